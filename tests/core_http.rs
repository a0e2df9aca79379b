//! Plain HTTP on the WebSocket listener (SPEC "Plain HTTP on the same listener"): `/health`,
//! `/metrics`, 404 for unknown paths, 400 for a non-upgrade request at the WebSocket path.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn health_reports_status_timestamp_uptime_and_connections() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let _a = connect(addr, 1, &[]);
    let b = connect(addr, 2, &[]);

    let r = http_get(addr, "/health", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("content-type").is_some_and(|v| v.contains("json")),
        "/health Content-Type should be JSON: {r:?}"
    );
    let v = r.json();
    assert_eq!(v["status"], "OK", "{v}");
    assert_rfc3339(v["timestamp"].as_str().expect("timestamp string"));
    let uptime = v["uptime"].as_f64().expect("uptime number");
    assert!((0.0..600.0).contains(&uptime), "uptime {uptime}");
    assert_eq!(v["connections"], 2, "{v}");

    b.close();
    wait_until(Duration::from_secs(3), "/health connections == 1", || {
        http_get(addr, "/health", &[]).json()["connections"] == 1
    });
}

#[test]
fn metrics_expose_connection_message_and_per_shard_series() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut clients: Vec<Client> = (1..=3).map(|u| connect(addr, u, &[])).collect();

    let r = http_get(addr, "/metrics", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("content-type").is_some_and(|v| v.starts_with("text/plain") || v.contains("openmetrics")),
        "/metrics Content-Type: {r:?}"
    );
    let text = r.body;
    let total = metric_sum(&text, "ws_connections_total")
        .unwrap_or_else(|| panic!("no ws_connections_total:\n{text}"));
    assert!(total >= 3.0, "ws_connections_total {total}");
    assert_eq!(metric_sum(&text, "ws_connections_current"), Some(3.0), "ws_connections_current:\n{text}");
    let shards = shard_connections_in(&text);
    assert_eq!(shards[0] + shards[1], 3, "per-shard gauges {shards:?}");

    let before =
        metric_sum(&text, "ws_messages_total").unwrap_or_else(|| panic!("no ws_messages_total:\n{text}"));
    for (i, c) in clients.iter_mut().enumerate() {
        c.roundtrip(&format!("m{i}"));
    }
    wait_until(Duration::from_secs(3), "ws_messages_total to count 3 more messages", || {
        metric_sum(&metrics(addr), "ws_messages_total").unwrap() >= before + 3.0
    });

    clients.pop().unwrap().close();
    wait_until(Duration::from_secs(3), "ws_connections_current == 2", || {
        metric_sum(&metrics(addr), "ws_connections_current") == Some(2.0)
    });
}

#[test]
fn metrics_carry_every_seed_004_series() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut c = connect(addr, 1, &[]);
    c.roundtrip("x");
    let text = metrics(addr);
    for name in [
        "ws_connections_total",
        "ws_connections_current",
        "ws_messages_total",
        "ws_errors_total",
        "ws_clients_current",
        "ws_message_size_bytes_bucket",
        "ws_latency_seconds_bucket",
        "customws_slow_consumer_closes_total",
    ] {
        assert!(!metric_samples(&text, name).is_empty(), "no samples of {name} in /metrics:\n{text}");
    }
}

#[test]
fn unknown_path_is_404_with_json_error() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let r = http_get(addr, "/nope", &[]);
    assert_eq!(r.status, 404, "{r:?}");
    assert_json_error_body(&r);
    // An upgrade attempt elsewhere than the WebSocket path is a 404 too.
    let auth = format!("Bearer {}", token(1, &[]));
    let r = raw_upgrade(addr, "/not-ws", &[("Authorization", &auth)]);
    assert_eq!(r.status, 404, "{r:?}");
    assert_json_error_body(&r);
}

#[test]
fn websocket_path_without_upgrade_is_400_with_json_error() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let auth = format!("Bearer {}", token(1, &[]));
    let r = http_get(addr, "/ws", &[("Authorization", &auth)]);
    assert_eq!(r.status, 400, "{r:?}");
    assert_json_error_body(&r);
}

#[test]
fn ws_path_is_configurable() {
    let server = start(|c| c.ws_path = "/custom".into());
    let addr = server.local_addr();
    let auth = format!("Bearer {}", token(1, &[]));
    let mut c = connect_with(addr, 1, "/custom", &[("Authorization", &auth)]);
    c.roundtrip("custom");
    let (status, _) = expect_refused(addr, "/ws", &[("Authorization", &auth)]);
    assert_eq!(status, 404);
}

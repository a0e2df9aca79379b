//! Seed 004 (presence system): a client written from that document, against this server in its
//! dev-only compatibility mode (`allow_insecure_user_id = true`, SPEC "Authentication"). The
//! document's client (Flutter `PresenceWebSocket`) connects to `ws://host:port?userId={userId}`
//! with no token, receives `CONNECT`, sends `HEARTBEAT` (answered `HEARTBEAT_ACK`),
//! `PRESENCE_UPDATE` and `DISCONNECT`; operators read `GET /health` and `GET /metrics`. The
//! messages below are the document's own examples.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use customws::ServerHandle;
use customws::config::PresenceScope;
use serde_json::{Value, json};

/// The document's examples, verbatim.
const HEARTBEAT: &str = r#"{
  "type": "HEARTBEAT",
  "timestamp": "2024-12-18T10:00:00Z"
}"#;
const DISCONNECT: &str = r#"{
  "type": "DISCONNECT",
  "timestamp": "2024-12-18T10:00:00Z"
}"#;

fn presence_server() -> ServerHandle {
    start(|c| c.allow_insecure_user_id = true)
}

/// The Flutter client's `Uri.parse('$baseUrl?userId=$userId')` with `baseUrl` =
/// `ws://host:port` — the request path is `/`.
fn flutter_connect(server: &ServerHandle, user_id: i64) -> Client {
    connect_with(server.local_addr(), user_id, &format!("/?userId={user_id}"), &[])
}

/// Asserts `s` is an RFC 3339 time within a few seconds of now (the server's clock, not an
/// echo of the client's `timestamp`).
fn assert_recent_rfc3339(s: &str) {
    assert_rfc3339(s);
    let t = humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
        .or_else(|_| humantime::parse_rfc3339(s))
        .unwrap_or_else(|e| panic!("unparsable timestamp {s:?}: {e}"));
    let now = SystemTime::now();
    let skew = now.duration_since(t).or_else(|_| t.duration_since(now)).unwrap();
    assert!(skew < Duration::from_secs(10), "timestamp {s:?} is not the server's current time");
}

/// The `CONNECT` greeting: `{"type":"CONNECT","userId":…,"timestamp":…}`, exactly.
fn assert_connect(v: &Value, user_id: i64) {
    let o = v.as_object().unwrap_or_else(|| panic!("CONNECT must be an object: {v}"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["timestamp", "type", "userId"], "{v}");
    assert_eq!(v["type"], "CONNECT", "{v}");
    // Choice: the document's example shows `"userId": "user123"`, but SPEC's identities are
    // int64 (`?userId=<int>`; a non-integer closes 1002), so the greeting carries the number.
    assert_eq!(v["userId"], user_id, "{v}");
    assert_recent_rfc3339(v["timestamp"].as_str().unwrap_or_else(|| panic!("timestamp string: {v}")));
}

#[test]
fn the_documented_url_connects_and_is_greeted_with_connect() {
    let server = presence_server();
    // `ws://tu-dominio:3000?userId={userId}`: path `/`.
    let mut a = flutter_connect(&server, 42);
    assert_connect(&a.recv_json(), 42);
    // The same at the tier's own path.
    let mut b = connect_with(server.local_addr(), 43, "/ws?userId=43", &[]);
    assert_connect(&b.recv_json(), 43);
    // The identity is the userId: P2P from 42 reaches 43 as fromUserId 42.
    a.send_p2p_acked(43, "p", &json!({"hi": 1}));
    let ev = b.recv_of_type("data_event");
    assert_eq!(ev["fromUserId"], 42, "{ev}");
}

/// Sends a WebSocket upgrade for `path` on a raw socket and returns what the server writes,
/// up to its first close frame (or EOF, or 2 s).
fn raw_exchange(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = tcp(addr);
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in UPGRADE_HEADERS {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return data,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
        let frames_from = data.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |e| e + 4);
        if close_code(&parse_frames(&data[frames_from..])).is_some() {
            return data;
        }
    }
}

#[test]
fn missing_or_non_integer_user_id_completes_the_handshake_then_closes_1002() {
    // "1002: Error de protocolo (userId faltante)"; "userId inválido: La conexión será
    // rechazada" — SPEC: the handshake completes (101), then close 1002.
    let server = presence_server();
    let addr = server.local_addr();
    for path in ["/", "/ws", "/?userId=", "/?userId=user123", "/ws?userId=12abc", "/?userId=1.5", "/?user=4"]
    {
        // On the wire: a 101, then a close frame with 1002.
        let data = raw_exchange(addr, path);
        let head_end = data.windows(4).position(|w| w == b"\r\n\r\n");
        let head = String::from_utf8_lossy(&data[..head_end.map_or(0, |e| e + 4)]).into_owned();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "{path}: expected `HTTP/1.1 101 …` then a close frame, got {:?}",
            String::from_utf8_lossy(&data)
        );
        let frames = parse_frames(&data[head.len()..]);
        assert_eq!(close_code(&frames), Some(1002), "{path}: frames after the 101: {frames:?}");

        // And as a WebSocket client sees it.
        let (ws, resp) = try_connect_with(addr, path, &[])
            .unwrap_or_else(|e| panic!("{path}: the upgrade must complete (101), got {e:?}"));
        let mut c = Client { ws, user_id: 0, response: resp };
        let reason = c.expect_close(1002);
        assert!(!reason.is_empty(), "{path}: the close reason should say why");
    }
    wait_until(Duration::from_secs(3), "the refused connections to be gone", || {
        metric_sum(&metrics(addr), "ws_connections_current") == Some(0.0)
    });
}

#[test]
fn heartbeat_is_answered_with_heartbeat_ack() {
    let server = presence_server();
    let mut c = flutter_connect(&server, 7);
    assert_connect(&c.recv_json(), 7);
    for _ in 0..3 {
        c.send_json(HEARTBEAT);
        let v = c.recv_json();
        let o = v.as_object().unwrap_or_else(|| panic!("{v}"));
        assert_eq!(o.len(), 2, "HEARTBEAT_ACK is {{type, timestamp}}: {v}");
        assert_eq!(v["type"], "HEARTBEAT_ACK", "{v}");
        // The server's time, not the document's 2024 example echoed back.
        assert_recent_rfc3339(v["timestamp"].as_str().unwrap_or_else(|| panic!("{v}")));
    }
}

#[test]
fn presence_update_with_metadata_reaches_watchers_as_presence_event() {
    let server = presence_server();
    let addr = server.local_addr();
    let mut p = flutter_connect(&server, 42);
    assert_connect(&p.recv_json(), 42);
    // A customws client (JWT) watching user 42.
    let mut w = connect(addr, 10, &[]);
    w.send_value(&json!({"pid": "s", "type": "presence_subscribe", "payload": {"userIds": [42]}}));
    let mut first: Vec<Value> = (0..2).map(|_| w.recv_json()).collect();
    first.sort_by_key(|v| v["type"].as_str().map(str::to_owned));
    assert_eq!(first[0]["payload"]["status"], "online", "{:?}", first);
    assert_eq!(first[1]["type"], "server_ack", "{:?}", first);

    // The document's example, with a concrete status and metadata.
    p.send_json(
        r#"{
  "type": "PRESENCE_UPDATE",
  "payload": {
    "status": "away",
    "metadata": {"device": "mobile", "battery": 0.42}
  },
  "timestamp": "2024-12-18T10:00:00Z"
}"#,
    );
    let v = w.recv_of_type("presence_event");
    assert_eq!(v["fromUserId"], 42, "{v}");
    assert_eq!(v["payload"]["userId"], 42, "{v}");
    assert_eq!(v["payload"]["status"], "away", "{v}");
    // `metadata` is the context of SPEC's presence model.
    assert_eq!(v["payload"]["context"], json!({"device": "mobile", "battery": 0.42}), "{v}");
    assert_rfc3339(v["payload"]["timestamp"].as_str().unwrap());

    // The Flutter `updatePresence`: no metadata; Dart's `toIso8601String()` (no zone).
    p.send_json(
        r#"{"type":"PRESENCE_UPDATE","payload":{"status":"busy"},"timestamp":"2024-12-18T10:00:00.000"}"#,
    );
    let v = w.recv_of_type("presence_event");
    assert_eq!(v["payload"]["status"], "busy", "{v}");
    assert_eq!(v["payload"]["context"], Value::Null, "{v}");
    // The presence client got no reply (the document defines none for PRESENCE_UPDATE).
    p.send_json(HEARTBEAT);
    assert_eq!(p.recv_json()["type"], "HEARTBEAT_ACK");
}

#[test]
fn with_presence_scope_all_every_presence_client_sees_the_update() {
    // Choice: the document's presence system tells every connected client. SPEC keeps that as
    // `presence_scope = "all"` (small deployments); by default only watchers and room members
    // get it (no O(N²) fan-out), as the test above shows.
    let server = start(|c| {
        c.allow_insecure_user_id = true;
        c.presence_scope = PresenceScope::All;
    });
    let mut a = flutter_connect(&server, 1);
    assert_connect(&a.recv_json(), 1);
    let mut b = flutter_connect(&server, 2);
    assert_connect(&b.recv_json(), 2);
    a.send_json(
        r#"{"type":"PRESENCE_UPDATE","payload":{"status":"busy"},"timestamp":"2024-12-18T10:00:00Z"}"#,
    );
    loop {
        // b may first see automatic `online` events.
        let v = b.recv_of_type("presence_event");
        if v["payload"]["status"] == "busy" {
            assert_eq!(v["payload"]["userId"], 1, "{v}");
            break;
        }
        assert_eq!(v["payload"]["status"], "online", "{v}");
    }
}

#[test]
fn disconnect_closes_with_1000() {
    let server = presence_server();
    let addr = server.local_addr();
    let mut c = flutter_connect(&server, 9);
    assert_connect(&c.recv_json(), 9);
    c.send_json(DISCONNECT);
    c.expect_close(1000);
    wait_until(Duration::from_secs(3), "the connection to be gone", || {
        metric_sum(&metrics(addr), "ws_connections_current") == Some(0.0)
    });
}

#[test]
fn health_reports_status_timestamp_uptime_and_connections() {
    let server = presence_server();
    let addr = server.local_addr();
    let mut a = flutter_connect(&server, 1);
    let mut b = flutter_connect(&server, 2);
    assert_connect(&a.recv_json(), 1);
    assert_connect(&b.recv_json(), 2);
    let r = http_get(addr, "/health", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["status"], "OK", "{v}");
    assert_recent_rfc3339(v["timestamp"].as_str().unwrap_or_else(|| panic!("timestamp: {v}")));
    // The document's example shows `"uptime": 3600`: whole seconds.
    assert!(v["uptime"].as_u64().is_some_and(|u| u < 60), "uptime in seconds since start: {v}");
    // SPEC adds `connections` to the document's fields.
    assert_eq!(v["connections"], 2, "{v}");
    drop(b);
    wait_until(Duration::from_secs(3), "/health to count 1 connection", || {
        http_get(addr, "/health", &[]).json()["connections"] == 1
    });
}

#[test]
fn metrics_has_the_documented_series_and_they_move() {
    let server = presence_server();
    let addr = server.local_addr();
    let mut a = flutter_connect(&server, 1);
    let mut a2 = flutter_connect(&server, 1);
    let mut b = flutter_connect(&server, 2);
    for c in [&mut a, &mut a2, &mut b] {
        let id = c.user_id;
        assert_connect(&c.recv_json(), id);
    }
    let before = metrics(addr);
    for (series, kind) in [
        ("ws_connections_total", "counter"),
        ("ws_connections_current", "gauge"),
        ("ws_messages_total", "counter"),
        ("ws_errors_total", "counter"),
        ("ws_clients_current", "gauge"),
        ("ws_message_size_bytes", "histogram"),
        ("ws_latency_seconds", "histogram"),
    ] {
        let family = series.trim_end_matches("_total");
        assert!(
            before
                .lines()
                .any(|l| l == format!("# TYPE {family} {kind}") || l == format!("# TYPE {series} {kind}")),
            "no `# TYPE {series} {kind}` line in /metrics:\n{before}"
        );
    }
    assert_eq!(metric_sum(&before, "ws_connections_current"), Some(3.0), "{before}");
    assert_eq!(metric_sum(&before, "ws_clients_current"), Some(2.0), "unique users: {before}");
    assert!(metric_sum(&before, "ws_connections_total").is_some_and(|n| n >= 3.0), "{before}");
    for h in ["ws_message_size_bytes", "ws_latency_seconds"] {
        assert!(metric_sum(&before, &format!("{h}_bucket")).is_some(), "{h} buckets: {before}");
        assert!(metric_sum(&before, &format!("{h}_sum")).is_some(), "{h}_sum: {before}");
    }

    // Messages are counted and sized; an error is counted.
    let count = |text: &str, name: &str| metric_sum(text, name).unwrap_or(0.0);
    a.send_json(HEARTBEAT);
    assert_eq!(a.recv_json()["type"], "HEARTBEAT_ACK");
    b.send_json("not json");
    assert_eq!(b.recv_json()["type"], "error_notification");
    let after = metrics(addr);
    assert!(count(&after, "ws_messages_total") >= count(&before, "ws_messages_total") + 2.0, "{after}");
    assert!(
        count(&after, "ws_message_size_bytes_count") >= count(&before, "ws_message_size_bytes_count") + 2.0,
        "{after}"
    );
    assert!(
        count(&after, "ws_latency_seconds_count") > count(&before, "ws_latency_seconds_count"),
        "{after}"
    );
    assert!(count(&after, "ws_errors_total") > count(&before, "ws_errors_total"), "{after}");
}

#[test]
fn without_the_dev_mode_user_id_alone_is_refused_401() {
    // The mode is off by default (SPEC: dev-only).
    let server = start(|_| {});
    let (status, _) = expect_refused(server.local_addr(), "/ws?userId=42", &[]);
    assert_eq!(status, 401);
    let (status, _) = expect_refused(server.local_addr(), "/?userId=42", &[]);
    assert_ne!(status, 101);
}

#[test]
fn token_clients_are_unaffected_by_the_dev_mode() {
    let server = presence_server();
    // A JWT client is not greeted with CONNECT: its first message is its own answer.
    let mut c = connect(server.local_addr(), 5, &[]);
    c.roundtrip("first");
    c.send_json(HEARTBEAT);
    assert_eq!(c.recv_json()["type"], "HEARTBEAT_ACK");
}

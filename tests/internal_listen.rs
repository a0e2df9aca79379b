//! `internal_listen` (operator issue #12, item 2): `/metrics`, `/health` and `/ready` move off
//! the public port when it is set; `/ready` answers 503 from the first moment of a shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn internal_listener_serves_ops_endpoints_and_the_public_port_does_not() {
    let server = start(|c| c.internal_listen = Some("127.0.0.1:0".parse().unwrap()));
    let public = server.local_addr();
    let internal = server.internal_addr().expect("internal_listen is set");
    assert_ne!(internal, public);
    let _client = connect(public, 1, &[]);

    let health = http_get(internal, "/health", &[]);
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(health.json()["status"], "OK");
    let metrics = http_get(internal, "/metrics", &[]);
    assert_eq!(metrics.status, 200);
    assert_eq!(metric_sum(&metrics.body, "ws_connections_current"), Some(1.0), "{}", metrics.body);
    let ready = http_get(internal, "/ready", &[]);
    assert_eq!((ready.status, ready.json()), (200, json!({"ready": true})));
    assert_eq!(http_get(internal, "/ws", &[]).status, 404);
    assert_eq!(http_raw(internal, "POST /ready HTTP/1.1\r\nContent-Length: 0\r\n\r\n").status, 405);

    for path in ["/health", "/metrics", "/ready"] {
        let answer = http_get(public, path, &[]);
        assert_eq!(answer.status, 404, "{path} must not be served on the public port: {}", answer.body);
    }
}

#[test]
fn without_internal_listen_the_public_port_serves_them() {
    let server = start(|_| {});
    assert_eq!(server.internal_addr(), None);
    let public = server.local_addr();
    assert_eq!(http_get(public, "/health", &[]).status, 200);
    assert_eq!(http_get(public, "/metrics", &[]).status, 200);
    let ready = http_get(public, "/ready", &[]);
    assert_eq!((ready.status, ready.json()), (200, json!({"ready": true})));
}

#[test]
fn ready_turns_503_when_a_shutdown_begins() {
    let server = start(|c| {
        c.internal_listen = Some("127.0.0.1:0".parse().unwrap());
        c.shutdown_timeout = Duration::from_secs(3);
    });
    let internal = server.internal_addr().unwrap();
    // A client that never answers the server's close keeps the drain going until the deadline.
    let _silent = raw_ws_connect(server.local_addr(), &token(1, &[]), None);
    assert_eq!(http_get(internal, "/ready", &[]).status, 200);
    let begun = Instant::now();
    server.shutdown();
    let ready = http_get(internal, "/ready", &[]);
    assert_eq!((ready.status, ready.json()), (503, json!({"ready": false})));
    assert!(begun.elapsed() < Duration::from_secs(1), "/ready answered 503 only after {:?}", begun.elapsed());
    // Health stays cheap and available while draining.
    assert_eq!(http_get(internal, "/health", &[]).status, 200);
    server.wait();
    assert!(std::net::TcpStream::connect(internal).is_err(), "the internal listener stops with the server");
}

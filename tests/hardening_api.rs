//! Hardening of the backend HTTP API (issue #9, defect 3): the API key is checked on the
//! request head, before any body is read and without `100 Continue`; an unauthenticated
//! connection buffers its head at most; chunked bodies are accepted (bounded like any body);
//! `api_max_connections` refuses API connections beyond it without touching WebSocket
//! handshakes.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::api::*;
use common::*;
use serde_json::{Value, json};

/// Reads what the server sends until it closes (or `within` passes); the bytes and whether
/// the server closed.
fn read_to_close(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (got, false);
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return (got, false),
            Err(_) => return (got, true),
        }
    }
}

/// Reads one response (head and `Content-Length` body) within `within`; panics naming what
/// arrived otherwise.
fn answer_within(s: &mut TcpStream, within: Duration) -> Answer {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some((answer, _)) = parse_answer(&got) {
            return answer;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no complete response within {within:?}; got {:?}",
            String::from_utf8_lossy(&got)
        );
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => panic!("closed before a complete response; got {:?}", String::from_utf8_lossy(&got)),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading a response: {e}; got {:?}", String::from_utf8_lossy(&got)),
        }
    }
}

fn keyless_post_head(api: SocketAddr, length: usize, extra: &str) -> String {
    format!(
        "POST /api/v1/send HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n"
    )
}

/// Resident memory of this process, KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn keyless_expect_continue_gets_401_and_no_100() {
    let (_server, _ws, api) = api_server(|_| {});
    let mut s = TcpStream::connect(api).unwrap();
    s.write_all(keyless_post_head(api, 40, "Expect: 100-continue\r\n").as_bytes()).unwrap();
    // The body is never sent: the client waits for 100 Continue, which must not come.
    let (got, closed) = read_to_close(&mut s, Duration::from_secs(3));
    let text = String::from_utf8_lossy(&got);
    assert!(!text.contains(" 100 "), "100 Continue sent to a client without the key: {text:?}");
    assert!(text.starts_with("HTTP/1.1 401 "), "expected a 401 before any body: {text:?}");
    assert!(text.contains("WWW-Authenticate: apikey"), "{text:?}");
    assert!(closed, "the connection must close after the 401 (its body was never read): {text:?}");

    // With the key, the same request still gets its 100 Continue and then its answer.
    let mut s = TcpStream::connect(api).unwrap();
    let body = r#"{"userId":1,"message":{"type":"t"}}"#;
    let head = format!(
        "POST /api/v1/send HTTP/1.1\r\nHost: {api}\r\nAuthorization: apikey {KEY}\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).unwrap();
    let answer = answer_within(&mut s, Duration::from_secs(3));
    assert_eq!((answer.status, answer.body["reason"].as_str()), (404, Some("offline")), "{}", answer.raw);
}

#[test]
fn keyless_body_is_answered_before_it_is_sent_and_never_buffered() {
    let (_server, _ws, api) = api_server(|_| {});
    // A head announcing ~1 MB: the 401 must come for the head alone.
    let mut s = TcpStream::connect(api).unwrap();
    s.write_all(keyless_post_head(api, 1_000_000, "").as_bytes()).unwrap();
    let started = Instant::now();
    let answer = answer_within(&mut s, Duration::from_secs(3));
    assert_status(&answer, 401);
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(started.elapsed() < Duration::from_secs(2), "401 took {:?}", started.elapsed());
    // The body sent after the answer is discarded and the connection ends.
    let body = vec![b'x'; 1_000_000];
    let _ = s.write_all(&body);
    let (_, closed) = read_to_close(&mut s, Duration::from_secs(5));
    assert!(closed, "the server must close a connection whose key was wrong");

    // 300 keyless connections each pushing 256 KiB of a 1 MB body at once (the report:
    // resident memory 3.9 → 310 MiB) leave the server's memory flat: at most the head each.
    let before = rss_kib();
    let mut streams = Vec::new();
    let chunk = vec![b'y'; 256 * 1024];
    for _ in 0..300 {
        let mut s = TcpStream::connect(api).unwrap();
        s.write_all(keyless_post_head(api, 1_000_000, "").as_bytes()).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.write(&chunk);
        s.set_nonblocking(false).unwrap();
        streams.push(s);
    }
    for s in &mut streams {
        assert_status(&answer_within(s, Duration::from_secs(5)), 401);
    }
    let grown_mib = rss_kib().saturating_sub(before) as f64 / 1024.0;
    eprintln!("300 keyless 1 MB uploads: resident memory grew {grown_mib:.1} MiB");
    assert!(grown_mib < 32.0, "resident memory grew {grown_mib:.1} MiB for 300 keyless uploads");
}

/// `body` as chunks of `size` bytes, with a chunk extension on the first and a trailer.
fn chunked(body: &str, size: usize) -> String {
    let mut out = String::new();
    for (i, part) in body.as_bytes().chunks(size).enumerate() {
        let ext = if i == 0 { ";note=first" } else { "" };
        out.push_str(&format!("{:x}{ext}\r\n{}\r\n", part.len(), std::str::from_utf8(part).unwrap()));
    }
    out.push_str("0\r\nX-Trailer: yes\r\n\r\n");
    out
}

fn chunked_post(api: SocketAddr, path: &str, encoded: &str, close: bool) -> String {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "POST {path} HTTP/1.1\r\nHost: {api}\r\nAuthorization: apikey {KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n{connection}\r\n{encoded}"
    )
}

#[test]
fn chunked_send_is_delivered() {
    let (_server, ws, api) = api_server(|_| {});
    let mut c = connect(ws, 7, &[]);
    let payload = r#"{"text": "chunked works", "n": [1, 2, 3]}"#;
    let body = format!(r#"{{"userId": 7, "message": {{"type": "data_event", "payload": {payload}}}}}"#);

    // Two chunked requests on one keep-alive connection, the second written byte by byte.
    let mut s = TcpStream::connect(api).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(chunked_post(api, "/api/v1/send", &chunked(&body, 7), false).as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let answer = read_answer(&mut s, &mut buf);
    assert_ok(&answer);
    assert_eq!(answer.body, json!({"delivered": 1}));
    assert_raw_payload(&c.recv_text(), payload);
    for byte in chunked_post(api, "/api/v1/send", &chunked(&body, 64), true).as_bytes() {
        s.write_all(&[*byte]).unwrap();
    }
    let answer = read_answer(&mut s, &mut buf);
    assert_eq!(answer.body, json!({"delivered": 1}), "{}", answer.raw);
    assert_raw_payload(&c.recv_text(), payload);

    // The decoded size is bounded like a Content-Length body: 413 past 1 MiB.
    let mut s = TcpStream::connect(api).unwrap();
    let big = format!(r#"{{"userId": 7, "message": {{"type": "t", "payload": "{}"}}}}"#, "z".repeat(1 << 20));
    s.write_all(chunked_post(api, "/api/v1/send", &chunked(&big, 60_000), false).as_bytes()).unwrap();
    assert_status(&answer_within(&mut s, Duration::from_secs(5)), 413);

    // Other transfer codings, and both framings at once, are refused.
    let mut s = TcpStream::connect(api).unwrap();
    let gzip = format!(
        "POST /api/v1/send HTTP/1.1\r\nHost: {api}\r\nAuthorization: apikey {KEY}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    );
    s.write_all(gzip.as_bytes()).unwrap();
    assert_status(&answer_within(&mut s, Duration::from_secs(5)), 501);
    let mut s = TcpStream::connect(api).unwrap();
    let both = format!(
        "POST /api/v1/send HTTP/1.1\r\nHost: {api}\r\nAuthorization: apikey {KEY}\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
    );
    s.write_all(both.as_bytes()).unwrap();
    assert_status(&answer_within(&mut s, Duration::from_secs(5)), 400);
    c.expect_silence(Duration::from_millis(50));
}

fn refused_total(ws: SocketAddr) -> f64 {
    metric_sum(&metrics(ws), "customws_api_refused_connections_total").unwrap_or(0.0)
}

#[test]
fn api_connections_beyond_the_cap_are_refused_and_websockets_still_connect() {
    let (_server, ws, api) = api_server(|c| c.api_max_connections = 4);
    let mut held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(api).unwrap()).collect();
    // The held connections are idle: each next connection queues behind them in the backlog,
    // so the server has accepted all four before it sees the fifth.
    for _ in 0..3 {
        let mut over = TcpStream::connect(api).unwrap();
        let started = Instant::now();
        let (got, closed) = read_to_close(&mut over, Duration::from_secs(3));
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 503 "), "expected 503 over the cap: {text:?}");
        assert!(closed && started.elapsed() < Duration::from_secs(1), "refusal took {:?}", started.elapsed());
    }
    assert_eq!(refused_total(ws), 3.0, "refusals are counted in /metrics");
    // WebSocket handshakes are not affected by the API's cap.
    let mut clients: Vec<Client> = (0..8).map(|u| connect(ws, 500 + u, &[])).collect();
    clients[0].roundtrip("p1");
    // Once a held connection goes, the API serves again.
    drop(held.pop());
    wait_until(Duration::from_secs(5), "the API to accept again", || {
        let mut s = TcpStream::connect(api).unwrap();
        let req = format!(
            "GET /api/v1/users/500 HTTP/1.1\r\nHost: {api}\r\nAuthorization: apikey {KEY}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).unwrap();
        let (got, _) = read_to_close(&mut s, Duration::from_secs(3));
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200 ")
    });
    let answer = get(api, "/api/v1/users/500");
    assert_eq!(answer.body["online"], Value::Bool(true), "{}", answer.raw);
}

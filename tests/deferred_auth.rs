//! `Application::authenticate_deferred`: the bound on waiting authentications per shard, a
//! client that leaves freeing its slot, a dropped `PendingAuth` failing closed, the handshake
//! timeout, and frames sent before the answer being handled after it, in order.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use common::*;
use customws::prelude::*;

/// Hands every connection's `PendingAuth` to the test, which answers it (or not).
struct HandOver(Mutex<Sender<PendingAuth>>);

impl Application for HandOver {
    fn authenticate_deferred(
        &self,
        _request: &Request,
        _jwt: Result<Identity, AuthError>,
        defer: Defer<'_>,
    ) -> Authentication {
        let _ = self.0.lock().unwrap().send(defer.later());
        Authentication::Later
    }
}

fn server(tweak: impl FnOnce(&mut Config)) -> (ServerHandle, Receiver<PendingAuth>) {
    let (tx, rx) = channel();
    let mut config = test_config();
    config.shards = 1;
    tweak(&mut config);
    let app = std::sync::Arc::new(HandOver(Mutex::new(tx)));
    (customws::start_with(config, app).unwrap(), rx)
}

fn admission(user_id: i64) -> Admission {
    let identity = Identity { user_id, roles: Roles::default(), claims: "{}".into(), expires_at: u64::MAX };
    Admission { identity, user_data: None }
}

fn next(rx: &Receiver<PendingAuth>) -> PendingAuth {
    rx.recv_timeout(READ_TIMEOUT).expect("the application was asked to authenticate")
}

/// Sends an upgrade request (plus `after`, the client's first bytes) on a new socket.
fn raw_upgrade_request(addr: SocketAddr, after: &[u8]) -> TcpStream {
    let mut s = tcp(addr);
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(after);
    s.write_all(&bytes).unwrap();
    s
}

/// Reads the response head; returns its status and the bytes after it read so far.
fn read_head(s: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).into_owned();
            let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            return (status, data[end + 4..].to_vec());
        }
        let n = s.read(&mut buf).expect("reading the response head");
        assert!(n > 0, "EOF before a response head: {:?}", String::from_utf8_lossy(&data));
        data.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn frames_sent_before_the_answer_are_handled_after_it() {
    let (server, rx) = server(|_| {});
    let first =
        masked_frame(true, 1, r#"{"pid":"early","type":"generic_request","payload":{"n":1}}"#.as_bytes());
    let mut s = raw_upgrade_request(server.local_addr(), &first);
    let pending = next(&rx);
    // Nothing is answered while the application decides.
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut probe = [0u8; 1];
    assert!(s.read(&mut probe).is_err(), "the server answered before the authentication did");
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    pending.admit(admission(41));
    let (status, mut rest) = read_head(&mut s);
    assert_eq!(status, 101);
    while !String::from_utf8_lossy(&rest).contains("generic_response") {
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "EOF before the early frame's answer");
        rest.extend_from_slice(&buf[..n]);
    }
    let frames = parse_frames(&rest);
    let answer: serde_json::Value = serde_json::from_slice(&frames[0].1).unwrap();
    assert_eq!((answer["pid"].as_str(), answer["type"].as_str()), (Some("early"), Some("generic_response")));
}

#[test]
fn pending_authentications_are_bounded_and_a_leaving_client_frees_its_slot() {
    let (server, rx) = server(|c| c.auth_max_pending = 1);
    let addr = server.local_addr();
    let x = raw_upgrade_request(addr, b"");
    let x_pending = next(&rx);
    // The shard's one slot is taken: the next handshake is refused 503 at once.
    let mut y = raw_upgrade_request(addr, b"");
    let y_pending = next(&rx);
    assert_eq!(read_head(&mut y).0, 503);
    y_pending.admit(admission(2)); // too late: ignored
    // X leaves: its slot is free again (the shard sees the EOF before or after the next
    // attempt; an attempt it refused is retried).
    drop(x);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "the slot of the client that left was never freed");
        let mut z = raw_upgrade_request(addr, b"");
        next(&rx).admit(admission(3));
        match read_head(&mut z).0 {
            101 => break,
            503 => continue,
            other => panic!("unexpected status {other}"),
        }
    }
    x_pending.admit(admission(1)); // the client is gone: ignored
}

#[test]
fn connect_with_in_a_helper_thread_is_admitted() {
    // The ordinary client path (tungstenite) with an answer from another thread.
    let (server, rx) = server(|_| {});
    let addr = server.local_addr();
    let client = std::thread::spawn(move || connect_with(addr, 9, "/ws", &[]));
    let pending = next(&rx);
    std::thread::spawn(move || pending.admit(admission(9))).join().unwrap();
    client.join().unwrap().roundtrip("ok");
}

#[test]
fn a_dropped_pending_auth_refuses_and_the_handshake_timeout_still_applies() {
    let (server, rx) = server(|c| c.handshake_timeout = Duration::from_millis(300));
    let addr = server.local_addr();
    let mut s = raw_upgrade_request(addr, b"");
    drop(next(&rx));
    let (status, body) = read_head(&mut s);
    assert_eq!(status, 500, "{}", String::from_utf8_lossy(&body));
    // An answer that never comes: the connection goes at handshake_timeout.
    let mut t = raw_upgrade_request(addr, b"");
    let started = Instant::now();
    let late = next(&rx);
    let (ended, _, bytes) = read_until_closed(&mut t, Duration::from_secs(3));
    assert!(ended.is_some(), "still open after 3 s");
    assert!(bytes.is_empty(), "{:?}", String::from_utf8_lossy(&bytes));
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    late.admit(admission(5)); // ignored
}

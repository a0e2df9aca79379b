//! The backend HTTP API (`api_listen`, `Authorization: apikey <key>`) against real WebSocket
//! clients: sends, acknowledged sends, requests, send_many, broadcast with exclusions, user
//! queries with presence, disconnects, errors, keep-alive, and 1,000 acknowledged sends waiting
//! at once on the API's single thread.

mod common;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use common::api::*;
use common::*;
use serde_json::{Value, json};

/// The 1,000-call test counts the process's API threads, so it runs alone: it takes this
/// lock for writing, every other test for reading.
static EXCLUSIVE: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner())
}

/// [`post`] on another thread; the answer comes with the time it took.
fn spawn_post(api: SocketAddr, path: &'static str, body: Value) -> JoinHandle<(Answer, Duration)> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let answer = post(api, path, &body);
        (answer, started.elapsed())
    })
}

/// Next message of the client, which must be a server-initiated one with a pid.
fn recv_with_pid(c: &mut Client, ty: &str) -> (String, Value) {
    let msg = c.recv_of_type(ty);
    let pid =
        msg["pid"].as_str().unwrap_or_else(|| panic!("no pid in a waited-for message: {msg}")).to_owned();
    (pid, msg)
}

/// A `GET /api/v1/users/{id}` answer: must be 200 with exactly `{"userId", "online",
/// "connections", "presence"}` and a presence of exactly `{"status", "context", "since"}`
/// (`since` RFC 3339); returns the body without `presence`, and the presence.
fn split_presence(answer: &Answer) -> (Value, Value) {
    assert_ok(answer);
    let mut body = answer.body.clone();
    let object = body.as_object_mut().unwrap_or_else(|| panic!("not an object: {}", answer.raw));
    let presence = object.remove("presence").unwrap_or_else(|| panic!("no presence: {}", answer.raw));
    let mut keys: Vec<&String> = presence.as_object().expect("presence must be an object").keys().collect();
    keys.sort_unstable();
    assert_eq!(keys, ["context", "since", "status"], "{}", answer.raw);
    assert_rfc3339(
        presence["since"].as_str().unwrap_or_else(|| panic!("since must be text: {}", answer.raw)),
    );
    (body, presence)
}

/// `since` of a presence as a time.
fn since(presence: &Value) -> SystemTime {
    humantime::parse_rfc3339(presence["since"].as_str().unwrap()).expect("since must be RFC 3339 UTC")
}

fn client_ack(c: &mut Client, pid: &str, status: &str, error: Option<Value>) {
    let mut payload = json!({ "acknowledgedPid": pid, "status": status });
    if let Some(error) = error {
        payload["error"] = error;
    }
    c.send_value(&json!({ "type": "client_ack", "payload": payload }));
}

// ---------------------------------------------------------------------------------------------

#[test]
fn api_is_off_without_a_key() {
    let _g = shared();
    let server = start(|c| c.api_listen = "127.0.0.1:0".parse().unwrap());
    assert_eq!(server.api_addr(), None);
}

#[test]
fn api_key_is_required() {
    let _g = shared();
    let (server, _ws, api) = api_server(|_| {});
    assert_ne!(api, server.local_addr(), "the API has its own listener");
    let body = r#"{"userId":1,"message":{"type":"t"}}"#;
    for key in [None, Some("apikey wrong"), Some("apikey kk"), Some("Bearer k"), Some("k")] {
        let answer = call(api, "POST", "/api/v1/send", key, Some(body));
        assert_status(&answer, 401);
        assert_eq!(answer.header("www-authenticate"), Some("apikey"));
        let answer = call(api, "GET", "/api/v1/users/1", key, None);
        assert_status(&answer, 401);
    }
    assert_ok(&call(api, "GET", "/api/v1/users/1", Some("ApiKey k"), None));
}

#[test]
fn send_reaches_every_connection_of_the_user() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});
    let mut a = connect(ws, 1, &[]);
    let mut b = connect(ws, 1, &[]);
    let payload = r#"{"n": 1, "list": [1,2 ,3]}"#;
    let body = format!(
        r#"{{"userId": 1, "message": {{"type": "data_event", "payload": {payload}, "fromUserId": 42}}}}"#
    );
    let answer = call(api, "POST", "/api/v1/send", Some("apikey k"), Some(&body));
    assert_ok(&answer);
    assert_eq!(answer.body, json!({"delivered": 2}));
    for c in [&mut a, &mut b] {
        let raw = c.recv_text();
        assert_raw_payload(&raw, payload);
        let msg: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(msg["type"], "data_event", "{msg}");
        assert_eq!(msg["fromUserId"], 42, "{msg}");
        assert!(msg.get("pid").is_none(), "a plain send carries no pid: {msg}");
    }
}

#[test]
fn send_to_an_offline_user_is_404() {
    let _g = shared();
    let (_server, _ws, api) = api_server(|_| {});
    let answer = post(api, "/api/v1/send", &json!({"userId": 5, "message": {"type": "data_event"}}));
    assert_status(&answer, 404);
    assert_eq!(answer.body["reason"], "offline");
    let answer = post(api, "/api/v1/send", &json!({"userId": 5, "message": {"type": "t"}, "ack": true}));
    assert_status(&answer, 404);
    let answer = post(api, "/api/v1/request", &json!({"userId": 5, "message": {"type": "t"}}));
    assert_status(&answer, 404);
}

#[test]
fn send_with_ack_returns_the_clients_status() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});
    let mut c = connect(ws, 7, &[]);
    let body = json!({"userId": 7, "message": {"type": "data_event", "payload": {"x": 1}}, "ack": true});
    let pending = spawn_post(api, "/api/v1/send", body);
    let (pid, msg) = recv_with_pid(&mut c, "data_event");
    assert_eq!(msg["payload"], json!({"x": 1}));
    client_ack(&mut c, &pid, "read", None);
    let (answer, _) = pending.join().unwrap();
    assert_ok(&answer);
    assert_eq!(answer.body, json!({"delivered": 1, "ack": {"status": "read", "error": null}}));
}

#[test]
fn ack_with_a_client_error_reports_it() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});
    let mut c = connect(ws, 7, &[]);
    let body = json!({"userId": 7, "message": {"type": "data_event"}, "ack": true, "timeoutMs": 5000});
    let pending = spawn_post(api, "/api/v1/send", body);
    let (pid, _) = recv_with_pid(&mut c, "data_event");
    client_ack(&mut c, &pid, "error", Some(json!("storage full")));
    let (answer, _) = pending.join().unwrap();
    assert_ok(&answer);
    assert_eq!(answer.body["ack"], json!({"status": "error", "error": "storage full"}));
}

#[test]
fn ack_timeout_is_504() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});
    let mut c = connect(ws, 7, &[]);
    let body = json!({"userId": 7, "message": {"type": "data_event"}, "ack": true, "timeoutMs": 200});
    let pending = spawn_post(api, "/api/v1/send", body);
    recv_with_pid(&mut c, "data_event");
    let (answer, took) = pending.join().unwrap();
    assert_status(&answer, 504);
    assert_eq!(answer.body["reason"], "timeout");
    assert!(took >= Duration::from_millis(190), "answered 504 after only {took:?}");
    assert!(took < Duration::from_secs(2), "a 200 ms timeout answered after {took:?}");
    // The connection stays usable.
    c.roundtrip("after-timeout");
}

#[test]
fn ack_pending_when_the_client_disconnects_is_410_at_once() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});
    let mut c = connect(ws, 7, &[]);
    let body = json!({"userId": 7, "message": {"type": "data_event"}, "ack": true, "timeoutMs": 10000});
    let pending = spawn_post(api, "/api/v1/send", body);
    recv_with_pid(&mut c, "data_event");
    let closed_at = Instant::now();
    c.close();
    let (answer, _) = pending.join().unwrap();
    let after_close = closed_at.elapsed();
    assert_status(&answer, 410);
    assert_eq!(answer.body["reason"], "closed");
    assert!(after_close < Duration::from_secs(2), "the closed status came {after_close:?} after the close");
}

#[test]
fn request_returns_the_clients_whole_message() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});
    let mut c = connect(ws, 3, &[]);
    let body = json!({"userId": 3, "message": {"type": "get_location", "payload": {"precise": true}}});
    let pending = spawn_post(api, "/api/v1/request", body);
    let (pid, msg) = recv_with_pid(&mut c, "get_location");
    assert_eq!(msg["payload"], json!({"precise": true}));
    let reply = json!({"pid": pid, "type": "location", "payload": {"lat": 40.4, "lon": -3.7}, "extra": [1]});
    c.send_value(&reply);
    let (answer, _) = pending.join().unwrap();
    assert_ok(&answer);
    assert_eq!(answer.body, json!({ "response": reply }));
}

#[test]
fn outstanding_requests_answered_in_reverse_order_each_get_their_own() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});
    let mut c = connect(ws, 3, &[]);
    let pending: Vec<_> = (0..4)
        .map(|n| {
            let body = json!({"userId": 3, "message": {"type": "question", "payload": {"n": n}}});
            spawn_post(api, "/api/v1/request", body)
        })
        .collect();
    let mut asked = Vec::new();
    for _ in 0..4 {
        let (pid, msg) = recv_with_pid(&mut c, "question");
        asked.push((pid, msg["payload"]["n"].as_i64().unwrap()));
    }
    for (pid, n) in asked.iter().rev() {
        c.send_value(&json!({"pid": pid, "type": "answer", "payload": {"n": n, "square": n * n}}));
    }
    let pids: HashMap<i64, String> = asked.iter().map(|(pid, n)| (*n, pid.clone())).collect();
    for (n, pending) in pending.into_iter().enumerate() {
        let (answer, _) = pending.join().unwrap();
        assert_ok(&answer);
        let response = &answer.body["response"];
        let n = n as i64;
        assert_eq!(response["payload"], json!({"n": n, "square": n * n}), "request {n}: {}", answer.raw);
        assert_eq!(response["pid"].as_str(), Some(pids[&n].as_str()), "request {n}: {}", answer.raw);
    }
}

#[test]
fn request_timeout_is_504() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});
    let mut c = connect(ws, 3, &[]);
    let body = json!({"userId": 3, "message": {"type": "question"}, "timeoutMs": 200});
    let pending = spawn_post(api, "/api/v1/request", body);
    recv_with_pid(&mut c, "question");
    let (answer, took) = pending.join().unwrap();
    assert_status(&answer, 504);
    assert!(took >= Duration::from_millis(190) && took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn send_many_sums_the_connections() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});
    let mut clients = [connect(ws, 1, &[]), connect(ws, 1, &[]), connect(ws, 2, &[])];
    let body = json!({"userIds": [1, 2, 3], "message": {"type": "news", "payload": "hi"}});
    let answer = post(api, "/api/v1/send_many", &body);
    assert_ok(&answer);
    assert_eq!(answer.body, json!({"delivered": 3}));
    for c in &mut clients {
        assert_eq!(c.recv_of_type("news")["payload"], "hi");
    }
    let answer = post(api, "/api/v1/send_many", &json!({"userIds": [], "message": {"type": "news"}}));
    assert_eq!(answer.body, json!({"delivered": 0}));
}

#[test]
fn broadcast_skips_the_excluded_users() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});
    let mut one = connect(ws, 1, &[]);
    let mut two = connect(ws, 2, &[]);
    let mut three = connect(ws, 3, &[]);
    let body = json!({"message": {"type": "notice", "payload": {"v": 1}}, "exclude": [2]});
    let answer = post(api, "/api/v1/broadcast", &body);
    assert_ok(&answer);
    assert_eq!(answer.body, json!({"delivered": 2}));
    assert_eq!(one.recv_of_type("notice")["payload"], json!({"v": 1}));
    assert_eq!(three.recv_of_type("notice")["payload"], json!({"v": 1}));
    two.expect_silence(Duration::from_millis(200));
    let answer = post(api, "/api/v1/broadcast", &json!({"message": {"type": "notice"}}));
    assert_eq!(answer.body, json!({"delivered": 3}));
    for c in [&mut one, &mut two, &mut three] {
        c.recv_of_type("notice");
    }
}

#[test]
fn user_query_reports_the_connections() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});
    let _a = connect(ws, 11, &[]);
    let _b = connect(ws, 11, &[]);
    let answer = get(api, "/api/v1/users/11");
    assert_ok(&answer);
    let (rest, presence) = split_presence(&answer);
    assert_eq!(rest, json!({"userId": 11, "online": true, "connections": 2}));
    assert_eq!(presence["status"], "online", "{}", answer.raw);
    let answer = get(api, "/api/v1/users/12");
    let (rest, presence) = split_presence(&answer);
    assert_eq!(rest, json!({"userId": 12, "online": false, "connections": 0}));
    assert_eq!(presence["status"], "offline", "{}", answer.raw);
}

#[test]
fn user_query_reports_the_presence() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});

    // A user who never connected: offline, no context.
    let (rest, presence) = split_presence(&get(api, "/api/v1/users/22"));
    assert_eq!(rest, json!({"userId": 22, "online": false, "connections": 0}));
    assert_eq!((&presence["status"], &presence["context"]), (&json!("offline"), &Value::Null));

    // Connected: online, no context, since about the connect.
    let before = SystemTime::now();
    let mut c = connect(ws, 21, &[]);
    let (rest, presence) = split_presence(&get(api, "/api/v1/users/21"));
    assert_eq!(rest, json!({"userId": 21, "online": true, "connections": 1}));
    assert_eq!((&presence["status"], &presence["context"]), (&json!("online"), &Value::Null));
    let online_since = since(&presence);
    let slack = Duration::from_millis(5);
    assert!(online_since + slack >= before && online_since <= SystemTime::now() + slack, "{presence}");

    // A status with a context: the context comes back byte-for-byte. The update reaches the
    // home shard asynchronously, so poll for it.
    let context = r#"{"doc": 1, "tags": ["a", "b"],  "pos": {"x": 2.5}}"#;
    let update = format!(
        r#"{{"pid": "pu", "type": "presence_update", "payload": {{"status": "busy", "context": {context}}}}}"#
    );
    let before = SystemTime::now();
    c.send_json(&update);
    let ack = c.recv_json();
    assert_eq!((&ack["type"], &ack["payload"]["status"]), (&json!("server_ack"), &json!("ok")), "{ack}");
    let mut answer = get(api, "/api/v1/users/21");
    wait_until(Duration::from_secs(5), "user 21's presence to become busy", || {
        answer = get(api, "/api/v1/users/21");
        answer.body["presence"]["status"] == "busy"
    });
    let (rest, presence) = split_presence(&answer);
    assert_eq!(rest, json!({"userId": 21, "online": true, "connections": 1}));
    assert!(answer.raw.contains(&format!(r#""context":{context}"#)), "not byte-for-byte: {}", answer.raw);
    let busy_since = since(&presence);
    assert!(busy_since + slack >= before && busy_since <= SystemTime::now() + slack, "{presence}");
    assert!(busy_since >= online_since, "{presence}");

    // Once the last connection is gone: offline again, the stored status dropped.
    c.close();
    wait_until(Duration::from_secs(5), "user 21 offline", || {
        get(api, "/api/v1/users/21").body["online"] == false
    });
    let (rest, presence) = split_presence(&get(api, "/api/v1/users/21"));
    assert_eq!(rest, json!({"userId": 21, "online": false, "connections": 0}));
    assert_eq!((&presence["status"], &presence["context"]), (&json!("offline"), &Value::Null));
}

#[test]
fn deleting_connections_closes_them_with_1000() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});
    let mut a = connect(ws, 11, &[]);
    let mut b = connect(ws, 11, &[]);
    let mut other = connect(ws, 12, &[]);
    let answer = call(api, "DELETE", "/api/v1/users/11/connections", Some("apikey k"), None);
    assert_ok(&answer);
    assert_eq!(answer.body, json!({"disconnected": 2}));
    a.expect_close(1000);
    b.expect_close(1000);
    other.roundtrip("still-here");
    wait_until(Duration::from_secs(3), "user 11 offline", || {
        get(api, "/api/v1/users/11").body["online"] == false
    });
    let answer = call(api, "DELETE", "/api/v1/users/11/connections", Some("apikey k"), None);
    assert_eq!(answer.body, json!({"disconnected": 0}));
}

#[test]
fn bad_requests_are_answered_with_a_reason() {
    let _g = shared();
    let (_server, _ws, api) = api_server(|_| {});
    let key = Some("apikey k");
    let answer = call(api, "POST", "/api/v1/send", key, Some("{not json"));
    assert_status(&answer, 400);
    assert!(answer.error().contains("not valid JSON"), "{}", answer.raw);
    let answer = call(api, "POST", "/api/v1/send", key, None);
    assert_status(&answer, 400);
    let answer = post(api, "/api/v1/send", &json!({"message": {"type": "t"}}));
    assert_status(&answer, 400);
    assert!(answer.error().contains("userId"), "{}", answer.raw);
    let answer = post(api, "/api/v1/send", &json!({"userId": 1, "message": {"payload": 1}}));
    assert_status(&answer, 400);
    assert!(answer.error().contains("type"), "{}", answer.raw);
    let answer = post(api, "/api/v1/send_many", &json!({"userIds": "1", "message": {"type": "t"}}));
    assert_status(&answer, 400);
    let answer =
        post(api, "/api/v1/request", &json!({"userId": 1, "message": {"type": "t"}, "timeoutMs": 0}));
    assert_status(&answer, 400);
    assert!(answer.error().contains("timeoutMs"), "{}", answer.raw);
    assert_status(&get(api, "/api/v1/users/abc"), 400);
    assert_status(&get(api, "/api/v1/nope"), 404);
    assert_status(&get(api, "/ws"), 404);
    let answer = get(api, "/api/v1/send");
    assert_status(&answer, 405);
    assert_eq!(answer.header("allow"), Some("POST"));
    let answer = post(api, "/api/v1/rooms/lobby/publish", &json!({"message": {"type": "t"}}));
    assert_status(&answer, 400);
    assert!(answer.error().contains("body"), "a room publish names the missing body: {}", answer.raw);
    // An oversized body is refused from its Content-Length, before it is sent.
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
    s.write_all(b"POST /api/v1/send HTTP/1.1\r\nHost: x\r\nAuthorization: apikey k\r\nContent-Length: 2000000\r\n\r\n")
        .unwrap();
    let answer = read_answer(&mut s, &mut Vec::new());
    assert_status(&answer, 413);
    assert_eq!(answer.header("connection"), Some("close"));
}

#[test]
fn keep_alive_pipelining_and_expect_continue() {
    let _g = shared();
    let (_server, ws, api) = api_server(|_| {});
    let mut c = connect(ws, 4, &[]);
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
    let send = r#"{"userId":4,"message":{"type":"ping"}}"#;
    let one = format!(
        "POST /api/v1/send HTTP/1.1\r\nHost: x\r\nAuthorization: apikey k\r\nContent-Length: {}\r\n\r\n{send}",
        send.len()
    );
    let two = "GET /api/v1/users/4 HTTP/1.1\r\nHost: x\r\nAuthorization: apikey k\r\n\r\n";
    // Two requests in one write: answered in order on the same connection.
    s.write_all(format!("{one}{two}").as_bytes()).unwrap();
    let mut buf = Vec::new();
    let first = read_answer(&mut s, &mut buf);
    assert_eq!(first.body, json!({"delivered": 1}), "{}", first.raw);
    assert_eq!(first.header("connection"), Some("keep-alive"));
    let second = read_answer(&mut s, &mut buf);
    let (rest, presence) = split_presence(&second);
    assert_eq!(rest, json!({"userId": 4, "online": true, "connections": 1}), "{}", second.raw);
    assert_eq!(presence["status"], "online", "{}", second.raw);
    c.recv_of_type("ping");
    // curl's Expect: 100-continue for larger bodies.
    let head = format!(
        "POST /api/v1/send HTTP/1.1\r\nHost: x\r\nAuthorization: apikey k\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        send.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(send.as_bytes()).unwrap();
    let third = read_answer(&mut s, &mut buf);
    assert_eq!(third.body, json!({"delivered": 1}), "{}", third.raw);
    c.recv_of_type("ping");
}

#[test]
fn shutdown_fails_a_waiting_call_with_503() {
    let _g = shared();
    let (server, ws, api) = api_server(|_| {});
    let mut c = connect(ws, 7, &[]);
    let body = json!({"userId": 7, "message": {"type": "data_event"}, "ack": true, "timeoutMs": 10000});
    let pending = spawn_post(api, "/api/v1/send", body);
    recv_with_pid(&mut c, "data_event");
    server.shutdown();
    let (answer, took) = pending.join().unwrap();
    assert_status(&answer, 503);
    assert_eq!(answer.body["reason"], "shutting_down", "{}", answer.raw);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    server.wait();
}

// ---------------------------------------------------------------------------------------------
// 1,000 acknowledged sends waiting at once
// ---------------------------------------------------------------------------------------------

/// Threads of this process whose name is `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

fn process_threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// One non-blocking API call of the mio client.
struct Flight {
    stream: mio::net::TcpStream,
    request: Vec<u8>,
    written: usize,
    response: Vec<u8>,
    done: bool,
}

/// Drives every flight on one thread until all have a complete response (the server closes
/// after each: `Connection: close`), calling `tick` between polls.
fn fly(flights: &mut [Flight], limit: Duration, mut tick: impl FnMut(&[Flight])) {
    let mut poll = mio::Poll::new().unwrap();
    for (i, f) in flights.iter_mut().enumerate() {
        poll.registry()
            .register(&mut f.stream, mio::Token(i), mio::Interest::READABLE | mio::Interest::WRITABLE)
            .unwrap();
    }
    let deadline = Instant::now() + limit;
    let mut events = mio::Events::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    while flights.iter().any(|f| !f.done) {
        assert!(Instant::now() < deadline, "{} of the API calls unanswered after {limit:?}", {
            flights.iter().filter(|f| !f.done).count()
        });
        poll.poll(&mut events, Some(Duration::from_millis(20))).unwrap();
        for event in events.iter() {
            let f = &mut flights[event.token().0];
            while f.written < f.request.len() {
                match f.stream.write(&f.request[f.written..]) {
                    Ok(n) => f.written += n,
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::NotConnected) => {
                        break;
                    }
                    Err(e) => panic!("API call write failed: {e}"),
                }
            }
            loop {
                match f.stream.read(&mut chunk) {
                    Ok(0) => {
                        f.done = true;
                        break;
                    }
                    Ok(n) => f.response.extend_from_slice(&chunk[..n]),
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::NotConnected) => {
                        break;
                    }
                    Err(e) => panic!("API call read failed: {e}"),
                }
            }
        }
        tick(flights);
    }
}

#[test]
fn a_thousand_acks_wait_at_once_on_one_api_thread() {
    const CALLS: usize = 1000;
    const USERS: usize = 10;
    const PER_USER: usize = CALLS / USERS;
    let _g = exclusive();
    let (_server, ws, api) = api_server(|_| {});
    // Each user's client collects all of its acknowledged sends, then (once every client has
    // all of its own, so all 1,000 calls are waiting) answers them in reverse order.
    let received = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(USERS + 1));
    let clients: Vec<JoinHandle<()>> = (0..USERS)
        .map(|u| {
            let mut c = connect(ws, 100 + u as i64, &[]);
            c.ws.get_ref().set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let (received, barrier) = (Arc::clone(&received), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let mut asked = Vec::with_capacity(PER_USER);
                for _ in 0..PER_USER {
                    let (pid, msg) = recv_with_pid(&mut c, "data_event");
                    asked.push((pid, msg["payload"]["n"].as_u64().unwrap()));
                    received.fetch_add(1, Ordering::SeqCst);
                }
                barrier.wait();
                for (pid, n) in asked.iter().rev() {
                    client_ack(&mut c, pid, &format!("read-{n}"), None);
                }
                c.expect_silence(Duration::from_millis(100));
            })
        })
        .collect();
    let threads_before = process_threads();
    let mut flights: Vec<Flight> = (0..CALLS)
        .map(|n| {
            let body = json!({
                "userId": 100 + (n % USERS) as i64,
                "message": {"type": "data_event", "payload": {"n": n}},
                "ack": true,
                "timeoutMs": 20000,
            })
            .to_string();
            let request = format!(
                "POST /api/v1/send HTTP/1.1\r\nHost: {api}\r\nAuthorization: apikey {KEY}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            Flight {
                stream: mio::net::TcpStream::connect(api).unwrap(),
                request: request.into_bytes(),
                written: 0,
                response: Vec::new(),
                done: false,
            }
        })
        .collect();
    let mut peak = None;
    let started = Instant::now();
    fly(&mut flights, Duration::from_secs(25), |flights| {
        if peak.is_none() && received.load(Ordering::SeqCst) == CALLS {
            // Every call is waiting for its ack: none can have been answered yet.
            assert!(flights.iter().all(|f| f.response.is_empty()), "a call was answered before its ack");
            peak = Some((threads_named("customws-api"), process_threads()));
            barrier.wait();
        }
    });
    let took = started.elapsed();
    let (api_threads, threads_at_peak) = peak.expect("the clients never had all 1,000 messages");
    assert_eq!(api_threads, 1, "the API must serve every waiting call on its one thread");
    assert!(
        threads_at_peak <= threads_before + 2,
        "threads grew from {threads_before} to {threads_at_peak} with 1,000 calls waiting"
    );
    for (n, f) in flights.iter().enumerate() {
        let (answer, _) = parse_answer(&f.response).unwrap_or_else(|| {
            panic!("call {n}: incomplete response {:?}", String::from_utf8_lossy(&f.response))
        });
        assert_ok(&answer);
        assert_eq!(
            answer.body,
            json!({"delivered": 1, "ack": {"status": format!("read-{n}"), "error": null}}),
            "call {n}"
        );
    }
    for c in clients {
        c.join().unwrap();
    }
    eprintln!("1,000 waiting acks answered in {took:?}");
}

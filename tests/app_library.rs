//! The library API: server-initiated acks and requests through `Handle`, and application
//! callbacks, against real WebSocket clients.

mod common;

#[path = "../examples/blocking_app.rs"]
#[allow(dead_code)]
mod blocking_app;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use customws::app::application::{Admission, Conn, Disconnect, Rejection};
use customws::app::{AckReply, WaitError};
use customws::http::auth::{AuthError, Identity, Roles};
use customws::http::request::Request;
use customws::protocol::ClientMessage;
use customws::{Application, Handled, OutMessage};
use serde_json::{Value, json};

fn event() -> OutMessage {
    OutMessage::new("data_event", r#"{"note":"hello"}"#).unwrap()
}

/// Reads until a message carrying a server pid arrives; returns it.
fn recv_with_pid(client: &mut Client) -> Value {
    loop {
        let v = client.recv_json();
        if v["pid"].is_string() {
            return v;
        }
    }
}

fn ack(client: &mut Client, pid: &str, status: &str, error: Option<&str>) {
    let mut payload = json!({"acknowledgedPid": pid, "status": status});
    if let Some(e) = error {
        payload["error"] = json!(e);
    }
    client.send_value(&json!({"type": "client_ack", "payload": payload}));
}

#[test]
fn send_for_ack_returns_the_clients_status() {
    let server = start(|_| {});
    let mut client = connect(server.local_addr(), 1, &[]);
    client.roundtrip("ready");
    let waiter = server.handle().send_for_ack(1, &event(), None);
    let msg = recv_with_pid(&mut client);
    assert_eq!(msg["type"], "data_event");
    assert_eq!(msg["payload"]["note"], "hello");
    ack(&mut client, msg["pid"].as_str().unwrap(), "read", None);
    assert_eq!(waiter.wait(), Ok(AckReply { status: Some("read".into()), error: None }));
}

#[test]
fn send_for_ack_carries_the_clients_error() {
    let server = start(|_| {});
    let mut client = connect(server.local_addr(), 2, &[]);
    client.roundtrip("ready");
    let waiter = server.handle().send_for_ack(2, &event(), None);
    let pid = recv_with_pid(&mut client)["pid"].as_str().unwrap().to_string();
    ack(&mut client, &pid, "failed", Some("disk full"));
    let reply = waiter.wait().unwrap();
    assert_eq!(reply.status.as_deref(), Some("failed"));
    assert_eq!(reply.error, Some(json!("disk full")));
}

#[test]
fn ack_times_out_and_a_late_ack_is_ignored() {
    let server = start(|_| {});
    let mut client = connect(server.local_addr(), 3, &[]);
    client.roundtrip("ready");
    let started = Instant::now();
    let waiter = server.handle().send_for_ack(3, &event(), Some(Duration::from_millis(200)));
    let pid = recv_with_pid(&mut client)["pid"].as_str().unwrap().to_string();
    assert_eq!(waiter.wait(), Err(WaitError::TimedOut));
    assert!(started.elapsed() >= Duration::from_millis(200));
    ack(&mut client, &pid, "late", None);
    client.roundtrip("still-open");
}

#[test]
fn ack_to_an_offline_user_fails_at_once() {
    let server = start(|_| {});
    let waiter = server.handle().send_for_ack(404, &event(), Some(Duration::from_secs(10)));
    assert_eq!(waiter.wait_timeout(Duration::from_secs(2)), Err(WaitError::Offline));
}

#[test]
fn pending_ack_fails_closed_when_the_client_disconnects() {
    let server = start(|_| {});
    let mut client = connect(server.local_addr(), 5, &[]);
    client.roundtrip("ready");
    let waiter = server.handle().send_for_ack(5, &event(), Some(Duration::from_secs(10)));
    recv_with_pid(&mut client);
    let started = Instant::now();
    client.close();
    assert_eq!(waiter.wait_timeout(Duration::from_secs(5)), Err(WaitError::Closed));
    assert!(started.elapsed() < Duration::from_secs(2), "closed must not wait for the timeout");
}

#[test]
fn an_ack_from_another_connection_does_not_resolve() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut target = connect(addr, 6, &[]);
    let mut other = connect(addr, 7, &[]);
    target.roundtrip("ready");
    let waiter = server.handle().send_for_ack(6, &event(), Some(Duration::from_millis(400)));
    let pid = recv_with_pid(&mut target)["pid"].as_str().unwrap().to_string();
    ack(&mut other, &pid, "forged", None);
    other.roundtrip("after-forgery");
    assert_eq!(waiter.wait(), Err(WaitError::TimedOut));
}

#[test]
fn requests_answered_out_of_order_each_get_their_reply() {
    let server = start(|_| {});
    let mut client = connect(server.local_addr(), 8, &[]);
    client.roundtrip("ready");
    let handle = server.handle();
    let waiters: Vec<_> = (0..5)
        .map(|i| {
            let msg = OutMessage::new("generic_request", &format!(r#"{{"question":{i}}}"#)).unwrap();
            handle.request(8, &msg, None)
        })
        .collect();
    let mut asked = Vec::new();
    for _ in 0..5 {
        let msg = recv_with_pid(&mut client);
        asked.push((msg["pid"].as_str().unwrap().to_string(), msg["payload"]["question"].as_i64().unwrap()));
    }
    for (pid, question) in asked.iter().rev() {
        client.send_value(
            &json!({"pid": pid, "type": "search_response", "payload": {"answer": question * 10}}),
        );
    }
    for (i, waiter) in waiters.into_iter().enumerate() {
        let reply = waiter.wait().unwrap().json();
        assert_eq!(reply["type"], "search_response");
        assert_eq!(reply["payload"]["answer"], i as i64 * 10, "request {i} got {reply}");
    }
    client.roundtrip("replies-were-consumed");
}

#[test]
fn request_times_out() {
    let server = start(|_| {});
    let mut client = connect(server.local_addr(), 9, &[]);
    client.roundtrip("ready");
    let waiter = server.handle().request(9, &event(), Some(Duration::from_millis(150)));
    recv_with_pid(&mut client);
    assert_eq!(waiter.wait(), Err(WaitError::TimedOut));
}

#[test]
fn shutdown_fails_pending_waits() {
    let server = start(|_| {});
    let mut client = connect(server.local_addr(), 10, &[]);
    client.roundtrip("ready");
    let waiter = server.handle().request(10, &event(), Some(Duration::from_secs(30)));
    recv_with_pid(&mut client);
    server.shutdown();
    assert_eq!(waiter.wait_timeout(Duration::from_secs(5)), Err(WaitError::ShuttingDown));
}

#[test]
fn send_broadcast_query_and_disconnect() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a1 = connect(addr, 11, &[]);
    let mut a2 = connect(addr, 11, &[]);
    let mut b = connect(addr, 12, &[]);
    for c in [&mut a1, &mut a2, &mut b] {
        c.roundtrip("ready");
    }
    let handle = server.handle();
    assert_eq!(handle.send_to_user(11, &event()).wait(), Ok(2));
    assert_eq!(a1.recv_of_type("data_event")["payload"]["note"], "hello");
    assert_eq!(a2.recv_of_type("data_event")["payload"]["note"], "hello");
    assert_eq!(handle.send_to_user(99, &event()).wait(), Ok(0));
    assert_eq!(handle.send_to_users(&[11, 12, 99], &event()).wait(), Ok(3));
    for c in [&mut a1, &mut a2, &mut b] {
        c.recv_of_type("data_event");
    }
    let note = OutMessage::new("data_event", r#"{"note":"all"}"#).unwrap();
    assert_eq!(handle.broadcast(&note, &[11]).wait(), Ok(1));
    assert_eq!(b.recv_of_type("data_event")["payload"]["note"], "all");
    a1.roundtrip("excluded-a1");
    a2.roundtrip("excluded-a2");
    assert_eq!(handle.is_online(11).wait(), Ok(true));
    assert_eq!(handle.user_connections(11).wait().map(|l| l.len()), Ok(2));
    assert_eq!(handle.is_online(99).wait(), Ok(false));
    assert_eq!(handle.disconnect_user(11).wait(), Ok(2));
    a1.expect_close(1000);
    a2.expect_close(1000);
    b.roundtrip("b-unaffected");
}

// ----- callbacks -----------------------------------------------------------------------------

/// Authenticates `?name=<n>&id=<id>` without a token and remembers events.
struct Recorder {
    events: std::sync::Mutex<mpsc::Sender<String>>,
}

struct Profile {
    name: String,
}

impl Application for Recorder {
    fn authenticate(
        &self,
        request: &Request,
        jwt: Result<Identity, AuthError>,
    ) -> Result<Admission, Rejection> {
        if let Ok(identity) = jwt {
            return Ok(Admission { identity, user_data: None });
        }
        let name =
            request.query_param("name").ok_or(Rejection { status: 401, message: "name required".into() })?;
        let user_id = request.query_param("id").and_then(|s| s.parse().ok()).unwrap_or(0);
        let identity =
            Identity { user_id, roles: Roles::default(), claims: "{}".into(), expires_at: u64::MAX };
        Ok(Admission { identity, user_data: Some(Box::new(Profile { name })) })
    }

    fn on_connect(&self, conn: &mut Conn<'_>) {
        let name = conn.user_data::<Profile>().map_or("anonymous", |p| p.name.as_str()).to_string();
        conn.send(&OutMessage::json("welcome", &json!({"name": name})).unwrap());
    }

    fn on_message(&self, conn: &mut Conn<'_>, msg: &ClientMessage<'_>, raw: &[u8]) -> Handled {
        match &*msg.kind {
            "whoami" => {
                let name = conn.user_data::<Profile>().map(|p| p.name.clone()).unwrap_or_default();
                let body = json!({"user": conn.user_id(), "name": name, "raw_len": raw.len()}).to_string();
                conn.respond(msg.pid.as_deref().unwrap_or(""), "whoami_response", &body);
                Handled::Yes
            }
            "explode" => panic!("application bug"),
            _ => Handled::No,
        }
    }

    fn on_disconnect(&self, event: &Disconnect<'_>) {
        let _ = self.events.lock().unwrap().send(format!("gone {} {}", event.user_id, event.reason));
    }
}

fn start_recorder() -> (customws::ServerHandle, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let app = Arc::new(Recorder { events: std::sync::Mutex::new(tx) });
    (customws::start_with(test_config(), app).unwrap(), rx)
}

#[test]
fn custom_authentication_user_data_and_lifecycle_callbacks() {
    let (server, events) = start_recorder();
    let addr = server.local_addr();
    let (status, _) = expect_refused(addr, "/ws", &[]);
    assert_eq!(status, 401, "no token and no name: the application refuses");
    let mut c = connect_with(addr, 21, "/ws?name=ada&id=21", &[]);
    assert_eq!(c.recv_json(), json!({"type": "welcome", "payload": {"name": "ada"}}));
    c.send_json(r#"{"pid":"w1","type":"whoami"}"#);
    let v = c.recv_json();
    assert_eq!((v["pid"].clone(), v["type"].clone()), (json!("w1"), json!("whoami_response")));
    assert_eq!(v["payload"]["name"], "ada");
    assert_eq!(v["payload"]["user"], 21);
    c.send_json(r#"{"pid":"u1","type":"not_mine"}"#);
    let v = c.recv_json();
    assert_eq!(v["error"]["code"], 400, "declined types get the built-in 400: {v}");
    c.roundtrip("generic-echo-still-built-in");
    c.close();
    let line = events.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(line.starts_with("gone 21 "), "{line}");
}

#[test]
fn a_panicking_callback_closes_only_its_connection_1011() {
    let (server, _events) = start_recorder();
    let addr = server.local_addr();
    let mut bystander = connect(addr, 31, &[]);
    bystander.recv_of_type("welcome");
    let mut c = connect(addr, 32, &[]);
    c.recv_of_type("welcome");
    c.send_json(r#"{"pid":"x","type":"explode"}"#);
    c.expect_close(1011);
    bystander.roundtrip("shard-survived");
    let mut again = connect(addr, 33, &[]);
    again.recv_of_type("welcome");
}

#[test]
fn blocking_work_on_workers_does_not_stall_the_shard() {
    let mut config = test_config();
    config.shards = 1; // everyone on the same event loop: the strictest case
    let delay = Duration::from_millis(400);
    let server = customws::start_with(config, Arc::new(blocking_app::Lookup::new(8, 64, delay))).unwrap();
    let addr = server.local_addr();
    let mut slow = connect(addr, 41, &[]);
    let mut fast = connect(addr, 42, &[]);
    slow.recv_of_type("welcome");
    fast.recv_of_type("welcome");
    let started = Instant::now();
    for i in 0..8 {
        slow.send_json(&format!(r#"{{"pid":"q{i}","type":"lookup","payload":{{"k":{i}}}}}"#));
    }
    // While eight 400 ms lookups are in progress, the other client's round trips stay fast.
    let mut worst = Duration::ZERO;
    for i in 0..10 {
        let t = Instant::now();
        fast.roundtrip(&format!("ping-{i}"));
        worst = worst.max(t.elapsed());
    }
    assert!(started.elapsed() < delay, "the pings must have run while the lookups were pending");
    assert!(worst < Duration::from_millis(100), "a round trip took {worst:?} during blocking work");
    let mut answered: Vec<String> =
        (0..8).map(|_| slow.recv_of_type("lookup_result")["pid"].as_str().unwrap().to_string()).collect();
    answered.sort();
    assert_eq!(answered, (0..8).map(|i| format!("q{i}")).collect::<Vec<_>>());
}

#[test]
fn answers_to_server_waits_are_not_rate_limited() {
    let server = start(|c| {
        c.rate_limit = 2;
        c.rate_limit_burst = 2;
    });
    let mut client = connect(server.local_addr(), 50, &[]);
    let handle = server.handle();
    let waiters: Vec<_> = (0..20).map(|_| handle.send_for_ack(50, &event(), None)).collect();
    let pids: Vec<String> =
        (0..20).map(|_| recv_with_pid(&mut client)["pid"].as_str().unwrap().to_string()).collect();
    for pid in &pids {
        ack(&mut client, pid, "ok", None);
    }
    for waiter in waiters {
        assert_eq!(waiter.wait().map(|a| a.status), Ok(Some("ok".into())));
    }
    // Ordinary messages still are: the burst of 2 passes, then 429.
    for i in 0..3 {
        client.send_json(&format!(r#"{{"type":"nope{i}"}}"#));
    }
    let codes: Vec<i64> = (0..3).map(|_| client.recv_json()["error"]["code"].as_i64().unwrap()).collect();
    assert_eq!(codes, vec![400, 400, 429]);
}

#[test]
fn presence_of_a_user_and_of_a_room() {
    let server = start(|c| c.room_presence_max_members = 0);
    let addr = server.local_addr();
    let mut a = connect(addr, 61, &[]);
    let mut b = connect(addr, 62, &[]);
    for (c, pid) in [(&mut a, "ja"), (&mut b, "jb")] {
        c.send_value(&json!({"pid": pid, "type": "join", "payload": {"room": "desk"}}));
        assert_eq!(c.recv_of_type("server_ack")["payload"]["status"], "joined");
    }
    a.send_value(
        &json!({"pid": "p", "type": "presence_update", "payload": {"status": "busy", "context": {"doc": 1}}}),
    );
    assert_eq!(a.recv_of_type("server_ack")["payload"]["status"], "ok");
    let handle = server.handle();
    wait_until(Duration::from_secs(3), "user 61 busy at its home shard", || {
        handle.presence(61).wait().is_ok_and(|p| p.status == "busy")
    });
    let busy = handle.presence(61).wait().unwrap();
    assert_eq!(busy.context.as_deref(), Some(r#"{"doc":1}"#));
    assert_eq!(handle.presence(62).wait().unwrap().status, "online");
    assert_eq!(handle.presence(63).wait().unwrap().status, "offline");
    let room = handle.room_presence("desk", Duration::from_secs(2)).unwrap();
    let statuses: Vec<(i64, String)> = room.into_iter().map(|p| (p.user_id, p.status)).collect();
    assert_eq!(statuses, vec![(61, "busy".to_string()), (62, "online".to_string())]);
}

//! Server-side control (issue 10, item 2) over real WebSocket clients on both shards: the
//! application's `Handle` and the backend HTTP API put a user's connections into rooms and
//! out of them, watch presence on a user's behalf, set a user's presence and read many users'
//! presence in one call. Also: `Waiter::wait` on a shard thread is refused, and a `Waiter` is
//! a `Future` woken by the shard that completes it.

mod common;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use common::api::*;
use common::*;
use customws::prelude::{Application, ClientMessage, Conn, Handled, Joined, OutMessage, WaitError};
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// Bound on any answer a test waits for.
const LIMIT: Duration = Duration::from_secs(5);

/// The next message of type `ty`, skipping presence events (`joined`/`left` of other
/// connections may arrive in either order around it).
fn recv_skipping_presence(c: &mut Client, ty: &str) -> Value {
    loop {
        let v = c.recv_json();
        if v["type"] == ty {
            return v;
        }
        assert_eq!(v["type"], "presence_event", "user {}: expected {ty}, got {v}", c.user_id);
    }
}

/// The next presence event, which must be about `user` with `status`.
fn expect_presence(c: &mut Client, user: i64, status: &str) -> Value {
    let v = c.recv_of_type("presence_event");
    assert_eq!(
        (v["payload"]["userId"].as_i64(), v["payload"]["status"].as_str()),
        (Some(user), Some(status)),
        "{v}"
    );
    v
}

fn join(c: &mut Client, room: &str, pid: &str) {
    c.send_value(&json!({"pid": pid, "type": "join", "payload": {"room": room}}));
    let v = recv_skipping_presence(c, "server_ack");
    assert_eq!(v["payload"]["acknowledgedPid"], pid, "{v}");
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.into()).unwrap()
}

#[test]
fn join_room_from_the_handle_puts_both_shards_connections_in_and_members_see_joined() {
    let server = start(|_| {});
    let (addr, handle) = (server.local_addr(), server.handle());
    let mut member = connect(addr, 2, &[]);
    join(&mut member, "lobby", "j");
    let mut a = connect_on_shard(addr, 1, &[], 0);
    let mut b = connect_on_shard(addr, 1, &[], 1);

    let joined = handle.join_room(1, "lobby").wait_timeout(LIMIT).unwrap();
    assert_eq!(joined, Joined { joined: 2, refused: 0 });
    // The member is told once per joining connection, as for two client joins.
    for _ in 0..2 {
        let v = expect_presence(&mut member, 1, "joined");
        assert_eq!(v["payload"]["context"], json!({"room": "lobby"}), "{v}");
    }
    assert_eq!(handle.room_members("lobby").wait_timeout(LIMIT).unwrap(), [1, 2]);
    // Joining again changes nothing and tells nobody.
    assert_eq!(handle.join_room(1, "lobby").wait_timeout(LIMIT).unwrap(), Joined { joined: 2, refused: 0 });

    let body = raw(r#"{"text":"hi"}"#);
    assert_eq!(handle.publish_to_room("lobby", &body, None).wait_timeout(LIMIT).unwrap(), 3);
    for c in [&mut a, &mut b, &mut member] {
        let v = recv_skipping_presence(c, "room_message");
        assert_eq!(v["payload"]["body"], json!({"text": "hi"}), "{v}");
    }

    assert_eq!(handle.leave_room(1, "lobby").wait_timeout(LIMIT).unwrap(), 2);
    for _ in 0..2 {
        expect_presence(&mut member, 1, "left");
    }
    assert_eq!(handle.room_members("lobby").wait_timeout(LIMIT).unwrap(), [2]);
    assert_eq!(handle.leave_room(1, "lobby").wait_timeout(LIMIT).unwrap(), 0, "not members any more");
    assert_eq!(handle.publish_to_room("lobby", &body, None).wait_timeout(LIMIT).unwrap(), 1);
    member.recv_of_type("room_message");
    for c in [&mut a, &mut b] {
        // Only presence events (a sibling's `left`) may precede the answer: no room_message.
        c.send_value(&json!({"pid": "after-leave", "type": "generic_request", "payload": {}}));
        recv_skipping_presence(c, "generic_response");
    }

    // No connection: nothing to do, nothing remembered for later.
    assert_eq!(handle.join_room(99, "lobby").wait_timeout(LIMIT).unwrap(), Joined::default());
    assert_eq!(handle.leave_room(99, "lobby").wait_timeout(LIMIT).unwrap(), 0);
    let late = connect(addr, 99, &[]);
    drop(late);
    assert_eq!(handle.room_members("lobby").wait_timeout(LIMIT).unwrap(), [2]);
    // An invalid name is refused before anything is sent.
    assert_eq!(
        handle.join_room(1, "no spaces").wait_timeout(LIMIT),
        Err(WaitError::Invalid("room name: 1 to 128 bytes of A-Z a-z 0-9 _ - . : @ #"))
    );
}

#[test]
fn join_room_from_the_handle_obeys_the_per_connection_room_limit() {
    let server = start(|c| {
        c.max_rooms_per_connection = 1;
        c.room_presence_max_members = 0;
    });
    let (addr, handle) = (server.local_addr(), server.handle());
    let mut full = connect_on_shard(addr, 5, &[], 0);
    join(&mut full, "other", "j");
    let mut free = connect_on_shard(addr, 5, &[], 1);
    assert_eq!(handle.join_room(5, "lobby").wait_timeout(LIMIT).unwrap(), Joined { joined: 1, refused: 1 });
    assert_eq!(handle.room_members("lobby").wait_timeout(LIMIT).unwrap(), [5]);
    // Nothing is sent to the refused connection (there is no request to answer).
    full.roundtrip("quiet");
    free.roundtrip("quiet");
}

#[test]
fn watch_from_the_handle_sends_the_snapshot_then_every_change_to_each_connection() {
    let server = start(|_| {});
    let (addr, handle) = (server.local_addr(), server.handle());
    let mut a = connect_on_shard(addr, 10, &[], 0);
    let mut b = connect_on_shard(addr, 10, &[], 1);

    assert_eq!(handle.watch_presence(10, &[20, 21]).wait_timeout(LIMIT).unwrap(), 2);
    for c in [&mut a, &mut b] {
        let mut snapshot: Vec<i64> = (0..2)
            .map(|_| expect_presence_any(c, "offline")["payload"]["userId"].as_i64().unwrap())
            .collect();
        snapshot.sort_unstable();
        assert_eq!(snapshot, [20, 21]);
    }
    // Watching again sends no second snapshot.
    assert_eq!(handle.watch_presence(10, &[20]).wait_timeout(LIMIT).unwrap(), 2);

    let target = connect(addr, 20, &[]);
    for c in [&mut a, &mut b] {
        expect_presence(c, 20, "online");
    }
    drop(target);
    for c in [&mut a, &mut b] {
        expect_presence(c, 20, "offline");
    }

    assert_eq!(handle.unwatch_presence(10, &[20]).wait_timeout(LIMIT).unwrap(), 2);
    let target = connect(addr, 20, &[]);
    let other = connect(addr, 21, &[]);
    for c in [&mut a, &mut b] {
        expect_presence(c, 21, "online"); // still watched; 20 is not
    }
    drop((target, other));
    for c in [&mut a, &mut b] {
        expect_presence(c, 21, "offline");
        c.roundtrip("no-20");
    }

    // An offline watcher: nothing stored, so a later connection gets nothing.
    assert_eq!(handle.watch_presence(11, &[20]).wait_timeout(LIMIT).unwrap(), 0);
    let mut later = connect(addr, 11, &[]);
    let target = connect(addr, 20, &[]);
    later.roundtrip("nothing-watched");
    drop(target);
    later.expect_silence(Duration::from_millis(200));

    let too_many: Vec<i64> = (0..1025).collect();
    assert!(matches!(handle.watch_presence(10, &too_many).wait_timeout(LIMIT), Err(WaitError::Invalid(_))));
}

/// The next presence event, with `status` (any user).
fn expect_presence_any(c: &mut Client, status: &str) -> Value {
    let v = c.recv_of_type("presence_event");
    assert_eq!(v["payload"]["status"], status, "{v}");
    v
}

#[test]
fn set_presence_from_the_handle_tells_watchers_and_room_members_and_is_stored() {
    let server = start(|_| {});
    let (addr, handle) = (server.local_addr(), server.handle());
    let mut user = connect_on_shard(addr, 30, &[], 1);
    let mut roommate = connect_on_shard(addr, 31, &[], 0);
    join(&mut roommate, "r", "j1");
    join(&mut user, "r", "j2");
    expect_presence(&mut roommate, 30, "joined");
    let mut watcher = connect(addr, 32, &[]);
    subscribe(&mut watcher, &[30], "s");

    let context = raw(r#"{"meeting":1}"#);
    assert_eq!(handle.set_presence(30, "busy", Some(&context)).wait_timeout(LIMIT).unwrap(), 1);
    for c in [&mut roommate, &mut watcher, &mut user] {
        let v = expect_presence(c, 30, "busy");
        assert_eq!(v["payload"]["context"], json!({"meeting": 1}), "{v}");
    }
    let stored = handle.presence(30).wait_timeout(LIMIT).unwrap();
    assert_eq!((stored.status.as_str(), stored.context.as_deref()), ("busy", Some(r#"{"meeting":1}"#)));
    // A repeat tells nobody.
    assert_eq!(handle.set_presence(30, "busy", Some(&context)).wait_timeout(LIMIT).unwrap(), 1);
    for c in [&mut roommate, &mut watcher, &mut user] {
        c.roundtrip("after-repeat");
    }

    // Offline: nothing stored, the presence stays offline.
    assert_eq!(handle.set_presence(33, "busy", None).wait_timeout(LIMIT).unwrap(), 0);
    assert_eq!(handle.presence(33).wait_timeout(LIMIT).unwrap().status, "offline");
    assert!(matches!(handle.set_presence(30, "", None).wait_timeout(LIMIT), Err(WaitError::Invalid(_))));
    let long = "x".repeat(257);
    assert!(matches!(handle.set_presence(30, &long, None).wait_timeout(LIMIT), Err(WaitError::Invalid(_))));
}

#[test]
fn presence_many_reads_200_users_in_one_call() {
    let server = start(|_| {});
    let (addr, handle) = (server.local_addr(), server.handle());
    let online: Vec<Client> = (1000..1010).map(|u| connect(addr, u, &[])).collect();
    let users: Vec<i64> = (1000..1200).collect();
    wait_until(LIMIT, "the ten users to be online", || {
        handle
            .presence_many(&users)
            .wait_timeout(LIMIT)
            .unwrap()
            .iter()
            .filter(|p| p.status == "online")
            .count()
            == 10
    });
    let started = Instant::now();
    let all = handle.presence_many(&users).wait_timeout(LIMIT).unwrap();
    let took = started.elapsed();
    assert_eq!(all.len(), 200);
    assert_eq!(all.iter().map(|p| p.user_id).collect::<Vec<_>>(), users, "each user once, by id");
    for p in &all {
        let want = if p.user_id < 1010 { "online" } else { "offline" };
        assert_eq!(p.status, want, "{p:?}");
        let one = handle.presence(p.user_id).wait_timeout(LIMIT).unwrap();
        // (An offline user's `since` is the time of the query.)
        assert_eq!(
            (p.user_id, &p.status, &p.context, &p.info),
            (one.user_id, &one.status, &one.context, &one.info),
            "same shape as presence()"
        );
    }
    let started = Instant::now();
    let one_by_one: Vec<_> = users.iter().map(|&u| handle.presence(u)).collect();
    let one_by_one: Vec<_> = one_by_one.into_iter().map(|w| w.wait_timeout(LIMIT).unwrap()).collect();
    eprintln!("presence_many of 200 users: {took:?}; 200 presence() calls: {:?}", started.elapsed());
    assert_eq!(one_by_one.len(), 200);
    // Duplicates are answered once; over the bound is refused.
    let twice = handle.presence_many(&[1000, 1000, 5]).wait_timeout(LIMIT).unwrap();
    assert_eq!(twice.iter().map(|p| p.user_id).collect::<Vec<_>>(), [5, 1000]);
    assert!(handle.presence_many(&[]).wait_timeout(LIMIT).unwrap().is_empty());
    let too_many: Vec<i64> = (0..1001).collect();
    assert!(matches!(handle.presence_many(&too_many).wait_timeout(LIMIT), Err(WaitError::Invalid(_))));
    drop(online);
}

// ---------------------------------------------------------------------------------------------
// HTTP API
// ---------------------------------------------------------------------------------------------

fn with_key(api: std::net::SocketAddr, method: &str, path: &str, body: Option<&str>) -> Answer {
    call(api, method, path, Some(&format!("apikey {KEY}")), body)
}

#[test]
fn http_rooms_of_a_user() {
    let (_server, addr, api) = api_server(|_| {});
    let mut member = connect(addr, 2, &[]);
    join(&mut member, "#team", "j");
    let mut a = connect_on_shard(addr, 1, &[], 0);
    let mut b = connect_on_shard(addr, 1, &[], 1);

    let answer = with_key(api, "POST", "/api/v1/users/1/rooms/%23team", None);
    assert_ok(&answer);
    assert_eq!(answer.body, json!({"connections": 2, "refused": 0}));
    for _ in 0..2 {
        expect_presence(&mut member, 1, "joined");
    }
    let answer = post(api, "/api/v1/rooms/%23team/publish", &json!({"body": "hello"}));
    assert_eq!(answer.body, json!({"delivered": 3}), "{}", answer.raw);
    for c in [&mut a, &mut b, &mut member] {
        assert_eq!(recv_skipping_presence(c, "room_message")["payload"]["body"], "hello");
    }
    let answer = with_key(api, "DELETE", "/api/v1/users/1/rooms/%23team", None);
    assert_eq!((answer.status, answer.body.clone()), (200, json!({"connections": 2})), "{}", answer.raw);
    for _ in 0..2 {
        expect_presence(&mut member, 1, "left");
    }
    let answer = with_key(api, "POST", "/api/v1/users/77/rooms/lobby", None);
    assert_eq!(answer.body, json!({"connections": 0, "refused": 0}), "offline: {}", answer.raw);

    assert_status(&with_key(api, "POST", "/api/v1/users/x/rooms/lobby", None), 400);
    assert_status(&with_key(api, "POST", "/api/v1/users/1/rooms/a%20b", None), 400);
    let wrong = with_key(api, "GET", "/api/v1/users/1/rooms/lobby", None);
    assert_status(&wrong, 405);
    assert_eq!(wrong.header("allow"), Some("POST, DELETE"));
    assert_status(&call(api, "POST", "/api/v1/users/1/rooms/lobby", None, None), 401);
}

#[test]
fn http_watches_presence_and_presence_many() {
    let (_server, addr, api) = api_server(|_| {});
    let mut a = connect_on_shard(addr, 10, &[], 0);
    let mut b = connect_on_shard(addr, 10, &[], 1);

    let answer = with_key(api, "POST", "/api/v1/users/10/watches", Some(r#"{"userIds":[20]}"#));
    assert_eq!((answer.status, answer.body.clone()), (200, json!({"connections": 2})), "{}", answer.raw);
    for c in [&mut a, &mut b] {
        expect_presence(c, 20, "offline");
    }
    let target = connect(addr, 20, &[]);
    for c in [&mut a, &mut b] {
        expect_presence(c, 20, "online");
    }

    let answer = with_key(
        api,
        "PUT",
        "/api/v1/users/20/presence",
        Some(r#"{"status":"away","context":{"until":"5pm"}}"#),
    );
    assert_eq!((answer.status, answer.body.clone()), (200, json!({"connections": 1})), "{}", answer.raw);
    for c in [&mut a, &mut b] {
        let v = expect_presence(c, 20, "away");
        assert_eq!(v["payload"]["context"], json!({"until": "5pm"}), "{v}");
    }
    let answer = with_key(api, "PUT", "/api/v1/users/21/presence", Some(r#"{"status":"away"}"#));
    assert_eq!(answer.body, json!({"connections": 0}), "offline: {}", answer.raw);

    let ids: Vec<i64> = (1..=200).chain([20]).collect();
    let answer = post(api, "/api/v1/presence", &json!({ "userIds": ids }));
    assert_ok(&answer);
    let users = answer.body["users"].as_array().unwrap();
    assert_eq!((users.len(), answer.body["count"].as_u64()), (200, Some(200)), "{}", answer.raw);
    let twenty = &users[19];
    assert_eq!(
        (twenty["userId"].clone(), twenty["status"].clone(), twenty["context"].clone()),
        (json!(20), json!("away"), json!({"until": "5pm"})),
        "{twenty}"
    );
    assert_rfc3339(twenty["since"].as_str().unwrap());
    assert_eq!(users[0]["status"], "offline");

    let answer = with_key(api, "DELETE", "/api/v1/users/10/watches", Some(r#"{"userIds":[20]}"#));
    assert_eq!(answer.body, json!({"connections": 2}), "{}", answer.raw);
    drop(target);
    for c in [&mut a, &mut b] {
        c.roundtrip("unwatched");
    }

    // Bad input: 400 naming the problem.
    for (method, path, body, needle) in [
        ("POST", "/api/v1/users/10/watches", "{nope", "not valid JSON"),
        ("POST", "/api/v1/users/10/watches", r#"{"userIds":["a"]}"#, "invalid type"),
        ("POST", "/api/v1/users/10/watches", r#"{}"#, "userIds"),
        ("POST", "/api/v1/users/10/watches", r#"[[1]]"#, "JSON object"),
        ("PUT", "/api/v1/users/10/presence", r#"{"status":""}"#, "status"),
        ("PUT", "/api/v1/users/10/presence", r#"{"context":1}"#, "status"),
        ("PUT", "/api/v1/users/10/presence", r#"{"status":"a","context":}"#, "not valid JSON"),
        ("POST", "/api/v1/presence", r#"{"userIds":1}"#, "invalid type"),
    ] {
        let answer = with_key(api, method, path, Some(body));
        assert_status(&answer, 400);
        assert!(answer.error().contains(needle), "{method} {path} {body}: {}", answer.raw);
    }
    let many = json!({ "userIds": (0..1001).collect::<Vec<i64>>() });
    let answer = post(api, "/api/v1/presence", &many);
    assert_status(&answer, 400);
    assert!(answer.error().contains("at most 1000"), "{}", answer.raw);
    let watches = json!({ "userIds": (0..1025).collect::<Vec<i64>>() });
    let answer = post(api, "/api/v1/users/10/watches", &watches);
    assert_status(&answer, 400);
    assert!(answer.error().contains("at most 1024"), "{}", answer.raw);
    let long = json!({ "status": "x".repeat(257) });
    assert_status(&with_key(api, "PUT", "/api/v1/users/10/presence", Some(&long.to_string())), 400);
    assert_status(&with_key(api, "POST", "/api/v1/users/10/presence", Some(r#"{"status":"a"}"#)), 405);
    assert_status(&with_key(api, "GET", "/api/v1/presence", None), 405);
}

// ---------------------------------------------------------------------------------------------
// Waiter on a shard thread, Waiter as a Future
// ---------------------------------------------------------------------------------------------

/// Answers `probe` by waiting, on the shard thread, for something a shard must answer.
struct WaitsInCallback;

impl Application for WaitsInCallback {
    fn on_message(&self, conn: &mut Conn<'_>, msg: &ClientMessage<'_>, _raw: &[u8]) -> Handled {
        if msg.kind != "probe" {
            return Handled::No;
        }
        let started = Instant::now();
        // The user's own home shard may be this one: it cannot answer while we block.
        let online = conn.handle().is_online(conn.user_id()).wait_timeout(Duration::from_secs(3));
        let blocking = conn.handle().presence(conn.user_id()).wait();
        let answer = json!({
            "online": format!("{online:?}"),
            "presence": format!("{:?}", blocking.map(|p| p.status)),
            "ms": started.elapsed().as_millis() as u64,
        });
        conn.respond(msg.pid.as_deref().unwrap_or(""), "probe_result", &answer.to_string());
        Handled::Yes
    }
}

#[test]
fn waiting_on_a_shard_thread_is_refused_at_once() {
    let server = customws::start_with(test_config(), Arc::new(WaitsInCallback)).expect("start");
    // Kept open: `connect_on_shard` reads the per-shard gauges, which a closing one would move.
    let mut open = Vec::new();
    for shard in 0..2 {
        // Users homed on either shard, from connections on either shard.
        for user in [40, 41] {
            let mut c = connect_on_shard(server.local_addr(), user, &[], shard);
            c.send_json(r#"{"pid":"p","type":"probe"}"#);
            let v = c.recv_of_type("probe_result");
            assert_eq!(v["payload"]["online"], "Err(OnShardThread)", "{v}");
            assert_eq!(v["payload"]["presence"], "Err(OnShardThread)", "{v}");
            assert!(v["payload"]["ms"].as_u64().unwrap() < 100, "refused at once, not after a stall: {v}");
            open.push(c);
        }
    }
    // Off the shard threads the same waits work.
    let handle = server.handle();
    let _c = connect(server.local_addr(), 42, &[]);
    assert_eq!(handle.is_online(42).wait_timeout(LIMIT), Ok(true));
}

/// A one-future executor: parks the thread until the waker unparks it; counts the wakes.
struct Unpark {
    thread: Thread,
    wakes: AtomicUsize,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// Runs `future` to completion on this thread; (output, polls, wakes). Panics after `LIMIT`.
fn block_on<F: Future>(future: F) -> (F::Output, usize, usize) {
    let unpark = Arc::new(Unpark { thread: thread::current(), wakes: AtomicUsize::new(0) });
    let waker = Waker::from(Arc::clone(&unpark));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    let deadline = Instant::now() + LIMIT;
    let mut polls = 0;
    loop {
        polls += 1;
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return (out, polls, unpark.wakes.load(Ordering::SeqCst));
        }
        assert!(Instant::now() < deadline, "future not woken within {LIMIT:?}");
        thread::park_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

#[test]
fn a_waiter_is_a_future_woken_by_the_shard() {
    let server = start(|_| {});
    let handle = server.handle();
    let mut client = connect(server.local_addr(), 50, &[]);

    let (online, _, _) = block_on(handle.is_online(50));
    assert_eq!(online, Ok(true));
    let (many, _, _) = block_on(handle.presence_many(&[50, 51]));
    assert_eq!(many.unwrap().iter().map(|p| p.status.as_str()).collect::<Vec<_>>(), ["online", "offline"]);

    // A wait on a client: pending until the client acks 300 ms later, then woken once.
    let msg = OutMessage::json("please_ack", &json!({})).unwrap();
    let acker = thread::spawn(move || {
        let v = client.recv_of_type("please_ack");
        thread::sleep(Duration::from_millis(300));
        let pid = v["pid"].as_str().unwrap().to_string();
        client.send_value(
            &json!({"type": "client_ack", "payload": {"acknowledgedPid": pid, "status": "seen"}}),
        );
        client
    });
    let started = Instant::now();
    let (ack, polls, wakes) = block_on(handle.send_for_ack(50, &msg, Some(LIMIT)));
    assert_eq!(ack.unwrap().status.as_deref(), Some("seen"));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(polls >= 2 && wakes >= 1, "pending first, then woken: {polls} polls, {wakes} wakes");
    assert!(polls <= 4, "woken by the completion, not polled in a loop: {polls} polls");
    let _client = acker.join().unwrap();

    // A wait the server abandons (shutdown) ends the future too.
    let msg = OutMessage::json("never_acked", &json!({})).unwrap();
    let waiter = handle.send_for_ack(50, &msg, Some(Duration::from_secs(30)));
    let stopper = {
        let handle = handle.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            handle.shutdown();
        })
    };
    let (failed, _, _) = block_on(waiter);
    assert_eq!(failed.unwrap_err(), WaitError::ShuttingDown);
    stopper.join().unwrap();
}

#[test]
fn server_watches_share_the_watch_list_bound() {
    let (server, addr, api) = api_server(|c| {
        // The 10,000-event snapshot must fit the watcher's queue while the reader drains it.
        c.send_queue = 20_000;
        c.send_queue_bytes = 16 << 20;
    });
    let handle = server.handle();
    let mut watcher = connect(addr, 60, &[]);
    for chunk in 0..10 {
        let targets: Vec<i64> = (0..1000).map(|i| 100_000 + chunk * 1000 + i).collect();
        assert_eq!(handle.watch_presence(60, &targets).wait_timeout(LIMIT).unwrap(), 1);
    }
    let reader = thread::spawn(move || {
        for _ in 0..10_000 {
            expect_presence_any(&mut watcher, "offline");
        }
        watcher
    });
    assert_eq!(
        handle.watch_presence(60, &[1]).wait_timeout(LIMIT),
        Err(WaitError::Limit("watch list limit reached"))
    );
    let answer = with_key(api, "POST", "/api/v1/users/60/watches", Some(r#"{"userIds":[2,3]}"#));
    assert_status(&answer, 429);
    assert!(answer.error().contains("watch list"), "{}", answer.raw);
    // Already watched targets are not new: still fine at the bound.
    assert_eq!(handle.watch_presence(60, &[100_000]).wait_timeout(LIMIT).unwrap(), 1);
    let mut watcher = reader.join().unwrap();
    watcher.roundtrip("no-more-snapshots");
}

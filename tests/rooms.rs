//! Rooms (seed 003's `join` / `leave` / `broadcast`, SPEC "Client → server message types") and
//! presence in rooms (issue 4): delivery to members on every shard, membership cleanup on
//! disconnect, limits and name validation, join/leave events and `room_presence`, presence
//! deduplication across shared rooms, transient statuses (typing) that expire by themselves,
//! coalescing of identical updates, and the library's `publish_to_room` / `room_members`.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use customws::ServerHandle;
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// Bound on the library waits.
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A server whose rooms announce no joins/leaves (`room_presence_max_members = 0`), so that a
/// test only sees the messages it is about.
fn quiet_server() -> ServerHandle {
    start(|c| c.room_presence_max_members = 0)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Asserts `v` is a `server_ack` for `pid` with `status`.
fn assert_ack(v: &Value, pid: &str, status: &str) {
    assert_eq!(v["type"], "server_ack", "expected the ack of {pid}, got {v}");
    assert_eq!(v["payload"]["acknowledgedPid"], pid, "{v}");
    assert_eq!(v["payload"]["status"], status, "{v}");
}

/// Asserts `v` is an `error_notification` with `code` for `pid`.
fn assert_error(v: &Value, code: i64, pid: &str) {
    assert_eq!(v["type"], "error_notification", "expected error {code} for {pid}, got {v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["originalPid"], pid, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "error.message: {v}");
}

/// `join` with a pid; the next message must be its `joined` ack.
fn join(c: &mut Client, room: &str, pid: &str) {
    c.send_value(&json!({"type": "join", "pid": pid, "payload": {"room": room}}));
    assert_ack(&c.recv_json(), pid, "joined");
}

/// `leave` with a pid; the next message must be its `left` ack.
fn leave(c: &mut Client, room: &str, pid: &str) {
    c.send_value(&json!({"type": "leave", "pid": pid, "payload": {"room": room}}));
    assert_ack(&c.recv_json(), pid, "left");
}

/// A `join` that must be refused with `code`.
fn join_refused(c: &mut Client, room: Value, pid: &str, code: i64) {
    c.send_value(&json!({"type": "join", "pid": pid, "payload": {"room": room}}));
    assert_error(&c.recv_json(), code, pid);
}

/// `broadcast` `{room, body, meta?}` with a pid; waits for its `published` ack.
///
/// The sending connection must not get its own `room_message` (README: "every member (other
/// than the sending connection) gets …", as for `data_request` broadcast). That is asserted
/// once, by `the_sending_connection_does_not_receive_its_own_room_message`; here an own copy
/// arriving before the ack is skipped, so that the other tests check what they are about.
fn publish(c: &mut Client, room: &str, body: &Value, meta: Option<&Value>, pid: &str) {
    let mut payload = json!({"room": room, "body": body});
    if let Some(meta) = meta {
        payload["meta"] = meta.clone();
    }
    c.send_value(&json!({"type": "broadcast", "pid": pid, "payload": payload}));
    let ack = recv_skipping_own_copy(c);
    assert_ack(&ack, pid, "published");
}

/// The next message, skipping room messages this very connection published.
fn recv_skipping_own_copy(c: &mut Client) -> Value {
    loop {
        let v = c.recv_json();
        if v["type"] != "room_message" || v["payload"]["from"] != c.user_id {
            return v;
        }
    }
}

/// Asserts `v` is a `room_message` with exactly seed 003's envelope `{from, room, ts, body,
/// meta}`, `ts` a Unix-ms time within [`after`, now].
fn assert_room_message(v: &Value, from: Value, room: &str, body: &Value, meta: &Value, after: u64) {
    assert_eq!(v["type"], "room_message", "expected a room_message, got {v}");
    let p = v["payload"].as_object().unwrap_or_else(|| panic!("payload must be an object: {v}"));
    let mut keys: Vec<&str> = p.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["body", "from", "meta", "room", "ts"], "envelope fields: {v}");
    assert_eq!(p["from"], from, "{v}");
    assert_eq!(p["room"], room, "{v}");
    assert_eq!(&p["body"], body, "{v}");
    assert_eq!(&p["meta"], meta, "{v}");
    let ts = p["ts"].as_u64().unwrap_or_else(|| panic!("ts must be Unix milliseconds: {v}"));
    assert!(ts + 5 >= after && ts <= now_ms() + 5, "ts {ts} not within [{after}, now]: {v}");
}

/// Asserts `v` is a `presence_event` about `user` with `status`; returns its payload.
fn assert_presence(v: &Value, user: i64, status: &str) -> Value {
    assert_eq!(v["type"], "presence_event", "expected {user}'s {status:?} presence, got {v}");
    assert_eq!(v["fromUserId"], user, "{v}");
    let p = &v["payload"];
    assert_eq!(p["userId"], user, "{v}");
    assert_eq!(p["status"], status, "{v}");
    assert_rfc3339(p["timestamp"].as_str().unwrap_or_else(|| panic!("payload.timestamp: {v}")));
    p.clone()
}

/// A `join`/`leave` event: status `joined`/`left` with context `{"room": room}`.
fn assert_room_event(v: &Value, user: i64, status: &str, room: &str) {
    let p = assert_presence(v, user, status);
    assert_eq!(p["context"], json!({"room": room}), "{v}");
}

/// `presence_update` with a pid; the next message must be its ack with `status`.
fn update(c: &mut Client, pid: &str, payload: Value, status: &str) {
    c.send_value(&json!({"pid": pid, "type": "presence_update", "payload": payload}));
    assert_ack(&c.recv_json(), pid, status);
}

fn members(server: &ServerHandle, room: &str) -> Vec<i64> {
    server.handle().room_members(room).wait_timeout(WAIT).expect("room_members")
}

fn publish_lib(server: &ServerHandle, room: &str, body: &str, meta: Option<&str>) -> usize {
    let raw = |json: &str| RawValue::from_string(json.to_string()).expect("test JSON");
    let (body, meta) = (raw(body), meta.map(raw));
    server.handle().publish_to_room(room, &body, meta.as_deref()).wait_timeout(WAIT).expect("publish_to_room")
}

// ---------------------------------------------------------------------------------------------
// Delivery
// ---------------------------------------------------------------------------------------------

#[test]
fn room_message_reaches_every_member_on_both_shards_once() {
    let server = quiet_server();
    let addr = server.local_addr();
    let mut a = connect_on_shard(addr, 1, &[], 0);
    let mut a2 = connect_on_shard(addr, 1, &[], 1); // the sender's other connection
    let mut b = connect_on_shard(addr, 2, &[], 1);
    let mut c = connect_on_shard(addr, 3, &[], 0);
    let mut outsider = connect(addr, 4, &[]);
    for (i, m) in [&mut a, &mut a2, &mut b, &mut c].into_iter().enumerate() {
        join(m, "room-1", &format!("j{i}"));
    }

    let before = now_ms();
    let body = json!({"text": "Hola sala 1", "n": [1, 2.5, null]});
    let meta = json!({"trace": "t-1"});
    publish(&mut a, "room-1", &body, Some(&meta), "pub-a");
    for m in [&mut a2, &mut b, &mut c] {
        assert_room_message(&m.recv_json(), json!(1), "room-1", &body, &meta, before);
    }

    // And from shard 1 back to shard 0, without meta (null).
    let before = now_ms();
    publish(&mut b, "room-1", &json!("hi"), None, "pub-b");
    for m in [&mut a, &mut a2, &mut c] {
        assert_room_message(&m.recv_json(), json!(2), "room-1", &json!("hi"), &Value::Null, before);
    }

    // Nothing more for anyone (each member got each message once); a non-member got nothing:
    // its next message is this sentinel.
    a.expect_silence(Duration::from_millis(100));
    b.expect_silence(Duration::from_millis(100));
    c.send_p2p_acked(4, "sentinel", &json!({"s": 1}));
    assert_eq!(outsider.recv_json()["type"], "data_event", "a non-member received a room message");
}

#[test]
fn broadcast_requires_membership_and_a_body() {
    let server = quiet_server();
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    let mut b = connect(addr, 2, &[]);
    join(&mut b, "room-1", "jb");

    a.send_value(&json!({"type": "broadcast", "pid": "nm", "payload": {"room": "room-1", "body": "x"}}));
    assert_error(&a.recv_json(), 403, "nm");
    a.send_value(&json!({"type": "broadcast", "pid": "nb", "payload": {"room": "room-1"}}));
    assert_error(&a.recv_json(), 400, "nb");
    // Neither reached the member; the connection is kept.
    a.roundtrip("still-open");
    b.expect_silence(Duration::from_millis(100));

    // After leaving, a former member is refused too.
    join(&mut a, "room-1", "ja");
    leave(&mut a, "room-1", "la");
    a.send_value(&json!({"type": "broadcast", "pid": "gone", "payload": {"room": "room-1", "body": 1}}));
    assert_error(&a.recv_json(), 403, "gone");
    b.expect_silence(Duration::from_millis(100));
}

#[test]
fn the_sending_connection_does_not_receive_its_own_room_message() {
    // README: "every member (other than the sending connection) gets room_message"; SPEC's
    // client broadcast likewise excludes "the sender's" connection. The sender's *other*
    // connections are members like any other and do get it.
    let server = quiet_server();
    let addr = server.local_addr();
    let mut a = connect_on_shard(addr, 1, &[], 0);
    let mut a2 = connect_on_shard(addr, 1, &[], 1);
    let mut b = connect(addr, 2, &[]);
    join(&mut a, "echo", "ja");
    join(&mut a2, "echo", "ja2");
    join(&mut b, "echo", "jb");
    a.send_value(&json!({"type": "broadcast", "pid": "p", "payload": {"room": "echo", "body": "hola"}}));
    let first = a.recv_json();
    assert_ack(&first, "p", "published");
    for m in [&mut a2, &mut b] {
        assert_eq!(m.recv_of_type("room_message")["payload"]["body"], "hola");
    }
    // Without a pid: nothing at all comes back to the sender.
    a.send_value(&json!({"type": "broadcast", "payload": {"room": "echo", "body": "again"}}));
    for m in [&mut a2, &mut b] {
        assert_eq!(m.recv_of_type("room_message")["payload"]["body"], "again");
    }
    a.expect_silence(Duration::from_millis(150));
}

#[test]
fn join_is_idempotent_and_leave_of_a_non_member_is_404() {
    let server = quiet_server();
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    let mut b = connect(addr, 2, &[]);
    join(&mut a, "dup", "j1");
    join(&mut a, "dup", "j2");
    join(&mut b, "dup", "jb");
    assert_eq!(members(&server, "dup"), vec![1, 2]);

    // Joined twice, delivered once.
    publish(&mut b, "dup", &json!("once"), None, "p");
    assert_eq!(a.recv_json()["payload"]["body"], "once");
    a.expect_silence(Duration::from_millis(150));

    leave(&mut a, "dup", "l1");
    a.send_value(&json!({"type": "leave", "pid": "l2", "payload": {"room": "dup"}}));
    assert_error(&a.recv_json(), 404, "l2");
    a.send_value(&json!({"type": "leave", "pid": "l3", "payload": {"room": "never-joined"}}));
    assert_error(&a.recv_json(), 404, "l3");
    assert_eq!(members(&server, "dup"), vec![2]);
}

// ---------------------------------------------------------------------------------------------
// Membership cleanup
// ---------------------------------------------------------------------------------------------

#[test]
fn disconnected_members_leave_their_rooms() {
    let server = quiet_server();
    let addr = server.local_addr();
    let mut a = connect_on_shard(addr, 1, &[], 0);
    let mut b = connect_on_shard(addr, 2, &[], 1);
    let mut c = connect_on_shard(addr, 3, &[], 0);
    for (i, m) in [&mut a, &mut b, &mut c].into_iter().enumerate() {
        join(m, "r-clean", &format!("j{i}"));
        join(m, "r-other", &format!("k{i}"));
    }
    assert_eq!(members(&server, "r-clean"), vec![1, 2, 3]);
    assert_eq!(publish_lib(&server, "r-clean", "1", None), 3);
    for m in [&mut a, &mut b, &mut c] {
        assert_eq!(m.recv_of_type("room_message")["payload"]["body"], 1);
    }

    // b (shard 1) closes cleanly; c (shard 0) just vanishes (TCP shutdown, no close frame).
    b.close();
    c.ws.get_ref().shutdown(std::net::Shutdown::Both).unwrap();
    drop(c);
    wait_until(Duration::from_secs(3), "r-clean to shrink to user 1", || members(&server, "r-clean") == [1]);
    assert_eq!(members(&server, "r-other"), vec![1]);
    assert_eq!(publish_lib(&server, "r-clean", "2", None), 1, "a publish counted a gone member");
    assert_eq!(a.recv_of_type("room_message")["payload"]["body"], 2);

    // Membership belongs to the connection: the same users reconnecting are not members.
    let mut b_again = connect_on_shard(addr, 2, &[], 1);
    let mut c_again = connect_on_shard(addr, 3, &[], 0);
    publish(&mut a, "r-clean", &json!(3), None, "p3");
    a.send_p2p_acked(2, "s2", &json!("sentinel"));
    a.send_p2p_acked(3, "s3", &json!("sentinel"));
    assert_eq!(b_again.recv_json()["type"], "data_event", "a new connection got an old room's message");
    assert_eq!(c_again.recv_json()["type"], "data_event", "a new connection got an old room's message");

    // The last member gone: the room is empty everywhere.
    a.close();
    wait_until(Duration::from_secs(3), "r-clean to be empty", || members(&server, "r-clean").is_empty());
    assert_eq!(publish_lib(&server, "r-clean", "4", None), 0);
}

// ---------------------------------------------------------------------------------------------
// Limits and names
// ---------------------------------------------------------------------------------------------

#[test]
fn rooms_per_connection_are_limited() {
    let server = start(|c| {
        c.max_rooms_per_connection = 3;
        c.room_presence_max_members = 0;
    });
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    for i in 0..3 {
        join(&mut a, &format!("lim-{i}"), &format!("j{i}"));
    }
    join_refused(&mut a, json!("lim-3"), "j3", 429);
    // Re-joining a room it is already in is not a new room.
    join(&mut a, "lim-0", "again");
    assert_eq!(members(&server, "lim-3"), Vec::<i64>::new());

    // The limit is per connection: the same user's other connection may join.
    let mut a2 = connect(addr, 1, &[]);
    join(&mut a2, "lim-3", "other-conn");
    // Leaving frees a slot.
    leave(&mut a, "lim-0", "l0");
    join(&mut a, "lim-3", "j3-after-leave");
    a.roundtrip("open");
}

#[test]
fn members_per_room_are_limited_across_shards() {
    let server = start(|c| {
        c.max_room_members = 2;
        c.room_presence_max_members = 0;
    });
    let addr = server.local_addr();
    let mut a = connect_on_shard(addr, 1, &[], 0);
    let mut b = connect_on_shard(addr, 2, &[], 1);
    let mut c = connect_on_shard(addr, 3, &[], 0);
    let mut d = connect_on_shard(addr, 4, &[], 1);
    join(&mut a, "small", "ja");
    join(&mut b, "small", "jb");
    // Full, whichever shard asks.
    join_refused(&mut c, json!("small"), "jc", 429);
    join_refused(&mut d, json!("small"), "jd", 429);
    assert_eq!(members(&server, "small"), vec![1, 2]);
    // Other rooms are unaffected.
    join(&mut c, "big", "jc-big");

    // A member leaving (here: disconnecting) makes room again.
    b.close();
    wait_until(Duration::from_secs(3), "b to leave `small`", || members(&server, "small") == [1]);
    join(&mut c, "small", "jc2");
    join_refused(&mut d, json!("small"), "jd2", 429);
    publish(&mut c, "small", &json!("hi"), None, "pc");
    assert_eq!(a.recv_of_type("room_message")["payload"]["from"], 3);
}

#[test]
fn room_names_are_validated() {
    let server = quiet_server();
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    let longest = "x".repeat(128);
    for (i, good) in ["room-1", "orders:42@eu#a.b_c", "A", longest.as_str()].into_iter().enumerate() {
        join(&mut a, good, &format!("good{i}"));
    }
    let too_long = "x".repeat(129);
    let bad = [
        json!(""),
        json!(too_long),
        json!("a b"),
        json!("sala-ñ"),
        json!("room/1"),
        json!("r\"q"),
        json!(42),
        json!(null),
    ];
    for (i, room) in bad.into_iter().enumerate() {
        join_refused(&mut a, room, &format!("bad{i}"), 400);
    }
    a.send_value(&json!({"type": "join", "pid": "no-room", "payload": {}}));
    assert_error(&a.recv_json(), 400, "no-room");
    a.send_value(&json!({"type": "broadcast", "pid": "bad-pub", "payload": {"room": "a b", "body": 1}}));
    let v = a.recv_json();
    assert_eq!(v["type"], "error_notification", "{v}");
    assert!(matches!(v["error"]["code"].as_i64(), Some(400 | 403)), "{v}");
    a.send_value(&json!({"type": "room_presence", "pid": "bad-rp", "payload": {"room": ""}}));
    assert_error(&a.recv_json(), 400, "bad-rp");
    // None of it closed the connection, and only the good rooms exist.
    a.roundtrip("open");
    assert_eq!(members(&server, &"x".repeat(128)), vec![1]);
    assert!(members(&server, "a b").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Join/leave events and room presence
// ---------------------------------------------------------------------------------------------

#[test]
fn join_and_leave_are_announced_to_the_other_members() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect_on_shard(addr, 1, &[], 0);
    let mut b = connect_on_shard(addr, 2, &[], 1);
    let mut c = connect_on_shard(addr, 3, &[], 0);
    join(&mut a, "room-ev", "ja");

    join(&mut b, "room-ev", "jb");
    assert_room_event(&a.recv_json(), 2, "joined", "room-ev");
    join(&mut c, "room-ev", "jc");
    assert_room_event(&a.recv_json(), 3, "joined", "room-ev");
    assert_room_event(&b.recv_json(), 3, "joined", "room-ev");

    leave(&mut b, "room-ev", "lb");
    assert_room_event(&a.recv_json(), 2, "left", "room-ev");
    assert_room_event(&c.recv_json(), 2, "left", "room-ev");

    // Disconnecting is leaving.
    c.close();
    assert_room_event(&a.recv_json(), 3, "left", "room-ev");
    // Nobody hears about their own joins/leaves, and b is no longer a member.
    a.expect_silence(Duration::from_millis(150));
    b.expect_silence(Duration::from_millis(50));
}

#[test]
fn large_rooms_do_not_announce_joins_and_leaves() {
    let server = start(|c| c.room_presence_max_members = 2);
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    let mut b = connect(addr, 2, &[]);
    let mut c = connect(addr, 3, &[]);
    join(&mut a, "crowd", "ja");
    join(&mut b, "crowd", "jb");
    assert_room_event(&a.recv_json(), 2, "joined", "crowd");
    // A third member makes the room larger than the limit: no event from here on.
    join(&mut c, "crowd", "jc");
    leave(&mut c, "crowd", "lc");
    publish(&mut b, "crowd", &json!("sentinel"), None, "pb");
    assert_eq!(a.recv_json()["type"], "room_message", "a join/leave event of a large room was sent");
    b.expect_silence(Duration::from_millis(100));
}

/// A `room_presence` answer to `pid`: one message `{room, members, next}`; returns the members.
fn room_presence_page(c: &mut Client, room: &str, pid: &str) -> Vec<Value> {
    c.send_value(&json!({"type": "room_presence", "pid": pid, "payload": {"room": room}}));
    let v = c.recv_json();
    assert_eq!(v["type"], "room_presence", "expected the room_presence answer to {pid}, got {v}");
    assert_eq!(v["pid"], pid, "{v}");
    assert_eq!(v["payload"]["room"], room, "{v}");
    assert_eq!(v["payload"]["next"], Value::Null, "one page holds the whole room: {v}");
    v["payload"]["members"].as_array().unwrap_or_else(|| panic!("payload.members: {v}")).clone()
}

/// A `room_presence` member entry `{userId, status, context, timestamp}`.
fn assert_member(m: &Value, user: i64, status: &str) {
    assert_eq!(m["userId"], user, "{m}");
    assert_eq!(m["status"], status, "{m}");
    assert!(m.as_object().is_some_and(|o| o.contains_key("context")), "member.context: {m}");
    assert_rfc3339(m["timestamp"].as_str().unwrap_or_else(|| panic!("member.timestamp: {m}")));
}

#[test]
fn room_presence_lists_every_members_current_status() {
    let server = start(|c| c.room_presence_max_members = 0);
    let addr = server.local_addr();
    let mut a = connect_on_shard(addr, 1, &[], 0);
    let mut b = connect_on_shard(addr, 2, &[], 1);
    let mut c = connect_on_shard(addr, 3, &[], 0);
    update(&mut a, "busy", json!({"status": "busy", "context": {"call": true}}), "ok");
    join(&mut a, "roster", "ja");
    join(&mut b, "roster", "jb");
    join(&mut c, "roster", "jc");

    // c asks who is there: one answer, members in user-id order, the asker included.
    let members = room_presence_page(&mut c, "roster", "rp");
    assert_eq!(members.len(), 3, "{members:?}");
    assert_member(&members[0], 1, "busy");
    assert_eq!(members[0]["context"], json!({"call": true}));
    assert_member(&members[1], 2, "online");
    assert_member(&members[2], 3, "online");
    c.expect_silence(Duration::from_millis(150));
}

#[test]
fn room_presence_reports_a_user_once_even_with_connections_on_both_shards() {
    let server = start(|c| c.room_presence_max_members = 0);
    let addr = server.local_addr();
    let mut a0 = connect_on_shard(addr, 1, &[], 0);
    let mut a1 = connect_on_shard(addr, 1, &[], 1);
    let mut c = connect(addr, 3, &[]);
    join(&mut a0, "twice", "j0");
    join(&mut a1, "twice", "j1");
    join(&mut c, "twice", "jc");
    assert_eq!(members(&server, "twice"), vec![1, 3]);
    let got = room_presence_page(&mut c, "twice", "rp");
    assert_eq!(got.len(), 2, "{got:?}");
    assert_member(&got[0], 1, "online");
    assert_member(&got[1], 3, "online");
    c.expect_silence(Duration::from_millis(200));
}

// ---------------------------------------------------------------------------------------------
// Presence to room members
// ---------------------------------------------------------------------------------------------

#[test]
fn presence_update_reaches_room_members_once_per_connection_across_shared_rooms() {
    let server = start(|c| c.room_presence_max_members = 0);
    let addr = server.local_addr();
    let mut s = connect_on_shard(addr, 1, &[], 0);
    let mut w = connect_on_shard(addr, 2, &[], 1); // shares 3 rooms with s
    let mut m = connect_on_shard(addr, 3, &[], 0); // shares 1 room with s
    let mut x = connect(addr, 4, &[]); // shares nothing
    for r in ["p-1", "p-2", "p-3"] {
        join(&mut s, r, &format!("s-{r}"));
        join(&mut w, r, &format!("w-{r}"));
    }
    join(&mut m, "p-2", "m");
    join(&mut x, "elsewhere", "x");

    let ctx = json!({"location": "chat-room-general"});
    update(&mut s, "away", json!({"status": "away", "context": ctx}), "ok");
    let pw = assert_presence(&w.recv_json(), 1, "away");
    assert_eq!(pw["context"], ctx);
    assert_presence(&m.recv_json(), 1, "away");

    // A duplicate would be queued before this room message (same path, same order).
    publish(&mut s, "p-3", &json!("after"), None, "sentinel");
    let next = w.recv_json();
    assert_eq!(next["type"], "room_message", "a member sharing 3 rooms got a second presence event: {next}");
    w.expect_silence(Duration::from_millis(200));
    m.expect_silence(Duration::from_millis(100));
    // The sender does not hear itself; a non-member hears nothing.
    s.expect_silence(Duration::from_millis(50));
    x.expect_silence(Duration::from_millis(50));
}

#[test]
fn a_watcher_who_is_also_a_room_member_gets_one_event() {
    let server = start(|c| c.room_presence_max_members = 0);
    let addr = server.local_addr();
    let mut s = connect_on_shard(addr, 1, &[], 0);
    let mut w = connect_on_shard(addr, 2, &[], 1);
    assert_presence(&subscribe(&mut w, &[1], "sub")[0], 1, "online");
    for r in ["both-1", "both-2"] {
        join(&mut s, r, &format!("s-{r}"));
        join(&mut w, r, &format!("w-{r}"));
    }
    update(&mut s, "away", json!({"status": "away"}), "ok");
    assert_presence(&w.recv_json(), 1, "away");
    // Issue 4: "one event per watcher even when they share several rooms".
    w.expect_silence(Duration::from_millis(300));
}

// ---------------------------------------------------------------------------------------------
// Typing: transient statuses and coalescing (seed 001 §10)
// ---------------------------------------------------------------------------------------------

const TTL: Duration = Duration::from_millis(300);

#[test]
fn typing_expires_after_the_ttl_back_to_online() {
    let server = start(|c| {
        c.transient_ttl = TTL;
        c.room_presence_max_members = 0;
    });
    let addr = server.local_addr();
    let mut s = connect_on_shard(addr, 1, &[], 0);
    let mut w = connect_on_shard(addr, 2, &[], 1); // a watcher
    let mut m = connect_on_shard(addr, 3, &[], 0); // a room member
    assert_presence(&subscribe(&mut w, &[1], "sub")[0], 1, "online");
    join(&mut s, "chat", "js");
    join(&mut m, "chat", "jm");

    let sent = Instant::now();
    let ctx = json!({"chatId": "chat"});
    update(&mut s, "t", json!({"status": "typing", "context": ctx}), "ok");
    assert_eq!(assert_presence(&w.recv_json(), 1, "typing")["context"], ctx);
    assert_presence(&m.recv_json(), 1, "typing");

    // Nobody sends "stop": the server reverts after the TTL.
    let pw = assert_presence(&w.recv_json(), 1, "online");
    let elapsed = sent.elapsed();
    assert_eq!(pw["context"], Value::Null);
    assert!(elapsed >= TTL, "typing reverted after {elapsed:?}, before the {TTL:?} TTL");
    assert!(elapsed < TTL + Duration::from_secs(1), "typing reverted only after {elapsed:?}");
    assert_presence(&m.recv_json(), 1, "online");
    // Once.
    w.expect_silence(TTL + Duration::from_millis(100));
    m.expect_silence(Duration::from_millis(50));

    // The stored presence reverted too.
    let mut late = connect(addr, 9, &[]);
    assert_presence(&subscribe(&mut late, &[1], "late")[0], 1, "online");
}

#[test]
fn typing_reverts_to_the_last_lasting_status_and_repeats_keep_it_alive() {
    let server = start(|c| c.transient_ttl = TTL);
    let addr = server.local_addr();
    let mut s = connect(addr, 1, &[]);
    let mut w = connect(addr, 2, &[]);
    subscribe(&mut w, &[1], "sub");
    update(&mut s, "busy", json!({"status": "busy"}), "ok");
    assert_presence(&w.recv_json(), 1, "busy");

    // Keystrokes every 100 ms for ~600 ms: identical, so coalesced, but each one keeps the
    // status alive.
    let first = Instant::now();
    update(&mut s, "k0", json!({"status": "typing"}), "ok");
    assert_presence(&w.recv_json(), 1, "typing");
    let mut last = first;
    for i in 1..=6 {
        std::thread::sleep(Duration::from_millis(100));
        last = Instant::now();
        update(&mut s, &format!("k{i}"), json!({"status": "typing"}), "coalesced");
    }
    assert!(first.elapsed() < Duration::from_secs(1), "the keystrokes must fall in one coalescing window");
    let v = w.recv_json();
    let since_last = last.elapsed();
    assert_presence(&v, 1, "busy");
    assert!(since_last >= TTL, "reverted {since_last:?} after the last keystroke, before the TTL");
    assert!(
        since_last < TTL + Duration::from_secs(1),
        "reverted only {since_last:?} after the last keystroke"
    );
}

#[test]
fn a_keystroke_storm_costs_one_event_per_watcher_per_window() {
    let server = start(|c| c.room_presence_max_members = 0);
    let addr = server.local_addr();
    let mut s = connect_on_shard(addr, 1, &[], 0);
    let mut w = connect_on_shard(addr, 2, &[], 1); // watcher
    let mut m = connect_on_shard(addr, 3, &[], 0); // room member
    subscribe(&mut w, &[1], "sub");
    join(&mut s, "storm", "js");
    join(&mut m, "storm", "jm");

    let started = Instant::now();
    let payload = json!({"status": "typing", "context": {"chatId": "storm"}});
    update(&mut s, "k0", payload.clone(), "ok");
    for i in 1..10 {
        update(&mut s, &format!("k{i}"), payload.clone(), "coalesced");
    }
    assert!(started.elapsed() < Duration::from_secs(1), "10 keystrokes took longer than the window");
    // A different update is not coalesced; it comes right after the single typing event.
    update(&mut s, "away", json!({"status": "away"}), "ok");
    for c in [&mut w, &mut m] {
        assert_presence(&c.recv_json(), 1, "typing");
        let v = c.recv_json();
        assert_presence(&v, 1, "away");
    }
    // Same status, other context: a different update, not coalesced.
    update(&mut s, "ctx-a", json!({"status": "typing", "context": {"chatId": "a"}}), "ok");
    update(&mut s, "ctx-b", json!({"status": "typing", "context": {"chatId": "b"}}), "ok");
    for c in [&mut w, &mut m] {
        assert_eq!(assert_presence(&c.recv_json(), 1, "typing")["context"]["chatId"], "a");
        assert_eq!(assert_presence(&c.recv_json(), 1, "typing")["context"]["chatId"], "b");
    }

    // After the window, the same update goes out again.
    std::thread::sleep(Duration::from_millis(1100).saturating_sub(started.elapsed()));
    let b_again = json!({"status": "typing", "context": {"chatId": "b"}});
    let wait_for_window = Instant::now();
    update(&mut s, "b-again", b_again, "ok");
    assert!(wait_for_window.elapsed() < Duration::from_secs(1));
    assert_eq!(assert_presence(&w.recv_json(), 1, "typing")["context"]["chatId"], "b");
}

#[test]
fn targeted_typing_expires_at_its_target() {
    let server = start(|c| c.transient_ttl = TTL);
    let addr = server.local_addr();
    let mut s = connect(addr, 1, &[]);
    let mut t = connect(addr, 456, &[]);
    // Seed 001 §10: `client.sendPresenceUpdate("typing", targetUserId)`.
    let sent = Instant::now();
    update(&mut s, "t", json!({"status": "typing", "targetUserId": 456}), "ok");
    assert_presence(&t.recv_json(), 1, "typing");
    // The client need not send "stop": the target, the only one who saw "typing", must see it
    // end (bounded wait: TTL plus a second).
    t.ws.get_ref().set_read_timeout(Some(TTL + Duration::from_secs(1))).unwrap();
    let v = t.recv_json();
    assert_presence(&v, 1, "online");
    assert!(sent.elapsed() >= TTL, "reverted before the TTL");
}

// ---------------------------------------------------------------------------------------------
// Library API
// ---------------------------------------------------------------------------------------------

#[test]
fn library_publish_to_room_and_room_members() {
    let server = quiet_server();
    let addr = server.local_addr();
    let mut a = connect_on_shard(addr, 1, &[], 0);
    let mut a2 = connect_on_shard(addr, 1, &[], 1);
    let mut b = connect_on_shard(addr, 2, &[], 1);
    let mut out = connect(addr, 3, &[]);
    assert!(members(&server, "lib").is_empty());
    join(&mut a, "lib", "ja");
    join(&mut a2, "lib", "ja2");
    join(&mut b, "lib", "jb");
    join(&mut out, "other", "jo");
    // Sorted user ids, each once (user 1 has a member connection on each shard).
    assert_eq!(members(&server, "lib"), vec![1, 2]);

    let before = now_ms();
    let n = publish_lib(&server, "lib", r#"{"event":"deploy","v":[1,2]}"#, Some(r#"{"by":"ci"}"#));
    assert_eq!(n, 3, "queued on every member connection");
    let body = json!({"event": "deploy", "v": [1, 2]});
    for c in [&mut a, &mut a2, &mut b] {
        assert_room_message(&c.recv_json(), Value::Null, "lib", &body, &json!({"by": "ci"}), before);
    }
    assert_eq!(publish_lib(&server, "lib", "\"no meta\"", None), 3);
    for c in [&mut a, &mut a2, &mut b] {
        assert_room_message(&c.recv_json(), Value::Null, "lib", &json!("no meta"), &Value::Null, before);
    }
    assert_eq!(publish_lib(&server, "nobody", "1", None), 0);
    out.expect_silence(Duration::from_millis(100));

    leave(&mut a2, "lib", "la2");
    assert_eq!(members(&server, "lib"), vec![1, 2]);
    leave(&mut a, "lib", "la");
    assert_eq!(members(&server, "lib"), vec![2]);
    assert_eq!(publish_lib(&server, "lib", "0", None), 1);
    assert_eq!(b.recv_of_type("room_message")["payload"]["body"], 0);
    a.expect_silence(Duration::from_millis(50));
}

#[test]
fn library_publish_never_puts_invalid_json_on_the_wire() {
    // SPEC: "Text frames carry one JSON object each". `publish_to_room` takes `&RawValue`, so
    // a body or meta that is not JSON cannot even be handed to it; what arrives is JSON.
    assert!(RawValue::from_string("not json{".to_string()).is_err());
    let server = quiet_server();
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    join(&mut a, "raw", "j");
    assert_eq!(publish_lib(&server, "raw", "\"ok\"", Some(r#"{"k": [1, 2]}"#)), 1);
    let text = a.recv_text();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON frame ({e}): {text}"));
    assert_eq!(v["payload"]["body"], "ok");
    assert_eq!(v["payload"]["meta"]["k"][1], 2);
}

//! The backend HTTP API's rooms (`POST /api/v1/rooms/{room}/publish`, `GET /api/v1/rooms/{room}`,
//! `GET /api/v1/rooms/{room}/presence`) against real WebSocket clients that `join` rooms on both
//! shards: delivery to every member and to no one else with seed 003's `room_message` envelope,
//! the delivered count, member lists that follow disconnects and leaves, each member's presence,
//! percent-encoded names, and the 400/401/405 errors.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::api::*;
use common::*;
use customws::Config;
use serde_json::{Value, json};

/// Bound on asynchronous membership changes (a disconnect leaving its rooms).
const SETTLE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Helpers (the HTTP client is in tests/common/api.rs)
// ---------------------------------------------------------------------------------------------

/// Makes the server quiet (no join/leave presence events, so clients only see what a test is
/// about); every test's server is `api_server(quiet)`.
fn quiet(c: &mut Config) {
    c.room_presence_max_members = 0;
}

/// Publishes through the API; must answer 200 `{"delivered": n}`; returns n.
fn publish(api: SocketAddr, room: &str, body: &str) -> u64 {
    let answer = post_raw(api, &format!("/api/v1/rooms/{room}/publish"), body);
    assert_ok(&answer);
    let keys: Vec<&String> = answer.body.as_object().expect("an object").keys().collect();
    assert_eq!(keys, ["delivered"], "{}", answer.raw);
    answer.body["delivered"].as_u64().unwrap_or_else(|| panic!("delivered must be a count: {}", answer.raw))
}

/// `GET /api/v1/rooms/{room}`: checks the answer's shape, returns the member list.
fn members(api: SocketAddr, path_room: &str, room: &str) -> Vec<i64> {
    let answer = get(api, &format!("/api/v1/rooms/{path_room}"));
    assert_ok(&answer);
    let b = &answer.body;
    let mut keys: Vec<&String> = b.as_object().expect("an object").keys().collect();
    keys.sort_unstable();
    assert_eq!(keys, ["count", "members", "room"], "{}", answer.raw);
    assert_eq!(b["room"], room, "{}", answer.raw);
    let list: Vec<i64> = b["members"]
        .as_array()
        .unwrap_or_else(|| panic!("members must be a list: {}", answer.raw))
        .iter()
        .map(|v| v.as_i64().unwrap_or_else(|| panic!("members must be user ids: {}", answer.raw)))
        .collect();
    assert!(list.windows(2).all(|w| w[0] < w[1]), "members must be sorted and unique: {}", answer.raw);
    assert_eq!(
        b["count"].as_u64(),
        Some(list.len() as u64),
        "count must be the list's length: {}",
        answer.raw
    );
    list
}

/// Polls the member list until it is `want` (leaving after a disconnect is asynchronous).
fn await_members(api: SocketAddr, room: &str, want: &[i64]) {
    let mut last = Vec::new();
    let what = format!("members of {room} to become {want:?}");
    wait_until(SETTLE, &what, || {
        last = members(api, room, room);
        last == want
    });
}

/// `GET /api/v1/rooms/{room}/presence`: checks the answer's shape (members sorted by user id,
/// each once, each exactly `{userId, status, context, since}` with an RFC 3339 `since`),
/// returns the answer and its members.
fn room_presence(api: SocketAddr, path_room: &str, room: &str) -> (Answer, Vec<Value>) {
    let answer = get(api, &format!("/api/v1/rooms/{path_room}/presence"));
    assert_ok(&answer);
    let b = &answer.body;
    let mut keys: Vec<&String> = b.as_object().expect("an object").keys().collect();
    keys.sort_unstable();
    assert_eq!(keys, ["members", "room"], "{}", answer.raw);
    assert_eq!(b["room"], room, "{}", answer.raw);
    let list = b["members"].as_array().unwrap_or_else(|| panic!("members must be a list: {}", answer.raw));
    for m in list {
        let mut keys: Vec<&String> = m.as_object().expect("a member must be an object").keys().collect();
        keys.sort_unstable();
        assert_eq!(keys, ["context", "since", "status", "userId"], "{}", answer.raw);
        assert!(m["status"].is_string(), "{}", answer.raw);
        assert_rfc3339(m["since"].as_str().unwrap_or_else(|| panic!("since must be text: {}", answer.raw)));
    }
    let ids: Vec<i64> = list.iter().map(|m| m["userId"].as_i64().expect("a user id")).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "members must be sorted and unique: {}", answer.raw);
    let list = list.clone();
    (answer, list)
}

/// (userId, status) of each member in a room presence list.
fn statuses(members: &[Value]) -> Vec<(i64, String)> {
    members
        .iter()
        .map(|m| (m["userId"].as_i64().unwrap(), m["status"].as_str().unwrap().to_owned()))
        .collect()
}

/// Polls the room's presence until its (userId, status) pairs are `want` (presence updates and
/// disconnects reach the shards asynchronously); returns the last answer and members.
fn await_room_presence(api: SocketAddr, room: &str, want: &[(i64, &str)]) -> (Answer, Vec<Value>) {
    let want: Vec<(i64, String)> = want.iter().map(|&(u, s)| (u, s.to_owned())).collect();
    let mut last = None;
    wait_until(SETTLE, &format!("the presence of {room} to become {want:?}"), || {
        let (answer, members) = room_presence(api, room, room);
        let done = statuses(&members) == want;
        last = Some((answer, members));
        done
    });
    last.expect("polled at least once")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// `join` with a pid; the next message must be its `joined` ack.
fn join(c: &mut Client, room: &str, pid: &str) {
    c.send_value(&json!({"type": "join", "pid": pid, "payload": {"room": room}}));
    let v = c.recv_json();
    assert_eq!(v["type"], "server_ack", "expected the ack of {pid}, got {v}");
    assert_eq!(v["payload"]["acknowledgedPid"], pid, "{v}");
    assert_eq!(v["payload"]["status"], "joined", "{v}");
}

/// Receives one message that must be a `room_message` with exactly `{from, room, ts, body,
/// meta}`, `ts` Unix ms within [`after`, now]; returns the raw text.
fn expect_room_message(
    c: &mut Client,
    from: Value,
    room: &str,
    body: &Value,
    meta: &Value,
    after: u64,
) -> String {
    let raw = c.recv_text();
    let v: Value = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("not JSON ({e}): {raw}"));
    let mut top: Vec<&String> = v.as_object().expect("an object").keys().collect();
    top.sort_unstable();
    assert_eq!(top, ["payload", "type"], "user {}: {raw}", c.user_id);
    assert_eq!(v["type"], "room_message", "user {}: expected a room_message, got {raw}", c.user_id);
    let p = v["payload"].as_object().unwrap_or_else(|| panic!("payload must be an object: {raw}"));
    let mut keys: Vec<&str> = p.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["body", "from", "meta", "room", "ts"], "envelope fields: {raw}");
    assert_eq!(p["from"], from, "{raw}");
    assert_eq!(p["room"], room, "{raw}");
    assert_eq!(&p["body"], body, "{raw}");
    assert_eq!(&p["meta"], meta, "{raw}");
    let ts = p["ts"].as_u64().unwrap_or_else(|| panic!("ts must be Unix milliseconds: {raw}"));
    assert!(ts + 5 >= after && ts <= now_ms() + 5, "ts {ts} not within [{after}, now]: {raw}");
    raw
}

/// Sends `{"type": "sentinel"}` to `c`'s user through the API, and asserts it is `c`'s next
/// message: nothing else (such as a room message) was queued for `c` before it.
fn expect_only_sentinel(api: SocketAddr, c: &mut Client, tag: &str) {
    let answer = post(
        api,
        "/api/v1/send",
        &json!({"userId": c.user_id, "message": {"type": "sentinel", "payload": tag}}),
    );
    assert_ok(&answer);
    let v = c.recv_json();
    assert_eq!(v["type"], "sentinel", "user {}: expected only the sentinel {tag}, got {v}", c.user_id);
    assert_eq!(v["payload"], tag, "{v}");
}

// ---------------------------------------------------------------------------------------------
// Publish
// ---------------------------------------------------------------------------------------------

#[test]
fn publish_reaches_every_member_on_both_shards_and_no_one_else() {
    let (_server, ws, api) = api_server(quiet);
    let mut a0 = connect_on_shard(ws, 1, &[], 0);
    let mut a1 = connect_on_shard(ws, 1, &[], 1); // user 1's second connection, other shard
    let mut b = connect_on_shard(ws, 2, &[], 1);
    let mut c = connect_on_shard(ws, 3, &[], 0);
    let mut outsider0 = connect_on_shard(ws, 4, &[], 0);
    let mut outsider1 = connect_on_shard(ws, 5, &[], 1);
    let mut elsewhere = connect_on_shard(ws, 6, &[], 1);
    for (i, m) in [&mut a0, &mut a1, &mut b, &mut c].into_iter().enumerate() {
        join(m, "lobby", &format!("j{i}"));
    }
    join(&mut elsewhere, "lobby-2", "j-other");

    // Body and meta are forwarded byte-for-byte; `from` is fromUserId.
    let body_text = r#"{"text": "hola sala",  "n": [1, 2.5, null], "u": "\u00e9"}"#;
    let meta_text = r#"{"trace" : "t-1"}"#;
    let request = format!(r#"{{"body": {body_text}, "meta": {meta_text}, "fromUserId": 42}}"#);
    let before = now_ms();
    assert_eq!(publish(api, "lobby", &request), 4, "four member connections on two shards");
    let body: Value = serde_json::from_str(body_text).unwrap();
    let meta: Value = serde_json::from_str(meta_text).unwrap();
    for m in [&mut a0, &mut a1, &mut b, &mut c] {
        let raw = expect_room_message(m, json!(42), "lobby", &body, &meta, before);
        assert!(
            raw.contains(&format!(r#""body":{body_text},"meta":{meta_text}"#)),
            "not byte-for-byte: {raw}"
        );
    }

    // Without fromUserId and meta: from the server (`from: null`), `meta: null`.
    let before = now_ms();
    assert_eq!(publish(api, "lobby", r#"{"body": ["x", 1]}"#), 4);
    for m in [&mut a0, &mut a1, &mut b, &mut c] {
        expect_room_message(m, Value::Null, "lobby", &json!(["x", 1]), &Value::Null, before);
    }
    // Explicit nulls are the same; a null body is still a body.
    let before = now_ms();
    assert_eq!(publish(api, "lobby", r#"{"body": null, "meta": null, "fromUserId": null}"#), 4);
    for m in [&mut a0, &mut a1, &mut b, &mut c] {
        expect_room_message(m, Value::Null, "lobby", &Value::Null, &Value::Null, before);
    }

    // Each member got each message once; non-members (either shard, another room) got none.
    for m in [&mut a0, &mut b, &mut c, &mut outsider0, &mut outsider1, &mut elsewhere] {
        expect_only_sentinel(api, m, "after-publish");
    }
    let v = a1.recv_json(); // user 1's other connection gets the sentinel too
    assert_eq!(v["type"], "sentinel", "{v}");

    // Another room and a room nobody is in.
    let before = now_ms();
    assert_eq!(publish(api, "lobby-2", r#"{"body": "other", "fromUserId": 7}"#), 1);
    expect_room_message(&mut elsewhere, json!(7), "lobby-2", &json!("other"), &Value::Null, before);
    assert_eq!(publish(api, "empty-room", r#"{"body": 1}"#), 0);
    for m in [&mut a0, &mut a1, &mut b, &mut c, &mut outsider0, &mut elsewhere] {
        m.expect_silence(Duration::from_millis(100));
    }
}

#[test]
fn delivered_counts_the_members_left_after_disconnects() {
    let (_server, ws, api) = api_server(quiet);
    let mut a = connect_on_shard(ws, 1, &[], 0);
    let mut b = connect_on_shard(ws, 2, &[], 1);
    let mut c = connect_on_shard(ws, 3, &[], 1);
    for (i, m) in [&mut a, &mut b, &mut c].into_iter().enumerate() {
        join(m, "count-room", &format!("j{i}"));
    }
    assert_eq!(publish(api, "count-room", r#"{"body": 1}"#), 3);
    for m in [&mut a, &mut b, &mut c] {
        assert_eq!(m.recv_json()["payload"]["body"], 1);
    }
    c.close();
    await_members(api, "count-room", &[1, 2]);
    assert_eq!(publish(api, "count-room", r#"{"body": 2}"#), 2);
    for m in [&mut a, &mut b] {
        assert_eq!(m.recv_json()["payload"]["body"], 2);
    }
}

// ---------------------------------------------------------------------------------------------
// Members
// ---------------------------------------------------------------------------------------------

#[test]
fn members_are_listed_across_shards_and_follow_disconnects() {
    let (_server, ws, api) = api_server(quiet);
    assert_eq!(members(api, "lobby", "lobby"), Vec::<i64>::new(), "an unknown room has no members");
    let unknown = get(api, "/api/v1/rooms/never-joined");
    assert_ok(&unknown);
    assert_eq!(unknown.body, json!({"room": "never-joined", "members": [], "count": 0}));

    let mut a0 = connect_on_shard(ws, 30, &[], 0);
    let mut a1 = connect_on_shard(ws, 30, &[], 1); // same user twice: listed once
    let mut b = connect_on_shard(ws, 7, &[], 1);
    let mut c = connect_on_shard(ws, 12, &[], 0);
    let mut other = connect(ws, 99, &[]);
    for (i, m) in [&mut a0, &mut a1, &mut b, &mut c].into_iter().enumerate() {
        join(m, "lobby", &format!("j{i}"));
    }
    join(&mut other, "not-lobby", "jo");
    let answer = get(api, "/api/v1/rooms/lobby");
    assert_ok(&answer);
    assert_eq!(answer.body, json!({"room": "lobby", "members": [7, 12, 30], "count": 3}));
    assert_eq!(members(api, "not-lobby", "not-lobby"), [99]);

    // A disconnected member disappears (asynchronously); a user stays while any of its
    // connections is in.
    c.close();
    await_members(api, "lobby", &[7, 30]);
    let gauges = metrics_shard_connections(ws);
    a1.close();
    wait_until(SETTLE, "user 30's shard-1 connection to be gone", || {
        metrics_shard_connections(ws)[1] < gauges[1]
    });
    assert_eq!(members(api, "lobby", "lobby"), [7, 30], "user 30 is still in through its other connection");
    // ...and is gone once its last member connection is.
    a0.close();
    await_members(api, "lobby", &[7]);
    // A leave takes effect too.
    b.send_value(&json!({"type": "leave", "pid": "l", "payload": {"room": "lobby"}}));
    assert_eq!(b.recv_json()["payload"]["status"], "left");
    await_members(api, "lobby", &[]);
    assert_eq!(members(api, "not-lobby", "not-lobby"), [99]);
}

#[test]
fn percent_encoded_room_names() {
    let (_server, ws, api) = api_server(quiet);
    let mut a = connect_on_shard(ws, 1, &[], 0);
    let mut b = connect_on_shard(ws, 2, &[], 1);
    join(&mut a, "#general", "ja");
    join(&mut b, "team:1@x", "jb");
    assert_eq!(members(api, "%23general", "#general"), [1]);
    assert_eq!(members(api, "team%3A1%40x", "team:1@x"), [2]);
    assert_eq!(members(api, "team:1@x", "team:1@x"), [2]);
    let before = now_ms();
    assert_eq!(publish(api, "%23general", r#"{"body": "hi"}"#), 1);
    expect_room_message(&mut a, Value::Null, "#general", &json!("hi"), &Value::Null, before);
    b.expect_silence(Duration::from_millis(100));
}

// ---------------------------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------------------------

#[test]
fn room_presence_lists_each_members_status_across_shards() {
    let (_server, ws, api) = api_server(quiet);
    let (_, empty) = room_presence(api, "lobby", "lobby");
    assert!(empty.is_empty(), "an unknown room has no members");
    let unknown = get(api, "/api/v1/rooms/%23never-joined/presence");
    assert_ok(&unknown);
    assert_eq!(unknown.body, json!({"room": "#never-joined", "members": []}));

    let mut a = connect_on_shard(ws, 30, &[], 0);
    let mut b0 = connect_on_shard(ws, 7, &[], 1);
    let mut b1 = connect_on_shard(ws, 7, &[], 0); // same user twice: listed once
    let mut other = connect(ws, 99, &[]);
    for (i, m) in [&mut a, &mut b0, &mut b1].into_iter().enumerate() {
        join(m, "lobby", &format!("j{i}"));
    }
    join(&mut other, "not-lobby", "jo");
    let (answer, list) = room_presence(api, "lobby", "lobby");
    assert_eq!(statuses(&list), [(7, "online".to_owned()), (30, "online".to_owned())], "{}", answer.raw);
    assert!(list.iter().all(|m| m["context"].is_null()), "no context set yet: {}", answer.raw);

    // A status with a context, set on user 30's shard-0 connection; the update reaches the
    // home shard asynchronously.
    let before = now_ms();
    let update =
        r#"{"pid": "pu", "type": "presence_update", "payload": {"status": "busy", "context": {"doc": 1}}}"#;
    a.send_json(update);
    let ack = a.recv_json();
    assert_eq!((&ack["type"], &ack["payload"]["status"]), (&json!("server_ack"), &json!("ok")), "{ack}");
    let (answer, list) = await_room_presence(api, "lobby", &[(7, "online"), (30, "busy")]);
    assert_eq!(list[0]["context"], Value::Null, "{}", answer.raw);
    assert_eq!(list[1]["context"], json!({"doc": 1}), "{}", answer.raw);
    assert!(answer.raw.contains(r#""context":{"doc": 1}"#), "context not byte-for-byte: {}", answer.raw);
    let since = humantime::parse_rfc3339(list[1]["since"].as_str().unwrap()).unwrap();
    let since = since.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(since + 5 >= before && since <= now_ms() + 5, "since {since} not within [{before}, now]");
    let (_, list) = room_presence(api, "not-lobby", "not-lobby");
    assert_eq!(statuses(&list), [(99, "online".to_owned())]);

    // A user stays while any of its member connections is in...
    let gauges = metrics_shard_connections(ws);
    b0.close();
    wait_until(SETTLE, "user 7's shard-1 connection to be gone", || {
        metrics_shard_connections(ws)[1] < gauges[1]
    });
    let (answer, list) = room_presence(api, "lobby", "lobby");
    let want = [(7, "online".to_owned()), (30, "busy".to_owned())];
    assert_eq!(statuses(&list), want, "user 7 is still in through its other connection: {}", answer.raw);
    // ...and a member who disconnects disappears (asynchronously).
    a.close();
    await_room_presence(api, "lobby", &[(7, "online")]);
    b1.close();
    await_room_presence(api, "lobby", &[]);
    let (_, list) = room_presence(api, "not-lobby", "not-lobby");
    assert_eq!(statuses(&list), [(99, "online".to_owned())]);
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_names_bad_bodies_and_wrong_methods_are_refused() {
    let (_server, ws, api) = api_server(quiet);
    let mut member = connect(ws, 1, &[]);
    join(&mut member, "lobby", "j");

    let long = "r".repeat(129);
    for bad in ["bad!", "a%20b", "sp%2Fce", "%C3%A9t%C3%A9", "x%zz", long.as_str()] {
        let answer = post(api, &format!("/api/v1/rooms/{bad}/publish"), &json!({"body": 1}));
        assert_status(&answer, 400);
        assert!(answer.error().contains("room name"), "{bad}: {}", answer.raw);
        let answer = get(api, &format!("/api/v1/rooms/{bad}"));
        assert_status(&answer, 400);
        assert!(answer.error().contains("room name"), "{bad}: {}", answer.raw);
        let answer = get(api, &format!("/api/v1/rooms/{bad}/presence"));
        assert_status(&answer, 400);
        assert!(answer.error().contains("room name"), "{bad}: {}", answer.raw);
    }
    assert_ok(&get(api, &format!("/api/v1/rooms/{}", "r".repeat(128))));
    assert_ok(&get(api, &format!("/api/v1/rooms/{}/presence", "r".repeat(128))));

    let publish_path = "/api/v1/rooms/lobby/publish";
    let answer = post(api, publish_path, &json!({"meta": {"m": 1}, "fromUserId": 1}));
    assert_status(&answer, 400);
    assert!(answer.error().contains("body"), "a missing body must be named: {}", answer.raw);
    for (text, needle) in [
        ("", "not valid JSON"),
        ("{nope", "not valid JSON"),
        (r#"{"body": [1, }"#, "not valid JSON"),
        (r#"{"body": 1, "fromUserId": "1"}"#, "invalid type"),
        (r#"["body"]"#, "expected a JSON object"),
    ] {
        let answer = post_raw(api, publish_path, text);
        assert_status(&answer, 400);
        assert!(answer.error().contains(needle), "{text}: {}", answer.raw);
    }
    let answer = call(api, "POST", publish_path, Some("apikey k"), None);
    assert_status(&answer, 400);

    let answer = get(api, publish_path);
    assert_status(&answer, 405);
    assert_eq!(answer.header("allow"), Some("POST"));
    let answer = post(api, "/api/v1/rooms/lobby", &json!({"body": 1}));
    assert_status(&answer, 405);
    assert_eq!(answer.header("allow"), Some("GET"));
    assert_status(&get(api, "/api/v1/rooms/lobby/members"), 404);
    let answer = post(api, "/api/v1/rooms/lobby/presence", &json!({"body": 1}));
    assert_status(&answer, 405);
    assert_eq!(answer.header("allow"), Some("GET"));
    assert_status(&get(api, "/api/v1/rooms//presence"), 404);

    // None of these reached the member.
    expect_only_sentinel(api, &mut member, "after-errors");
}

#[test]
fn the_api_key_is_required() {
    let (_server, ws, api) = api_server(quiet);
    let mut member = connect(ws, 1, &[]);
    join(&mut member, "lobby", "j");
    let body = r#"{"body": "sneaky"}"#;
    for key in [None, Some("apikey wrong"), Some("Bearer k")] {
        let answer = call(api, "POST", "/api/v1/rooms/lobby/publish", key, Some(body));
        assert_status(&answer, 401);
        assert_eq!(answer.header("www-authenticate"), Some("apikey"));
        let answer = call(api, "GET", "/api/v1/rooms/lobby", key, None);
        assert_status(&answer, 401);
        assert_eq!(answer.header("www-authenticate"), Some("apikey"));
        let answer = call(api, "GET", "/api/v1/rooms/lobby/presence", key, None);
        assert_status(&answer, 401);
        assert_eq!(answer.header("www-authenticate"), Some("apikey"));
        // Authentication comes first, even for a bad room name.
        assert_status(&call(api, "GET", "/api/v1/rooms/bad!", key, None), 401);
        assert_status(&call(api, "GET", "/api/v1/rooms/bad!/presence", key, None), 401);
    }
    expect_only_sentinel(api, &mut member, "after-401");
    assert_eq!(members(api, "lobby", "lobby"), [1]);
}

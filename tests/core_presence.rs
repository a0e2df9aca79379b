//! Presence (SPEC "Client → server message types": `presence_update`, `presence_subscribe`,
//! `presence_unsubscribe`): watch lists, automatic online/offline, stored status + context,
//! targeted updates, and `presence_scope = all`.

mod common;

use std::time::Duration;

use common::*;
use customws::config::PresenceScope;
use serde_json::{Value, json};

/// Asserts `v` is a presence_event about `user` with `status`; returns its payload.
fn assert_presence(v: &Value, user: i64, status: &str) -> Value {
    assert_eq!(v["type"], "presence_event", "{v}");
    assert_eq!(v["fromUserId"], user, "{v}");
    let p = &v["payload"];
    assert_eq!(p["userId"], user, "{v}");
    assert_eq!(p["status"], status, "{v}");
    assert!(
        p.as_object().is_some_and(|o| o.contains_key("context")),
        "payload.context must be present (value or null): {v}"
    );
    assert_rfc3339(p["timestamp"].as_str().expect("payload.timestamp string"));
    p.clone()
}

/// Asserts `v` is a `server_ack` for `pid` with status "ok".
fn assert_ok_ack(v: &Value, pid: &str) {
    assert_eq!(v["type"], "server_ack", "{v}");
    assert_eq!(v["payload"]["acknowledgedPid"], pid, "{v}");
    assert_eq!(v["payload"]["status"], "ok", "{v}");
}

/// Sends a presence_update with `pid` and waits for its "ok" ack.
fn update(c: &mut Client, pid: &str, payload: Value) {
    c.send_value(&json!({"pid": pid, "type": "presence_update", "payload": payload}));
    assert_ok_ack(&c.recv_json(), pid);
}

#[test]
fn subscribe_reports_current_state_of_each_listed_user() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let _u1 = connect(addr, 1, &[]);
    let mut w = connect(addr, 10, &[]);

    let events = subscribe(&mut w, &[1, 2], "s1");
    assert_eq!(events.len(), 2);
    let e1 = events.iter().find(|e| e["payload"]["userId"] == 1).expect("event for user 1");
    let e2 = events.iter().find(|e| e["payload"]["userId"] == 2).expect("event for user 2");
    let p1 = assert_presence(e1, 1, "online");
    assert_eq!(p1["context"], Value::Null, "{e1}");
    assert_presence(e2, 2, "offline");
}

#[test]
fn subscribe_reports_stored_status_and_context() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut u1 = connect(addr, 1, &[]);
    update(&mut u1, "pu", json!({"status": "busy", "context": {"mood": "focus", "n": [1, 2]}}));

    let mut w = connect(addr, 10, &[]);
    let events = subscribe(&mut w, &[1], "s1");
    let p = assert_presence(&events[0], 1, "busy");
    assert_eq!(p["context"], json!({"mood": "focus", "n": [1, 2]}));
}

#[test]
fn watchers_see_online_on_first_connection_and_offline_on_last_disconnect() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut w = connect(addr, 10, &[]);
    let events = subscribe(&mut w, &[5], "s5");
    assert_presence(&events[0], 5, "offline");

    let u5a = connect(addr, 5, &[]);
    assert_presence(&w.recv_json(), 5, "online");

    // A second connection of the same user is not a presence change.
    let mut u5b = connect(addr, 5, &[]);
    update(&mut u5b, "busy", json!({"status": "busy"}));
    assert_presence(&w.recv_json(), 5, "busy");

    // Closing one of two connections is not a presence change either.
    u5a.close();
    wait_until(Duration::from_secs(3), "the first connection of user 5 to be gone", || {
        metric_sum(&metrics(addr), "ws_connections_current") == Some(2.0)
    });
    update(&mut u5b, "away", json!({"status": "away"}));
    assert_presence(&w.recv_json(), 5, "away");

    // The last one is.
    u5b.close();
    assert_presence(&w.recv_json(), 5, "offline");
}

#[test]
fn presence_update_with_context_reaches_watchers_only_across_shards() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut u1 = connect_on_shard(addr, 1, &[], 1);
    let mut w = connect_on_shard(addr, 10, &[], 0);
    let mut x = connect(addr, 20, &[]);

    let events = subscribe(&mut w, &[1], "s1");
    assert_presence(&events[0], 1, "online");

    let ctx = json!({"room": "r1", "since": 3, "tags": ["a", "b"]});
    update(&mut u1, "pu", json!({"status": "busy", "context": ctx}));
    let p = assert_presence(&w.recv_json(), 1, "busy");
    assert_eq!(p["context"], ctx);

    // `x` does not watch user 1: the next thing it gets is this P2P message.
    u1.send_p2p_acked(20, "sentinel", &json!({"s": 1}));
    let ev = x.recv_json();
    assert_eq!(ev["type"], "data_event", "non-watcher got {ev}");
    x.expect_silence(Duration::from_millis(150));
}

#[test]
fn targeted_presence_update_goes_only_to_the_target() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut u1 = connect(addr, 1, &[]);
    let mut w = connect(addr, 10, &[]);
    let mut t = connect(addr, 30, &[]);
    let events = subscribe(&mut w, &[1], "s1");
    assert_presence(&events[0], 1, "online");

    update(&mut u1, "to-t", json!({"status": "dnd", "context": {"why": "call"}, "targetUserId": 30}));
    let p = assert_presence(&t.recv_json(), 1, "dnd");
    assert_eq!(p["context"], json!({"why": "call"}));

    // The watcher did not get the targeted one: its next event is the following broadcast one.
    update(&mut u1, "all", json!({"status": "away"}));
    assert_presence(&w.recv_json(), 1, "away");
    // And the target is not a watcher.
    t.expect_silence(Duration::from_millis(150));
}

#[test]
fn unsubscribe_stops_further_events() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut u1 = connect(addr, 1, &[]);
    let mut w = connect(addr, 10, &[]);
    let mut z = connect(addr, 40, &[]);
    let events = subscribe(&mut w, &[1], "s1");
    assert_presence(&events[0], 1, "online");
    update(&mut u1, "b", json!({"status": "busy"}));
    assert_presence(&w.recv_json(), 1, "busy");

    w.send_value(&json!({"pid": "un", "type": "presence_unsubscribe", "payload": {"userIds": [1]}}));
    assert_ok_ack(&w.recv_json(), "un");

    update(&mut u1, "a", json!({"status": "away"}));
    u1.close();
    wait_until(Duration::from_secs(3), "user 1 to be disconnected", || {
        metric_sum(&metrics(addr), "ws_connections_current") == Some(2.0)
    });
    z.send_p2p_acked(10, "sentinel", &json!({}));
    let v = w.recv_json();
    assert_eq!(v["type"], "data_event", "unsubscribed watcher got {v}");
    w.expect_silence(Duration::from_millis(150));
}

#[test]
fn presence_scope_all_sends_updates_to_every_connection() {
    let server = start(|c| c.presence_scope = PresenceScope::All);
    let addr = server.local_addr();
    let mut x = connect(addr, 20, &[]);
    let mut u1 = connect(addr, 1, &[]);
    // No pid: `u1` itself may receive presence events in this scope, so no ack is awaited.
    u1.send_value(&json!({"type": "presence_update", "payload": {"status": "busy", "context": {"k": 1}}}));
    // `x` may first see automatic online events; every message must be presence.
    loop {
        let v = x.recv_json();
        assert_eq!(v["type"], "presence_event", "{v}");
        if v["payload"]["status"] == "busy" {
            let p = assert_presence(&v, 1, "busy");
            assert_eq!(p["context"], json!({"k": 1}));
            break;
        }
    }
}

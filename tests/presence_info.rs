//! Presence carries who the user is (issue #10 item 5): `presence_info_claim` names a token
//! claim sent as `info` in every presence event about the user; and an update repeating the
//! user's current status and context (a client heartbeat re-sending `online`) tells nobody.

mod common;

use std::time::Duration;

use common::*;
use customws::config::PresenceScope;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

/// Connects `user` with a token carrying the claim `name`.
fn connect_named(addr: std::net::SocketAddr, user: i64, name: &Value) -> Client {
    let mut claims = claims(user, &[]);
    claims["name"] = name.clone();
    let auth = format!("Bearer {}", sign_hmac(&claims, Algorithm::HS256, SECRET.as_bytes()));
    connect_with(addr, user, "/ws", &[("Authorization", &auth)])
}

/// The next message, which must be a presence_event about `user` with `status`; its payload.
fn next_presence(c: &mut Client, user: i64, status: &str) -> Value {
    let v = c.recv_json();
    assert_eq!(v["type"], "presence_event", "{v}");
    assert_eq!(v["payload"]["userId"], user, "{v}");
    assert_eq!(v["payload"]["status"], status, "{v}");
    v["payload"].clone()
}

/// Sends a presence_update and waits for its ack, which must say `status`.
fn update(c: &mut Client, pid: &str, payload: Value) {
    c.send_value(&json!({"pid": pid, "type": "presence_update", "payload": payload}));
    let v = c.recv_json();
    assert_eq!(v["type"], "server_ack", "{v}");
    assert_eq!(v["payload"]["acknowledgedPid"], pid, "{v}");
    assert_eq!(v["payload"]["status"], "ok", "{v}");
}

#[test]
fn the_info_claim_is_in_online_updates_snapshots_room_presence_and_offline() {
    let server = start(|c| {
        c.presence_info_claim = Some("name".into());
        c.room_presence_max_members = 0;
    });
    let addr = server.local_addr();
    let mut w = connect(addr, 10, &[]);
    let snapshot = subscribe(&mut w, &[5], "s1");
    assert_eq!(snapshot[0]["payload"]["status"], "offline");
    assert!(
        snapshot[0]["payload"].get("info").is_none(),
        "nothing known of an offline user: {}",
        snapshot[0]
    );

    let name = json!({"first": "Ana", "last": "O\"Neil"});
    let mut u5 = connect_named(addr, 5, &name);
    assert_eq!(next_presence(&mut w, 5, "online")["info"], name);
    update(&mut u5, "pu", json!({"status": "busy", "context": {"n": 1}}));
    assert_eq!(next_presence(&mut w, 5, "busy")["info"], name);

    let mut w2 = connect(addr, 11, &[]);
    let snapshot = subscribe(&mut w2, &[5], "s2");
    assert_eq!(snapshot[0]["payload"]["status"], "busy");
    assert_eq!(snapshot[0]["payload"]["info"], name, "{}", snapshot[0]);

    // room_presence members carry it too.
    for c in [&mut u5, &mut w2] {
        c.send_value(&json!({"type": "join", "pid": "j", "payload": {"room": "r"}}));
        assert_eq!(c.recv_json()["payload"]["status"], "joined");
    }
    w2.send_value(&json!({"type": "room_presence", "pid": "rp", "payload": {"room": "r"}}));
    let v = w2.recv_json();
    assert_eq!(v["type"], "room_presence", "{v}");
    let members = v["payload"]["members"].as_array().expect("members").clone();
    assert_eq!(members.len(), 2, "{v}");
    assert_eq!(members[0]["userId"], 5, "{v}");
    assert_eq!(members[0]["info"], name, "{v}");
    assert!(members[1].get("info").is_none(), "user 11's token has no name: {v}");

    u5.close();
    assert_eq!(next_presence(&mut w, 5, "offline")["info"], name);
}

#[test]
fn the_backend_api_user_query_shows_the_info() {
    let (_server, ws, api) = api::api_server(|c| c.presence_info_claim = Some("name".into()));
    let _u5 = connect_named(ws, 5, &json!("Ana"));
    let _u6 = connect(ws, 6, &[]);
    // The home shard learns of the connection just after the handshake.
    wait_until(Duration::from_secs(5), "user 5 online at its home shard", || {
        api::get(api, "/api/v1/users/5").body["online"] == true
    });
    let answer = api::get(api, "/api/v1/users/5");
    assert_eq!(answer.body["presence"]["info"], "Ana", "{}", answer.raw);
    let answer = api::get(api, "/api/v1/users/6");
    assert!(answer.body["presence"].get("info").is_none(), "no name claim: {}", answer.raw);
}

#[test]
fn without_the_key_presence_payloads_have_no_info() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut w = connect(addr, 10, &[]);
    subscribe(&mut w, &[5], "s1");
    let mut u5 = connect_named(addr, 5, &json!("Ana"));
    let online = next_presence(&mut w, 5, "online");
    let mut keys: Vec<&String> = online.as_object().expect("payload object").keys().collect();
    keys.sort();
    assert_eq!(keys, ["context", "status", "timestamp", "userId"], "{online}");
    update(&mut u5, "pu", json!({"status": "busy"}));
    assert!(next_presence(&mut w, 5, "busy").get("info").is_none());
    let mut w2 = connect(addr, 11, &[]);
    assert!(subscribe(&mut w2, &[5], "s2")[0]["payload"].get("info").is_none());
}

/// A client re-sending its current status and context three times tells the watcher nothing:
/// the sentinel update that follows is the very next event. A changed context is announced.
fn repeats_are_silent(scope: PresenceScope) {
    let server = start(|c| {
        c.presence_coalesce = Duration::ZERO; // every repeat reaches the home shard
        c.presence_scope = scope;
    });
    let addr = server.local_addr();
    let mut w = connect(addr, 10, &[]);
    if scope == PresenceScope::All {
        next_presence(&mut w, 10, "online"); // everyone's presence, its own too
    }
    subscribe(&mut w, &[5], "s1");
    let mut u5 = connect(addr, 5, &[]);
    next_presence(&mut w, 5, "online");
    if scope == PresenceScope::All {
        next_presence(&mut u5, 5, "online");
    }

    for i in 0..3 {
        update(&mut u5, &format!("hb{i}"), json!({"status": "online"}));
    }
    update(&mut u5, "sentinel", json!({"status": "away"}));
    next_presence(&mut w, 5, "away");

    update(&mut u5, "ctx", json!({"status": "away", "context": {"since": "lunch"}}));
    assert_eq!(next_presence(&mut w, 5, "away")["context"], json!({"since": "lunch"}));
    update(&mut u5, "ctx-again", json!({"status": "away", "context": {"since": "lunch"}}));
    update(&mut u5, "back", json!({"status": "online"}));
    next_presence(&mut w, 5, "online");
}

#[test]
fn a_repeated_status_and_context_produces_no_event() {
    repeats_are_silent(PresenceScope::Watchers);
}

#[test]
fn a_repeated_status_and_context_produces_no_event_with_scope_all() {
    repeats_are_silent(PresenceScope::All);
}

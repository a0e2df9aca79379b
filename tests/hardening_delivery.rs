//! Who receives what (hardening issue #9, items 7, 8, 9, 11 and 12), over real sockets:
//! echo-endpoint sockets are outside every audience; a targeted presence update is delivered,
//! not stored; a closing connection is no delivery target (404, not `delivered`); an expired
//! transient status returns the user's lasting status whichever connection set it; payloads
//! too deep or with out-of-range numbers are refused 400 while valid ones are relayed
//! byte for byte.

mod common;

use std::time::{Duration, Instant};

use common::*;
use customws::OutMessage;
use customws::config::PresenceScope;
use serde_json::{Value, json};
use tungstenite::Message;

fn assert_presence(v: &Value, user: i64, status: &str) -> Value {
    assert_eq!(v["type"], "presence_event", "expected {user}'s {status:?} presence, got {v}");
    assert_eq!(v["payload"]["userId"], user, "{v}");
    assert_eq!(v["payload"]["status"], status, "{v}");
    v["payload"].clone()
}

fn update(c: &mut Client, pid: &str, payload: Value) {
    c.send_value(&json!({"pid": pid, "type": "presence_update", "payload": payload}));
    let v = recv_skipping_presence(c);
    assert_eq!(v["type"], "server_ack", "user {}: {v}", c.user_id);
    assert_eq!(v["payload"]["acknowledgedPid"], pid, "{v}");
}

/// The next message that is not a presence event (online/offline noise with scope `all`).
fn recv_skipping_presence(c: &mut Client) -> Value {
    loop {
        let v = c.recv_json();
        if v["type"] != "presence_event" {
            return v;
        }
    }
}

fn assert_error(v: &Value, pid: &str, code: u16) {
    assert_eq!(v["type"], "error_notification", "expected error {code} for {pid}, got {v}");
    assert_eq!(v["error"]["originalPid"], pid, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
}

// ---------------------------------------------------------------------------------------------
// 7. Echo sockets are outside every audience
// ---------------------------------------------------------------------------------------------

fn echo_socket(addr: std::net::SocketAddr) -> Client {
    match try_connect_with(addr, "/echo", &[]) {
        Ok((ws, response)) => Client { ws, user_id: 0, response },
        Err(e) => panic!("echo handshake failed: {e:?}"),
    }
}

#[test]
fn echo_sockets_receive_no_broadcast_and_no_presence() {
    let server = start(|c| {
        c.echo_path = Some("/echo".into());
        c.presence_scope = PresenceScope::All;
    });
    let addr = server.local_addr();
    // Several unauthenticated echo sockets, so that both shards hold some.
    let mut echoes: Vec<Client> = (0..6).map(|_| echo_socket(addr)).collect();
    // A user on each shard: once both have a message, both shards have handled it.
    let mut users = [connect_on_shard(addr, 20, &[], 0), connect_on_shard(addr, 21, &[], 1)];
    let mut caster = connect(addr, 1, &["broadcast"]);

    caster.send_json(r#"{"pid":"b1","type":"data_request","payload":{"secret":"for users"}}"#);
    assert_eq!(recv_skipping_presence(&mut caster)["payload"]["status"], "broadcast");
    update(&mut caster, "p1", json!({"status": "away", "context": {"where": "lunch"}}));
    let note = OutMessage::new("data_event", r#"{"note":"from the application"}"#).unwrap();
    let count = server.handle().broadcast(&note, &[]).wait_timeout(READ_TIMEOUT).expect("broadcast");
    assert_eq!(count, 3, "the handle's broadcast counts user connections only");
    for u in &mut users {
        assert_eq!(recv_skipping_presence(u)["payload"]["secret"], "for users");
        // The caster's "away" (from its home shard) and the handle's broadcast take different
        // paths: either may arrive first.
        let (mut away, mut note) = (false, false);
        while !(away && note) {
            let v = u.recv_json();
            away |= v["payload"]["status"] == "away";
            note |= v["payload"]["note"] == "from the application";
        }
    }

    // Everything above reached both shards before these sentinels: anything queued for an
    // echo socket would arrive before its own echo.
    for (i, e) in echoes.iter_mut().enumerate() {
        let sentinel = format!("sentinel-{i}");
        e.ws.send(Message::text(sentinel.clone())).unwrap();
        assert_eq!(e.recv_text(), sentinel, "echo socket {i} received something else first");
        e.expect_silence(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// 8. A targeted presence update is delivered, not stored
// ---------------------------------------------------------------------------------------------

#[test]
fn a_targeted_presence_update_is_not_anyones_public_presence() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    let mut b = connect(addr, 2, &[]);
    let draft = json!({"draft": "the surprise party is on friday"});
    update(&mut a, "t", json!({"status": "typing", "context": draft, "targetUserId": 2}));
    assert_eq!(assert_presence(&b.recv_json(), 1, "typing")["context"], draft);
    update(&mut a, "w", json!({"status": "whispering", "targetUserId": 2}));
    assert_presence(&b.recv_json(), 1, "whispering");

    // C subscribes afterwards: A's public presence is still what it was before.
    let mut c = connect(addr, 3, &[]);
    let events = subscribe(&mut c, &[1], "sub");
    let p = assert_presence(&events[0], 1, "online");
    assert_eq!(p["context"], Value::Null, "a targeted context leaked: {p}");
}

// ---------------------------------------------------------------------------------------------
// 9. A closing connection is no delivery target
// ---------------------------------------------------------------------------------------------

#[test]
fn messages_to_a_connection_closed_as_a_slow_consumer_are_404_not_delivered() {
    let server = start(|c| {
        c.send_queue = 16;
        c.send_queue_bytes = 64 * 1024;
    });
    let addr = server.local_addr();
    let mut watcher = connect(addr, 9, &[]);
    // Never reads, tiny receive buffer: once closed 1013 its close frame cannot be written, so
    // it lingers in the closing phase (2 s) before it is dropped.
    let mut slow = raw_ws_connect(addr, &token(3, &[]), Some(4096));
    assert_presence(&subscribe(&mut watcher, &[3], "sub")[0], 3, "online");
    let mut sender = connect(addr, 1, &[]);
    sender.roundtrip("ready");

    let pad = "x".repeat(4000);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut sent = 0;
    while metric_sum(&metrics(addr), "customws_slow_consumer_closes_total").unwrap_or(0.0) < 1.0 {
        assert!(Instant::now() < deadline, "no 1013 after {sent} messages of 4 KB");
        for _ in 0..50 {
            sender.send_json(&format!(r#"{{"type":"data_request","targetUserId":3,"payload":"{pad}"}}"#));
            sent += 1;
        }
        sender.roundtrip(&format!("paced-{sent}"));
    }
    let closed_at = Instant::now();

    // The receiver's only connection is closing: nobody will receive this.
    sender.send_value(&json!({"pid": "late", "type": "data_request", "targetUserId": 3, "payload": 1}));
    let v = sender.recv_json();
    assert!(
        closed_at.elapsed() < Duration::from_millis(1500),
        "too slow to observe the lingering connection"
    );
    assert_error(&v, "late", 404);
    // Its user went offline once, at the start of the close.
    assert_presence(&watcher.recv_json(), 3, "offline");

    // When the socket is finally dropped nothing is announced twice, and a new connection of
    // the same user is listed again.
    let (ended, _, _) = read_until_closed(&mut slow, Duration::from_secs(5));
    assert!(ended.is_some(), "the slow consumer was never dropped");
    let mut back = connect(addr, 3, &[]);
    assert_presence(&watcher.recv_json(), 3, "online");
    sender.send_p2p_acked(3, "again", &json!({"hello": "again"}));
    assert_eq!(back.recv_of_type("data_event")["payload"]["hello"], "again");
    wait_until(Duration::from_secs(4), "the lingering connection to be dropped", || {
        metric_sum(&metrics(addr), "ws_connections_current") == Some(3.0)
    });
    watcher.expect_silence(Duration::from_millis(200));
    let users = server.handle().user_connections(3).wait_timeout(READ_TIMEOUT).expect("user connections");
    assert_eq!(users.len(), 1, "{users:?}");
}

// ---------------------------------------------------------------------------------------------
// 11. An expired transient status returns the user's lasting status
// ---------------------------------------------------------------------------------------------

const TTL: Duration = Duration::from_millis(300);

#[test]
fn typing_on_one_device_reverts_to_the_status_another_device_set() {
    let server = start(|c| c.transient_ttl = TTL);
    let addr = server.local_addr();
    let mut laptop = connect(addr, 1, &[]);
    let mut phone = connect(addr, 1, &[]);
    let mut w = connect(addr, 2, &[]);
    assert_presence(&subscribe(&mut w, &[1], "sub")[0], 1, "online");

    let ctx = json!({"until": "17:00"});
    update(&mut laptop, "dnd", json!({"status": "do-not-disturb", "context": ctx}));
    assert_presence(&w.recv_json(), 1, "do-not-disturb");
    let sent = Instant::now();
    update(&mut phone, "typing", json!({"status": "typing", "context": {"chatId": 5}}));
    assert_presence(&w.recv_json(), 1, "typing");

    w.ws.get_ref().set_read_timeout(Some(TTL + Duration::from_secs(2))).unwrap();
    let back = assert_presence(&w.recv_json(), 1, "do-not-disturb");
    assert!(sent.elapsed() >= TTL, "reverted before the TTL");
    assert_eq!(back["context"], ctx, "the lasting status comes back with its context");
    w.expect_silence(TTL + Duration::from_millis(100));

    let mut late = connect(addr, 3, &[]);
    let stored = assert_presence(&subscribe(&mut late, &[1], "late")[0], 1, "do-not-disturb");
    assert_eq!(stored["context"], ctx);
}

#[test]
fn a_lasting_status_set_while_typing_is_not_overwritten_by_the_revert() {
    let server = start(|c| c.transient_ttl = TTL);
    let addr = server.local_addr();
    let mut laptop = connect(addr, 1, &[]);
    let mut phone = connect(addr, 1, &[]);
    let mut w = connect(addr, 2, &[]);
    subscribe(&mut w, &[1], "sub");
    update(&mut phone, "typing", json!({"status": "typing"}));
    assert_presence(&w.recv_json(), 1, "typing");
    update(&mut laptop, "away", json!({"status": "away"}));
    assert_presence(&w.recv_json(), 1, "away");
    // The phone's typing expires: "away" stays, nothing is announced.
    w.expect_silence(TTL + Duration::from_millis(400));
    let mut late = connect(addr, 3, &[]);
    assert_presence(&subscribe(&mut late, &[1], "late")[0], 1, "away");
}

// ---------------------------------------------------------------------------------------------
// 12. Nesting and number range of relayed JSON
// ---------------------------------------------------------------------------------------------

#[test]
fn payloads_too_deep_or_out_of_range_are_refused_and_valid_ones_relayed_verbatim() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    let mut b = connect(addr, 2, &[]);
    let mut w = connect(addr, 3, &[]);
    subscribe(&mut w, &[1], "sub");
    for r in [&mut a, &mut b] {
        r.send_value(&json!({"pid": "j", "type": "join", "payload": {"room": "deep"}}));
        assert_eq!(r.recv_of_type("server_ack")["payload"]["status"], "joined");
    }

    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    let refused = [
        (
            "p2p-deep",
            format!(r#"{{"pid":"p2p-deep","type":"data_request","targetUserId":2,"payload":{deep}}}"#),
        ),
        (
            "p2p-inf",
            r#"{"pid":"p2p-inf","type":"data_request","targetUserId":2,"payload":{"n":1e999999}}"#.into(),
        ),
        (
            "presence",
            format!(
                r#"{{"pid":"presence","type":"presence_update","payload":{{"status":"x","context":{deep}}}}}"#
            ),
        ),
        ("room", r#"{"pid":"room","type":"broadcast","payload":{"room":"deep","body":[-1E+400]}}"#.into()),
    ];
    for (pid, text) in &refused {
        a.send_json(text);
        assert_error(&recv_skipping_presence(&mut a), pid, 400);
    }

    // Valid, if unusual: whitespace, escapes, large but finite and tiny numbers, 100 levels.
    let nested = format!("{}0{}", "[".repeat(100), "]".repeat(100));
    let payload = format!(
        "{{ \"s\" :\t\"\\u00e9\\\"\\\\\\/\\ud83d\\ude00\" ,\n \"max\": 1.7976931348623157e308, \
         \"tiny\":-4.9E-999999,\"big\":123456789012345678901234567890123,\"n\":{nested}  }}"
    );
    a.send_json(&format!(r#"{{"pid":"ok","type":"data_request","targetUserId":2,"payload":{payload}}}"#));
    let ack = a.recv_json();
    assert_eq!(ack["payload"]["status"], "delivered", "{ack}");
    // The refused messages were not relayed: this is the first thing B and W receive.
    let raw = b.recv_text();
    assert!(raw.contains("\"data_event\""), "B received something else first: {raw}");
    assert_raw_payload(&raw, &payload);
    w.expect_silence(Duration::from_millis(100));
}

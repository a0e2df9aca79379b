//! Hardening issue #9, defects 1 and 2: requests whose answer is larger than the request are
//! bounded (`room_presence` only for members, paged, one in flight per connection, charged to a
//! per-connection presence budget; `presence_subscribe` sends no second snapshot of users
//! already watched and is charged to the same budget), and the inboxes between shards are
//! bounded (client-originated work is shed with 503 and counted; state is never shed).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

/// Asserts `v` is an `error_notification` with `code` for `pid`.
fn assert_error(v: &Value, code: i64, pid: &str) {
    assert_eq!(v["type"], "error_notification", "expected error {code} for {pid}, got {v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["originalPid"], pid, "{v}");
}

fn join(c: &mut Client, room: &str, pid: &str) {
    c.send_value(&json!({"type": "join", "pid": pid, "payload": {"room": room}}));
    let v = c.recv_json();
    assert_eq!(v["payload"]["status"], "joined", "join {room}: {v}");
}

/// Sends `room_presence` for `room` (with `cursor`) and returns the next message.
fn ask(c: &mut Client, room: &str, cursor: Option<i64>, pid: &str) -> Value {
    let mut payload = json!({"room": room});
    if let Some(cursor) = cursor {
        payload["cursor"] = json!(cursor);
    }
    c.send_value(&json!({"type": "room_presence", "pid": pid, "payload": payload}));
    c.recv_json()
}

/// The user ids of a `room_presence` answer, and its `next`.
fn page(v: &Value, room: &str, pid: &str) -> (Vec<i64>, Option<i64>) {
    assert_eq!(v["type"], "room_presence", "expected the answer to {pid}, got {v}");
    assert_eq!(v["pid"], pid, "{v}");
    assert_eq!(v["payload"]["room"], room, "{v}");
    let members = v["payload"]["members"].as_array().unwrap_or_else(|| panic!("members: {v}"));
    for m in members {
        assert_eq!(m["status"], "online", "{m}");
        assert!(m.as_object().is_some_and(|o| o.contains_key("context")), "{m}");
        assert_rfc3339(m["timestamp"].as_str().unwrap_or_else(|| panic!("timestamp: {m}")));
    }
    let next = &v["payload"]["next"];
    assert!(next.is_null() || next.is_i64(), "next must be a user id or null: {v}");
    (members.iter().map(|m| m["userId"].as_i64().unwrap()).collect(), next.as_i64())
}

/// Members `first..first+n` of `room`, alternating shards.
fn populate(addr: std::net::SocketAddr, room: &str, first: i64, n: i64) -> Vec<Client> {
    (0..n)
        .map(|i| {
            let mut c = connect_on_shard(addr, first + i, &[], i as usize % 2);
            join(&mut c, room, "j");
            c
        })
        .collect()
}

fn counter(addr: std::net::SocketAddr, name: &str) -> f64 {
    metric_sum(&metrics(addr), name).unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

#[test]
fn room_presence_from_a_non_member_is_403_with_the_pid() {
    let server = start(|c| c.room_presence_max_members = 0);
    let addr = server.local_addr();
    let _members = populate(addr, "dm:10:11", 10, 2);
    let mut outsider = connect(addr, 12, &[]);
    let v = ask(&mut outsider, "dm:10:11", None, "peek");
    assert_error(&v, 403, "peek");
    // Nothing about the members follows.
    outsider.expect_silence(Duration::from_millis(200));
    // Not even for a room nobody is in.
    assert_error(&ask(&mut outsider, "nobody-here", None, "peek2"), 403, "peek2");
}

#[test]
fn room_presence_answers_in_pages_with_a_cursor() {
    let server = start(|c| {
        c.room_presence_max_members = 0;
        c.room_presence_page = 2;
    });
    let addr = server.local_addr();
    let mut clients = populate(addr, "paged", 20, 5);
    let asker = &mut clients[0];
    let mut seen = Vec::new();
    let mut cursor = None;
    for round in 0.. {
        assert!(round < 3, "5 members in pages of 2 take 3 pages, got more: {seen:?}");
        let pid = format!("p{round}");
        let (ids, next) = page(&ask(asker, "paged", cursor, &pid), "paged", &pid);
        assert!(ids.len() <= 2, "page of {} members over room_presence_page = 2", ids.len());
        seen.extend(ids);
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, vec![20, 21, 22, 23, 24], "every member once, in user-id order");
    asker.expect_silence(Duration::from_millis(150));
    // A cursor that is not a user id is refused.
    asker.send_value(
        &json!({"type": "room_presence", "pid": "bad", "payload": {"room": "paged", "cursor": "x"}}),
    );
    assert_error(&asker.recv_json(), 400, "bad");
}

#[test]
fn a_second_room_presence_while_one_is_in_flight_is_429() {
    let server = start(|c| c.room_presence_max_members = 0);
    let addr = server.local_addr();
    // Members on both shards, so gathering the answer crosses shards and takes a loop turn.
    let mut clients = populate(addr, "busy", 30, 4);
    let asker = &mut clients[0];
    // Both requests in one write: the second is read while the first is being gathered.
    for pid in ["first", "second"] {
        let text = json!({"type": "room_presence", "pid": pid, "payload": {"room": "busy"}}).to_string();
        asker.ws.write(Message::text(text)).unwrap();
    }
    asker.ws.flush().unwrap();
    let (mut answered, mut refused) = (false, false);
    for _ in 0..2 {
        let v = asker.recv_json();
        if v["type"] == "room_presence" {
            assert_eq!(page(&v, "busy", "first").0, vec![30, 31, 32, 33]);
            answered = true;
        } else {
            assert_error(&v, 429, "second");
            refused = true;
        }
    }
    assert!(answered && refused);
    assert!(counter(addr, "customws_presence_refused_total") >= 1.0);
    // Once the answer is out, the connection may ask again.
    assert_eq!(page(&ask(asker, "busy", None, "third"), "busy", "third").0, vec![30, 31, 32, 33]);
}

#[test]
fn room_presence_over_the_presence_budget_is_429() {
    let server = start(|c| {
        c.room_presence_max_members = 0;
        c.presence_budget = 10; // members per second; a page of this room costs 5
    });
    let addr = server.local_addr();
    let mut clients = populate(addr, "budget", 40, 5);
    let asker = &mut clients[0];
    let started = Instant::now();
    for pid in ["b1", "b2"] {
        assert_eq!(page(&ask(asker, "budget", None, pid), "budget", pid).0.len(), 5);
    }
    let v = ask(asker, "budget", None, "b3");
    assert!(started.elapsed() < Duration::from_millis(500), "too slow to test a 10/s budget");
    assert_error(&v, 429, "b3");
    assert!(v["error"]["message"].as_str().unwrap().contains("budget"), "{v}");
    // The budget refills: half a second later a page fits again.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(page(&ask(asker, "budget", None, "b4"), "budget", "b4").0.len(), 5);
}

#[test]
fn presence_subscribe_does_not_resend_the_snapshot_of_users_already_watched() {
    let server = start(|c| c.room_presence_max_members = 0);
    let addr = server.local_addr();
    let _targets: Vec<Client> = (50..53).map(|u| connect(addr, u, &[])).collect();
    let mut w = connect(addr, 60, &[]);
    let first = subscribe(&mut w, &[50, 51], "s1");
    assert_eq!(first.len(), 2);
    // 50 and 51 again, plus 52: only 52's snapshot.
    w.send_value(
        &json!({"pid": "s2", "type": "presence_subscribe", "payload": {"userIds": [50, 51, 52, 50]}}),
    );
    let mut events = Vec::new();
    loop {
        let v = w.recv_json();
        if v["type"] == "server_ack" {
            assert_eq!(v["payload"]["acknowledgedPid"], "s2", "{v}");
            break;
        }
        assert_eq!(v["type"], "presence_event", "{v}");
        events.push(v["payload"]["userId"].as_i64().unwrap());
    }
    // The snapshot may come before or after the ack (it comes from the target's home shard).
    let deadline = Instant::now() + Duration::from_millis(300);
    while events.is_empty() && Instant::now() < deadline {
        w.ws.get_ref().set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        if let Ok(Message::Text(t)) = w.ws.read() {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            events.push(v["payload"]["userId"].as_i64().unwrap());
        }
    }
    w.ws.get_ref().set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    assert_eq!(events, vec![52], "re-subscribing re-sent snapshots of users already watched");
    w.expect_silence(Duration::from_millis(200));
}

#[test]
fn presence_subscribe_over_the_presence_budget_is_429() {
    let server = start(|c| c.presence_budget = 100);
    let addr = server.local_addr();
    let mut w = connect(addr, 70, &[]);
    let ids: Vec<i64> = (1000..1100).collect();
    let started = Instant::now();
    assert_eq!(subscribe(&mut w, &ids, "all-100").len(), 100);
    // The budget is spent: 100 more users (repeats count once) need another second.
    let more: Vec<i64> = (2000..2100).chain(2000..2100).collect();
    w.send_value(&json!({"pid": "more", "type": "presence_subscribe", "payload": {"userIds": more}}));
    let v = w.recv_json();
    assert!(started.elapsed() < Duration::from_millis(500), "too slow to test a 100/s budget");
    assert_error(&v, 429, "more");
    assert!(v["error"]["message"].as_str().unwrap().contains("budget"), "{v}");
    w.expect_silence(Duration::from_millis(100));
}

/// `customws_inbox_bytes{shard="N"}`.
fn inbox_bytes(text: &str, shard: usize) -> f64 {
    let samples = metric_samples(text, "customws_inbox_bytes");
    let label = format!("shard=\"{shard}\"");
    samples.iter().find(|(l, _)| l.contains(&label)).map(|(_, v)| *v).expect("customws_inbox_bytes gauge")
}

/// A flood of P2P messages from a client on shard 0 to a user on shard 1, with a small
/// `inbox_max_bytes`: what does not fit in shard 1's inbox is shed, each shed message is
/// answered 503 with its pid and counted, the rest is delivered exactly once, the inbox depth
/// stays near the bound — and the state-keeping messages sent to the same inbox meanwhile
/// (connections opening and closing, homed on shard 1) are never shed.
#[test]
fn a_full_inbox_sheds_client_traffic_with_503_but_never_state() {
    const BOUND: usize = 16 * 1024;
    const FLOOD: usize = 3000;
    let server = start(|c| {
        c.inbox_max_bytes = BOUND;
        c.send_queue = 1_000_000;
        c.send_queue_bytes = 1 << 30;
        c.room_presence_max_members = 0;
    });
    let addr = server.local_addr();
    let mut watcher = connect_on_shard(addr, 2, &[], 0);
    let churn: Vec<i64> = (0..6).map(|i| 101 + 2 * i).collect(); // odd: homed on shard 1
    assert_eq!(subscribe(&mut watcher, &churn, "watch").len(), churn.len());
    let mut sender = connect_on_shard(addr, 4, &[], 0);
    let mut receiver = connect_on_shard(addr, 5, &[], 1);

    // The receiver reads until it has what was acknowledged (known once the flood is answered),
    // then 300 ms more for anything that should not come; 20 s at most.
    let expected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
    let target = std::sync::Arc::clone(&expected);
    let reader = std::thread::spawn(move || {
        let mut got = 0usize;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut quiet_until = None;
        receiver.ws.get_ref().set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        while Instant::now() < deadline && quiet_until.is_none_or(|t| Instant::now() < t) {
            if let Ok(Message::Text(t)) = receiver.ws.read() {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(v["type"], "data_event", "{v}");
                got += 1;
            }
            if quiet_until.is_none() && got >= target.load(std::sync::atomic::Ordering::SeqCst) {
                quiet_until = Some(Instant::now() + Duration::from_millis(300));
            }
        }
        got
    });
    let flood = std::thread::spawn(move || {
        let pad = "f".repeat(2000);
        for i in 0..FLOOD {
            let text = json!({"pid": format!("m{i}"), "type": "data_request", "targetUserId": 5,
                              "payload": {"pad": pad}})
            .to_string();
            sender.ws.write(Message::text(text)).unwrap();
        }
        sender.ws.flush().unwrap();
        let (mut delivered, mut shed) = (0usize, 0usize);
        while delivered + shed < FLOOD {
            let v = sender.recv_json();
            if v["type"] == "server_ack" {
                assert_eq!(v["payload"]["status"], "delivered", "{v}");
                delivered += 1;
            } else {
                assert_eq!(v["type"], "error_notification", "{v}");
                assert_eq!(v["error"]["code"], 503, "{v}");
                assert!(v["error"]["originalPid"].as_str().is_some_and(|p| p.starts_with('m')), "{v}");
                shed += 1;
            }
        }
        (delivered, shed)
    });
    // Meanwhile: connections homed on shard 1 open and close, and the inbox is sampled.
    let mut peak = 0f64;
    let mut kept = Vec::new();
    for (i, &user) in churn.iter().enumerate() {
        let c = connect(addr, user, &[]);
        peak = peak.max(inbox_bytes(&metrics(addr), 1));
        if i % 2 == 0 {
            c.close();
        } else {
            kept.push(c);
        }
    }
    while !flood.is_finished() {
        peak = peak.max(inbox_bytes(&metrics(addr), 1));
        std::thread::sleep(Duration::from_millis(2));
    }
    let (delivered, shed) = flood.join().unwrap();
    expected.store(delivered, std::sync::atomic::Ordering::SeqCst);
    let received = reader.join().unwrap();
    eprintln!("flood of {FLOOD}: {delivered} delivered, {shed} shed (503); peak inbox {peak} bytes");
    assert!(shed > 0, "a {BOUND}-byte inbox absorbed a {FLOOD}-message flood: nothing was shed");
    assert_eq!(received, delivered, "every acknowledged message arrives once, no shed one does");
    let text = metrics(addr);
    let shed_deliver = metric_samples(&text, "customws_inbox_shed_total")
        .into_iter()
        .find(|(l, _)| l.contains("kind=\"deliver\""))
        .map(|(_, v)| v);
    assert_eq!(shed_deliver, Some(shed as f64), "customws_inbox_shed_total{{kind=\"deliver\"}}");
    assert!(peak <= (BOUND + 8 * 1024) as f64, "inbox depth {peak} beyond the {BOUND}-byte bound");
    wait_until(Duration::from_secs(3), "the inboxes to drain", || {
        let text = metrics(addr);
        inbox_bytes(&text, 0) == 0.0 && inbox_bytes(&text, 1) == 0.0
    });

    // State was never shed: whoever closed is offline, whoever stayed is online, everywhere.
    let handle = server.handle();
    for (i, &user) in churn.iter().enumerate() {
        let online = handle.is_online(user).wait_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(online, i % 2 == 1, "user {user}: home shard's view after the flood");
    }
    let mut last = std::collections::HashMap::new();
    loop {
        watcher.ws.get_ref().set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        match watcher.ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                last.insert(v["payload"]["userId"].as_i64().unwrap(), v["payload"]["status"].clone());
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    for (i, &user) in churn.iter().enumerate() {
        let want = if i % 2 == 1 { "online" } else { "offline" };
        assert_eq!(last.get(&user), Some(&json!(want)), "watcher's last event about {user}: {last:?}");
    }
    drop(kept);
}

//! The built-in router (SPEC "Envelopes", "Client → server message types", "Close codes"):
//! P2P `data_request`, client broadcast, `generic_request` echo, error notifications and the
//! protocol-level closes (1003 binary, 1009 too big).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

/// Asserts `v` is an `error_notification` with `code` (and `originalPid` when given).
fn assert_error(v: &Value, code: i64, pid: Option<&str>) {
    assert_eq!(v["type"], "error_notification", "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string(), "error.message: {v}");
    if let Some(pid) = pid {
        assert_eq!(v["error"]["originalPid"], pid, "{v}");
    }
}

#[test]
fn p2p_forwards_payload_byte_for_byte_and_acks_delivered() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    let mut b = connect(addr, 2, &[]);

    let payload = r#"{"b":1, "a":[1,2],   "s":"h\u00e9 \"q\"" ,"n":1.50}"#;
    a.send_json(&format!(r#"{{"pid":"p1","type":"data_request","targetUserId":2,"payload":{payload}}}"#));

    let raw = b.recv_text();
    assert_raw_payload(&raw, payload);
    let ev: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(ev["type"], "data_event", "{ev}");
    assert_eq!(ev["fromUserId"], 1, "{ev}");

    let ack = a.recv_json();
    assert_eq!(ack["type"], "server_ack", "{ack}");
    assert_eq!(ack["payload"]["acknowledgedPid"], "p1", "{ack}");
    assert_eq!(ack["payload"]["status"], "delivered", "{ack}");

    // Scalar and array payloads are forwarded verbatim too.
    for payload in ["42", r#""just a string""#, "[ 3,2 ,1 ]"] {
        a.send_json(&format!(r#"{{"type":"data_request","targetUserId":2,"payload":{payload}}}"#));
        assert_raw_payload(&b.recv_text(), payload);
    }
}

#[test]
fn p2p_reaches_every_connection_of_the_target() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    let mut b1 = connect(addr, 2, &[]);
    let mut b2 = connect(addr, 2, &[]);
    let mut b3 = connect(addr, 2, &[]);

    a.send_p2p_acked(2, "multi", &json!({"k": "v"}));
    for b in [&mut b1, &mut b2, &mut b3] {
        let ev = b.recv_of_type("data_event");
        assert_eq!(ev["fromUserId"], 1);
        assert_eq!(ev["payload"], json!({"k": "v"}));
    }
}

#[test]
fn p2p_ignores_client_supplied_from_user_id() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    let mut b = connect(addr, 2, &[]);
    a.send_json(r#"{"pid":"f1","type":"data_request","fromUserId":999,"targetUserId":2,"payload":{"x":1}}"#);
    let ev = b.recv_of_type("data_event");
    assert_eq!(ev["fromUserId"], 1, "fromUserId must come from the token: {ev}");
    let ack = a.recv_of_type("server_ack");
    assert_eq!(ack["payload"]["acknowledgedPid"], "f1");
}

#[test]
fn p2p_to_offline_target_is_404_error_notification() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    a.send_json(r#"{"pid":"p404","type":"data_request","targetUserId":424242,"payload":{}}"#);
    assert_error(&a.recv_json(), 404, Some("p404"));
    a.roundtrip("still-open");
}

#[test]
fn p2p_without_pid_is_delivered_without_ack() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    let mut b = connect(addr, 2, &[]);
    a.send_json(r#"{"type":"data_request","targetUserId":2,"payload":{"nopid":true}}"#);
    let ev = b.recv_of_type("data_event");
    assert_eq!(ev["payload"], json!({"nopid": true}));
    // Anything queued for `a` by that request would precede this response.
    a.roundtrip("after-nopid");
}

#[test]
fn p2p_across_shards_is_delivered_in_order_and_acked() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect_on_shard(addr, 1, &[], 0);
    let mut b = connect_on_shard(addr, 2, &[], 1);
    let shards = metrics_shard_connections(addr);
    assert_eq!(shards, [1, 1], "one connection per shard expected");

    let payload = r#"{"cross" : "shard", "v":[1, 2]}"#;
    a.send_json(&format!(r#"{{"pid":"x1","type":"data_request","targetUserId":2,"payload":{payload}}}"#));
    let raw = b.recv_text();
    assert_raw_payload(&raw, payload);
    let ev: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(ev["type"], "data_event");
    assert_eq!(ev["fromUserId"], 1);
    let ack = a.recv_of_type("server_ack");
    assert_eq!(ack["payload"]["acknowledgedPid"], "x1");
    assert_eq!(ack["payload"]["status"], "delivered");

    // And back, shard 1 → shard 0.
    b.send_p2p_acked(1, "x2", &json!({"back": true}));
    let ev = a.recv_of_type("data_event");
    assert_eq!(ev["fromUserId"], 2);
    assert_eq!(ev["payload"], json!({"back": true}));

    // Ordering of one sender's stream across shards (200 < the default send_queue of 256, so
    // this does not depend on how deliveries are batched; see the burst test for that).
    for i in 0..200 {
        a.send_json(&format!(r#"{{"type":"data_request","targetUserId":2,"payload":{{"seq":{i}}}}}"#));
    }
    for i in 0..200 {
        let ev = b.recv_of_type("data_event");
        assert_eq!(ev["payload"]["seq"], i, "out of order: {ev}");
    }
}

#[test]
fn broadcast_without_role_is_403_and_reaches_nobody() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut plain = connect(addr, 1, &[]);
    let mut caster = connect(addr, 2, &["broadcast"]);
    let mut b = connect(addr, 3, &[]);

    plain.send_json(r#"{"pid":"b403","type":"data_request","payload":{"nope":1}}"#);
    assert_error(&plain.recv_json(), 403, Some("b403"));

    // The refused request is finished; the next thing `b` sees must be the allowed broadcast.
    caster.send_json(r#"{"pid":"ok","type":"data_request","payload":{"sentinel":1}}"#);
    let ev = b.recv_of_type("data_event");
    assert_eq!(ev["fromUserId"], 2, "{ev}");
    assert_eq!(ev["payload"], json!({"sentinel": 1}), "{ev}");
    let ev = plain.recv_of_type("data_event");
    assert_eq!(ev["fromUserId"], 2, "{ev}");
}

#[test]
fn broadcast_with_role_reaches_everyone_but_the_sender_and_acks_broadcast() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut caster = connect(addr, 1, &["broadcast"]);
    let mut others: Vec<Client> = (2..=5).map(|u| connect(addr, u, &[])).collect();

    caster.send_json(r#"{"pid":"bc1","type":"data_request","payload":{"news":"hello"}}"#);
    let ack = caster.recv_of_type("server_ack");
    assert_eq!(ack["payload"]["acknowledgedPid"], "bc1", "{ack}");
    assert_eq!(ack["payload"]["status"], "broadcast", "{ack}");
    for o in &mut others {
        let ev = o.recv_of_type("data_event");
        assert_eq!(ev["fromUserId"], 1, "{ev}");
        assert_eq!(ev["payload"], json!({"news": "hello"}), "{ev}");
    }
    // The sender does not get its own broadcast.
    caster.roundtrip("after-broadcast");
    caster.expect_silence(Duration::from_millis(150));
}

#[test]
fn allow_client_broadcast_lets_any_user_broadcast() {
    let server = start(|c| c.allow_client_broadcast = true);
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    let mut b = connect(addr, 2, &[]);
    a.send_json(r#"{"pid":"open","type":"data_request","payload":[1,2,3]}"#);
    let ack = a.recv_of_type("server_ack");
    assert_eq!(ack["payload"]["status"], "broadcast", "{ack}");
    let ev = b.recv_of_type("data_event");
    assert_eq!(ev["fromUserId"], 1);
    assert_eq!(ev["payload"], json!([1, 2, 3]));
}

#[test]
fn generic_request_with_pid_is_echoed_as_generic_response() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    let payload = json!({"q": [1, 2, {"deep": "é"}], "n": null, "t": true});
    a.send_value(&json!({"pid": "g1", "type": "generic_request", "payload": payload}));
    let v = a.recv_json();
    assert_eq!(v["type"], "generic_response", "{v}");
    assert_eq!(v["pid"], "g1", "{v}");
    assert_eq!(v["payload"], payload, "{v}");
}

#[test]
fn generic_request_without_pid_is_400() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    a.send_json(r#"{"type":"generic_request","payload":{"x":1}}"#);
    assert_error(&a.recv_json(), 400, None);
    a.roundtrip("still-open");
}

#[test]
fn malformed_json_is_400_and_the_connection_stays_open() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    for bad in [r#"{"type": "generic_request", "pid": "#, "not json at all", "[1,2", "{}"] {
        a.send_json(bad);
        assert_error(&a.recv_json(), 400, None);
    }
    a.roundtrip("after-malformed");
}

#[test]
fn unknown_type_is_400_and_the_connection_stays_open() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    a.send_json(r#"{"pid":"u1","type":"no_such_type","payload":{}}"#);
    assert_error(&a.recv_json(), 400, None);
    a.roundtrip("after-unknown");
}

#[test]
fn unknown_envelope_fields_are_ignored() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    a.send_json(r#"{"pid":"k1","type":"generic_request","payload":7,"extra":{"a":1},"v":2}"#);
    let v = a.recv_of_type("generic_response");
    assert_eq!(v["pid"], "k1");
    assert_eq!(v["payload"], 7);
}

#[test]
fn binary_frame_is_closed_with_1003() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    a.ws.send(Message::binary(vec![1u8, 2, 3, 4])).unwrap();
    a.expect_close(1003);
}

#[test]
fn message_over_max_message_size_is_closed_with_1009() {
    let server = start(|c| c.max_message_size = 1024);
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &[]);
    // Just under the limit is fine.
    let fits = json!({"pid": "fits", "type": "generic_request", "payload": "x".repeat(900)});
    assert!(fits.to_string().len() < 1024);
    a.send_value(&fits);
    assert_eq!(a.recv_of_type("generic_response")["pid"], "fits");
    // Over it: close 1009.
    let big = json!({"pid": "big", "type": "generic_request", "payload": "y".repeat(4000)});
    a.send_value(&big);
    a.expect_close(1009);
}

#[test]
fn a_burst_to_a_receiver_with_room_in_its_socket_is_not_a_slow_consumer() {
    // 1,000 small messages (~40 KB in all: far below any socket buffer) sent back to back to
    // a receiver on the same shard that then reads them. Nothing here is slow: the receiver
    // must get them all, in order, and no slow-consumer close may happen.
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect_on_shard(addr, 1, &[], 0);
    let mut b = connect_on_shard(addr, 2, &[], 0);
    for i in 0..1000 {
        a.send_json(&format!(r#"{{"type":"data_request","targetUserId":2,"payload":{{"seq":{i}}}}}"#));
    }
    for i in 0..1000 {
        let ev = b.recv_of_type("data_event");
        assert_eq!(ev["payload"]["seq"], i, "out of order: {ev}");
    }
    assert_eq!(metric_sum(&metrics(addr), "customws_slow_consumer_closes_total"), Some(0.0));
}

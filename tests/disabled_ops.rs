//! `disabled_ops`: built-in client operations an application turns off entirely are refused
//! 403 `operation disabled` with the pid, and nothing of them reaches anyone.

mod common;

use common::*;
use serde_json::json;

fn assert_disabled(reply: &serde_json::Value, pid: &str) {
    assert_eq!(reply["type"], "error_notification", "{reply}");
    assert_eq!(reply["error"]["code"], 403, "{reply}");
    assert_eq!(reply["error"]["message"], "operation disabled", "{reply}");
    assert_eq!(reply["error"]["originalPid"], pid, "{reply}");
}

#[test]
fn disabled_operations_are_refused_and_leak_nothing() {
    let server = start(|c| {
        c.shards = 2;
        c.disabled_ops = ["data_request", "presence_subscribe", "presence_update", "join", "room_presence"]
            .map(String::from)
            .to_vec();
    });
    let addr = server.local_addr();
    let mut a = connect(addr, 1, &["broadcast"]);
    let mut b = connect(addr, 2, &[]);
    b.roundtrip("ready");

    let refused = [
        ("p1", json!({"type":"data_request","targetUserId":2,"pid":"p1","payload":{"secret":1}})),
        ("p2", json!({"type":"presence_subscribe","pid":"p2","payload":{"userIds":[2]}})),
        ("p3", json!({"type":"presence_update","pid":"p3","payload":{"status":"typing","targetUserId":2}})),
        ("p4", json!({"type":"join","pid":"p4","payload":{"room":"dm:1:2"}})),
        ("p5", json!({"type":"room_presence","pid":"p5","payload":{"room":"dm:1:2"}})),
    ];
    for (pid, msg) in &refused {
        a.send_value(msg);
        assert_disabled(&a.recv_json(), pid);
    }
    // What is not disabled still works; the broadcast is the first thing user 2 hears, so none
    // of the refused operations reached it.
    a.send_value(&json!({"type":"data_request","pid":"b1","payload":{"hello":"all"}}));
    assert_eq!(a.recv_of_type("server_ack")["payload"]["status"], "broadcast");
    let first = b.recv_json();
    assert_eq!(
        (first["type"].as_str(), first["payload"]["hello"].as_str()),
        (Some("data_event"), Some("all"))
    );
}

#[test]
fn an_unknown_operation_name_stops_start_up_naming_the_key() {
    let error = customws::Config::load(
        ["--jwt-secret", "s", "--disabled-ops", "join,teleport"].map(String::from),
        Vec::<(String, String)>::new(),
    )
    .expect_err("refused");
    let text = error.to_string();
    assert!(text.contains("disabled_ops") && text.contains("teleport"), "{text}");
}

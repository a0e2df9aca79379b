//! Seed 001 (the TypeScript client guide): the client's flows, message by message, against
//! this server — connecting (§1), chat and file messages (§2), server-mediated P2P (§4),
//! `client_ack` (§5), answering server requests (§6), keep-alive (§7), generic requests (§8),
//! closing (§9) and presence (§10), including typing that expires by itself and coalescing of
//! keystroke storms. The messages are what the guide's TypeScript builds (`JSON.stringify`
//! of its objects, `undefined` fields omitted).

mod common;

use std::time::{Duration, Instant};

use common::*;
use customws::OutMessage;
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

fn assert_ack(v: &Value, pid: &str, status: &str) {
    assert_eq!(v["type"], "server_ack", "{v}");
    assert_eq!(v["payload"]["acknowledgedPid"], pid, "{v}");
    assert_eq!(v["payload"]["status"], status, "{v}");
}

/// A `presence_event` about `user` with `status` (SPEC payload `{userId, status, context,
/// timestamp}`); returns the payload.
fn assert_presence(v: &Value, user: i64, status: &str) -> Value {
    assert_eq!(v["type"], "presence_event", "expected {user}'s {status:?}, got {v}");
    assert_eq!(v["fromUserId"], user, "{v}");
    assert_eq!(v["payload"]["userId"], user, "{v}");
    assert_eq!(v["payload"]["status"], status, "{v}");
    assert_rfc3339(v["payload"]["timestamp"].as_str().unwrap_or_else(|| panic!("{v}")));
    v["payload"].clone()
}

/// `generateUniquePID()`: `client-${Date.now()}-${random base36}`.
fn ts_pid(n: u32) -> String {
    format!("client-{}-k{n}x9a2b", now_secs() * 1000)
}

/// Watches `users` from `w` (`presence_subscribe`), consuming the ack and initial events.
fn watch(w: &mut Client, users: &[i64]) {
    w.send_value(&json!({"pid": "watch", "type": "presence_subscribe", "payload": {"userIds": users}}));
    for _ in 0..=users.len() {
        let v = w.recv_json();
        assert!(v["type"] == "server_ack" || v["type"] == "presence_event", "{v}");
    }
}

#[test]
fn browser_connection_with_token_in_url_or_subprotocol_and_normal_close() {
    // §1.1: browsers cannot set headers, "la autenticación … mediante token en URL". SPEC also
    // accepts the `Sec-WebSocket-Protocol: bearer, <token>` form and selects `bearer`.
    let server = start(|_| {});
    let addr = server.local_addr();
    let t = token(1, &[]);
    let mut by_url = connect_with(addr, 1, &format!("/ws?token={t}"), &[]);
    by_url.roundtrip("url");
    let mut by_proto = connect_with(addr, 1, "/ws", &[("Sec-WebSocket-Protocol", &format!("bearer, {t}"))]);
    let chosen =
        by_proto.response.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(chosen.as_deref(), Some("bearer"));
    by_proto.roundtrip("proto");

    // §1 `disconnect()` / §9: `socket.close(1000, "Cierre normal por el cliente")`; the
    // server completes the closing handshake with 1000.
    by_url
        .ws
        .close(Some(CloseFrame { code: CloseCode::Normal, reason: "Cierre normal por el cliente".into() }))
        .unwrap();
    let reply = loop {
        match by_url.ws.read() {
            Ok(Message::Close(f)) => break f,
            Ok(_) => continue,
            Err(e) => panic!("no close reply: {e:?}"),
        }
    };
    assert_eq!(reply.map(|f| u16::from(f.code)), Some(1000));
    wait_until(Duration::from_secs(3), "one connection left", || {
        metric_sum(&metrics(addr), "ws_connections_current") == Some(1.0)
    });
}

#[test]
fn send_private_message_is_server_mediated_p2p() {
    // §4.2 step 1, verbatim, from user 123 to user 456 (§4.4 `sendPrivateMessage` awaits the
    // ack: `sendMessageWithAck`).
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect_on_shard(addr, 123, &[], 0);
    let mut b = connect_on_shard(addr, 456, &[], 1);
    let payload = r#"{"action":"send_message","resource":"chat","data":{"text":"Hola! Este es un mensaje privado","messageType":"private"}}"#;
    a.send_json(&format!(
        r#"{{"type":"data_request","targetUserId":456,"payload":{payload},"pid":"client-msg-123"}}"#
    ));
    // Step 3: B's `handleDataEvent` sees `fromUserId` 123. Choice: the guide's step 2 shows a
    // server *application* wrapping the payload (`originalPayload`, `senderName`, …); SPEC's
    // built-in router forwards the sender's payload byte for byte.
    let raw = b.recv_text();
    assert_raw_payload(&raw, payload);
    let ev: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(ev["type"], "data_event");
    assert_eq!(ev["fromUserId"], 123, "the receiver knows who sent it: {ev}");
    assert_ack(&a.recv_json(), "client-msg-123", "delivered");

    // §4.4 `sendCollaborationInvite` / `initiateVideoCall`: no pid, so no ack; delivered all
    // the same.
    a.send_value(&json!({
        "type": "data_request",
        "targetUserId": 456,
        "payload": {"action": "initiate_call", "resource": "webrtc",
                    "data": {"callType": "video", "sdpOffer": "v=0...", "callId": ts_pid(1)}}
    }));
    let ev = b.recv_of_type("data_event");
    assert_eq!(ev["payload"]["resource"], "webrtc", "{ev}");
    a.expect_silence(Duration::from_millis(100));

    // §4.6: the server checks the target is connected.
    a.send_value(&json!({"type": "data_request", "targetUserId": 999, "payload": {}, "pid": "p-off"}));
    let v = a.recv_json();
    assert_eq!((v["type"].as_str(), v["error"]["code"].as_i64()), (Some("error_notification"), Some(404)));
    assert_eq!(v["error"]["originalPid"], "p-off");
}

#[test]
fn messages_without_target_are_broadcasts() {
    // §2 `uploadFileChunk` / §8.1 `sendPublicMessage`: no targetUserId. §4.5: "Broadcasting
    // (sin targetUserId) → todos los usuarios conectados". SPEC: only for role `broadcast`
    // (403 otherwise), to every connection except the sender's.
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut caster = connect(addr, 1, &["broadcast"]);
    let mut user = connect(addr, 2, &[]);
    let mut other = connect(addr, 3, &[]);
    let pid = ts_pid(2);
    caster.send_value(&json!({
        "type": "data_request",
        "payload": {"action": "upload_chunk", "resource": "file",
                    "data": {"fileName": "a.pdf", "chunkNum": 0, "data": "SGVsbG8="}},
        "pid": pid
    }));
    assert_ack(&caster.recv_json(), &pid, "broadcast");
    for c in [&mut user, &mut other] {
        let ev = c.recv_of_type("data_event");
        assert_eq!(ev["fromUserId"], 1, "{ev}");
        assert_eq!(ev["payload"]["data"]["fileName"], "a.pdf", "{ev}");
    }
    user.send_value(&json!({"type": "data_request",
        "payload": {"action": "send_message", "resource": "chat", "data": {"text": "hi", "messageType": "public"}}}));
    let v = user.recv_json();
    assert_eq!((v["type"].as_str(), v["error"]["code"].as_i64()), (Some("error_notification"), Some(403)));
    caster.expect_silence(Duration::from_millis(100));
}

#[test]
fn send_client_ack_and_send_generic_response() {
    let server = start(|_| {});
    let mut c = connect(server.local_addr(), 5, &[]);
    c.roundtrip("ready");

    // §5 `sendClientAck(serverPid, "processed")`.
    let msg = OutMessage::new("data_event", r#"{"resource":"notification","data":{"id":1}}"#).unwrap();
    let waiter = server.handle().send_for_ack(5, &msg, Some(Duration::from_secs(5)));
    let got = c.recv_of_type("data_event");
    let server_pid = got["pid"].as_str().unwrap().to_owned();
    c.send_value(
        &json!({"type": "client_ack", "payload": {"acknowledgedPid": server_pid, "status": "processed"},
                         "pid": ts_pid(3)}),
    );
    let reply = waiter.wait_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(reply.status.as_deref(), Some("processed"));

    // §6 `sendGenericResponse(serverPid, clientInfo)` to the server's `get_client_info`.
    let req = OutMessage::new("generic_request", r#"{"action":"get_client_info"}"#).unwrap();
    let waiter = server.handle().request(5, &req, Some(Duration::from_secs(5)));
    let got = c.recv_of_type("generic_request");
    let server_pid = got["pid"].as_str().unwrap().to_owned();
    assert_eq!(got["payload"]["action"], "get_client_info");
    let info = json!({"browserInfo": "Mozilla/5.0", "screenResolution": "1920x1080",
                      "timezone": "Europe/Madrid", "timestamp": 1_700_000_000_000_u64});
    c.send_value(&json!({"pid": server_pid, "type": "generic_response", "payload": info}));
    let reply = waiter.wait_timeout(Duration::from_secs(5)).unwrap().json();
    assert_eq!(reply["type"], "generic_response");
    assert_eq!(reply["payload"], info);
}

#[test]
fn generic_request_for_chat_history() {
    // §8.1 `getChatHistory` → `sendGenericRequest`; §3 `GENERIC_RESPONSE` handled by pid.
    // With no application the server echoes the payload (SPEC).
    let server = start(|_| {});
    let mut c = connect(server.local_addr(), 5, &[]);
    let pid = ts_pid(4);
    let payload =
        json!({"action": "get_history", "resource": "chat", "data": {"chatId": "general", "limit": 50}});
    c.send_value(&json!({"type": "generic_request", "payload": payload, "pid": pid}));
    let v = c.recv_of_type("generic_response");
    assert_eq!(v["pid"], pid.as_str());
    assert_eq!(v["payload"], payload);
}

#[test]
fn keep_alive_needs_nothing_from_the_client() {
    // §7: the client sends no pings and no explicit pongs (its library answers pings); the
    // server keeps it connected.
    let server = start(|c| {
        c.ping_period = Duration::from_millis(100);
        c.pong_wait = Duration::from_millis(300);
    });
    let mut c = connect(server.local_addr(), 1, &[]);
    c.expect_silence(Duration::from_millis(900)); // reads answer pings meanwhile
    c.roundtrip("alive");
}

// ---------------------------------------------------------------------------------------------
// §10 presence
// ---------------------------------------------------------------------------------------------

#[test]
fn targeted_presence_update_as_in_section_10_3() {
    // §10.3's client → server example (target and context inside the payload).
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut me = connect(addr, 123, &[]);
    let mut peer = connect(addr, 456, &[]);
    me.send_json(
        r#"{"type":"presence_update","payload":{"status":"typing","targetUserId":456,"context":{"location":"chat-room-general","activity":"writing_message"}}}"#,
    );
    // §10.3's server → client example, minus `username` (the tier knows no user names).
    let p = assert_presence(&peer.recv_json(), 123, "typing");
    assert_eq!(p["context"], json!({"location": "chat-room-general", "activity": "writing_message"}));
}

#[test]
fn presence_manager_target_at_the_envelope_level() {
    // §10.5 `updateStatusWithContext(status, context, targetUserId)` puts `targetUserId` on the
    // envelope (the §2 `ClientToServerMessage` field), not in the payload, and adds a numeric
    // `timestamp` to the payload: `startTyping("chat-1", 456)`.
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut me = connect(addr, 123, &[]);
    let mut peer = connect(addr, 456, &[]);
    let mut watcher = connect(addr, 9, &[]);
    watch(&mut watcher, &[123]);
    me.send_value(&json!({
        "type": "presence_update",
        "targetUserId": 456,
        "payload": {"status": "typing", "context": {"chatId": "chat-1"}, "timestamp": 1_700_000_000_000_u64}
    }));
    peer.ws.get_ref().set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let p = assert_presence(&peer.recv_json(), 123, "typing");
    assert_eq!(p["context"], json!({"chatId": "chat-1"}));
    // Targeted: the watcher is not told.
    watcher.expect_silence(Duration::from_millis(200));
}

#[test]
fn explicit_stop_typing_after_start_typing() {
    // §10.4: `sendPresenceUpdate("typing", target)` then, 3 s later in the guide,
    // `sendPresenceUpdate("online", target)`. The target sees both, and the server's own
    // expiry of "typing" adds nothing after an explicit stop.
    let ttl = Duration::from_millis(300);
    let server = start(|c| c.transient_ttl = ttl);
    let addr = server.local_addr();
    let mut me = connect(addr, 123, &[]);
    let mut peer = connect(addr, 456, &[]);
    me.send_json(
        r#"{"pid":"start","type":"presence_update","payload":{"status":"typing","targetUserId":456}}"#,
    );
    assert_ack(&me.recv_json(), "start", "ok");
    assert_presence(&peer.recv_json(), 123, "typing");
    me.send_json(
        r#"{"pid":"stop","type":"presence_update","payload":{"status":"online","targetUserId":456}}"#,
    );
    assert_ack(&me.recv_json(), "stop", "ok");
    assert_presence(&peer.recv_json(), 123, "online");
    peer.expect_silence(ttl + Duration::from_millis(300));

    // Same without a target (watchers): typing, explicit online, nothing more.
    let mut w = connect(addr, 9, &[]);
    watch(&mut w, &[123]);
    me.send_json(r#"{"type":"presence_update","payload":{"status":"typing"}}"#);
    me.send_json(r#"{"type":"presence_update","payload":{"status":"online"}}"#);
    assert_presence(&w.recv_json(), 123, "typing");
    assert_presence(&w.recv_json(), 123, "online");
    w.expect_silence(ttl + Duration::from_millis(300));
}

#[test]
fn typing_stops_by_itself_without_a_stop_message() {
    // §10.5 `startTyping` relies on a client timer to send "stop"; with the tier's transient
    // statuses a client that never sends it still clears the indicator after the TTL.
    let ttl = Duration::from_millis(300);
    let server = start(|c| c.transient_ttl = ttl);
    let addr = server.local_addr();
    let mut me = connect(addr, 123, &[]);
    let mut w = connect(addr, 9, &[]);
    watch(&mut w, &[123]);
    me.send_json(r#"{"type":"presence_update","payload":{"status":"away"}}"#);
    assert_presence(&w.recv_json(), 123, "away");
    let sent = Instant::now();
    me.send_json(r#"{"type":"presence_update","payload":{"status":"typing","context":{"chatId":"c"}}}"#);
    assert_presence(&w.recv_json(), 123, "typing");
    // Back to the last lasting status ("away"), with no context.
    let p = assert_presence(&w.recv_json(), 123, "away");
    let elapsed = sent.elapsed();
    assert_eq!(p["context"], Value::Null);
    assert!(elapsed >= ttl && elapsed < ttl + Duration::from_secs(1), "reverted after {elapsed:?}");
}

#[test]
fn keystroke_spam_is_coalesced() {
    // §10.7 "❌ MAL: Actualizar presencia en cada keystroke": 20 identical updates, no pids.
    // The server coalesces identical updates within `presence_coalesce` (1 s): one event per
    // watcher; the following "online" (a different update) arrives right after it.
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut me = connect(addr, 123, &[]);
    let mut w1 = connect(addr, 9, &[]);
    let mut w2 = connect(addr, 10, &[]);
    watch(&mut w1, &[123]);
    watch(&mut w2, &[123]);
    let started = Instant::now();
    for _ in 0..20 {
        me.send_json(r#"{"type":"presence_update","payload":{"status":"typing"}}"#);
    }
    me.send_json(r#"{"pid":"idle","type":"presence_update","payload":{"status":"online"}}"#);
    assert_ack(&me.recv_json(), "idle", "ok");
    assert!(started.elapsed() < Duration::from_secs(1), "the storm did not fit in one window");
    for w in [&mut w1, &mut w2] {
        assert_presence(&w.recv_json(), 123, "typing");
        assert_presence(&w.recv_json(), 123, "online");
        w.expect_silence(Duration::from_millis(100));
    }
}

#[test]
fn collaboration_presence_reaches_the_document_room() {
    // §10.4 "Colaboración en documentos": `sendPresenceUpdate("editing", null, {documentId,
    // section, cursor_position})` with no target reaches the people in the same document —
    // here the members of the room `doc_123` (issue 4: the sender's rooms' members).
    let server = start(|c| c.room_presence_max_members = 0);
    let addr = server.local_addr();
    let mut me = connect_on_shard(addr, 123, &[], 0);
    let mut co = connect_on_shard(addr, 456, &[], 1);
    let mut elsewhere = connect(addr, 789, &[]);
    for (c, pid) in [(&mut me, "j1"), (&mut co, "j2")] {
        c.send_value(&json!({"type": "join", "pid": pid, "payload": {"room": "doc_123"}}));
        assert_ack(&c.recv_json(), pid, "joined");
    }
    let ctx = json!({"documentId": "doc_123", "section": "paragraph_5", "cursor_position": 245});
    me.send_value(&json!({"type": "presence_update", "payload": {"status": "editing", "context": ctx}}));
    let p = assert_presence(&co.recv_json(), 123, "editing");
    assert_eq!(p["context"], ctx);
    elsewhere.expect_silence(Duration::from_millis(150));
}

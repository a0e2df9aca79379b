//! Seed 000 (`customws`, the generic Go connection manager): its client protocol (§5) and the
//! manager features a client can observe (§3, §4, §6), against this server. The JSON messages
//! are the document's own examples (its `//` comments removed). Where the document shows
//! application code (its `ProcessClientMessage` callbacks), SPEC's built-in router decides
//! what a server with no application does; each such choice is named below.

mod common;

use std::time::Duration;

use common::*;
use customws::OutMessage;
use customws::app::WaitError;
use serde_json::{Value, json};

/// Asserts `v` is an `error_notification` with `code` and `originalPid` (§5.3's shape:
/// `{"type":"error_notification","error":{"originalPid","code","message"}}`).
fn assert_error(v: &Value, code: i64, pid: &str) {
    assert_eq!(v["type"], "error_notification", "{v}");
    let e = v["error"].as_object().unwrap_or_else(|| panic!("error object: {v}"));
    assert_eq!(e["originalPid"], pid, "{v}");
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

fn assert_ack(v: &Value, pid: &str, status: &str) {
    assert_eq!(v["type"], "server_ack", "{v}");
    assert_eq!(v["payload"]["acknowledgedPid"], pid, "{v}");
    assert_eq!(v["payload"]["status"], status, "{v}");
}

/// §5.2's first example, addressed to user 456.
const P2P_PAYLOAD: &str = r#"{
    "action": "get_user_profile",
    "data": {
      "userId": 123,
      "fields": ["username", "email", "roles"]
    }
  }"#;

#[test]
fn p2p_data_request_is_forwarded_as_data_event_and_acked_delivered() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut sender = connect_on_shard(addr, 123, &[], 0);
    let mut target = connect_on_shard(addr, 456, &[], 1);
    sender.send_json(&format!(
        r#"{{
  "pid": "opcional-client-generated-uuid-123",
  "type": "data_request",
  "targetUserId": 456,
  "payload": {P2P_PAYLOAD}
}}"#
    ));
    // §3.4 `handlePeerToPeerChat`: the target gets `data_event` with `fromUserId` the sender.
    // Choice: the document's handler enriches the payload (timestamp, messageId); SPEC's
    // router forwards the sender's payload byte for byte.
    let raw = target.recv_text();
    assert_raw_payload(&raw, P2P_PAYLOAD);
    let ev: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(ev["type"], "data_event", "{ev}");
    assert_eq!(ev["fromUserId"], 123, "{ev}");
    // `conn.SendServerAck(msg.PID, "delivered", nil)`.
    assert_ack(&sender.recv_json(), "opcional-client-generated-uuid-123", "delivered");

    // A target with no connection: an error naming the pid (SPEC: 404).
    sender.send_json(r#"{"pid":"to-nobody","type":"data_request","targetUserId":789,"payload":{}}"#);
    assert_error(&sender.recv_json(), 404, "to-nobody");
}

#[test]
fn untargeted_data_request_is_a_broadcast_for_the_broadcast_role_only() {
    // §5.2 "Solicitud de datos" (no target, no pid). Choice: the document's `handleDataRequest`
    // answers the sender with its own data_event and a "processed" ack — application code.
    // SPEC's router makes an untargeted data_request a broadcast to every other connection,
    // allowed with role `broadcast` (403 otherwise), acked "broadcast".
    let example = r#"{
  "type": "data_request",
  "payload": {
    "resource": "user_profile",
    "action": "update",
    "data": {
      "username": "nuevo_nombre",
      "bio": "Nueva biografía"
    }
  }
}"#;
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut plain = connect(addr, 1, &["user"]);
    let mut caster = connect(addr, 2, &["broadcast"]);
    let mut other = connect(addr, 3, &[]);

    plain.send_json(example);
    let v = plain.recv_json();
    assert_eq!((v["type"].as_str(), v["error"]["code"].as_i64()), (Some("error_notification"), Some(403)));

    let with_pid = example.replacen("{\n", "{\n  \"pid\": \"b1\",\n", 1);
    caster.send_json(&with_pid);
    assert_ack(&caster.recv_json(), "b1", "broadcast");
    for c in [&mut plain, &mut other] {
        let ev = c.recv_of_type("data_event");
        assert_eq!(ev["fromUserId"], 2, "{ev}");
        assert_eq!(ev["payload"]["data"]["bio"], "Nueva biografía", "{ev}");
    }
    caster.expect_silence(Duration::from_millis(100));
}

#[test]
fn presence_update_with_target_reaches_the_target_as_presence_event() {
    // §5.2 "Actualización de presencia", verbatim: the target is inside the payload.
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut me = connect(addr, 123, &[]);
    let mut target = connect(addr, 789, &[]);
    let mut bystander = connect(addr, 5, &[]);
    me.send_json(
        r#"{
  "type": "presence_update",
  "payload": {
    "status": "typing",
    "targetUserId": 789
  }
}"#,
    );
    let v = target.recv_of_type("presence_event");
    assert_eq!(v["fromUserId"], 123, "{v}");
    // Choice: §5.3's example payload is `{status, username, lastSeen}` (application data);
    // SPEC's presence_event payload is `{userId, status, context, timestamp}`.
    assert_eq!(v["payload"]["userId"], 123, "{v}");
    assert_eq!(v["payload"]["status"], "typing", "{v}");
    assert_eq!(v["payload"]["context"], Value::Null, "{v}");
    assert_rfc3339(v["payload"]["timestamp"].as_str().unwrap());
    // Choice: the document's handler broadcasts untargeted updates to everyone; a targeted
    // one goes to the target only.
    bystander.expect_silence(Duration::from_millis(150));
    me.expect_silence(Duration::from_millis(10));
}

#[test]
fn generic_request_is_answered_with_the_same_pid() {
    // §5.2 "Solicitud genérica con respuesta esperada". Choice: with no application (the
    // document's `handleGenericRequest`), SPEC has the server echo the payload.
    let payload = r#"{
    "operation": "search",
    "query": "documentos importantes",
    "filters": {
      "dateRange": "last_week",
      "type": "pdf"
    }
  }"#;
    let server = start(|_| {});
    let mut c = connect(server.local_addr(), 1, &[]);
    c.send_json(&format!(
        "{{\n  \"pid\": \"client-req-123\",\n  \"type\": \"generic_request\",\n  \"payload\": {payload}\n}}"
    ));
    let raw = c.recv_text();
    let v: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(v["type"], "generic_response", "{v}");
    assert_eq!(v["pid"], "client-req-123", "{v}");
    assert_raw_payload(&raw, payload);
}

#[test]
fn client_ack_resolves_the_servers_send_for_ack() {
    // §3.2 `SendForClientAck` and §5.4's `client_ack`.
    let server = start(|_| {});
    let mut c = connect(server.local_addr(), 7, &[]);
    c.roundtrip("ready");
    let msg =
        OutMessage::new("data_event", r#"{"event":"new_document","document":{"id":"doc_123"}}"#).unwrap();
    let waiter = server.handle().send_for_ack(7, &msg, Some(Duration::from_secs(5)));
    let got = c.recv_of_type("data_event");
    let server_pid = got["pid"].as_str().unwrap_or_else(|| panic!("a pid to acknowledge: {got}")).to_owned();
    assert_eq!(got["payload"]["document"]["id"], "doc_123");
    c.send_json(&format!(
        r#"{{
  "pid": "client-ack-pid-xyz-456",
  "type": "client_ack",
  "payload": {{
    "acknowledgedPid": "{server_pid}",
    "status": "received",
    "error": null
  }}
}}"#
    ));
    let reply = waiter.wait_timeout(Duration::from_secs(5)).expect("the ack");
    assert_eq!(reply.status.as_deref(), Some("received"));
    // `"error": null` means no error.
    assert!(matches!(reply.error, None | Some(Value::Null)), "{reply:?}");

    // §3.2 "Timeouts configurables": no ack → the wait fails.
    let waiter = server.handle().send_for_ack(7, &msg, Some(Duration::from_millis(150)));
    c.recv_of_type("data_event");
    assert_eq!(waiter.wait_timeout(Duration::from_secs(5)), Err(WaitError::TimedOut));
}

#[test]
fn a_server_request_is_answered_by_a_message_with_the_same_pid() {
    // §3.2 `SendRequestAndWaitClientResponse` and §5.5's reply.
    let server = start(|_| {});
    let mut c = connect(server.local_addr(), 8, &[]);
    c.roundtrip("ready");
    let msg = OutMessage::new("generic_request", r#"{"action":"search_local","query":"x"}"#).unwrap();
    let waiter = server.handle().request(8, &msg, Some(Duration::from_secs(5)));
    let req = c.recv_of_type("generic_request");
    let pid = req["pid"].as_str().unwrap_or_else(|| panic!("request pid: {req}")).to_owned();
    let answer = json!({
        "results": [{"id": "local_doc_1", "title": "Documento local encontrado", "content": "Contenido relevante..."}],
        "searchTime": 150,
        "source": "client_cache"
    });
    c.send_value(&json!({"pid": pid, "type": "search_response", "payload": answer}));
    let reply = waiter.wait_timeout(Duration::from_secs(5)).expect("the reply").json();
    assert_eq!(reply["type"], "search_response", "{reply}");
    assert_eq!(reply["pid"], pid.as_str(), "{reply}");
    assert_eq!(reply["payload"], answer, "{reply}");
}

#[test]
fn unsupported_type_gets_error_notification_400_and_the_connection_stays() {
    // §4.2's default case: `SendErrorNotification(msg.PID, 400, "Tipo de mensaje no
    // soportado")`.
    let server = start(|_| {});
    let mut c = connect(server.local_addr(), 1, &[]);
    c.send_json(r#"{"pid":"f-1","type":"file_upload","payload":{"fileName":"a.pdf","chunkNum":0}}"#);
    assert_error(&c.recv_json(), 400, "f-1");
    c.roundtrip("still-open");
}

#[test]
fn server_push_operations_of_the_manager() {
    // §3.4: `SendMessageToUser`, `BroadcastToUsers`, `BroadcastToAll(msg, excluded...)`;
    // §3.1: `GetConnection`.
    let server = start(|_| {});
    let addr = server.local_addr();
    let h = server.handle();
    let mut u1 = connect_on_shard(addr, 1, &[], 0);
    let mut u2 = connect_on_shard(addr, 2, &[], 1);
    let mut admin = connect(addr, 3, &[]);
    for c in [&mut u1, &mut u2, &mut admin] {
        c.roundtrip("ready");
    }
    let wait = Duration::from_secs(5);

    let mut direct = OutMessage::new("data_event", r#"{"text":"hola"}"#).unwrap();
    direct.from_user_id = Some(3);
    assert_eq!(h.send_to_user(2, &direct).wait_timeout(wait), Ok(1));
    let ev = u2.recv_of_type("data_event");
    assert_eq!((ev["fromUserId"].as_i64(), ev["payload"]["text"].as_str()), (Some(3), Some("hola")));

    let note =
        OutMessage::new("notification", r#"{"type":"system","title":"Notificación del Sistema"}"#).unwrap();
    assert_eq!(h.send_to_users(&[1, 2, 99], &note).wait_timeout(wait), Ok(2));
    for c in [&mut u1, &mut u2] {
        assert_eq!(c.recv_of_type("notification")["payload"]["type"], "system");
    }
    // Excluding "administrators".
    assert_eq!(h.broadcast(&note, &[3]).wait_timeout(wait), Ok(2));
    for c in [&mut u1, &mut u2] {
        c.recv_of_type("notification");
    }
    admin.expect_silence(Duration::from_millis(150));

    assert_eq!(h.is_online(1).wait_timeout(wait), Ok(true));
    assert_eq!(h.is_online(99).wait_timeout(wait), Ok(false));
    let conns = h.user_connections(2).wait_timeout(wait).unwrap();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].shard, 1);
}

#[test]
fn duplicate_connections_of_a_user_are_closed_when_configured() {
    // §3.1 "Prevención de duplicados: cierre automático de conexiones duplicadas del mismo
    // usuario". Choice (SPEC): only with `connections_per_user = 1`; the older connection
    // is closed with 4000. By default a user may have several connections.
    let server = start(|c| c.connections_per_user = 1);
    let addr = server.local_addr();
    let mut old = connect(addr, 1, &[]);
    old.roundtrip("old");
    let mut new = connect(addr, 1, &[]);
    old.expect_close(4000);
    new.roundtrip("new");

    let server = start(|_| {});
    let mut a = connect(server.local_addr(), 1, &[]);
    let mut b = connect(server.local_addr(), 1, &[]);
    a.roundtrip("a");
    b.roundtrip("b");
}

#[test]
fn authentication_sources_of_the_collaboration_example() {
    // §3.6: header `Authorization: Bearer`, then `?token=`, then cookie `auth_token`; no token
    // or a bad one refuses the connection (SPEC: 401 before the upgrade).
    let server = start(|_| {});
    let addr = server.local_addr();
    let t = token(11, &["user"]);
    connect_with(addr, 11, "/ws", &[("Authorization", &format!("Bearer {t}"))]).roundtrip("header");
    connect_with(addr, 11, &format!("/ws?token={t}"), &[]).roundtrip("query");
    connect_with(addr, 11, "/ws", &[("Cookie", &format!("theme=dark; auth_token={t}"))]).roundtrip("cookie");
    assert_eq!(expect_refused(addr, "/ws", &[]).0, 401);
    assert_eq!(expect_refused(addr, "/ws", &[("Authorization", "Bearer valid-token-user1")]).0, 401);
}

#[test]
fn allowed_origins_are_enforced() {
    // §6.1: `AllowedOrigins: ["https://myapp.com", "https://app.mycompany.com"]`.
    let server = start(|c| {
        c.allowed_origins = vec!["https://myapp.com".into(), "https://app.mycompany.com".into()];
    });
    let addr = server.local_addr();
    let auth = format!("Bearer {}", token(1, &[]));
    connect_with(addr, 1, "/ws", &[("Authorization", &auth), ("Origin", "https://myapp.com")])
        .roundtrip("ok");
    let (status, _) =
        expect_refused(addr, "/ws", &[("Authorization", &auth), ("Origin", "https://evil.example")]);
    assert_eq!(status, 403);
}

#[test]
fn max_message_size_closes_with_1009() {
    // §4.3: `MaxMessageSize: 4096`.
    let server = start(|c| c.max_message_size = 4096);
    let mut c = connect(server.local_addr(), 1, &[]);
    let small = json!({"type": "generic_request", "pid": "s", "payload": "x".repeat(3000)});
    c.send_value(&small);
    assert_eq!(c.recv_json()["pid"], "s");
    c.send_value(&json!({"type": "generic_request", "pid": "big", "payload": "x".repeat(5000)}));
    c.expect_close(1009);
}

#[test]
fn shutdown_closes_every_connection_with_1001() {
    // §4.3: `connManager.Shutdown(ctx)` on SIGINT/SIGTERM.
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut a = connect_on_shard(addr, 1, &[], 0);
    let mut b = connect_on_shard(addr, 2, &[], 1);
    server.shutdown();
    a.expect_close(1001);
    b.expect_close(1001);
}

#[test]
fn health_endpoint_answers_ok() {
    // §4.3 registers `/health` writing the text "OK". Choice (SPEC): `/health` answers JSON
    // `{"status":"OK", …}` (seed 004's fields), which still carries "OK".
    let server = start(|_| {});
    let r = http_get(server.local_addr(), "/health", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["status"], "OK", "{r:?}");
}

//! Every message type against the real chat server over SQLite, with real WebSocket clients.

mod common;

use common::{Fixture, flows};
use customws_chat::store;
use serde_json::{Value, json};

#[test]
fn send_to_online_contact_is_delivered_after_the_client_ack() {
    flows::send_to_online(&Fixture::sqlite());
}

#[test]
fn send_to_offline_contact_is_delivered_when_it_connects() {
    flows::send_to_offline_then_connect(&Fixture::sqlite());
}

#[test]
fn read_receipts_and_chat_list() {
    flows::read_receipts(&Fixture::sqlite());
}

#[test]
fn only_accepted_contacts_can_message_or_type() {
    flows::contacts_only(&Fixture::sqlite());
}

#[test]
fn presence_reaches_online_contacts_only() {
    flows::presence_to_contacts(&Fixture::sqlite());
}

#[test]
fn profiles_carry_country_names() {
    flows::profile_with_country(&Fixture::sqlite());
}

#[test]
fn a_message_is_not_lost_when_the_connection_drops_before_the_ack() {
    let f = Fixture::sqlite();
    let bob_id = f.user("bob").id;
    let mut alice = f.connect("alice");
    let mut bob = f.connect_without_acks("bob");
    let (id, _) = flows::send(&mut alice, bob_id, "no te lo pierdas");
    let first = bob.expect("NEW_CHAT_MESSAGE");
    assert_eq!(first["payload"]["text"], "no te lo pierdas");
    bob.close(); // received, never acknowledged
    let offline = alice.next_where(common::WAIT, "bob offline", |v| {
        v["type"] == "PRESENCE_EVENT" && v["payload"]["event"] == "user_offline"
    });
    assert_eq!(offline["payload"]["userId"], bob_id);
    assert_eq!(f.status_of(id), Some(store::SENT), "delivered without an ack");
    alice.assert_none_before_marker("MESSAGE_STATUS_UPDATE");
    let mut bob = f.connect("bob");
    let again = bob.expect("NEW_CHAT_MESSAGE");
    assert_eq!(again["payload"]["id"], id.to_string());
    let update = alice.expect("MESSAGE_STATUS_UPDATE");
    assert_eq!(update["payload"]["status"], "delivered");
    assert_eq!(f.status_of(id), Some(store::DELIVERED));
}

#[test]
fn typing_indicators_reach_the_contact() {
    let f = Fixture::sqlite();
    let (alice_id, bob_id) = (f.user("alice").id, f.user("bob").id);
    let mut alice = f.connect("alice");
    let mut bob = f.connect("bob");
    let ack = alice.call("TYPING_INDICATOR_ON", json!({ "toUserId": bob_id }));
    assert_eq!(ack["type"], "SERVER_ACK");
    let on = bob.expect("TYPING_INDICATOR_ON");
    assert_eq!(on["fromUserId"], alice_id);
    assert_eq!(on["payload"]["fromUserId"], alice_id);
    assert_eq!(on["payload"]["isTyping"], true);
    assert_eq!(on["payload"]["chatId"], format!("chat_{alice_id}_{bob_id}"));
    // Without a pid: no answer, the indicator still goes out.
    alice.send(&json!({ "type": "TYPING_INDICATOR_OFF", "payload": { "toUserId": bob_id } }));
    let off = bob.expect("TYPING_INDICATOR_OFF");
    assert_eq!(off["payload"]["isTyping"], false);
}

#[test]
fn notifications_list_and_mark_read() {
    let f = Fixture::sqlite();
    let mut alice = f.connect("alice");
    let mut bob = f.connect("bob");
    let list = alice.call("GET_NOTIFICATIONS", Value::Null);
    assert_eq!(list["type"], "NOTIFICATION_LIST");
    let notes = list["payload"]["notifications"].as_array().unwrap().clone();
    assert_eq!(notes.len(), 1, "{list}");
    assert_eq!(notes[0]["type"], "welcome");
    assert_eq!(notes[0]["isRead"], false);
    assert!(notes[0]["timestamp"].as_str().unwrap().ends_with('Z'), "RFC 3339 UTC: {}", notes[0]);
    let id = notes[0]["id"].as_str().unwrap().to_string();
    let ack = alice.call("MARK_NOTIFICATION_READ", json!({ "notificationId": id }));
    assert_eq!(ack["type"], "SERVER_ACK", "{ack}");
    assert_eq!(ack["payload"]["status"], "read");
    let unread = alice.call("GET_NOTIFICATIONS", json!({ "unreadOnly": true }));
    assert_eq!(unread["payload"]["notifications"], json!([]));
    let all = alice.call("GET_NOTIFICATIONS", json!({ "limit": 10 }));
    assert_eq!(all["payload"]["notifications"][0]["isRead"], true);
    // Somebody else's notification, or none at all: 404.
    let bobs = bob.call("GET_NOTIFICATIONS", Value::Null);
    let bobs_id = bobs["payload"]["notifications"][0]["id"].clone();
    let refused = alice.call("MARK_NOTIFICATION_READ", json!({ "notificationId": bobs_id }));
    assert_eq!(refused["type"], "ERROR_NOTIFICATION");
    assert_eq!(refused["payload"]["code"], 404);
    let refused = alice.call("MARK_NOTIFICATION_READ", json!({ "notificationId": 987_654 }));
    assert_eq!(refused["payload"]["code"], 404);
    let bobs_list = bob.call("GET_NOTIFICATIONS", Value::Null);
    assert_eq!(bobs_list["payload"]["notifications"][0]["isRead"], false);
}

#[test]
fn bad_requests_are_refused_with_the_seeds_error_shape() {
    let f = Fixture::sqlite();
    let bob_id = f.user("bob").id;
    let mut alice = f.connect("alice");
    for (kind, payload, code) in [
        ("SEND_CHAT_MESSAGE", json!({ "toUserId": bob_id }), 400),
        ("SEND_CHAT_MESSAGE", json!({ "text": "x" }), 400),
        ("SEND_CHAT_MESSAGE", json!({ "toUserId": bob_id, "text": "   " }), 400),
        ("SEND_CHAT_MESSAGE", json!({ "toUserId": bob_id, "text": "x".repeat(4001) }), 413),
        ("SEND_CHAT_MESSAGE", json!({ "toUserId": f.user("alice").id, "text": "me" }), 400),
        ("MESSAGES_READ", json!({}), 400),
        ("GET_USER_PROFILE", json!({ "userId": "abc" }), 400),
        ("UPDATE_MY_PROFILE", json!({ "headline": 5 }), 400),
        ("UPDATE_MY_PROFILE", json!({ "unknown": "x" }), 400),
        ("UPDATE_MY_PROFILE", json!({ "headline": "y".repeat(256) }), 400),
        ("MARK_NOTIFICATION_READ", json!({}), 400),
    ] {
        let answer = alice.call(kind, payload);
        assert_eq!(answer["type"], "ERROR_NOTIFICATION", "{kind}: {answer}");
        assert_eq!(answer["payload"]["code"], code, "{kind}: {answer}");
        assert!(answer["payload"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // A type the chat does not know is the tier's: error_notification 400.
    let pid = alice.request("FROBNICATE", Value::Null);
    let unknown = alice.next_where(common::WAIT, "tier error", |v| v["error"]["originalPid"] == pid.as_str());
    assert_eq!(unknown["type"], "error_notification", "{unknown}");
    assert_eq!(unknown["error"]["code"], 400, "{unknown}");
    // The connection is still usable.
    assert_eq!(alice.call("GET_MY_PROFILE", Value::Null)["type"], "MY_PROFILE_DATA");
}

#[test]
fn handshake_needs_a_live_session_token() {
    let f = Fixture::sqlite();
    let addr = f.server.local_addr();
    assert_eq!(common::try_connect(addr, "not-a-session").err(), Some(401));
    assert_eq!(common::try_connect(addr, "").err(), Some(401));
    assert!(common::try_connect(addr, &f.user("carol").token).is_ok());
    // Expired: the cache refuses it even before a reload drops it.
    let db = f.db();
    let mut conn = db.conn().unwrap();
    conn.exec("UPDATE Session SET ExpiresAt = 1 WHERE UserId = ?", customws_chat::params![f.user("dave").id])
        .unwrap();
    drop(conn);
    f.server.chat().sessions.reload(&db).unwrap();
    assert_eq!(common::try_connect(addr, &f.user("dave").token).err(), Some(401));
}

#[test]
fn sessions_created_after_start_are_accepted_after_a_reload() {
    let f =
        Fixture::sqlite_with(|_, options| options.session_refresh = std::time::Duration::from_millis(100));
    let db = f.db();
    let token = customws_chat::seed::demo(&db).unwrap().remove(0).token; // fresh sessions
    assert_ne!(token, f.user("alice").token);
    common::wait_until(common::WAIT, "new session accepted", || {
        common::try_connect(f.server.local_addr(), &token).is_ok()
    });
    // And the app's own session API updates the cache at once.
    let chat = f.server.chat();
    let user = customws_chat::model::WsUserData {
        id: f.user("dave").id,
        username: "dave".into(),
        first_name: "David".into(),
        last_name: "Fernández".into(),
    };
    let created = chat.sessions.create(&chat.db, user, 60_000).unwrap();
    assert!(common::try_connect(f.server.local_addr(), &created).is_ok());
    assert!(chat.sessions.delete(&chat.db, &created).unwrap());
    assert_eq!(common::try_connect(f.server.local_addr(), &created).err(), Some(401));
}

#[test]
fn three_clients_chat_list_shows_who_is_online() {
    let f = Fixture::sqlite();
    let (bob_id, carol_id) = (f.user("bob").id, f.user("carol").id);
    let mut alice = f.connect("alice");
    let _bob = f.connect("bob");
    let mut carol = f.connect("carol");
    flows::send(&mut carol, f.user("alice").id, "hola alicia");
    let _ = alice.expect("NEW_CHAT_MESSAGE");
    let list = alice.call("GET_CHAT_LIST", Value::Null);
    let chats = list["payload"]["chats"].as_array().unwrap();
    assert_eq!(chats.len(), 2, "one chat per accepted contact: {list}");
    assert_eq!(chats[0]["otherUserId"], carol_id, "newest activity first");
    assert_eq!(chats[0]["lastMessage"], "hola alicia");
    assert_eq!(chats[0]["unreadCount"], 1);
    assert_eq!(chats[1]["otherUserId"], bob_id);
    assert_eq!(chats[1]["lastMessage"], "");
    assert!(chats.iter().all(|c| c["isOtherOnline"] == true));
    let dave_list = f.connect("dave").call("GET_CHAT_LIST", Value::Null);
    assert_eq!(dave_list["payload"]["chats"], json!([]));
}

#[test]
fn the_schema_is_created_once_and_reopened() {
    let f = Fixture::sqlite();
    let again = customws_chat::Db::open(&f.url, 1).expect("reopen migrated database");
    let rows = again.conn().unwrap().query("SELECT Version FROM SchemaVersion", Vec::new()).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].int(0), customws_chat::schema::VERSION);
}

#[test]
fn a_long_backlog_goes_out_in_acknowledged_batches() {
    // Sent at once, a long backlog would overflow the tier's per-connection queue (close 1013)
    // as soon as the client reads slower than the server writes.
    let f = Fixture::sqlite();
    let bob_id = f.user("bob").id;
    let batch = customws_chat::delivery::BACKLOG_BATCH as usize;
    let mut alice = f.connect("alice");
    let total = 2 * batch + 10;
    for i in 0..total {
        let pid = alice.request("SEND_CHAT_MESSAGE", json!({ "toUserId": bob_id, "text": format!("m{i}") }));
        assert_eq!(alice.expect_pid(&pid)["type"], "SERVER_ACK");
    }
    let mut bob = f.connect_without_acks("bob");
    let mut pids = Vec::new();
    for i in 0..batch {
        let msg = bob.expect("NEW_CHAT_MESSAGE");
        assert_eq!(msg["payload"]["text"], format!("m{i}"), "oldest first");
        pids.push(msg["pid"].as_str().unwrap().to_string());
    }
    // Nothing more until this batch is acknowledged.
    bob.assert_none_before_marker("NEW_CHAT_MESSAGE");
    assert_eq!(f.server.chat().deliveries.in_flight(), batch);
    for pid in &pids {
        bob.ack(pid);
    }
    bob.auto_ack = true;
    for i in batch..total {
        let msg = bob.expect("NEW_CHAT_MESSAGE");
        assert_eq!(msg["payload"]["text"], format!("m{i}"), "oldest first");
    }
    let db = f.db();
    common::wait_until(common::WAIT, "all delivered", || {
        let rows = db
            .conn()
            .unwrap()
            .query("SELECT COUNT(*) FROM ChatMessage WHERE StatusId = 2", Vec::new())
            .unwrap();
        rows[0].int(0) == total as i64
    });
}

#[test]
fn messages_read_up_to_a_message() {
    let f = Fixture::sqlite();
    let bob_id = f.user("bob").id;
    let mut alice = f.connect("alice");
    let mut bob = f.connect("bob");
    let ids: Vec<(i64, String)> = (0..3).map(|i| flows::send(&mut alice, bob_id, &format!("n{i}"))).collect();
    let chat = ids[0].1.clone();
    let ack = bob.call("MESSAGES_READ", json!({ "chatId": chat, "upToMessageId": ids[1].0.to_string() }));
    assert_eq!(ack["payload"]["count"], 2, "{ack}");
    let read = |alice: &mut common::Client| {
        alice.next_where(common::WAIT, "read update", |v| {
            v["type"] == "MESSAGE_STATUS_UPDATE" && v["payload"]["status"] == "read"
        })
    };
    assert_eq!(
        read(&mut alice)["payload"]["messageIds"],
        json!([ids[0].0.to_string(), ids[1].0.to_string()])
    );
    assert_eq!(f.status_of(ids[2].0).map(|s| s < store::READ), Some(true));
    let ack = bob.call("MESSAGES_READ", json!({ "chatId": chat }));
    assert_eq!(ack["payload"]["count"], 1, "{ack}");
    assert_eq!(read(&mut alice)["payload"]["messageIds"], json!([ids[2].0.to_string()]));
    // Nothing left: no update is pushed.
    assert_eq!(bob.call("MESSAGES_READ", json!({ "chatId": chat }))["payload"]["count"], 0);
    alice.assert_none_before_marker_where("read update", |v| v["payload"]["status"] == "read");
}

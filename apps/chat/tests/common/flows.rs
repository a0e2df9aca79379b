//! The chat flows, written once and run against each backend.

use serde_json::{Value, json};

use super::Fixture;
use customws_chat::store;

fn id_of(v: &Value) -> i64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a decimal id: {v}"))
}

/// Sends `text` from `from` and returns `(messageId, chatId)` from the `SERVER_ACK`.
pub fn send(client: &mut super::Client, to: i64, text: &str) -> (i64, String) {
    let ack = client.call("SEND_CHAT_MESSAGE", json!({ "toUserId": to, "text": text }));
    assert_eq!(ack["type"], "SERVER_ACK", "{ack}");
    assert_eq!(ack["payload"]["status"], "sent", "{ack}");
    (id_of(&ack["payload"]["messageId"]), ack["payload"]["chatId"].as_str().unwrap().to_string())
}

/// Sent to an online contact: pushed, `delivered` only after the client's ack.
pub fn send_to_online(f: &Fixture) {
    let (alice_id, bob_id) = (f.user("alice").id, f.user("bob").id);
    let mut alice = f.connect("alice");
    let mut bob = f.connect_without_acks("bob");
    let (id, chat) = send(&mut alice, bob_id, "hola bob");
    let msg = bob.expect("NEW_CHAT_MESSAGE");
    let p = &msg["payload"];
    assert_eq!(id_of(&p["id"]), id);
    assert_eq!(p["chatId"], chat.as_str());
    assert_eq!(p["fromUserId"], alice_id);
    assert_eq!(p["fromUsername"], "alice");
    assert_eq!(p["toUserId"], bob_id);
    assert_eq!(p["text"], "hola bob");
    assert!(p["timestamp"].as_i64().unwrap() > 0);
    // Not acknowledged yet: still only sent.
    assert_eq!(f.status_of(id), Some(store::SENT));
    bob.ack(msg["pid"].as_str().expect("server pid on an acknowledged send"));
    let update = alice.expect("MESSAGE_STATUS_UPDATE");
    assert_eq!(update["payload"]["status"], "delivered", "{update}");
    assert_eq!(update["payload"]["messageIds"], json!([id.to_string()]));
    assert_eq!(update["payload"]["chatId"], chat.as_str());
    assert_eq!(f.status_of(id), Some(store::DELIVERED));
}

/// Sent to an offline contact: stored as sent, delivered when the recipient connects.
pub fn send_to_offline_then_connect(f: &Fixture) {
    let bob_id = f.user("bob").id;
    let mut alice = f.connect("alice");
    let (id, _) = send(&mut alice, bob_id, "¿estás?");
    assert_eq!(f.status_of(id), Some(store::SENT));
    let mut bob = f.connect("bob");
    let msg = bob.expect("NEW_CHAT_MESSAGE");
    assert_eq!(id_of(&msg["payload"]["id"]), id);
    assert_eq!(msg["payload"]["text"], "¿estás?");
    let update = alice.next_where(super::WAIT, "delivered update", |v| {
        v["type"] == "MESSAGE_STATUS_UPDATE" && v["payload"]["status"] == "delivered"
    });
    assert_eq!(update["payload"]["messageIds"], json!([id.to_string()]));
    assert_eq!(f.status_of(id), Some(store::DELIVERED));
}

/// `MESSAGES_READ` marks the chat's messages read and tells the sender; the chat list's
/// unread count follows.
pub fn read_receipts(f: &Fixture) {
    let (alice_id, bob_id) = (f.user("alice").id, f.user("bob").id);
    let mut alice = f.connect("alice");
    let mut bob = f.connect("bob");
    let (m1, chat) = send(&mut alice, bob_id, "uno");
    let (m2, _) = send(&mut alice, bob_id, "dos");
    // Reading them makes bob's client acknowledge them.
    bob.expect("NEW_CHAT_MESSAGE");
    bob.expect("NEW_CHAT_MESSAGE");
    f.wait_status(m1, store::DELIVERED);
    f.wait_status(m2, store::DELIVERED);
    let list = bob.call("GET_CHAT_LIST", Value::Null);
    assert_eq!(list["type"], "CHAT_LIST");
    let entry =
        list["payload"]["chats"].as_array().unwrap().iter().find(|c| c["otherUserId"] == alice_id).cloned();
    let entry = entry.expect("chat with alice listed");
    assert_eq!(entry["chatId"], chat.as_str());
    assert_eq!(entry["unreadCount"], 2);
    assert_eq!(entry["lastMessage"], "dos");
    assert_eq!(entry["isOtherOnline"], true);
    assert_eq!(entry["otherUserName"], "alice");
    let ack = bob.call("MESSAGES_READ", json!({ "chatId": chat }));
    assert_eq!(ack["type"], "SERVER_ACK", "{ack}");
    assert_eq!(ack["payload"]["status"], "read");
    assert_eq!(ack["payload"]["count"], 2);
    let update = alice.next_where(super::WAIT, "read update", |v| {
        v["type"] == "MESSAGE_STATUS_UPDATE" && v["payload"]["status"] == "read"
    });
    assert_eq!(update["payload"]["messageIds"], json!([m1.to_string(), m2.to_string()]));
    assert_eq!(f.status_of(m1), Some(store::READ));
    assert_eq!(f.status_of(m2), Some(store::READ));
    let list = bob.call("GET_CHAT_LIST", Value::Null);
    let entry =
        list["payload"]["chats"].as_array().unwrap().iter().find(|c| c["otherUserId"] == alice_id).cloned();
    assert_eq!(entry.unwrap()["unreadCount"], 0);
    // Reading someone else's chat is refused.
    let carol_chat = format!("chat_{}_{}", f.user("alice").id, f.user("carol").id);
    let refused = bob.call("MESSAGES_READ", json!({ "chatId": carol_chat }));
    assert_eq!(refused["type"], "ERROR_NOTIFICATION");
    assert_eq!(refused["payload"]["code"], 403);
}

/// Only accepted contacts may message each other or see typing.
pub fn contacts_only(f: &Fixture) {
    let (bob_id, carol_id, dave_id) = (f.user("bob").id, f.user("carol").id, f.user("dave").id);
    let mut alice = f.connect("alice");
    let mut bob = f.connect("bob");
    let mut carol = f.connect("carol");
    let mut dave = f.connect("dave");
    for (client, to) in [(&mut alice, dave_id), (&mut bob, carol_id), (&mut dave, bob_id)] {
        let refused = client.call("SEND_CHAT_MESSAGE", json!({ "toUserId": to, "text": "hi" }));
        assert_eq!(refused["type"], "ERROR_NOTIFICATION", "{refused}");
        assert_eq!(refused["payload"]["code"], 403, "{refused}");
        let refused = client.call("TYPING_INDICATOR_ON", json!({ "toUserId": to }));
        assert_eq!(refused["payload"]["code"], 403, "{refused}");
    }
    // The tier's built-in operations, which would bypass the contacts rule, are turned off.
    let bypasses = [
        ("data_request", json!({ "secret": "hi" })),
        ("presence_subscribe", json!({ "userIds": [dave_id] })),
        ("presence_update", json!({ "status": "typing", "targetUserId": dave_id })),
        ("join", json!({ "room": "dm:1:4" })),
        ("room_presence", json!({ "room": "dm:1:4" })),
    ];
    for (kind, payload) in bypasses {
        alice.next_pid += 1;
        let pid = format!("c{}", alice.next_pid);
        alice.send(&json!({ "pid": pid, "type": kind, "targetUserId": dave_id, "payload": payload }));
        let refused = alice.next_where(super::WAIT, kind, |v| v["error"]["originalPid"] == pid.as_str());
        assert_eq!(refused["type"], "error_notification", "{kind}: {refused}");
        assert_eq!(refused["error"]["code"], 403, "{kind}: {refused}");
        assert_eq!(refused["error"]["message"], "operation disabled", "{kind}: {refused}");
    }
    dave.assert_none_before_marker("data_event");
    dave.assert_none_before_marker("NEW_CHAT_MESSAGE");
    dave.assert_none_before_marker("TYPING_INDICATOR_ON");
    carol.assert_none_before_marker("NEW_CHAT_MESSAGE");
    carol.assert_none_before_marker("TYPING_INDICATOR_ON");
    bob.assert_none_before_marker("NEW_CHAT_MESSAGE");
    let db = f.db();
    let rows = db.conn().unwrap().query("SELECT COUNT(*) FROM ChatMessage", Vec::new()).unwrap();
    assert_eq!(rows[0].int(0), 0, "a refused message was stored");
}

/// A user's first connection and last disconnection reach its online accepted contacts only,
/// and are stored (seed §9).
pub fn presence_to_contacts(f: &Fixture) {
    let bob_id = f.user("bob").id;
    let mut alice = f.connect("alice");
    let mut carol = f.connect("carol");
    let mut dave = f.connect("dave");
    let bob = f.connect("bob");
    let online = alice.next_where(super::WAIT, "bob online", |v| {
        v["type"] == "PRESENCE_EVENT" && v["payload"]["userId"] == bob_id
    });
    assert_eq!(online["payload"]["event"], "user_online");
    assert_eq!(online["payload"]["isOnline"], true);
    let stored = |f: &Fixture| {
        let db = f.db();
        let mut conn = db.conn().unwrap();
        store::stored_status(&mut conn, bob_id).unwrap()
    };
    super::wait_until(super::WAIT, "bob stored online", || stored(f).is_some_and(|(on, _)| on));
    // A second connection is not a new "online".
    let bob2 = f.connect("bob");
    bob.close();
    // carol's contact with bob is only pending; dave is no contact.
    let about_bob = |v: &Value| v["type"] == "PRESENCE_EVENT" && v["payload"]["userId"] == bob_id;
    carol.assert_none_before_marker_where("presence of bob", about_bob);
    dave.assert_none_before_marker_where("presence of bob", about_bob);
    bob2.close();
    let offline = alice.next_where(super::WAIT, "bob offline", |v| {
        v["type"] == "PRESENCE_EVENT" && v["payload"]["userId"] == bob_id
    });
    assert_eq!(offline["payload"]["event"], "user_offline", "a second connection announced online twice?");
    super::wait_until(super::WAIT, "bob stored offline", || {
        stored(f).is_some_and(|(on, seen)| !on && seen.is_some())
    });
    carol.assert_none_before_marker_where("presence of bob", about_bob);
    dave.assert_none_before_marker_where("presence of bob", about_bob);
    // dave has no accepted contact: he hears about nobody.
    dave.assert_none_before_marker("PRESENCE_EVENT");
}

/// Profiles with country names (seed §10), contact-only details, the profile-view
/// notification, and updating one's profile.
pub fn profile_with_country(f: &Fixture) {
    let bob_id = f.user("bob").id;
    let mut alice = f.connect("alice");
    let mut bob = f.connect("bob");
    let mut dave = f.connect("dave");
    let me = alice.call("GET_MY_PROFILE", Value::Null);
    assert_eq!(me["type"], "MY_PROFILE_DATA");
    let p = &me["payload"];
    assert_eq!(p["userName"], "alice");
    assert_eq!(p["firstName"], "Alicia");
    assert_eq!(p["email"], "alice@example.com");
    assert_eq!(p["isOnline"], true);
    let education = p["curriculum"]["education"].as_array().unwrap();
    assert_eq!(education[0]["country_name"], "España");
    assert!(education[0]["country_id"].as_i64().unwrap() > 0);
    assert!(education[1].get("country_name").is_none(), "no country: country_name omitted: {}", education[1]);
    let experience = p["curriculum"]["experience"].as_array().unwrap();
    assert_eq!(experience[0]["country_name"], "México");
    assert_eq!(experience[1]["country_name"], "España");
    assert_eq!(experience[1]["endDate"], Value::Null);
    let other = alice.call("GET_USER_PROFILE", json!({ "userId": bob_id }));
    assert_eq!(other["type"], "USER_PROFILE_DATA");
    assert_eq!(other["payload"]["userName"], "bob");
    assert_eq!(other["payload"]["email"], "bob@example.com");
    assert_eq!(other["payload"]["isOnline"], true);
    assert_eq!(other["payload"]["curriculum"]["education"][0]["country_name"], "México");
    assert_eq!(other["payload"]["curriculum"]["experience"][0]["country_name"], "Argentina");
    let note = bob.expect("NEW_NOTIFICATION");
    assert_eq!(note["payload"]["type"], "profile_view");
    assert_eq!(note["payload"]["payload"]["viewerId"], f.user("alice").id);
    assert_eq!(note["payload"]["isRead"], false);
    // Viewing again within the hour notifies nobody: views cannot flood notifications.
    assert_eq!(alice.call("GET_USER_PROFILE", json!({ "userId": bob_id }))["type"], "USER_PROFILE_DATA");
    bob.assert_none_before_marker("NEW_NOTIFICATION");
    let stranger = dave.call("GET_USER_PROFILE", json!({ "userId": bob_id }));
    assert_eq!(stranger["payload"]["email"], "", "contact details are for contacts");
    assert_eq!(stranger["payload"]["isOnline"], false, "presence is for contacts");
    let missing = dave.call("GET_USER_PROFILE", json!({ "userId": 999_999 }));
    assert_eq!(missing["payload"]["code"], 404);
    let updated = alice.call("UPDATE_MY_PROFILE", json!({ "headline": "CTO", "phone": "+34 611" }));
    assert_eq!(updated["type"], "MY_PROFILE_DATA", "{updated}");
    assert_eq!(updated["payload"]["headline"], "CTO");
    assert_eq!(updated["payload"]["phone"], "+34 611");
    assert_eq!(updated["payload"]["firstName"], "Alicia");
}

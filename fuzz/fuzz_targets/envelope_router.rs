//! A client's text message through the envelope decoder and the built-in router, then the
//! server envelopes the shard would build from it.
//!
//! Invariants beyond "no panic":
//! - the single-pass decoder agrees with plain serde (derive + `check_relayable`): same
//!   fields, same relayability, same error;
//! - a decoded payload is exactly one JSON value, and `targetUserId` 0 counts as absent;
//! - each route agrees with the message (P2P target and payload, broadcast only with the
//!   capability, echo only with a pid, room names valid, watch lists bounded, rejections 400
//!   or 403) and does not depend on the capability unless it is a broadcast;
//! - every server envelope built from client bytes (data_event with the payload spliced
//!   byte-for-byte, generic_response, error_notification, server_ack, presence_event,
//!   room_message) is one well-formed text frame holding valid JSON that carries the client's
//!   values unchanged;
//! - a pid the server generates parses back to its wait, whatever the client sends instead.
#![no_main]

use std::borrow::Cow;

use customws::core::ConnKey;
use customws::core::pending::{PendingTable, Wait, WaitKind};
use customws::core::rooms::validate_name;
use customws::protocol::ClientMessage;
use customws::protocol::envelope::{
    Envelope, MAX_DEPTH, check_relayable, data_event, error_notification, presence_event, room_message,
    server_ack,
};
use customws::protocol::router::{MAX_WATCH_LIST, Route, SenderCaps, route};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

const SENDER: i64 = 42;

/// A server → client envelope as a client reads it; raw values keep their exact bytes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Out<'a> {
    pid: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "fromUserId")]
    from_user_id: Option<i64>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    error: Option<OutError>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutError {
    #[serde(rename = "originalPid")]
    original_pid: Option<String>,
    code: u16,
    message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresencePayload<'a> {
    #[serde(rename = "userId")]
    user_id: i64,
    status: String,
    #[serde(borrow)]
    context: &'a RawValue,
    timestamp: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomPayload<'a> {
    from: Option<i64>,
    room: String,
    ts: u64,
    #[serde(borrow)]
    body: &'a RawValue,
    #[serde(borrow)]
    meta: &'a RawValue,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AckPayload {
    #[serde(rename = "acknowledgedPid")]
    acknowledged_pid: String,
    status: String,
}

/// The envelope as plain serde decodes it: what `ClientMessage::parse`'s single pass must
/// agree with.
#[derive(Debug, Deserialize)]
#[serde(expecting = "struct ClientMessage")] // as the derive on ClientMessage said, in its errors
struct Reference<'a> {
    #[serde(borrow, default)]
    pid: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "targetUserId", default)]
    target_user_id: Option<i64>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

fn check_against_serde(data: &[u8], parsed: &Result<ClientMessage<'_>, serde_json::Error>) {
    match (parsed, serde_json::from_slice::<Reference>(data)) {
        (Ok(msg), Ok(r)) => {
            assert_eq!(msg.pid.as_deref(), r.pid.as_deref());
            assert_eq!(&*msg.kind, &*r.kind);
            assert_eq!(msg.target_user_id, r.target_user_id);
            assert_eq!(msg.payload.map(RawValue::get), r.payload.map(RawValue::get));
            let relayable = r.payload.map_or(Ok(()), |p| check_relayable(p.get().as_bytes(), MAX_DEPTH - 1));
            assert_eq!(msg.relayable(), relayable, "relayability differs from check_relayable");
        }
        (Err(e), Err(r)) => assert_eq!(e.to_string(), r.to_string()),
        (mine, theirs) => panic!("single pass {mine:?}, serde {theirs:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let parsed = ClientMessage::parse(data);
    check_against_serde(data, &parsed);
    let msg = match parsed {
        Ok(msg) => msg,
        Err(e) => {
            // The shard answers 400 with the decoder's message; that envelope must be valid too.
            let frame = error_notification(None, 400, &format!("malformed message: {e}"));
            let text = frame_text(&frame);
            let out = envelope(text);
            assert_eq!(out.error.map(|e| e.code), Some(400));
            return;
        }
    };
    check_message(&msg);
    let denied = route(&msg, SenderCaps { can_broadcast: false, ..Default::default() });
    let allowed = route(&msg, SenderCaps { can_broadcast: true, ..Default::default() });
    match (&denied, &allowed) {
        (Route::Reject { code: 403, .. }, Route::Broadcast { .. }) => {}
        _ => assert_eq!(
            format!("{denied:?}"),
            format!("{allowed:?}"),
            "the broadcast capability changed a non-broadcast decision"
        ),
    }
    check_route(&msg, &denied, false);
    check_route(&msg, &allowed, true);
    check_pids(&msg);
});

fn check_message(msg: &ClientMessage<'_>) {
    assert_ne!(msg.target(), Some(0));
    if let Some(payload) = msg.payload_bytes() {
        serde_json::from_slice::<IgnoredAny>(payload).expect("a decoded payload is one JSON value");
        assert_ne!(payload, b"null");
    }
    // The shard echoes unknown types and pids back inside its envelopes.
    let pid = msg.pid.as_deref();
    let frame = error_notification(pid, 400, &format!("unknown message type {:?}", msg.kind));
    let out = envelope(frame_text(&frame));
    let error = out.error.expect("error_notification has an error");
    assert_eq!(error.original_pid.as_deref(), pid);
    assert_eq!(error.code, 400);
}

fn check_route(msg: &ClientMessage<'_>, decision: &Route<'_>, can_broadcast: bool) {
    let pid = msg.pid.as_deref();
    let kind = &*msg.kind;
    match decision {
        Route::P2p { target, payload } => {
            assert_eq!(kind, "data_request");
            assert_eq!(Some(*target), msg.target());
            assert_eq!(*payload, msg.payload_bytes());
            check_data_event(*payload);
        }
        Route::Broadcast { payload } => {
            assert!(can_broadcast && kind == "data_request" && msg.target().is_none());
            check_data_event(*payload);
        }
        Route::GenericEcho { payload } => {
            assert_eq!(kind, "generic_request");
            let pid = pid.expect("an echoed generic_request has a pid");
            let frame = Envelope::new("generic_response").pid(Some(pid)).raw_payload(*payload).frame();
            let out = envelope(frame_text(&frame));
            assert_eq!(out.pid.as_deref(), Some(pid));
            assert_eq!(out.kind, "generic_response");
            assert_spliced(out.payload, *payload);
        }
        Route::Presence(update) => {
            assert!(kind == "presence_update" || kind == "PRESENCE_UPDATE");
            let context = update.context.map(|raw| raw.get().as_bytes());
            let frame = presence_event(SENDER, &update.status, context, "2026-01-01T00:00:00.000Z", None);
            let out = envelope(frame_text(&frame));
            assert_eq!(out.from_user_id, Some(SENDER));
            let payload: PresencePayload =
                serde_json::from_str(out.payload.expect("presence payload").get()).expect("presence payload");
            assert_eq!((payload.user_id, &*payload.status), (SENDER, &*update.status));
            assert_eq!(payload.context.get().as_bytes(), context.unwrap_or(b"null"));
            assert_eq!(payload.timestamp, "2026-01-01T00:00:00.000Z");
        }
        Route::Subscribe(users) | Route::Unsubscribe(users) => {
            assert!(kind == "presence_subscribe" || kind == "presence_unsubscribe");
            assert!(users.len() <= MAX_WATCH_LIST, "{} userIds passed the router", users.len());
        }
        Route::Ack(ack) => {
            assert_eq!(kind, "client_ack");
            if let Some(error) = ack.error {
                serde_json::from_str::<IgnoredAny>(error.get()).expect("ack error JSON");
            }
        }
        Route::Join(room) | Route::Leave(room) | Route::RoomPresence(room) => {
            assert!(matches!(kind, "join" | "leave" | "room_presence"));
            assert_eq!(validate_name(room), Ok(()), "invalid room name {room:?} passed the router");
            if let Some(pid) = pid {
                let frame = server_ack(pid, "joined");
                let out = envelope(frame_text(&frame));
                let ack: AckPayload =
                    serde_json::from_str(out.payload.expect("ack payload").get()).expect("ack payload");
                assert_eq!((&*ack.acknowledged_pid, &*ack.status), (pid, "joined"));
            }
        }
        Route::RoomPublish(publish) => {
            assert_eq!(kind, "broadcast");
            let body = publish.body.get().as_bytes();
            let meta = publish.meta.map(|m| m.get().as_bytes());
            let frame = room_message(Some(SENDER), &publish.room, 1_700_000_000_000, body, meta);
            let out = envelope(frame_text(&frame));
            let payload: RoomPayload =
                serde_json::from_str(out.payload.expect("room payload").get()).expect("room payload");
            assert_eq!(
                (payload.from, &*payload.room, payload.ts),
                (Some(SENDER), &*publish.room, 1_700_000_000_000)
            );
            assert_eq!(payload.body.get().as_bytes(), body, "room body not spliced byte-for-byte");
            assert_eq!(payload.meta.get().as_bytes(), meta.unwrap_or(b"null"));
        }
        Route::AuthRefresh(_) => assert_eq!(kind, "auth_refresh"),
        Route::Heartbeat => assert_eq!(kind, "HEARTBEAT"),
        Route::Disconnect => assert_eq!(kind, "DISCONNECT"),
        Route::Unhandled => assert!(!BUILT_IN.contains(&kind), "built-in type {kind} went unhandled"),
        Route::Reject { code, message } => {
            assert!(matches!(code, 400 | 403), "rejected with {code}: {message}");
            // Any type's payload too deep or with an out-of-range number is refused (400).
            let unrelayable =
                msg.payload.is_some_and(|p| check_relayable(p.get().as_bytes(), MAX_DEPTH - 1).is_err());
            assert!(
                BUILT_IN.contains(&kind) || (unrelayable && *code == 400),
                "unknown type {kind} rejected instead of unhandled"
            );
            let frame = error_notification(pid, *code, message);
            let out = envelope(frame_text(&frame));
            let error = out.error.expect("error_notification has an error");
            assert_eq!((error.code, &*error.message), (*code, &**message));
        }
    }
}

const BUILT_IN: [&str; 14] = [
    "data_request",
    "generic_request",
    "presence_update",
    "PRESENCE_UPDATE",
    "presence_subscribe",
    "presence_unsubscribe",
    "client_ack",
    "join",
    "leave",
    "room_presence",
    "broadcast",
    "auth_refresh",
    "HEARTBEAT",
    "DISCONNECT",
];

fn check_data_event(payload: Option<&[u8]>) {
    let frame = data_event(SENDER, payload);
    let out = envelope(frame_text(&frame));
    assert_eq!((&*out.kind, out.from_user_id), ("data_event", Some(SENDER)));
    assert_spliced(out.payload, payload);
}

/// The server's `payload` must be the client's bytes, exactly.
fn assert_spliced(got: Option<&RawValue>, sent: Option<&[u8]>) {
    assert_eq!(got.map(|raw| raw.get().as_bytes()), sent, "payload not spliced byte-for-byte");
}

/// Pids the client echoes (any string) never resolve someone else's wait, and ours parse back.
/// (Spellings such as `s03.+0.01` parse to the same key as `s3.0.1`: harmless, the key and the
/// connection still have to match.)
fn check_pids(msg: &ClientMessage<'_>) {
    let mut table = PendingTable::new(3);
    let conn = ConnKey { index: 1, generation: 1 };
    let key = table.insert(Wait { conn, kind: WaitKind::Ack, deadline: 10, completion: () });
    assert_eq!(table.parse_pid(&table.pid(key)), Some(key));
    for candidate in [msg.pid.as_deref(), Some(&*msg.kind)].into_iter().flatten() {
        if let Some(parsed) = table.parse_pid(candidate) {
            let resolved = table.resolve(parsed, conn, WaitKind::Ack).is_some();
            assert_eq!(resolved, parsed == key, "{candidate:?} resolved the wrong wait");
            if resolved {
                return;
            }
        }
    }
}

/// The payload of one complete, final, unmasked server text frame.
fn frame_text(frame: &[u8]) -> &[u8] {
    assert_eq!(frame[0], 0x81, "not a final text frame");
    assert_eq!(frame[1] & 0x80, 0, "server frames are not masked");
    let (start, len) = match frame[1] & 0x7f {
        126 => (4, usize::from(u16::from_be_bytes([frame[2], frame[3]]))),
        127 => (10, u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize),
        n => (2, usize::from(n)),
    };
    assert_eq!(frame.len(), start + len, "frame length disagrees with its header");
    &frame[start..]
}

fn envelope(text: &[u8]) -> Out<'_> {
    // Within serde_json's default recursion limit and f64 range: what receivers parse.
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(text)
        && (e.to_string().contains("recursion limit") || e.to_string().contains("out of range"))
    {
        panic!("server envelope too deep or out of range ({e}): {:?}", String::from_utf8_lossy(text));
    }
    serde_json::from_slice(text).unwrap_or_else(|e| {
        panic!("server envelope is not well-formed ({e}): {:?}", String::from_utf8_lossy(text))
    })
}

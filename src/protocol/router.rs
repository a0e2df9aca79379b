//! The built-in router: what a client message asks for, decided without any I/O.
//!
//! The shard executes the returned [`Route`]; keeping the decision here makes every rule of
//! SPEC's message table testable without a socket.

use std::borrow::Cow;

use super::envelope::{
    AuthRefresh, ClientAck, ClientMessage, PresenceUpdate, PresenceWatch, RoomPublish, RoomRef,
};
use crate::core::rooms::validate_name;

/// Largest `userIds` list accepted by one `presence_subscribe`.
pub const MAX_WATCH_LIST: usize = 1024;

/// What the sender is allowed to do, from its token and the server configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct SenderCaps {
    /// Role `broadcast`, or `allow_client_broadcast` is on.
    pub can_broadcast: bool,
    /// Built-in operations turned off by `disabled_ops`: refused 403 `operation disabled`.
    pub disabled: OpSet,
}

/// A built-in client operation an application may turn off (`disabled_ops`) or, later, decide
/// on (`authorize_ops`). The names are the configuration's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinOp {
    /// `data_request` to a user (P2P).
    DataRequest,
    /// `data_request` without a target (broadcast to everyone).
    Broadcast,
    /// `presence_subscribe`.
    PresenceSubscribe,
    /// `presence_update` (targeted or not), and seed 004's `PRESENCE_UPDATE`.
    PresenceUpdate,
    /// `join` of a room.
    Join,
    /// `broadcast` `{room, body}` to a room.
    RoomBroadcast,
    /// `room_presence`.
    RoomPresence,
}

impl BuiltinOp {
    /// Every operation, in the order of their configuration names.
    pub const ALL: [BuiltinOp; 7] = [
        BuiltinOp::DataRequest,
        BuiltinOp::Broadcast,
        BuiltinOp::PresenceSubscribe,
        BuiltinOp::PresenceUpdate,
        BuiltinOp::Join,
        BuiltinOp::RoomBroadcast,
        BuiltinOp::RoomPresence,
    ];

    /// The configuration name (`disabled_ops`, `authorize_ops`).
    pub fn name(self) -> &'static str {
        match self {
            BuiltinOp::DataRequest => "data_request",
            BuiltinOp::Broadcast => "broadcast",
            BuiltinOp::PresenceSubscribe => "presence_subscribe",
            BuiltinOp::PresenceUpdate => "presence_update",
            BuiltinOp::Join => "join",
            BuiltinOp::RoomBroadcast => "room_broadcast",
            BuiltinOp::RoomPresence => "room_presence",
        }
    }

    /// The operation a client message asks for, if it is one of these.
    pub fn of(msg: &ClientMessage<'_>) -> Option<BuiltinOp> {
        Some(match &*msg.kind {
            "data_request" if msg.target().is_some() => BuiltinOp::DataRequest,
            "data_request" => BuiltinOp::Broadcast,
            "presence_subscribe" => BuiltinOp::PresenceSubscribe,
            "presence_update" | "PRESENCE_UPDATE" => BuiltinOp::PresenceUpdate,
            "join" => BuiltinOp::Join,
            "broadcast" => BuiltinOp::RoomBroadcast,
            "room_presence" => BuiltinOp::RoomPresence,
            _ => return None,
        })
    }
}

/// A set of [`BuiltinOp`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpSet(u8);

impl OpSet {
    /// Whether `op` is in the set.
    pub fn contains(self, op: BuiltinOp) -> bool {
        self.0 & (1 << op as u8) != 0
    }

    /// The set named by configuration names; the first unknown name is the error.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<OpSet, String> {
        let mut set = OpSet::default();
        for name in names {
            let name = name.as_ref().trim();
            let op =
                BuiltinOp::ALL.into_iter().find(|op| op.name() == name).ok_or_else(|| name.to_string())?;
            set.0 |= 1 << op as u8;
        }
        Ok(set)
    }
}

/// The action a client message requests.
#[derive(Debug)]
pub enum Route<'a> {
    /// `data_request` with a target: forward to every connection of `target`.
    P2p {
        /// Receiving user.
        target: i64,
        /// The sender's payload bytes.
        payload: Option<&'a [u8]>,
    },
    /// `data_request` without a target: every connection except the sender's.
    Broadcast {
        /// The sender's payload bytes.
        payload: Option<&'a [u8]>,
    },
    /// `generic_request` with no application configured: echo as `generic_response` with the
    /// request's pid (always present for this route).
    GenericEcho {
        /// The payload to echo.
        payload: Option<&'a [u8]>,
    },
    /// `presence_update` / seed 004 `PRESENCE_UPDATE`.
    Presence(PresenceUpdate<'a>),
    /// `presence_subscribe`.
    Subscribe(Vec<i64>),
    /// `presence_unsubscribe`.
    Unsubscribe(Vec<i64>),
    /// `client_ack` resolving a server-initiated wait.
    Ack(ClientAck<'a>),
    /// `join` `{room}` (seed 003).
    Join(Cow<'a, str>),
    /// `leave` `{room}` (seed 003).
    Leave(Cow<'a, str>),
    /// `broadcast` `{room, body, meta?}` to the room's members (seed 003).
    RoomPublish(RoomPublish<'a>),
    /// `room_presence` `{room}`: the current presence of each member.
    RoomPresence(Cow<'a, str>),
    /// `auth_refresh` `{token}`: extend the session with a new token of the same user.
    AuthRefresh(Cow<'a, str>),
    /// Seed 004 `HEARTBEAT`: answer `HEARTBEAT_ACK`.
    Heartbeat,
    /// Seed 004 `DISCONNECT`: close 1000.
    Disconnect,
    /// Not a built-in type: the application's, or `error_notification` 400 without one.
    Unhandled,
    /// Refused: answer `error_notification` with this code and message.
    Reject {
        /// HTTP-like status code.
        code: u16,
        /// Human-readable reason.
        message: Cow<'static, str>,
    },
}

/// Decides what `msg` asks for.
pub fn route<'a>(msg: &ClientMessage<'a>, caps: SenderCaps) -> Route<'a> {
    // The payload (and the context, body or meta inside it) may be relayed byte for byte:
    // refused when a receiver's parser would choke on it.
    // Decided by `ClientMessage::parse`, in its pass over the payload.
    if let Err(e) = msg.relayable() {
        return reject_owned(400, format!("payload not accepted: {e}"));
    }
    if BuiltinOp::of(msg).is_some_and(|op| caps.disabled.contains(op)) {
        return reject(403, "operation disabled");
    }
    match &*msg.kind {
        "data_request" => data_request(msg, caps),
        "generic_request" => match msg.pid {
            Some(_) => Route::GenericEcho { payload: msg.payload_bytes() },
            None => reject(400, "generic_request needs a pid"),
        },
        "presence_update" | "PRESENCE_UPDATE" => match msg.payload_as::<PresenceUpdate>() {
            // Seed 001's PresenceManager puts targetUserId on the envelope; the payload's wins.
            Ok(update) => Route::Presence(PresenceUpdate {
                target_user_id: update.target_user_id.or(msg.target()),
                ..update
            }),
            Err(e) => reject_owned(400, format!("invalid presence_update payload: {e}")),
        },
        "presence_subscribe" => watch_list(msg).map_or_else(|r| r, Route::Subscribe),
        "presence_unsubscribe" => watch_list(msg).map_or_else(|r| r, Route::Unsubscribe),
        "client_ack" => match msg.payload_as::<ClientAck>() {
            Ok(ack) => Route::Ack(ack),
            Err(e) => reject_owned(400, format!("invalid client_ack payload: {e}")),
        },
        "join" => room_ref(msg).map_or_else(|r| r, Route::Join),
        "leave" => room_ref(msg).map_or_else(|r| r, Route::Leave),
        "room_presence" => room_ref(msg).map_or_else(|r| r, Route::RoomPresence),
        "broadcast" => match msg.payload_as::<RoomPublish>() {
            Ok(publish) => Route::RoomPublish(publish),
            Err(e) => reject_owned(400, format!("invalid broadcast payload (want room, body, meta?): {e}")),
        },
        "auth_refresh" => match msg.payload_as::<AuthRefresh>() {
            Ok(refresh) => Route::AuthRefresh(refresh.token),
            Err(e) => reject_owned(400, format!("invalid auth_refresh payload (want token): {e}")),
        },
        "HEARTBEAT" => Route::Heartbeat,
        "DISCONNECT" => Route::Disconnect,
        _ => Route::Unhandled,
    }
}

fn data_request<'a>(msg: &ClientMessage<'a>, caps: SenderCaps) -> Route<'a> {
    let payload = msg.payload_bytes();
    match msg.target() {
        Some(target) => Route::P2p { target, payload },
        None if caps.can_broadcast => Route::Broadcast { payload },
        None => reject(403, "broadcast requires the broadcast role"),
    }
}

fn watch_list<'a>(msg: &ClientMessage<'a>) -> Result<Vec<i64>, Route<'a>> {
    let watch: PresenceWatch =
        msg.payload_as().map_err(|e| reject_owned(400, format!("invalid userIds payload: {e}")))?;
    if watch.user_ids.len() > MAX_WATCH_LIST {
        return Err(reject_owned(400, format!("at most {MAX_WATCH_LIST} userIds per message")));
    }
    Ok(watch.user_ids)
}

fn room_ref<'a>(msg: &ClientMessage<'a>) -> Result<Cow<'a, str>, Route<'a>> {
    let room: RoomRef =
        msg.payload_as().map_err(|e| reject_owned(400, format!("invalid room payload: {e}")))?;
    validate_name(&room.room).map_err(|e| reject_owned(400, e.to_string()))?;
    Ok(room.room)
}

fn reject(code: u16, message: &'static str) -> Route<'static> {
    Route::Reject { code, message: Cow::Borrowed(message) }
}

fn reject_owned(code: u16, message: String) -> Route<'static> {
    Route::Reject { code, message: Cow::Owned(message) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::envelope::MAX_DEPTH;

    fn decide(raw: &str, can_broadcast: bool) -> String {
        let msg = ClientMessage::parse(raw.as_bytes()).unwrap();
        format!("{:?}", route(&msg, SenderCaps { can_broadcast, ..Default::default() }))
    }

    #[test]
    fn data_request_with_target_is_p2p() {
        let r = decide(r#"{"type":"data_request","targetUserId":9,"payload":{"x":1}}"#, false);
        assert!(r.starts_with("P2p { target: 9"), "{r}");
    }

    #[test]
    fn disabled_operations_are_refused_403_and_others_still_work() {
        let names = ["data_request", "room_presence"];
        let disabled = OpSet::from_names(&names).unwrap();
        let caps = SenderCaps { can_broadcast: true, disabled };
        let route_of =
            |raw: &str| format!("{:?}", route(&ClientMessage::parse(raw.as_bytes()).unwrap(), caps));
        let p2p = route_of(r#"{"type":"data_request","targetUserId":9,"payload":{}}"#);
        assert!(p2p.starts_with("Reject { code: 403") && p2p.contains("operation disabled"), "{p2p}");
        assert!(
            route_of(r#"{"type":"room_presence","payload":{"room":"r"}}"#).contains("operation disabled")
        );
        assert!(route_of(r#"{"type":"data_request","payload":{}}"#).starts_with("Broadcast"));
        assert!(route_of(r#"{"type":"join","payload":{"room":"r"}}"#).starts_with("Join"));
        assert_eq!(OpSet::from_names(&["join", "nope"]), Err("nope".to_string()));
        let all: Vec<&str> = BuiltinOp::ALL.iter().map(|op| op.name()).collect();
        let every = OpSet::from_names(&all).unwrap();
        assert!(BuiltinOp::ALL.iter().all(|op| every.contains(*op)));
    }

    #[test]
    fn broadcast_needs_the_role() {
        let raw = r#"{"type":"data_request","payload":{"x":1}}"#;
        assert!(decide(raw, true).starts_with("Broadcast"));
        assert!(decide(raw, false).starts_with("Reject { code: 403"));
    }

    #[test]
    fn generic_request_echoes_and_needs_a_pid() {
        assert!(
            decide(r#"{"type":"generic_request","pid":"p","payload":1}"#, false).starts_with("GenericEcho")
        );
        assert!(decide(r#"{"type":"generic_request","payload":1}"#, false).starts_with("Reject { code: 400"));
    }

    #[test]
    fn presence_messages() {
        assert!(
            decide(r#"{"type":"presence_update","payload":{"status":"busy"}}"#, false)
                .starts_with("Presence")
        );
        assert!(
            decide(r#"{"type":"presence_update","payload":{}}"#, false).starts_with("Reject { code: 400")
        );
        assert_eq!(
            decide(r#"{"type":"presence_subscribe","payload":{"userIds":[1,2]}}"#, false),
            "Subscribe([1, 2])"
        );
        assert_eq!(
            decide(r#"{"type":"presence_unsubscribe","payload":{"userIds":[3]}}"#, false),
            "Unsubscribe([3])"
        );
        let many: Vec<String> = (0..=MAX_WATCH_LIST).map(|i| i.to_string()).collect();
        let raw = format!(r#"{{"type":"presence_subscribe","payload":{{"userIds":[{}]}}}}"#, many.join(","));
        assert!(decide(&raw, false).starts_with("Reject { code: 400"));
    }

    #[test]
    fn unknown_type_goes_to_the_application() {
        assert_eq!(decide(r#"{"type":"nope"}"#, true), "Unhandled");
    }

    #[test]
    fn room_messages() {
        assert_eq!(decide(r#"{"type":"join","payload":{"room":"room-1"}}"#, false), "Join(\"room-1\")");
        assert_eq!(decide(r#"{"type":"leave","payload":{"room":"room-1"}}"#, false), "Leave(\"room-1\")");
        assert!(
            decide(r#"{"type":"join","payload":{"room":"a b"}}"#, false).starts_with("Reject { code: 400")
        );
        assert!(decide(r#"{"type":"join","payload":{}}"#, false).starts_with("Reject { code: 400"));
        assert!(
            decide(r#"{"type":"broadcast","payload":{"room":"r","body":"hi"}}"#, false)
                .starts_with("RoomPublish")
        );
        assert!(
            decide(r#"{"type":"broadcast","payload":{"room":"r"}}"#, false).starts_with("Reject { code: 400")
        );
    }

    #[test]
    fn unrelayable_payloads_are_refused_whatever_the_type() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        let deepest_ok = format!("{}{}", "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
        for kind in ["data_request", "generic_request", "presence_update", "broadcast", "custom"] {
            for bad in [&deep, "{\"n\":1e999999}"] {
                let raw = format!(r#"{{"pid":"p","type":"{kind}","targetUserId":2,"payload":{bad}}}"#);
                assert!(decide(&raw, true).starts_with("Reject { code: 400"), "{kind} {bad}");
            }
        }
        let raw = format!(r#"{{"type":"data_request","targetUserId":2,"payload":{deepest_ok}}}"#);
        assert!(decide(&raw, false).starts_with("P2p"));
        let nested_context = format!(r#"{{"status":"x","context":{deep}}}"#);
        let raw = format!(r#"{{"type":"presence_update","payload":{nested_context}}}"#);
        assert!(decide(&raw, false).starts_with("Reject { code: 400"));
    }

    #[test]
    fn seed_004_types() {
        assert_eq!(decide(r#"{"type":"HEARTBEAT","timestamp":"x"}"#, false), "Heartbeat");
        assert_eq!(decide(r#"{"type":"DISCONNECT"}"#, false), "Disconnect");
    }
}

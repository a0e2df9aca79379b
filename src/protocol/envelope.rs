//! The customws JSON envelopes.
//!
//! Decoding borrows from the (unmasked, in-place) frame payload: `payload` stays a raw slice
//! of the client's bytes so that P2P forwarding splices it into the outgoing envelope without
//! building a JSON tree. Encoding writes the envelope straight into a frame buffer, once per
//! message, whatever the number of recipients.

use std::borrow::Cow;
use std::io::Write;

use bytes::{BufMut, Bytes};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::ws::{FrameEncoder, OutKind};

/// A client → server message: `{"pid"?, "type", "targetUserId"?, "payload"?}`.
/// Unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub struct ClientMessage<'a> {
    /// Client-chosen correlation id.
    #[serde(borrow, default)]
    pub pid: Option<Cow<'a, str>>,
    /// Message type, routes the message.
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// Target user for P2P; 0 counts as absent, as in the seed's Go `omitempty`.
    #[serde(rename = "targetUserId", default)]
    pub target_user_id: Option<i64>,
    /// The payload, exactly as the client wrote it.
    #[serde(borrow, default)]
    pub payload: Option<&'a RawValue>,
}

impl<'a> ClientMessage<'a> {
    /// Decodes one text message.
    pub fn parse(text: &'a [u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(text)
    }

    /// The pid as an owned string, to move into a job that answers later (`msg.pid` borrows
    /// the message text, which lives only as long as the callback).
    ///
    /// ```
    /// use customws::protocol::ClientMessage;
    ///
    /// let text = br#"{"pid":"q1","type":"lookup"}"#.to_vec();
    /// let pid = ClientMessage::parse(&text).unwrap().pid_owned();
    /// drop(text);
    /// std::thread::spawn(move || assert_eq!(pid.as_deref(), Some("q1"))).join().unwrap();
    /// ```
    pub fn pid_owned(&self) -> Option<String> {
        self.pid.as_deref().map(str::to_owned)
    }

    /// The P2P target, if any.
    pub fn target(&self) -> Option<i64> {
        self.target_user_id.filter(|&id| id != 0)
    }

    /// The payload's raw JSON bytes, if present and not `null`.
    pub fn payload_bytes(&self) -> Option<&'a [u8]> {
        self.payload.map(|raw| raw.get().as_bytes()).filter(|raw| *raw != b"null")
    }

    /// Decodes the payload into `T`; a missing payload decodes from `{}`.
    pub fn payload_as<T: Deserialize<'a>>(&self) -> Result<T, serde_json::Error> {
        match self.payload {
            Some(raw) => serde_json::from_str(raw.get()),
            None => serde_json::from_str("{}"),
        }
    }
}

/// Deepest nesting of arrays and objects in a client message, its own object included: what
/// serde_json parses with its default recursion limit. A relayed `payload` (and the `context`,
/// `body` and `meta` inside it) sits exactly as deep in the server's envelope as in the
/// client's, so every envelope built from an accepted message parses with that limit too.
pub const MAX_DEPTH: usize = 127;

/// Why a JSON value is not relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrelayable {
    /// Arrays and objects nested deeper than allowed.
    TooDeep,
    /// A number whose magnitude overflows an f64 (e.g. `1e999999`).
    OutOfRange,
}

impl std::fmt::Display for Unrelayable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unrelayable::TooDeep => write!(f, "nested deeper than {MAX_DEPTH} levels"),
            Unrelayable::OutOfRange => f.write_str("a number out of range"),
        }
    }
}

/// Checks well-formed JSON (as serde_json captured it into a `RawValue`) for arrays and
/// objects nested more than `max_depth` deep and for numbers that overflow an f64, which
/// receivers' parsers reject or crash on. One pass over the bytes, no allocation; the bytes
/// themselves are relayed unchanged.
pub fn check_relayable(raw: &[u8], max_depth: usize) -> Result<(), Unrelayable> {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&byte) = raw.get(i) {
        match byte {
            b'"' => {
                i = string_end(raw, i + 1);
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(Unrelayable::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                let mut exponent = false;
                while let Some(&b) = raw.get(i) {
                    match b {
                        b'0'..=b'9' | b'-' | b'+' | b'.' => {}
                        b'e' | b'E' => exponent = true,
                        _ => break,
                    }
                    i += 1;
                }
                // Without an exponent, fewer than 309 digits cannot reach f64::MAX (1.8e308).
                if (exponent || i - start > 308) && number_overflows(&raw[start..i]) {
                    return Err(Unrelayable::OutOfRange);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Index just past the closing quote of the string whose contents start at `i`.
fn string_end(raw: &[u8], mut i: usize) -> usize {
    // Keys and short values end within a few bytes; a long string is skipped by memchr (SIMD)
    // to the next quote or backslash.
    for _ in 0..16 {
        match raw.get(i) {
            Some(b'"') => return i + 1,
            Some(b'\\') => i += 2,
            Some(_) => i += 1,
            None => return raw.len(),
        }
    }
    while let Some(at) = raw.get(i..).and_then(|rest| memchr::memchr2(b'"', b'\\', rest)) {
        i += at;
        if raw[i] == b'"' {
            return i + 1;
        }
        i += 2; // the backslash and the character it escapes
    }
    raw.len()
}

fn number_overflows(number: &[u8]) -> bool {
    std::str::from_utf8(number).ok().and_then(|n| n.parse::<f64>().ok()).is_some_and(f64::is_infinite)
}

/// `presence_update` payload: `{status, context?, targetUserId?}` (also accepts seed 004's
/// `metadata` in place of `context`).
#[derive(Debug, Deserialize)]
pub struct PresenceUpdate<'a> {
    /// New status, e.g. `online`, `away`, `typing`.
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    /// Free-form context stored with the status.
    #[serde(borrow, default, alias = "metadata")]
    pub context: Option<&'a RawValue>,
    /// Send the event only to this user.
    #[serde(rename = "targetUserId", default)]
    pub target_user_id: Option<i64>,
}

/// `presence_subscribe` / `presence_unsubscribe` payload.
#[derive(Debug, Deserialize)]
pub struct PresenceWatch {
    /// Users to watch / stop watching.
    #[serde(rename = "userIds")]
    pub user_ids: Vec<i64>,
}

/// `join` / `leave` / `room_presence` payload (seed 003).
#[derive(Debug, Deserialize)]
pub struct RoomRef<'a> {
    /// Room name.
    #[serde(borrow)]
    pub room: Cow<'a, str>,
}

/// `broadcast` payload (seed 003): `{room, body, meta?}`.
#[derive(Debug, Deserialize)]
pub struct RoomPublish<'a> {
    /// Room name.
    #[serde(borrow)]
    pub room: Cow<'a, str>,
    /// The message body, any JSON.
    #[serde(borrow)]
    pub body: &'a RawValue,
    /// Optional metadata, any JSON.
    #[serde(borrow, default)]
    pub meta: Option<&'a RawValue>,
}

/// `auth_refresh` payload.
#[derive(Debug, Deserialize)]
pub struct AuthRefresh<'a> {
    /// The new JWT.
    #[serde(borrow)]
    pub token: Cow<'a, str>,
}

/// `client_ack` payload.
#[derive(Debug, Deserialize)]
pub struct ClientAck<'a> {
    /// The server pid being acknowledged.
    #[serde(rename = "acknowledgedPid", borrow)]
    pub acknowledged_pid: Cow<'a, str>,
    /// Optional status (`received`, `processed`, …).
    #[serde(borrow, default)]
    pub status: Option<Cow<'a, str>>,
    /// Optional client-side error.
    #[serde(borrow, default)]
    pub error: Option<&'a RawValue>,
}

/// Builder of one server → client envelope, written directly into a frame.
pub struct Envelope<'a> {
    pid: Option<&'a str>,
    kind: &'a str,
    from_user_id: Option<i64>,
    payload: Option<&'a [u8]>,
    error: Option<(Option<&'a str>, u16, &'a str)>,
}

impl<'a> Envelope<'a> {
    /// An envelope of the given type.
    pub fn new(kind: &'a str) -> Self {
        Envelope { pid: None, kind, from_user_id: None, payload: None, error: None }
    }

    /// Sets `pid`.
    pub fn pid(mut self, pid: Option<&'a str>) -> Self {
        self.pid = pid;
        self
    }

    /// Sets `fromUserId`.
    pub fn from_user(mut self, user: i64) -> Self {
        self.from_user_id = Some(user);
        self
    }

    /// Sets `payload` to already-encoded JSON, copied verbatim.
    pub fn raw_payload(mut self, payload: Option<&'a [u8]>) -> Self {
        self.payload = payload;
        self
    }

    /// Sets `error` `{originalPid?, code, message}`.
    pub fn error(mut self, original_pid: Option<&'a str>, code: u16, message: &'a str) -> Self {
        self.error = Some((original_pid, code, message));
        self
    }

    /// Encodes the envelope as one complete text frame.
    pub fn frame(self) -> Bytes {
        // Fixed keys and punctuation, a 20-digit fromUserId, the pid and the payload: the
        // buffer is allocated once and never grows.
        let error_len =
            self.error.map_or(0, |(pid, _, message)| 48 + pid.map_or(0, str::len) + message.len());
        let hint = 64
            + self.kind.len()
            + self.pid.map_or(0, str::len)
            + self.payload.map_or(0, <[u8]>::len)
            + error_len;
        let mut w = FrameEncoder::start(hint).writer();
        self.write(&mut w);
        FrameEncoder::finish(w.into_inner(), OutKind::Text)
    }

    fn write(&self, w: &mut impl Write) {
        // Writes into memory cannot fail.
        let _ = w.write_all(b"{");
        if let Some(pid) = self.pid {
            let _ = w.write_all(b"\"pid\":");
            write_str(w, pid);
            let _ = w.write_all(b",");
        }
        let _ = w.write_all(b"\"type\":");
        write_str(w, self.kind);
        if let Some(from) = self.from_user_id {
            let _ = write!(w, ",\"fromUserId\":{from}");
        }
        if let Some(payload) = self.payload {
            let _ = w.write_all(b",\"payload\":");
            let _ = w.write_all(payload);
        }
        if let Some((original, code, message)) = self.error {
            let _ = w.write_all(b",\"error\":{");
            if let Some(original) = original {
                let _ = w.write_all(b"\"originalPid\":");
                write_str(w, original);
                let _ = w.write_all(b",");
            }
            let _ = write!(w, "\"code\":{code},\"message\":");
            write_str(w, message);
            let _ = w.write_all(b"}");
        }
        let _ = w.write_all(b"}");
    }
}

/// Writes a JSON string literal with escaping.
pub fn write_str(w: &mut impl Write, s: &str) {
    let _ = serde_json::to_writer(w, s);
}

/// `server_ack` `{"acknowledgedPid": pid, "status": status}`.
pub fn server_ack(acknowledged: &str, status: &str) -> Bytes {
    let mut payload = Vec::with_capacity(48 + acknowledged.len());
    payload.extend_from_slice(b"{\"acknowledgedPid\":");
    write_str(&mut payload, acknowledged);
    payload.extend_from_slice(b",\"status\":");
    write_str(&mut payload, status);
    payload.push(b'}');
    Envelope::new("server_ack").raw_payload(Some(&payload)).frame()
}

/// `error_notification` with `{originalPid?, code, message}`.
pub fn error_notification(original_pid: Option<&str>, code: u16, message: &str) -> Bytes {
    Envelope::new("error_notification").error(original_pid, code, message).frame()
}

/// `data_event` from `from`, splicing the sender's payload bytes.
pub fn data_event(from: i64, payload: Option<&[u8]>) -> Bytes {
    Envelope::new("data_event").from_user(from).raw_payload(payload).frame()
}

/// `presence_event` for `user`: `{"userId","status","context","timestamp"}`, and `"info"` (raw
/// JSON) when the user has one (`presence_info_claim`).
pub fn presence_event(
    user: i64,
    status: &str,
    context: Option<&[u8]>,
    timestamp: &str,
    info: Option<&str>,
) -> Bytes {
    let mut payload = Vec::with_capacity(
        80 + status.len() + context.map_or(4, <[u8]>::len) + info.map_or(0, |i| 9 + i.len()),
    );
    let _ = write!(payload, "{{\"userId\":{user},\"status\":");
    write_str(&mut payload, status);
    payload.extend_from_slice(b",\"context\":");
    payload.extend_from_slice(context.unwrap_or(b"null"));
    payload.extend_from_slice(b",\"timestamp\":");
    write_str(&mut payload, timestamp);
    if let Some(info) = info {
        payload.extend_from_slice(b",\"info\":");
        payload.extend_from_slice(info.as_bytes());
    }
    payload.push(b'}');
    Envelope::new("presence_event").from_user(user).raw_payload(Some(&payload)).frame()
}

/// `room_message` `{"from","room","ts","body","meta"}` (seed 003's envelope).
pub fn room_message(from: Option<i64>, room: &str, ts_ms: u64, body: &[u8], meta: Option<&[u8]>) -> Bytes {
    let mut payload = Vec::with_capacity(64 + room.len() + body.len() + meta.map_or(4, <[u8]>::len));
    payload.extend_from_slice(b"{\"from\":");
    match from {
        Some(from) => {
            let _ = write!(payload, "{from}");
        }
        None => payload.extend_from_slice(b"null"),
    }
    payload.extend_from_slice(b",\"room\":");
    write_str(&mut payload, room);
    let _ = write!(payload, ",\"ts\":{ts_ms},\"body\":");
    payload.extend_from_slice(body);
    payload.extend_from_slice(b",\"meta\":");
    payload.extend_from_slice(meta.unwrap_or(b"null"));
    payload.push(b'}');
    Envelope::new("room_message").raw_payload(Some(&payload)).frame()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ws::frame::frame_text as text;

    #[test]
    fn decodes_and_keeps_payload_bytes() {
        let raw = br#"{"type":"data_request","targetUserId":7,"pid":"a\"b","extra":1,"payload":{"b":1,  "a":[1, 2]}}"#;
        let msg = ClientMessage::parse(raw).unwrap();
        assert_eq!(msg.kind, "data_request");
        assert_eq!(msg.target(), Some(7));
        assert_eq!(msg.pid.as_deref(), Some("a\"b"));
        assert_eq!(msg.payload_bytes(), Some(&br#"{"b":1,  "a":[1, 2]}"#[..]));
    }

    #[test]
    fn zero_target_and_null_payload_are_absent() {
        let msg = ClientMessage::parse(br#"{"type":"x","targetUserId":0,"payload":null}"#).unwrap();
        assert_eq!(msg.target(), None);
        assert_eq!(msg.payload_bytes(), None);
    }

    #[test]
    fn rejects_bad_envelopes() {
        for bad in [
            &b"{"[..],
            b"[]",
            b"{\"pid\":\"x\"}",
            b"{\"type\":5}",
            b"{\"type\":\"x\",\"targetUserId\":\"2\"}",
        ] {
            assert!(ClientMessage::parse(bad).is_err(), "{:?}", std::str::from_utf8(bad));
        }
    }

    #[test]
    fn encodes_data_event_with_spliced_payload() {
        let frame = data_event(42, Some(br#"{"b":1,  "a":[1, 2]}"#));
        assert_eq!(text(&frame), r#"{"type":"data_event","fromUserId":42,"payload":{"b":1,  "a":[1, 2]}}"#);
    }

    #[test]
    fn encodes_acks_errors_and_presence() {
        assert_eq!(
            text(&server_ack("p\"1", "delivered")),
            r#"{"type":"server_ack","payload":{"acknowledgedPid":"p\"1","status":"delivered"}}"#
        );
        assert_eq!(
            text(&error_notification(Some("p1"), 404, "user 9 is not connected")),
            r#"{"type":"error_notification","error":{"originalPid":"p1","code":404,"message":"user 9 is not connected"}}"#
        );
        assert_eq!(
            text(&error_notification(None, 400, "bad")),
            r#"{"type":"error_notification","error":{"code":400,"message":"bad"}}"#
        );
        let event = presence_event(5, "busy", None, "2026-01-01T00:00:00Z", None);
        let value: serde_json::Value = serde_json::from_str(text(&event)).unwrap();
        assert_eq!(value["fromUserId"], 5);
        assert_eq!(value["payload"]["status"], "busy");
        assert!(value["payload"]["context"].is_null());
        assert!(value["payload"].get("info").is_none(), "no info field without one");
        let event = presence_event(5, "busy", None, "2026-01-01T00:00:00Z", Some(r#"{"name":"Ana"}"#));
        let value: serde_json::Value = serde_json::from_str(text(&event)).unwrap();
        assert_eq!(value["payload"]["info"]["name"], "Ana");
    }

    #[test]
    fn encodes_room_message() {
        let frame = room_message(Some(3), "r-1", 1700, br#""hola""#, None);
        assert_eq!(
            text(&frame),
            r#"{"type":"room_message","payload":{"from":3,"room":"r-1","ts":1700,"body":"hola","meta":null}}"#
        );
    }

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn raw_capture_keeps_deep_nesting_and_huge_numbers() {
        // serde_json's recursion limit does not apply to a RawValue's capture: the envelope
        // decodes, so the check below is what keeps these from being relayed.
        for payload in [nested(30_000), "1e999999".into(), "[-1E+400]".into()] {
            let raw = format!(r#"{{"type":"data_request","targetUserId":2,"payload":{payload}}}"#);
            let msg = ClientMessage::parse(raw.as_bytes()).expect("decodes");
            assert_eq!(msg.payload_bytes(), Some(payload.as_bytes()));
        }
        assert!(serde_json::from_str::<serde_json::Value>(&nested(MAX_DEPTH)).is_ok());
        assert!(serde_json::from_str::<serde_json::Value>(&nested(MAX_DEPTH + 1)).is_err());
        assert!(serde_json::from_str::<serde_json::Value>("1e999999").is_err());
    }

    #[test]
    fn relayable_checks_depth_outside_strings_and_number_range() {
        let ok = |raw: &str, depth| check_relayable(raw.as_bytes(), depth);
        assert_eq!(ok(&nested(5), 5), Ok(()));
        assert_eq!(ok(&nested(6), 5), Err(Unrelayable::TooDeep));
        assert_eq!(ok(r#"{"a":{"b":[1]}}"#, 3), Ok(()));
        assert_eq!(ok(r#"{"a":{"b":[{}]}}"#, 3), Err(Unrelayable::TooDeep));
        assert_eq!(ok(r#"["[[[[[[", "\"[[[[", "\\", {"k[{":"}}}}"}]"#, 2), Ok(()));
        assert_eq!(ok(r#"["\\"]"#, 1), Ok(()));
        for fine in ["1.7976931348623157e308", "-1e-999999", "0", "-0.5E-3", "123456789012345678901234567890"]
        {
            assert_eq!(ok(fine, 1), Ok(()), "{fine}");
        }
        let long = "9".repeat(308);
        assert_eq!(ok(&long, 1), Ok(()));
        for bad in ["1e999999", "[1, -2E+309]", r#"{"n":1.8e308}"#, &"9".repeat(400)] {
            assert_eq!(ok(bad, 4), Err(Unrelayable::OutOfRange), "{bad}");
        }
        assert_eq!(ok(r#""1e999999""#, 1), Ok(()), "a string is not a number");
    }

    #[test]
    fn presence_payload_accepts_metadata_alias() {
        let msg = ClientMessage::parse(
            br#"{"type":"PRESENCE_UPDATE","payload":{"status":"away","metadata":{"a":1}}}"#,
        )
        .unwrap();
        let update: PresenceUpdate = msg.payload_as().unwrap();
        assert_eq!(update.status, "away");
        assert_eq!(update.context.unwrap().get(), r#"{"a":1}"#);
    }
}

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
use serde::de::value::BorrowedStrDeserializer;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::ws::{FrameEncoder, OutKind};

/// A client → server message: `{"pid"?, "type", "targetUserId"?, "payload"?}`.
/// Unknown fields are ignored.
///
/// [`ClientMessage::parse`] checks the payload for what receivers cannot parse (see
/// [`ClientMessage::relayable`]) in the same pass that captures its bytes.
#[derive(Debug)]
pub struct ClientMessage<'a> {
    /// Client-chosen correlation id (borrowed from the message unless it has escapes).
    pub pid: Option<Cow<'a, str>>,
    /// Message type, routes the message.
    pub kind: Cow<'a, str>,
    /// Target user for P2P; 0 counts as absent, as in the seed's Go `omitempty`.
    pub target_user_id: Option<i64>,
    /// The payload, exactly as the client wrote it.
    pub payload: Option<&'a RawValue>,
    relayable: Result<(), Unrelayable>,
}

/// The envelope as serde derives it: the reference [`ClientMessage::parse`] falls back to
/// (for its error messages and for spellings the single pass leaves to it, such as escaped
/// keys or duplicate fields).
#[derive(Deserialize)]
#[serde(expecting = "struct ClientMessage")] // in serde's errors, which clients get back
struct Derived<'a> {
    #[serde(borrow, default)]
    pid: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "targetUserId", default)]
    target_user_id: Option<i64>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

impl<'a> ClientMessage<'a> {
    /// Decodes one text message.
    ///
    /// One pass: serde_json parses each value where it stands (the payload through a visitor
    /// that counts nesting and sees every number) and the payload's bytes are kept as written.
    /// Anything that pass does not settle (malformed JSON, escaped or repeated keys, a payload
    /// it flags) is decoded again the plain serde way, which gives the same message or error.
    pub fn parse(text: &'a [u8]) -> Result<Self, serde_json::Error> {
        // One UTF-8 validation of the whole text: serde_json then reads it as a `str`, without
        // validating each string again.
        if let Ok(text) = std::str::from_utf8(text)
            && let Some(msg) = (Walk { text, at: 0 }).message()
        {
            return Ok(msg);
        }
        let derived: Derived<'a> = serde_json::from_slice(text)?;
        let relayable =
            derived.payload.map_or(Ok(()), |raw| check_relayable(raw.get().as_bytes(), PAYLOAD_DEPTH));
        Ok(ClientMessage {
            pid: derived.pid,
            kind: derived.kind,
            target_user_id: derived.target_user_id,
            payload: derived.payload,
            relayable,
        })
    }

    /// Whether the payload may be relayed: `Err` when it nests deeper than [`MAX_DEPTH`]
    /// allows inside an envelope or holds a number out of f64 range (see
    /// [`check_relayable`], the rule this was decided by).
    pub fn relayable(&self) -> Result<(), Unrelayable> {
        self.relayable
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

/// Deepest nesting allowed inside a relayed payload: one level less than [`MAX_DEPTH`], for the
/// envelope's own object.
const PAYLOAD_DEPTH: usize = MAX_DEPTH - 1;

/// The single pass over a client message: the envelope's punctuation is walked here, every
/// value is parsed by serde_json where it stands. `None` leaves the message to [`Derived`].
struct Walk<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Walk<'a> {
    fn message(mut self) -> Option<ClientMessage<'a>> {
        let (mut pid, mut kind, mut target_user_id, mut payload) = (None, None, None, None);
        let mut relayable = Ok(());
        let mut seen = [false; 4];
        self.skip_ws();
        self.eat(b'{')?;
        self.skip_ws();
        if self.eat(b'}').is_none() {
            loop {
                let key = self.key()?;
                self.skip_ws();
                self.eat(b':')?;
                self.skip_ws();
                let field = match key {
                    "pid" => 0,
                    "type" => 1,
                    "targetUserId" => 2,
                    "payload" => 3,
                    _ => 4,
                };
                if let Some(seen) = seen.get_mut(field) {
                    if *seen {
                        return None; // serde's "duplicate field" error
                    }
                    *seen = true;
                }
                match field {
                    0 => pid = self.value::<Option<BorrowedCow<'a>>>()?.map(|p| p.0),
                    1 => kind = Some(self.value::<BorrowedCow<'a>>()?.0),
                    2 => target_user_id = self.value::<Option<i64>>()?,
                    3 => (payload, relayable) = self.payload()?,
                    _ => {
                        self.value::<IgnoredAny>()?;
                    }
                }
                self.skip_ws();
                if self.eat(b',').is_some() {
                    self.skip_ws();
                    continue;
                }
                self.eat(b'}')?;
                break;
            }
        }
        self.skip_ws();
        if self.at != self.text.len() {
            return None;
        }
        Some(ClientMessage { pid, kind: kind?, target_user_id, payload, relayable })
    }

    /// The payload and whether it is relayable. Parsed once, by [`Relayable`]; only when
    /// that does not settle it (too deep, a number at the edge of f64's range, malformed) is
    /// it captured again and checked byte by byte, which decides exactly as before.
    fn payload(&mut self) -> Option<(Option<&'a RawValue>, Result<(), Unrelayable>)> {
        let start = self.at;
        if self.value::<Relayable>().is_some() {
            let json = self.text.get(start..self.at)?;
            if json == "null" {
                return Some((None, Ok(())));
            }
            if let Some(raw) = borrowed_raw_value(json) {
                return Some((Some(raw), Ok(())));
            }
        }
        self.at = start;
        let raw: Option<&'a RawValue> = self.value()?;
        Some((raw, raw.map_or(Ok(()), |raw| check_relayable(raw.get().as_bytes(), PAYLOAD_DEPTH))))
    }

    /// One JSON value parsed by serde_json where it stands; `at` moves past it.
    fn value<T: Deserialize<'a>>(&mut self) -> Option<T> {
        let rest = self.text.get(self.at..)?;
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<T>();
        let value = stream.next()?.ok()?;
        self.at += stream.byte_offset();
        Some(value)
    }

    /// A key without escapes or control characters (anything else is left to serde).
    fn key(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        let bytes = self.text.as_bytes();
        let len = bytes.get(start..)?.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if bytes[start + len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        self.text.get(start..start + len)
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.text.as_bytes().get(self.at) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.text.as_bytes().get(self.at) == Some(&byte)).then(|| self.at += 1)
    }
}

/// A string borrowed from the message when it has no escapes (serde's `Cow` always copies
/// inside an `Option`).
struct BorrowedCow<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for BorrowedCow<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Str;
        impl<'de> Visitor<'de> for Str {
            type Value = BorrowedCow<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(BorrowedCow(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(BorrowedCow(Cow::Owned(s.to_owned())))
            }
        }
        deserializer.deserialize_str(Str)
    }
}

/// Any JSON value, accepted only if serde_json's parse of it shows it relayable: nesting
/// within [`PAYLOAD_DEPTH`] and every number well inside f64's range. An error means "not
/// settled here", not "unrelayable": the caller then applies [`check_relayable`].
struct Relayable;

impl<'de> Deserialize<'de> for Relayable {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Level(0).deserialize(deserializer).map(|()| Relayable)
    }
}

/// A value `.0` levels inside the payload.
#[derive(Clone, Copy)]
struct Level(usize);

impl<'de> DeserializeSeed<'de> for Level {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Level {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // serde_json's float conversion is not correctly rounded: near f64::MAX (1.8e308) the
        // exact check decides. A number that overflows was already an error.
        if v.abs() < 1e308 { Ok(()) } else { Err(E::custom("at the edge of f64's range")) }
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

impl Level {
    /// The level inside an array or object at this one.
    fn inner<E: de::Error>(self) -> Result<Level, E> {
        if self.0 < PAYLOAD_DEPTH { Ok(Level(self.0 + 1)) } else { Err(E::custom("nested too deep")) }
    }
}

/// `json` (already parsed by serde_json, from the message) as a borrowed [`RawValue`].
/// serde_json only makes a `&RawValue` by deserializing one: this answers its raw-value
/// request with the bytes at hand instead of scanning them again. `None` if serde_json ever
/// asks differently (the caller then captures the value the ordinary way).
fn borrowed_raw_value(json: &str) -> Option<&RawValue> {
    /// The key serde_json's raw-value request expects (private to serde_json: the unit tests
    /// fail, not the server, if it ever changes).
    const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";
    struct Raw<'a>(&'a str);
    struct Entry<'a>(Option<&'a str>);

    impl<'de> Deserializer<'de> for Raw<'de> {
        type Error = serde_json::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a raw value request"))
        }
        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            visitor: V,
        ) -> Result<V::Value, Self::Error> {
            visitor.visit_map(Entry(Some(self.0)))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct seq tuple tuple_struct map struct enum identifier ignored_any
        }
    }

    impl<'de> MapAccess<'de> for Entry<'de> {
        type Error = serde_json::Error;
        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, Self::Error> {
            match self.0 {
                Some(_) => seed.deserialize(BorrowedStrDeserializer::new(RAW_VALUE_TOKEN)).map(Some),
                None => Ok(None),
            }
        }
        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Self::Error> {
            let json = self.0.take().ok_or_else(|| de::Error::custom("no raw value"))?;
            seed.deserialize(BorrowedStrDeserializer::new(json))
        }
    }

    <&RawValue>::deserialize(Raw(json)).ok()
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

    /// pid, type, targetUserId, payload and relayability, or the error's text.
    type Decoded = (Option<String>, String, Option<i64>, Option<String>, Result<(), Unrelayable>);

    /// What `parse` must agree with: serde's derive, then the byte check.
    fn reference(raw: &[u8]) -> Result<Decoded, String> {
        let d: Derived = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
        let relayable = d.payload.map_or(Ok(()), |p| check_relayable(p.get().as_bytes(), PAYLOAD_DEPTH));
        Ok((
            d.pid.map(Cow::into_owned),
            d.kind.into_owned(),
            d.target_user_id,
            d.payload.map(|p| p.get().to_owned()),
            relayable,
        ))
    }

    fn decoded(raw: &[u8]) -> Result<Decoded, String> {
        let m = ClientMessage::parse(raw).map_err(|e| e.to_string())?;
        let relayable = m.relayable();
        Ok((
            m.pid.map(Cow::into_owned),
            m.kind.into_owned(),
            m.target_user_id,
            m.payload.map(|p| p.get().to_owned()),
            relayable,
        ))
    }

    fn single_pass(raw: &str) -> bool {
        (Walk { text: raw, at: 0 }).message().is_some()
    }

    #[test]
    fn single_pass_agrees_with_serde_on_every_spelling() {
        let deep = |n: usize| format!(r#"{{"type":"x","payload":{}}}"#, nested(n));
        let cases = [
            r#"{"type":"x"}"#.to_string(),
            r#" { "pid" : "p" , "type" : "x" , "targetUserId" : 7 , "payload" : [1, {"a": null}] } "#.into(),
            "{\"type\":\"x\",\n\t\"payload\":\r{}}".into(),
            r#"{"payload":{"a":1},"type":"x","pid":null,"targetUserId":null}"#.into(),
            r#"{"type":"x","payload":null}"#.into(),
            r#"{"type":"x","payload":"s","extra":{"deep":[[[[1e999999]]]]},"more":true}"#.into(),
            r#"{"pid":"a\"b","type":"\u0078"}"#.into(),
            r#"{"pa\u0079load":5,"type":"x"}"#.into(),
            r#"{"type":"x","pid":"1","pid":"2"}"#.into(),
            r#"{"type":"x","pid":null,"pid":null}"#.into(),
            r#"{"type":"x","extra":1,"extra":2}"#.into(),
            r#"{"type":"x","payload":1,}"#.into(),
            r#"{"type":"x"} x"#.into(),
            r#"{"type":"x"}}"#.into(),
            r#"{"type":"x","payload":01}"#.into(),
            r#"{"type":"x","payload":1x}"#.into(),
            r#"{"type":"x","payload":[1,]}"#.into(),
            r#"{"type":"x","payload":"tab	in string"}"#.into(),
            r#"{"type":"x","payload":"\q"}"#.into(),
            r#"{"type":"x","targetUserId":1.0}"#.into(),
            r#"{"type":"x","targetUserId":-9223372036854775808}"#.into(),
            r#"{"type":"x","targetUserId":9223372036854775808}"#.into(),
            r#"{"type":null}"#.into(),
            r#"{"type":"x","payload":1e999999}"#.into(),
            r#"{"type":"x","payload":[-1.7976931348623157e308, 1.7976931348623158e308]}"#.into(),
            r#"{"type":"x","payload":1.7976931348623159e308}"#.into(),
            r#"{"type":"x","payload":179769313486231580000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000}"#.into(),
            r#"{"type":"x","payload":[1e308, -1e-999999, 0e999999999999, 123456789012345678901234567890]}"#.into(),
            format!(r#"{{"type":"x","payload":{}}}"#, "9".repeat(400)),
            deep(PAYLOAD_DEPTH),
            deep(PAYLOAD_DEPTH + 1),
            deep(30_000),
            format!(r#"{{"type":"x","payload":{{"k":{}}}}}"#, nested(PAYLOAD_DEPTH - 1)),
            format!(r#"{{"type":"x","payload":{{"k":{}}}}}"#, nested(PAYLOAD_DEPTH)),
            "{\"type\":\"x\",\"payload\":\"\u{e9}\"}".into(),
            "{\"type\":\"x\",\"\u{e9}\":1}".into(),
            "".into(),
            "{".into(),
            "[]".into(),
            "1".into(),
        ];
        for case in &cases {
            assert_eq!(decoded(case.as_bytes()), reference(case.as_bytes()), "{case}");
        }
        let error = decoded(b"1").unwrap_err();
        assert!(error.contains("expected struct ClientMessage"), "the old error text: {error}");
        let invalid_utf8 = b"{\"type\":\"x\",\"\xff\":1}";
        assert_eq!(decoded(invalid_utf8), reference(invalid_utf8));
        assert!(decoded(invalid_utf8).is_err());
        // The usual spellings take the single pass; escaped and repeated keys are left to serde.
        for fast in [&cases[0], &cases[1], &cases[2], &cases[3], &cases[6], &deep(PAYLOAD_DEPTH)] {
            assert!(single_pass(fast), "{fast}");
        }
        for slow in [&cases[7], &cases[8], &cases[12]] {
            assert!(!single_pass(slow), "{slow}");
        }
    }

    /// A cheap stand-in for the fuzz target's differential check: random edits of real
    /// envelopes (structural characters, escapes, digits, exponents, invalid UTF-8) decode
    /// the same way, or fail with the same error, in the single pass as in plain serde.
    #[test]
    fn single_pass_agrees_with_serde_on_mutated_messages() {
        let seeds: [&[u8]; 6] = [
            br#"{"pid":"c-1","type":"data_request","targetUserId":2,"payload":{"a":[1,2.5,-3e2],"s":"x\"y\u00e9"}}"#,
            br#"{"pid":"c-2","type":"presence_update","payload":{"status":"away","context":{"d":"web"}}}"#,
            br#"{"type":"broadcast","payload":{"room":"r","body":[[[{"k":null}]]],"meta":true}}"#,
            br#" {"type":"x", "payload": 1.7976931348623157e308 , "pid" : null} "#,
            br#"{"payload":[[[[[[[[[[]]]]]]]]]],"type":"generic_request","pid":"p"}"#,
            br#"{"type":"t","targetUserId":-7,"extra":{"a":[1e999999]},"payload":"s"}"#,
        ];
        let alphabet = b"{}[]\":,\\ \t0123456789eE+-.nultrfasx\x00\x1f\xc3\xa9\xff";
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let (mut agreed_ok, mut agreed_err) = (0, 0);
        for _ in 0..20_000 {
            let mut m = seeds[next(seeds.len())].to_vec();
            for _ in 0..1 + next(3) {
                let at = next(m.len() + 1);
                let byte = alphabet[next(alphabet.len())];
                match next(4) {
                    0 if at < m.len() => m[at] = byte,
                    1 => m.insert(at, byte),
                    2 if at < m.len() => {
                        m.remove(at);
                    }
                    _ => {
                        let from = next(m.len());
                        let piece = m[from..(from + 1 + next(12)).min(m.len())].to_vec();
                        m.splice(at..at, piece);
                    }
                }
            }
            let (mine, theirs) = (decoded(&m), reference(&m));
            assert_eq!(mine, theirs, "{:?}", String::from_utf8_lossy(&m));
            if mine.is_ok() { agreed_ok += 1 } else { agreed_err += 1 }
        }
        assert!(agreed_ok > 2_000 && agreed_err > 2_000, "{agreed_ok} decoded, {agreed_err} refused");
    }

    #[test]
    fn payload_depth_limit_is_exact() {
        for (payload, fine) in [
            (nested(PAYLOAD_DEPTH), true),
            (nested(PAYLOAD_DEPTH + 1), false),
            (format!("{}1{}", r#"{"a":"#.repeat(PAYLOAD_DEPTH), "}".repeat(PAYLOAD_DEPTH)), true),
            (format!("{}1{}", r#"{"a":"#.repeat(PAYLOAD_DEPTH + 1), "}".repeat(PAYLOAD_DEPTH + 1)), false),
            (format!("[{}, 1]", nested(PAYLOAD_DEPTH - 1)), true),
            (format!("[1, {}]", nested(PAYLOAD_DEPTH)), false),
        ] {
            let raw = format!(r#"{{"type":"x","payload":{payload}}}"#);
            let msg = ClientMessage::parse(raw.as_bytes()).expect("decodes either way");
            let want = if fine { Ok(()) } else { Err(Unrelayable::TooDeep) };
            assert_eq!(msg.relayable(), want, "{}", payload.len());
            assert_eq!(msg.payload_bytes(), Some(payload.as_bytes()));
        }
        // The payload's depth plus the envelope's own object is what receivers parse.
        let frame = data_event(1, Some(nested(PAYLOAD_DEPTH).as_bytes()));
        assert!(serde_json::from_str::<serde_json::Value>(text(&frame)).is_ok());
        let frame = data_event(1, Some(nested(PAYLOAD_DEPTH + 1).as_bytes()));
        assert!(serde_json::from_str::<serde_json::Value>(text(&frame)).is_err());
    }

    #[test]
    fn payload_number_range_is_exact() {
        for (number, fine) in [
            ("1.7976931348623157e308", true),
            ("-1.7976931348623157e308", true),
            ("1.7976931348623158e308", true),  // rounds down to f64::MAX
            ("1.7976931348623159e308", false), // rounds up to infinity
            ("1.8e308", false),
            ("-2E+309", false),
            ("1e999999", false),
            ("1e308", true),
            ("-1e-999999", true),
            ("0e999999999999", true),
            ("18446744073709551616", true),
            ("-9223372036854775809", true),
        ] {
            for payload in [number.to_string(), format!(r#"{{"a":[0,{number}]}}"#)] {
                let raw = format!(r#"{{"type":"x","payload":{payload}}}"#);
                let msg = ClientMessage::parse(raw.as_bytes()).expect("decodes either way");
                let want = if fine { Ok(()) } else { Err(Unrelayable::OutOfRange) };
                assert_eq!(msg.relayable(), want, "{payload}");
                assert_eq!(msg.payload_bytes(), Some(payload.as_bytes()));
            }
        }
        let (long_fine, long_bad) = ("9".repeat(308), "9".repeat(309));
        for (payload, want) in [(long_fine, Ok(())), (long_bad, Err(Unrelayable::OutOfRange))] {
            let raw = format!(r#"{{"type":"x","payload":{payload}}}"#);
            assert_eq!(ClientMessage::parse(raw.as_bytes()).unwrap().relayable(), want);
        }
        let raw = br#"{"type":"x","payload":"1e999999"}"#;
        assert_eq!(ClientMessage::parse(raw).unwrap().relayable(), Ok(()), "a string is not a number");
    }

    #[test]
    fn payload_with_escapes_is_relayed_byte_for_byte_and_the_pid_is_borrowed() {
        let payload = "{ \"t\" : \"caf\\u00e9 \\\"q\\\" \\\\ \\/ \\n\\ud83d\\ude00\", \"n\":1.50,\"e\":1E+2,\"z\":-0.0,\"u\":\"naïve\" }";
        let raw = format!(r#"{{"pid":"p-1","type":"data_request","targetUserId":2,"payload":{payload}}}"#);
        assert!(single_pass(&raw));
        let msg = ClientMessage::parse(raw.as_bytes()).unwrap();
        assert_eq!(msg.payload_bytes(), Some(payload.as_bytes()));
        assert_eq!(msg.relayable(), Ok(()));
        assert!(matches!(msg.pid, Some(Cow::Borrowed("p-1"))), "{:?}", msg.pid);
        assert!(matches!(msg.kind, Cow::Borrowed("data_request")));
        let frame = data_event(7, msg.payload_bytes());
        assert_eq!(text(&frame), format!(r#"{{"type":"data_event","fromUserId":7,"payload":{payload}}}"#));
        let msg = ClientMessage::parse(br#"{"pid":"p\u002d1","type":"x"}"#).unwrap();
        assert_eq!(msg.pid.as_deref(), Some("p-1"));
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

//! The inter-node message encoding.
//!
//! `[version u8 = 1][header_len u16 big-endian][postcard header][raw body]`. The header is a
//! small [`Header`] in postcard (compact, serde-derived, no schema drift between hand-written
//! encoders); the body is carried as raw bytes after it, so a WebSocket frame already encoded by
//! the sending node is handed to local connections as a [`Bytes::slice`] of the received
//! payload, without a copy or a re-encoding ("encoded once" across nodes).
//!
//! [`decode`] is total: any input gives `Ok` or `Err`, never a panic, and allocates at most
//! about the input's size.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The encoding version this build writes and reads.
pub const VERSION: u8 = 1;

/// Most records in one [`Header::Records`] message; more are split over several.
pub const MAX_RECORDS: usize = 256;

/// What a message is about. Every variant names its origin node and the origin's epoch (a
/// random number per process start, so a restarted node with the same id is a new node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Header {
    /// "I am alive" on the directory subject; `seq` is the origin's last records sequence, so a
    /// lost records message is noticed at the next heartbeat.
    Heartbeat {
        /// Sending node.
        origin: String,
        /// Sending node's epoch.
        epoch: u64,
        /// Sequence number of the origin's last [`Header::Records`].
        seq: u64,
    },
    /// State records of the origin's users and rooms. Each record replaces the previous one for
    /// the same name; `full` means the records are the origin's whole state (a snapshot).
    Records {
        /// Sending node.
        origin: String,
        /// Sending node's epoch.
        epoch: u64,
        /// Per-origin sequence, one more per records message.
        seq: u64,
        /// Part of a snapshot of the origin's whole state: names absent from the snapshot are
        /// gone. A snapshot of more than [`MAX_RECORDS`] records spans several messages.
        full: bool,
        /// The last message of a snapshot (only with `full`).
        end: bool,
        /// The records.
        records: Vec<Record>,
    },
    /// Asks `target` to republish its whole state (after a gap, or on joining).
    SyncReq {
        /// Sending node.
        origin: String,
        /// Sending node's epoch.
        epoch: u64,
        /// Node asked to republish; empty means every node.
        target: String,
    },
    /// A message for local connections of the receiving node; the body is the encoded frame.
    Deliver {
        /// Sending node.
        origin: String,
        /// Sending node's epoch.
        epoch: u64,
    },
    /// A broadcast for every local connection of the receiving node except those of the
    /// users in `exclude` (sorted); the body is the encoded frame.
    DeliverExcept {
        /// Sending node.
        origin: String,
        /// Sending node's epoch.
        epoch: u64,
        /// Sorted user ids to skip.
        exclude: Vec<i64>,
    },
    /// A user's presence status changed on its node (a `presence_update`, or a transient one
    /// expiring): every node stores it and tells its own watchers and members of `rooms`.
    Presence {
        /// Sending node.
        origin: String,
        /// Sending node's epoch.
        epoch: u64,
        /// The user.
        user: i64,
        /// The status.
        status: String,
        /// Its context, raw JSON.
        context: Option<String>,
        /// When it was set, Unix milliseconds.
        since_ms: u64,
        /// The user's `presence_info_claim` value, raw JSON.
        info: Option<String>,
        /// Rooms whose members are told too.
        rooms: Vec<String>,
    },
    /// On a room's subject: every node with members of `room` answers the origin with a
    /// [`Header::Members`] carrying the same `id`.
    MembersReq {
        /// Sending node.
        origin: String,
        /// Sending node's epoch.
        epoch: u64,
        /// The origin's id of the gather.
        id: u64,
        /// The room.
        room: String,
    },
    /// One node's members of a room, for the gather `id`: the body is their user ids, 8 bytes
    /// each, little-endian.
    Members {
        /// Sending node.
        origin: String,
        /// Sending node's epoch.
        epoch: u64,
        /// The origin's id of the gather.
        id: u64,
    },
    /// `connections_per_user` across nodes: a connection of `user` opened at `before_ms` on
    /// the origin, and the user holds `count` too many: every receiving node closes up to
    /// `count` of its connections of the user opened before `before_ms`, oldest first.
    Evict {
        /// Sending node.
        origin: String,
        /// Sending node's epoch.
        epoch: u64,
        /// The user.
        user: i64,
        /// Only connections opened before this (Unix milliseconds) are closed.
        before_ms: u64,
        /// At most this many.
        count: u32,
    },
    /// Close every connection of `user` on the receiving node (the API's disconnect).
    Disconnect {
        /// Sending node.
        origin: String,
        /// Sending node's epoch.
        epoch: u64,
        /// The user.
        user: i64,
    },
    /// To the node holding `user`'s connection: send the message (type `kind`, payload = the
    /// body, raw JSON, empty for none) to the user's newest connection there with a pid, wait
    /// for the client's ack (or reply, with `request`) up to `timeout_ms`, and answer the origin
    /// with [`Header::AwaitDone`] carrying `id`.
    Await {
        /// Sending node (where the caller waits).
        origin: String,
        /// Sending node's epoch.
        epoch: u64,
        /// The origin's id of the wait.
        id: u64,
        /// The receiving user.
        user: i64,
        /// A request (answered by the client's reply) rather than a send-for-ack.
        request: bool,
        /// The wait bound.
        timeout_ms: u64,
        /// The message's `type`.
        kind: String,
        /// The message's `fromUserId`.
        from: Option<i64>,
    },
    /// How a [`Header::Await`] ended, to its origin's node subject.
    AwaitDone {
        /// Sending node (where the client answered).
        origin: String,
        /// Sending node's epoch.
        epoch: u64,
        /// The origin's id of the wait.
        id: u64,
        /// The result.
        outcome: AwaitOutcome,
    },
}

/// The result of a wait on another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AwaitOutcome {
    /// The client acknowledged: its `status` and `error` (raw JSON).
    Ack {
        /// `status`.
        status: Option<String>,
        /// `error`, raw JSON.
        error: Option<String>,
    },
    /// The client replied: its whole message.
    Reply(String),
    /// No answer in time.
    TimedOut,
    /// The user has no connection there.
    Offline,
    /// The connection closed first.
    Closed,
    /// The node is shutting down.
    ShuttingDown,
    /// The node could not take the wait (too many in flight).
    Unavailable,
}

impl Header {
    /// The sending node and its epoch.
    pub fn origin(&self) -> (&str, u64) {
        match self {
            Header::Heartbeat { origin, epoch, .. }
            | Header::Records { origin, epoch, .. }
            | Header::SyncReq { origin, epoch, .. }
            | Header::Deliver { origin, epoch }
            | Header::DeliverExcept { origin, epoch, .. }
            | Header::Disconnect { origin, epoch, .. }
            | Header::Evict { origin, epoch, .. }
            | Header::MembersReq { origin, epoch, .. }
            | Header::Members { origin, epoch, .. }
            | Header::Presence { origin, epoch, .. }
            | Header::Await { origin, epoch, .. }
            | Header::AwaitDone { origin, epoch, .. } => (origin, *epoch),
        }
    }
}

/// One idempotent state record: how many connections (members) a node holds; 0 means none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Record {
    /// Connections of `user` on the origin node.
    User {
        /// User id.
        user: String,
        /// Connections; 0 = the user left the node.
        count: u32,
    },
    /// Members of `room` on the origin node.
    Room {
        /// Room name.
        room: String,
        /// Members; 0 = none left.
        count: u32,
    },
}

/// A decoded message: header plus the body bytes (a slice of the received payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// What the message is.
    pub header: Header,
    /// The raw body (for [`Header::Deliver`], the encoded WebSocket frame).
    pub body: Bytes,
}

/// Why a payload was not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than the fixed prefix or the announced header.
    #[error("truncated message")]
    Truncated,
    /// A version this build does not read.
    #[error("unknown wire version {0}")]
    Version(u8),
    /// The header is not a valid postcard [`Header`].
    #[error("malformed header")]
    Header,
    /// The header does not fit in 64 KiB (encoding only).
    #[error("header too large")]
    TooLarge,
}

/// Encodes `header` followed by `body`.
pub fn encode(header: &Header, body: &[u8]) -> Result<Bytes, WireError> {
    let head = postcard::to_allocvec(header).map_err(|_| WireError::Header)?;
    let len = u16::try_from(head.len()).map_err(|_| WireError::TooLarge)?;
    let mut out = BytesMut::with_capacity(3 + head.len() + body.len());
    out.put_u8(VERSION);
    out.put_u16(len);
    out.put_slice(&head);
    out.put_slice(body);
    Ok(out.freeze())
}

/// Decodes a payload received from the broker. Never panics.
pub fn decode(payload: Bytes) -> Result<Message, WireError> {
    let [version, hi, lo, ..] = payload[..] else {
        return Err(WireError::Truncated);
    };
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let end = 3 + usize::from(u16::from_be_bytes([hi, lo]));
    let head = payload.get(3..end).ok_or(WireError::Truncated)?;
    let header: Header = postcard::from_bytes(head).map_err(|_| WireError::Header)?;
    Ok(Message { header, body: payload.slice(end..) })
}

/// Splits `records` into [`Header::Records`] messages of at most [`MAX_RECORDS`] each, with
/// consecutive sequence numbers from `*seq + 1` (updated). With `full`, the messages form one
/// snapshot, the last marked `end` (an empty snapshot is still one message).
pub fn records_messages(
    origin: &str,
    epoch: u64,
    seq: &mut u64,
    full: bool,
    records: Vec<Record>,
) -> Vec<Header> {
    let mut out = Vec::new();
    let mut rest = records.into_iter().peekable();
    let mut first = true;
    while first || rest.peek().is_some() {
        let chunk: Vec<Record> = rest.by_ref().take(MAX_RECORDS).collect();
        *seq += 1;
        let end = full && rest.peek().is_none();
        out.push(Header::Records { origin: origin.to_string(), epoch, seq: *seq, full, end, records: chunk });
        first = false;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Header> {
        vec![
            Header::Heartbeat { origin: "a".into(), epoch: u64::MAX, seq: 7 },
            Header::Records {
                origin: "node-b".into(),
                epoch: 3,
                seq: 1,
                full: true,
                end: true,
                records: vec![
                    Record::User { user: "42".into(), count: 2 },
                    Record::Room { room: "caf\u{e9}".into(), count: 0 },
                ],
            },
            Header::SyncReq { origin: "a".into(), epoch: 1, target: String::new() },
            Header::Deliver { origin: "a".into(), epoch: 1 },
            Header::DeliverExcept { origin: "a".into(), epoch: 1, exclude: vec![-1, 3] },
            Header::Disconnect { origin: "a".into(), epoch: 1, user: -9 },
            Header::Evict { origin: "a".into(), epoch: 1, user: 4, before_ms: 1_700_000_000_000, count: 1 },
            Header::MembersReq { origin: "a".into(), epoch: 1, id: 3, room: "lobby".into() },
            Header::Members { origin: "b".into(), epoch: 1, id: 3 },
            Header::Presence {
                origin: "a".into(),
                epoch: 1,
                user: 5,
                status: "busy".into(),
                context: Some("{}".into()),
                since_ms: 9,
                info: None,
                rooms: vec!["lobby".into()],
            },
            Header::Await {
                origin: "a".into(),
                epoch: 1,
                id: 7,
                user: 42,
                request: true,
                timeout_ms: 500,
                kind: "question".into(),
                from: Some(1),
            },
            Header::AwaitDone {
                origin: "b".into(),
                epoch: 2,
                id: 7,
                outcome: AwaitOutcome::Ack { status: Some("read".into()), error: Some("{\"x\":1}".into()) },
            },
        ]
    }

    #[test]
    fn messages_round_trip_with_the_body_as_a_slice() {
        for header in samples() {
            let body = b"\x81\x05hello";
            let bytes = encode(&header, body).unwrap();
            assert_eq!(bytes[0], VERSION);
            let message = decode(bytes.clone()).unwrap();
            assert_eq!(message.header, header);
            assert_eq!(&message.body[..], body);
            // The body shares the received buffer (no copy).
            assert_eq!(message.body.as_ptr(), bytes[bytes.len() - body.len()..].as_ptr());
        }
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let good = encode(&samples()[1], b"body").unwrap();
        assert_eq!(decode(Bytes::new()), Err(WireError::Truncated));
        assert_eq!(decode(Bytes::from_static(b"\x01\x00")), Err(WireError::Truncated));
        assert_eq!(decode(Bytes::from_static(b"\x02\x00\x00")), Err(WireError::Version(2)));
        assert_eq!(decode(Bytes::from_static(b"\x01\xff\xff\x00")), Err(WireError::Truncated));
        assert_eq!(decode(Bytes::from_static(b"\x01\x00\x00")), Err(WireError::Header));
        assert_eq!(decode(Bytes::from_static(b"\x01\x00\x01\x63")), Err(WireError::Header));
        // Every truncation of a good message fails or decodes, never panics.
        for cut in 0..good.len() {
            let _ = decode(good.slice(..cut));
        }
        // A header claiming a huge record list in a few bytes is refused without allocating it.
        let huge = [1u8, 0, 8, 1, 1, b'a', 1, 1, 0, 0xff, 0xff];
        assert!(decode(Bytes::copy_from_slice(&huge)).is_err());
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        // A deterministic xorshift stream: random payloads, and random mutations of good ones.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let goods: Vec<Bytes> = samples().iter().map(|h| encode(h, b"xyz").unwrap()).collect();
        for round in 0..20_000 {
            let mut bytes = if round % 2 == 0 {
                let len = (next() % 64) as usize;
                let mut v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if !v.is_empty() && round % 4 == 0 {
                    v[0] = VERSION;
                }
                v
            } else {
                goods[(next() % goods.len() as u64) as usize].to_vec()
            };
            if !bytes.is_empty() {
                for _ in 0..=(next() % 3) {
                    let at = (next() % bytes.len() as u64) as usize;
                    bytes[at] = next() as u8;
                }
            }
            let _ = decode(Bytes::from(bytes));
        }
    }

    #[test]
    fn records_are_split_into_bounded_messages() {
        let records: Vec<Record> = (0..600).map(|i| Record::User { user: i.to_string(), count: 1 }).collect();
        let mut seq = 10;
        let messages = records_messages("a", 1, &mut seq, true, records);
        assert_eq!(messages.len(), 3);
        assert_eq!(seq, 13);
        let ends: Vec<bool> =
            messages.iter().map(|m| matches!(m, Header::Records { full: true, end: true, .. })).collect();
        assert_eq!(ends, [false, false, true]);
        assert_eq!(records_messages("a", 1, &mut seq, true, Vec::new()).len(), 1);
        assert!(encode(&messages[0], b"").unwrap().len() < 8 * 1024);
    }
}

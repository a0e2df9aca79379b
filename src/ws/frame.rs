//! Sans-IO RFC 6455 framing for the server side.
//!
//! Header parsing and formatting are tungstenite's (`FrameHeader::parse` / `format`); what we
//! own is the buffering around them. tungstenite's `WebSocketContext` keeps a read and a write
//! buffer inside every connection, which is the dominant cost of an idle connection at 100k
//! scale; here the shard reads into one scratch buffer, frames are unmasked in place, and a
//! connection only holds bytes while a frame is actually incomplete.

use std::io::Cursor;

use bytes::{BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// Why a connection must be closed while reading frames; each maps to a close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Malformed framing: unmasked client frame, reserved bits or opcodes, bad control frame,
    /// continuation out of sequence (close 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A text message that is not valid UTF-8 (close 1007).
    #[error("invalid UTF-8 in text message")]
    InvalidUtf8,
    /// A message larger than `max_message_size` (close 1009).
    #[error("message too big")]
    TooBig,
}

impl FrameError {
    /// The close code RFC 6455 prescribes for this error.
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::Protocol(_) => close::PROTOCOL_ERROR,
            FrameError::InvalidUtf8 => close::INVALID_PAYLOAD,
            FrameError::TooBig => close::TOO_BIG,
        }
    }
}

/// Close codes used by the tier (SPEC "Close codes").
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Server shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Binary frames are not supported.
    pub const UNSUPPORTED: u16 = 1003;
    /// Invalid frame payload data (bad UTF-8).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation (rate limit, auth expiry).
    pub const POLICY: u16 = 1008;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Internal server error.
    pub const INTERNAL: u16 = 1011;
    /// Overloaded / slow consumer.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Replaced by a newer connection of the same user.
    pub const REPLACED: u16 = 4000;
}

/// The kind of a parsed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// First frame of a text message.
    Text,
    /// First frame of a binary message.
    Binary,
    /// Continuation of a fragmented message.
    Continuation,
    /// Ping control frame.
    Ping,
    /// Pong control frame.
    Pong,
    /// Close control frame.
    Close,
}

/// One complete frame found in a buffer; its payload was unmasked in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame is.
    pub kind: FrameKind,
    /// FIN bit.
    pub fin: bool,
    /// Payload position inside the buffer given to [`parse_frame`].
    pub payload: std::ops::Range<usize>,
    /// Bytes of the buffer this frame occupies (header + payload).
    pub len: usize,
}

/// Parses the first frame of `buf`, unmasking its payload in place.
///
/// `Ok(None)` means more bytes are needed; no frame ever needs more than
/// `max_payload + 14` bytes, which bounds what a connection may stash.
pub fn parse_frame(buf: &mut [u8], max_payload: usize) -> Result<Option<Frame>, FrameError> {
    let mut cursor = Cursor::new(&buf[..]);
    let (header, length) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return Ok(None),
        Err(_) => return Err(FrameError::Protocol("malformed frame header")),
    };
    let header_len = cursor.position() as usize;
    let kind = frame_kind(&header, length)?;
    if length > max_payload as u64 {
        return Err(FrameError::TooBig);
    }
    let Some(mask) = header.mask else {
        return Err(FrameError::Protocol("client frame not masked"));
    };
    let end = header_len + length as usize;
    if buf.len() < end {
        return Ok(None);
    }
    unmask(&mut buf[header_len..end], mask);
    Ok(Some(Frame { kind, fin: header.is_final, payload: header_len..end, len: end }))
}

fn frame_kind(header: &FrameHeader, length: u64) -> Result<FrameKind, FrameError> {
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(FrameError::Protocol("reserved bits set"));
    }
    let kind = match header.opcode {
        OpCode::Data(Data::Text) => FrameKind::Text,
        OpCode::Data(Data::Binary) => FrameKind::Binary,
        OpCode::Data(Data::Continue) => FrameKind::Continuation,
        OpCode::Control(Control::Ping) => FrameKind::Ping,
        OpCode::Control(Control::Pong) => FrameKind::Pong,
        OpCode::Control(Control::Close) => FrameKind::Close,
        _ => return Err(FrameError::Protocol("reserved opcode")),
    };
    let control = matches!(kind, FrameKind::Ping | FrameKind::Pong | FrameKind::Close);
    if control && (!header.is_final || length > 125) {
        return Err(FrameError::Protocol("fragmented or oversized control frame"));
    }
    Ok(kind)
}

/// XORs `buf` with the 4-byte mask, eight bytes at a time.
pub fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8])) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Reassembles fragmented data messages; holds no memory between messages.
#[derive(Debug, Default)]
pub struct Reassembly {
    /// Kind and bytes of the message in progress, if any.
    partial: Option<(FrameKind, Vec<u8>)>,
}

/// What a data frame completed.
#[derive(Debug, PartialEq, Eq)]
pub enum Assembled {
    /// The frame itself is a whole message; use its payload in place.
    InPlace(FrameKind),
    /// A fragmented message completed; here are its bytes.
    Buffered(FrameKind, Vec<u8>),
    /// More fragments are needed.
    Pending,
}

impl Reassembly {
    /// Feeds one data frame (text, binary or continuation).
    pub fn push(&mut self, frame: &Frame, payload: &[u8], max: usize) -> Result<Assembled, FrameError> {
        match (frame.kind, self.partial.as_mut()) {
            (FrameKind::Continuation, None) => Err(FrameError::Protocol("continuation without message")),
            (FrameKind::Continuation, Some((_, bytes))) => {
                if bytes.len() + payload.len() > max {
                    return Err(FrameError::TooBig);
                }
                bytes.extend_from_slice(payload);
                if !frame.fin {
                    return Ok(Assembled::Pending);
                }
                let (kind, bytes) = self.partial.take().unwrap_or((FrameKind::Text, Vec::new()));
                Ok(Assembled::Buffered(kind, bytes))
            }
            (_, Some(_)) => Err(FrameError::Protocol("new message before the last one ended")),
            (kind, None) if frame.fin => Ok(Assembled::InPlace(kind)),
            (kind, None) => {
                self.partial = Some((kind, payload.to_vec()));
                Ok(Assembled::Pending)
            }
        }
    }

    /// True while a fragmented message awaits its continuation frames.
    pub fn in_progress(&self) -> bool {
        self.partial.is_some()
    }

    /// Bytes held for an incomplete message.
    pub fn held(&self) -> usize {
        self.partial.as_ref().map_or(0, |(_, b)| b.capacity())
    }
}

/// Parses a close frame payload into `(code, reason)`; empty payload means no code.
pub fn parse_close(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(FrameError::Protocol("one-byte close payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(FrameError::InvalidUtf8);
            }
            if !valid_close_code(code) {
                return Err(FrameError::Protocol("invalid close code"));
            }
            Ok(Some(code))
        }
    }
}

fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Encodes unmasked server frames. A frame is built once and shared by every recipient.
pub struct FrameEncoder;

/// Opcode byte values for server frames.
#[derive(Debug, Clone, Copy)]
pub enum OutKind {
    /// Text frame.
    Text = 0x1,
    /// Binary frame (echo endpoint only).
    Binary = 0x2,
    /// Close frame.
    Close = 0x8,
    /// Ping frame.
    Ping = 0x9,
    /// Pong frame.
    Pong = 0xA,
}

/// Largest unmasked server frame header.
pub const MAX_HEADER: usize = 10;

impl FrameEncoder {
    /// A buffer with room for the frame header, into which the caller writes the payload;
    /// finish it with [`FrameEncoder::finish`].
    pub fn start(payload_hint: usize) -> BytesMut {
        let mut buf = BytesMut::with_capacity(MAX_HEADER + payload_hint);
        buf.put_bytes(0, MAX_HEADER);
        buf
    }

    /// Writes the header in front of the payload and returns the frame.
    pub fn finish(mut buf: BytesMut, kind: OutKind) -> Bytes {
        let payload_len = buf.len() - MAX_HEADER;
        let (header, len) = header_bytes(kind, payload_len);
        let start = MAX_HEADER - len;
        buf[start..MAX_HEADER].copy_from_slice(&header[..len]);
        let mut frame = buf.freeze();
        let _ = frame.split_to(start);
        frame
    }

    /// A complete frame with the given payload.
    pub fn frame(kind: OutKind, payload: &[u8]) -> Bytes {
        let mut buf = Self::start(payload.len());
        buf.extend_from_slice(payload);
        Self::finish(buf, kind)
    }

    /// A close frame with a code and a short reason.
    pub fn close(code: u16, reason: &str) -> Bytes {
        let reason = &reason.as_bytes()[..reason.len().min(123)];
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason);
        Self::frame(OutKind::Close, &payload)
    }
}

/// The header for a frame of `len` payload bytes, formatted on the stack.
fn header_bytes(kind: OutKind, len: usize) -> ([u8; MAX_HEADER], usize) {
    let opcode = match kind {
        OutKind::Text => OpCode::Data(Data::Text),
        OutKind::Binary => OpCode::Data(Data::Binary),
        OutKind::Close => OpCode::Control(Control::Close),
        OutKind::Ping => OpCode::Control(Control::Ping),
        OutKind::Pong => OpCode::Control(Control::Pong),
    };
    let header = FrameHeader { opcode, ..FrameHeader::default() };
    let mut out = Cursor::new([0u8; MAX_HEADER]);
    // An unmasked header is at most MAX_HEADER bytes, so this cannot run out of room.
    let _ = header.format(len as u64, &mut out);
    let written = out.position() as usize;
    (out.into_inner(), written)
}

/// A client → server frame: `first_byte` (FIN, RSV, opcode), then `payload` masked with
/// `mask`. The server never sends one; tests, benches and fuzzers build their input with it.
pub fn masked_frame(first_byte: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(first_byte);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], mask);
    out
}

/// The payload of an unmasked server frame as text (test helper; short and 16-bit lengths).
#[cfg(test)]
pub(crate) fn frame_text(frame: &Bytes) -> &str {
    let header = if frame[1] & 0x7f == 126 { 4 } else { 2 };
    std::str::from_utf8(&frame[header..]).unwrap_or("<not UTF-8>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_masked_text_in_place() {
        let mut buf = masked_frame(0x81, b"hello world, longer than eight", [1, 2, 3, 4]);
        let frame = parse_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(frame.kind, FrameKind::Text);
        assert!(frame.fin);
        assert_eq!(&buf[frame.payload.clone()], b"hello world, longer than eight");
        assert_eq!(frame.len, buf.len());
    }

    #[test]
    fn incomplete_needs_more() {
        let buf = masked_frame(0x81, &[b'x'; 300], [9, 8, 7, 6]);
        for cut in [0, 1, 2, 3, 5, 8, 100, buf.len() - 1] {
            let mut part = buf[..cut].to_vec();
            assert_eq!(parse_frame(&mut part, 1024), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn rejects_hostile_frames() {
        let mut unmasked = vec![0x81, 0x02, b'h', b'i'];
        assert!(matches!(parse_frame(&mut unmasked, 1024), Err(FrameError::Protocol(_))));
        let mut rsv = masked_frame(0xC1, b"x", [1, 1, 1, 1]);
        assert!(matches!(parse_frame(&mut rsv, 1024), Err(FrameError::Protocol(_))));
        let mut reserved_op = masked_frame(0x83, b"x", [1, 1, 1, 1]);
        assert!(matches!(parse_frame(&mut reserved_op, 1024), Err(FrameError::Protocol(_))));
        let mut frag_ping = masked_frame(0x09, b"x", [1, 1, 1, 1]);
        assert!(matches!(parse_frame(&mut frag_ping, 1024), Err(FrameError::Protocol(_))));
        let mut big_ping = masked_frame(0x89, &[0; 126], [1, 1, 1, 1]);
        assert!(matches!(parse_frame(&mut big_ping, 1024), Err(FrameError::Protocol(_))));
    }

    #[test]
    fn announced_size_over_limit_fails_before_payload_arrives() {
        // A header announcing 1 GiB: rejected from the header alone.
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 30).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(parse_frame(&mut header, 65536), Err(FrameError::TooBig));
    }

    #[test]
    fn reassembles_fragments_and_enforces_order_and_size() {
        let mut r = Reassembly::default();
        let f = |kind, fin| Frame { kind, fin, payload: 0..0, len: 0 };
        assert_eq!(r.push(&f(FrameKind::Text, false), b"ab", 10), Ok(Assembled::Pending));
        assert!(r.push(&f(FrameKind::Text, true), b"x", 10).is_err());
        assert_eq!(r.push(&f(FrameKind::Continuation, false), b"cd", 10), Ok(Assembled::Pending));
        assert_eq!(
            r.push(&f(FrameKind::Continuation, true), b"e", 10),
            Ok(Assembled::Buffered(FrameKind::Text, b"abcde".to_vec()))
        );
        assert_eq!(r.held(), 0);
        assert!(r.push(&f(FrameKind::Continuation, true), b"e", 10).is_err());
        assert_eq!(r.push(&f(FrameKind::Text, true), b"z", 10), Ok(Assembled::InPlace(FrameKind::Text)));
        r.push(&f(FrameKind::Binary, false), b"123456", 10).unwrap();
        assert_eq!(r.push(&f(FrameKind::Continuation, true), b"7890x", 10), Err(FrameError::TooBig));
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close(b""), Ok(None));
        assert!(parse_close(b"\x03").is_err());
        assert_eq!(parse_close(b"\x03\xe8bye"), Ok(Some(1000)));
        assert!(parse_close(b"\x03\xecx").is_err()); // 1004 reserved
        assert!(parse_close(b"\x03\xe8\xff").is_err()); // bad UTF-8 reason
    }

    #[test]
    fn encodes_each_length_form() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let frame = FrameEncoder::frame(OutKind::Text, &vec![b'a'; len]);
            let mut cursor = Cursor::new(&frame[..]);
            let (header, parsed_len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert_eq!(parsed_len as usize, len);
            assert!(header.is_final && header.mask.is_none());
            assert_eq!(frame.len(), cursor.position() as usize + len);
        }
        let close = FrameEncoder::close(1001, "shutdown");
        assert_eq!(&close[..4], &[0x88, 10, 0x03, 0xe9]);
    }
}

//! Client → server framing as the shard reads it: a byte stream (either raw bytes or a list of
//! described frames, encoded here with any mask, length form or lie) cut into arbitrary reads,
//! parsed with `parse_frame`, data frames fed to `Reassembly`, close payloads to `parse_close`.
//!
//! Invariants beyond "no panic":
//! - a connection never stashes more than `max + 14` bytes of an incomplete frame, and a
//!   fragmented message never holds more than `max` bytes (plus `Vec` growth slack);
//! - a parsed frame lies inside the buffer; a control frame is final and at most 125 bytes;
//! - how the bytes are cut into reads changes nothing: same frames, same messages, same error;
//! - described frames come back exactly as described (unmasked payload, kind, FIN), and a
//!   reassembled message is the concatenation of its fragments;
//! - described frames that break a rule fail with the right class of error.
#![no_main]

use arbitrary::Arbitrary;
use customws::ws::frame::{Assembled, FrameError, FrameKind, Reassembly, parse_close, parse_frame};
use libfuzzer_sys::fuzz_target;

/// Largest frame header a client may send: 2 + 8 (length) + 4 (mask).
const MAX_CLIENT_HEADER: usize = 14;

#[derive(Debug, Arbitrary)]
struct Input {
    /// `max_message_size`; the server refuses less than 125.
    max: u16,
    /// Sizes of successive reads (cycled); 0 means "the rest".
    reads: Vec<u16>,
    stream: Stream,
}

#[derive(Debug, Arbitrary)]
enum Stream {
    Raw(Vec<u8>),
    Frames(Vec<FrameSpec>),
}

#[derive(Debug, Arbitrary)]
struct FrameSpec {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    /// 0: shortest length form; 1: always 16-bit; 2: always 64-bit; 3: announce `lie`.
    length_form: u8,
    lie: u64,
    payload: Vec<u8>,
}

/// What the reader observed, compared across read patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Frame { kind: FrameKind, fin: bool, payload: Vec<u8> },
    Message { kind: FrameKind, bytes: Vec<u8> },
    Close(Result<Option<u16>, FrameError>),
    Error(FrameError),
}

fuzz_target!(|input: Input| {
    let max = usize::from(input.max).max(125);
    let (stream, specs) = match &input.stream {
        Stream::Raw(bytes) => (bytes.clone(), None),
        Stream::Frames(specs) => (encode(specs), Some(specs)),
    };
    let at_once = read_stream(&stream, &[], max);
    let in_pieces = read_stream(&stream, &input.reads, max);
    assert_eq!(at_once, in_pieces, "the read pattern changed what was parsed");
    let byte_by_byte = read_stream(&stream, &[1], max);
    assert_eq!(at_once, byte_by_byte, "byte-by-byte reads changed what was parsed");
    if let Some(specs) = specs {
        check_against_specs(specs, &at_once, max);
    }
});

/// The shard's read path: parse straight from the read buffer, stash an incomplete tail,
/// append the next read to the stash. Stops at the first error, as the connection does.
fn read_stream(stream: &[u8], reads: &[u16], max: usize) -> Vec<Event> {
    let mut events = Vec::new();
    let mut reassembly = Reassembly::default();
    let mut stash: Vec<u8> = Vec::new();
    let mut pos = 0;
    let mut turn = 0;
    while pos < stream.len() {
        let want = reads.get(turn % reads.len().max(1)).map_or(0, |&n| usize::from(n));
        turn += 1;
        let end = if want == 0 { stream.len() } else { (pos + want).min(stream.len()) };
        let mut buf = std::mem::take(&mut stash);
        buf.extend_from_slice(&stream[pos..end]);
        pos = end;
        let (used, failed) = on_frames(&mut buf, max, &mut reassembly, &mut events);
        if failed {
            return events;
        }
        stash = buf.split_off(used);
        assert!(
            stash.len() < max + MAX_CLIENT_HEADER,
            "{} bytes stashed for an incomplete frame with max {max}",
            stash.len()
        );
        assert!(reassembly.held() <= 2 * max + 8, "reassembly holds {} bytes, max {max}", reassembly.held());
    }
    events
}

fn on_frames(
    buf: &mut [u8],
    max: usize,
    reassembly: &mut Reassembly,
    events: &mut Vec<Event>,
) -> (usize, bool) {
    let mut pos = 0;
    while pos < buf.len() {
        let rest = &mut buf[pos..];
        let available = rest.len();
        let frame = match parse_frame(rest, max) {
            Ok(None) => {
                assert!(available < max + MAX_CLIENT_HEADER, "{available} bytes are not enough for a frame");
                break;
            }
            Ok(Some(frame)) => frame,
            Err(e) => {
                events.push(Event::Error(e));
                return (pos, true);
            }
        };
        assert!(frame.len <= available && frame.payload.end == frame.len);
        assert!(frame.payload.start <= frame.payload.end && frame.payload.start <= MAX_CLIENT_HEADER);
        let payload = rest[frame.payload.clone()].to_vec();
        assert!(payload.len() <= max);
        pos += frame.len;
        let control = matches!(frame.kind, FrameKind::Ping | FrameKind::Pong | FrameKind::Close);
        if control {
            assert!(frame.fin && payload.len() <= 125, "bad control frame accepted: {frame:?}");
        }
        events.push(Event::Frame { kind: frame.kind, fin: frame.fin, payload: payload.clone() });
        if frame.kind == FrameKind::Close {
            let close = parse_close(&payload);
            events.push(Event::Close(close));
            // The connection stops reading frames after a close.
            return (pos, true);
        }
        if control {
            continue;
        }
        match reassembly.push(&frame, &payload, max) {
            Ok(Assembled::InPlace(kind)) => events.push(Event::Message { kind, bytes: payload }),
            Ok(Assembled::Buffered(kind, bytes)) => {
                assert!(bytes.len() <= max, "a {}-byte message passed max {max}", bytes.len());
                events.push(Event::Message { kind, bytes });
            }
            Ok(Assembled::Pending) => {}
            Err(e) => {
                events.push(Event::Error(e));
                return (pos, true);
            }
        }
    }
    (pos, false)
}

fn encode(specs: &[FrameSpec]) -> Vec<u8> {
    let mut out = Vec::new();
    for spec in specs {
        out.push(u8::from(spec.fin) << 7 | (spec.rsv & 0x7) << 4 | spec.opcode & 0xf);
        let mask_bit = if spec.mask.is_some() { 0x80 } else { 0 };
        let len = spec.payload.len() as u64;
        match spec.length_form % 4 {
            0 if len < 126 => out.push(mask_bit | len as u8),
            0 | 1 if len < 65536 => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            3 => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&spec.lie.to_be_bytes());
            }
            _ => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        let mut payload = spec.payload.clone();
        if let Some(mask) = spec.mask {
            out.extend_from_slice(&mask);
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        out.extend_from_slice(&payload);
    }
    out
}

/// Replays the described frames through a reference reading of RFC 6455 and compares.
fn check_against_specs(specs: &[FrameSpec], events: &[Event], max: usize) {
    let mut expected = Vec::new();
    let mut partial: Option<(FrameKind, Vec<u8>)> = None;
    for spec in specs {
        if spec.length_form % 4 == 3 && spec.lie != spec.payload.len() as u64 {
            return; // the stream no longer lines up with the descriptions
        }
        let kind = match spec.opcode & 0xf {
            0x0 => Some(FrameKind::Continuation),
            0x1 => Some(FrameKind::Text),
            0x2 => Some(FrameKind::Binary),
            0x8 => Some(FrameKind::Close),
            0x9 => Some(FrameKind::Ping),
            0xA => Some(FrameKind::Pong),
            _ => None,
        };
        let control = matches!(kind, Some(FrameKind::Close | FrameKind::Ping | FrameKind::Pong));
        let Some(kind) = kind.filter(|_| spec.rsv & 0x7 == 0) else {
            return expect_error(events, &expected, "protocol");
        };
        if control && (!spec.fin || spec.payload.len() > 125) {
            return expect_error(events, &expected, "protocol");
        }
        if spec.payload.len() > max {
            return expect_error(events, &expected, "too big");
        }
        if spec.mask.is_none() {
            return expect_error(events, &expected, "protocol");
        }
        expected.push(Event::Frame { kind, fin: spec.fin, payload: spec.payload.clone() });
        if kind == FrameKind::Close {
            expected.push(Event::Close(parse_close(&spec.payload)));
            break;
        }
        if control {
            continue;
        }
        match (kind, partial.take()) {
            (FrameKind::Continuation, None) => return expect_error(events, &expected, "protocol"),
            (FrameKind::Continuation, Some((first, mut bytes))) => {
                if bytes.len() + spec.payload.len() > max {
                    return expect_error(events, &expected, "too big");
                }
                bytes.extend_from_slice(&spec.payload);
                if spec.fin {
                    expected.push(Event::Message { kind: first, bytes });
                } else {
                    partial = Some((first, bytes));
                }
            }
            (_, Some(_)) => return expect_error(events, &expected, "protocol"),
            (kind, None) if spec.fin => expected.push(Event::Message { kind, bytes: spec.payload.clone() }),
            (kind, None) => partial = Some((kind, spec.payload.clone())),
        }
    }
    assert_eq!(events, &expected[..], "frames did not come back as described");
}

fn expect_error(events: &[Event], before: &[Event], class: &str) {
    assert_eq!(&events[..events.len().saturating_sub(1)], before, "events before the {class} error");
    let got = events.last();
    let ok = matches!(
        (class, got),
        ("protocol", Some(Event::Error(FrameError::Protocol(_))))
            | ("too big", Some(Event::Error(FrameError::TooBig)))
    );
    assert!(ok, "expected a {class} error after {} events, got {got:?}", before.len());
}

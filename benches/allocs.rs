//! Heap allocations per delivered message, counted by a global allocator that wraps
//! [`System`] and counts every `alloc`, `alloc_zeroed` and `realloc` (calls and bytes).
//!
//! Three measurements, all on the sans-IO hot paths, each repeated [`ROUNDS`] times with the
//! per-round minimum and maximum reported (equal when the count is exact):
//! - **broadcast**: one `data_event` frame encode (100-byte payload), then `push(frame.clone())`
//!   into 1,000 `OutQueue`s that were pre-warmed (pushed and flushed once, so their `VecDeque`
//!   has capacity). Goal: 0 allocations per recipient.
//! - **P2P**: `ClientMessage::parse` + `route` + `data_event` + `server_ack(pid, "delivered")`,
//!   plus the two pushes into pre-warmed queues, for payloads of 10, 100 and 1000 bytes.
//!   Goal: a constant number, not growing with the payload.
//! - **frame parse**: `parse_frame` of a masked client text frame, unmasked in place. Goal: 0.
//!
//! - **handshake** (issue 15): `request::parse` (httparse + header extraction), `Gate::decide`
//!   (upgrade checks, token lookup, HS256 verification) and the 101 response, on the load
//!   generator's upgrade request.
//!
//! Run with `cargo bench --bench allocs`; prints one JSON object, then a table.
//!
//! `cargo bench --bench allocs -- --loop ROUTINE SHAPE N` instead runs one routine N times and
//! nothing else, for instruction counts under callgrind (repeatable on a loaded machine):
//! `valgrind --tool=callgrind target/release/deps/allocs-… --loop serde_parse_route p2p_4KB 1000`
//! minus the same with N = 0, divided by N. Routines: `serde_parse_only`, `serde_parse_route`,
//! `simd_copy_tape`,
//! `simd_copy_dom_reencode` (SHAPE: `p2p_100B`, `presence`, `room_publish`, `p2p_4KB`), and
//! `handshake_parse`, `handshake_decide`, `handshake_101` (SHAPE ignored).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use customws::protocol::ClientMessage;
use customws::protocol::envelope::{data_event, server_ack};
use customws::protocol::router::{Route, SenderCaps, route};
use customws::shard::conn::OutQueue;
use customws::ws::frame::{FrameKind, parse_frame};
use serde_json::{Value, json};

#[path = "support/messages.rs"]
mod messages;
use messages::{masked_text_frame, p2p_message, payload};
#[path = "support/handshake.rs"]
#[allow(dead_code)]
mod handshake;

/// Times each measurement is repeated.
const ROUNDS: usize = 1_000;
/// Recipients of one broadcast.
const RECIPIENTS: usize = 1_000;
/// Payload sizes of the P2P and frame-parse measurements.
const SIZES: [usize; 3] = [10, 100, 1000];
/// The largest payload `parse_frame` accepts here.
const MAX_PAYLOAD: usize = 64 * 1024;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// [`System`], counting allocation calls and requested bytes.
struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// counters are atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc`, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc_zeroed`, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        REALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size.saturating_sub(layout.size()) as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc`, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Counter values at one instant; differences of two are what a piece of code allocated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    /// `alloc` + `alloc_zeroed` calls.
    allocs: u64,
    /// `realloc` calls.
    reallocs: u64,
    /// Bytes requested (for `realloc`, the growth).
    bytes: u64,
}

impl Counts {
    fn now() -> Self {
        Counts {
            allocs: ALLOCS.load(Ordering::Relaxed),
            reallocs: REALLOCS.load(Ordering::Relaxed),
            bytes: BYTES.load(Ordering::Relaxed),
        }
    }

    fn since(self, start: Counts) -> Counts {
        Counts {
            allocs: self.allocs - start.allocs,
            reallocs: self.reallocs - start.reallocs,
            bytes: self.bytes - start.bytes,
        }
    }

    /// Heap calls that may allocate: `alloc`, `alloc_zeroed` and `realloc`.
    fn calls(self) -> u64 {
        self.allocs + self.reallocs
    }
}

/// Per-round counts of one measured step, summarised.
#[derive(Debug, Default)]
struct Stat {
    rounds: Vec<Counts>,
}

impl Stat {
    fn add(&mut self, c: Counts) {
        self.rounds.push(c);
    }

    fn min_calls(&self) -> u64 {
        self.rounds.iter().map(|c| c.calls()).min().unwrap_or(0)
    }

    fn max_calls(&self) -> u64 {
        self.rounds.iter().map(|c| c.calls()).max().unwrap_or(0)
    }

    fn mean_calls(&self) -> f64 {
        self.rounds.iter().map(|c| c.calls()).sum::<u64>() as f64 / self.rounds.len().max(1) as f64
    }

    fn mean_bytes(&self) -> f64 {
        self.rounds.iter().map(|c| c.bytes).sum::<u64>() as f64 / self.rounds.len().max(1) as f64
    }

    fn reallocs(&self) -> u64 {
        self.rounds.iter().map(|c| c.reallocs).sum()
    }

    fn json(&self) -> Value {
        json!({
            "min": self.min_calls(),
            "max": self.max_calls(),
            "mean": self.mean_calls(),
            "bytes_mean": self.mean_bytes(),
            "reallocs_total": self.reallocs(),
        })
    }
}

/// A queue that has pushed and flushed once, as a connection's queue in a running shard.
fn warm_queue(frame: &Bytes) -> OutQueue {
    let mut q = OutQueue::default();
    q.push(frame.clone());
    drain(&mut q);
    q
}

fn drain(q: &mut OutQueue) {
    q.flush(&mut std::io::sink()).expect("the sink accepts everything");
}

struct Broadcast {
    /// Encode with a realistic sender id (`fromUserId` 777001).
    encode: Stat,
    /// Encode with a sender id of at most two digits (the envelope fits the size hint).
    encode_small_id: Stat,
    pushes: Stat,
}

/// The sender of every measured message: a realistic (six-digit) user id.
const FROM: i64 = 777_001;

fn broadcast() -> Broadcast {
    let body = payload(100);
    let first = data_event(1, Some(&body));
    let mut queues: Vec<OutQueue> = (0..RECIPIENTS).map(|_| warm_queue(&first)).collect();
    drop(first);
    let mut result =
        Broadcast { encode: Stat::default(), encode_small_id: Stat::default(), pushes: Stat::default() };
    for _ in 0..ROUNDS {
        let t0 = Counts::now();
        let small = data_event(black_box(7), Some(black_box(&body[..])));
        result.encode_small_id.add(Counts::now().since(t0));
        drop(small);
        let t0 = Counts::now();
        let frame = data_event(black_box(FROM), Some(black_box(&body[..])));
        let t1 = Counts::now();
        for q in &mut queues {
            q.push(black_box(&frame).clone());
        }
        let t2 = Counts::now();
        result.encode.add(t1.since(t0));
        result.pushes.add(t2.since(t1));
        drop(frame);
        queues.iter_mut().for_each(drain);
    }
    result
}

struct P2p {
    size: usize,
    parse_route: Stat,
    data_event: Stat,
    server_ack: Stat,
    pushes: Stat,
    total: Stat,
}

fn p2p(size: usize) -> P2p {
    let raw = p2p_message(&payload(size));
    let warm = data_event(1, Some(b"{}"));
    let mut receiver = warm_queue(&warm);
    let mut sender = warm_queue(&warm);
    drop(warm);
    let caps = SenderCaps { can_broadcast: false, ..Default::default() };
    let mut r = P2p {
        size,
        parse_route: Stat::default(),
        data_event: Stat::default(),
        server_ack: Stat::default(),
        pushes: Stat::default(),
        total: Stat::default(),
    };
    for _ in 0..ROUNDS {
        let t0 = Counts::now();
        let msg = ClientMessage::parse(black_box(&raw)).expect("valid envelope");
        let Route::P2p { target, payload } = route(&msg, caps) else {
            panic!("the message must route as P2P");
        };
        let t1 = Counts::now();
        let event = data_event(FROM, payload);
        let t2 = Counts::now();
        let ack = server_ack(msg.pid.as_deref().unwrap_or_default(), "delivered");
        let t3 = Counts::now();
        receiver.push(event);
        sender.push(ack);
        let t4 = Counts::now();
        black_box(target);
        r.parse_route.add(t1.since(t0));
        r.data_event.add(t2.since(t1));
        r.server_ack.add(t3.since(t2));
        r.pushes.add(t4.since(t3));
        r.total.add(t4.since(t0));
        drain(&mut receiver);
        drain(&mut sender);
    }
    r
}

fn frame_parse(size: usize) -> Stat {
    let body = payload(size);
    let mut buf = masked_text_frame(&body);
    let mut stat = Stat::default();
    for _ in 0..ROUNDS {
        let t0 = Counts::now();
        // Unmasks in place; the header is untouched, so the same buffer parses again next
        // round (its payload alternates masked / unmasked).
        let frame = parse_frame(black_box(&mut buf[..]), MAX_PAYLOAD);
        let t1 = Counts::now();
        let frame = frame.expect("valid frame").expect("complete frame");
        assert_eq!((frame.kind, frame.len), (FrameKind::Text, buf.len()));
        stat.add(t1.since(t0));
    }
    stat
}

struct Handshake {
    parse: Stat,
    decide: Stat,
    response: Stat,
    total: Stat,
}

fn handshake() -> Handshake {
    use customws::http::Decision;
    use customws::http::request::{Parsed, parse};
    use customws::http::response::switching_protocols;

    let head = handshake::upgrade_head(&handshake::token(777_001));
    let gate = handshake::gate();
    let mut h = Handshake {
        parse: Stat::default(),
        decide: Stat::default(),
        response: Stat::default(),
        total: Stat::default(),
    };
    for _ in 0..ROUNDS {
        let t0 = Counts::now();
        let Parsed::Complete(request, _) = parse(black_box(&head)) else { panic!("the head parses") };
        let t1 = Counts::now();
        let decision = gate.decide(&request);
        let t2 = Counts::now();
        let response = switching_protocols(request.ws_key.as_deref().unwrap_or(""), None);
        let t3 = Counts::now();
        assert!(matches!(decision, Decision::Upgrade { jwt: Ok(_), .. }), "the token verifies");
        black_box(response);
        h.parse.add(t1.since(t0));
        h.decide.add(t2.since(t1));
        h.response.add(t3.since(t2));
        h.total.add(t3.since(t0));
    }
    h
}

/// `--loop ROUTINE SHAPE N` (see the module documentation).
fn run_loop(routine: &str, shape: &str, n: usize) {
    use customws::http::request::{Parsed, parse};
    use customws::http::response::switching_protocols;
    let raw = handshake::envelope_shapes()
        .into_iter()
        .find(|(name, _)| *name == shape)
        .map(|(_, raw)| raw)
        .unwrap_or_default();
    let mut scratch = raw.clone();
    let mut buffers = simd_json::Buffers::new(raw.len());
    let head = handshake::upgrade_head(&handshake::token(777_001));
    let gate = handshake::gate();
    let Parsed::Complete(request, _) = parse(&head) else { panic!("the head parses") };
    for _ in 0..n {
        match routine {
            "serde_parse_route" => {
                let msg = ClientMessage::parse(black_box(&raw)).expect("valid envelope");
                black_box(matches!(route(&msg, SenderCaps::default()), Route::Reject { .. }));
            }
            "serde_parse_only" => {
                let msg = ClientMessage::parse(black_box(&raw)).expect("valid envelope");
                black_box(msg.payload_bytes().map(<[u8]>::len));
            }
            "simd_copy_tape" => {
                scratch.copy_from_slice(black_box(&raw));
                black_box(
                    simd_json::to_tape_with_buffers(&mut scratch, &mut buffers).map(|t| t.0.len()).ok(),
                );
            }
            "simd_copy_dom_reencode" => {
                use simd_json::prelude::*;
                scratch.copy_from_slice(black_box(&raw));
                let value =
                    simd_json::to_borrowed_value_with_buffers(&mut scratch, &mut buffers).expect("parses");
                black_box((value.get_str("type"), value.get_str("pid"), value.get_i64("targetUserId")));
                black_box(value.get("payload").map(|p| p.encode()));
            }
            "handshake_parse" => {
                black_box(matches!(parse(black_box(&head)), Parsed::Complete(..)));
            }
            "handshake_decide" => {
                black_box(gate.decide(black_box(&request)));
            }
            "handshake_101" => {
                black_box(switching_protocols(black_box("dGhlIHNhbXBsZSBub25jZQ=="), None));
            }
            other => panic!("unknown routine {other}"),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--loop") {
        let arg = |i: usize| args.get(at + i).map(String::as_str).unwrap_or("");
        run_loop(arg(1), arg(2), arg(3).parse().expect("--loop ROUTINE SHAPE N"));
        return;
    }
    let hs = handshake();
    let bcast = broadcast();
    let p2ps: Vec<P2p> = SIZES.iter().map(|&size| p2p(size)).collect();
    let frames: Vec<(usize, Stat)> = SIZES.iter().map(|&size| (size, frame_parse(size))).collect();

    let push_total = bcast.pushes.rounds.iter().map(|c| c.calls()).sum::<u64>();
    let per_recipient = push_total as f64 / (ROUNDS * RECIPIENTS) as f64;
    let p2p_totals: Vec<u64> = p2ps.iter().map(|p| p.total.max_calls()).collect();
    let p2p_constant = p2ps.iter().all(|p| p.total.min_calls() == p.total.max_calls())
        && p2p_totals.windows(2).all(|w| w[0] == w[1]);
    let frame_zero = frames.iter().all(|(_, s)| s.max_calls() == 0);

    let report = json!({
        "bench": "allocs",
        "rounds": ROUNDS,
        "counted": "alloc + alloc_zeroed + realloc calls; bytes = requested (realloc: growth)",
        "broadcast": {
            "payload_bytes": 100,
            "recipients": RECIPIENTS,
            "from_user_id": FROM,
            "frame_encode": bcast.encode.json(),
            "frame_encode_from_user_id_7": bcast.encode_small_id.json(),
            "pushes_per_broadcast": bcast.pushes.json(),
            "allocs_per_recipient": per_recipient,
        },
        "p2p": p2ps.iter().map(|p| json!({
            "payload_bytes": p.size,
            "parse_route": p.parse_route.json(),
            "data_event": p.data_event.json(),
            "server_ack": p.server_ack.json(),
            "queue_pushes": p.pushes.json(),
            "total": p.total.json(),
        })).collect::<Vec<_>>(),
        "frame_parse": frames.iter().map(|(size, s)| json!({
            "payload_bytes": size,
            "allocs": s.json(),
        })).collect::<Vec<_>>(),
        "handshake": {
            "request_parse": hs.parse.json(),
            "gate_decide_with_hs256": hs.decide.json(),
            "switching_protocols": hs.response.json(),
            "total": hs.total.json(),
        },
        "goals": {
            "broadcast_zero_per_recipient": per_recipient == 0.0,
            "p2p_constant_across_sizes": p2p_constant,
            "frame_parse_zero": frame_zero,
        },
    });
    println!("{report}");
    println!();

    let row = |what: &str, s: &Stat| {
        let exact = if s.min_calls() == s.max_calls() {
            format!("{}", s.min_calls())
        } else {
            format!("{}..{}", s.min_calls(), s.max_calls())
        };
        println!("{what:<44} {exact:>9} {:>10.1}", s.mean_bytes());
    };
    println!("{:<44} {:>9} {:>10}", "path (per round, min..max over rounds)", "allocs", "bytes");
    println!("{}", "-".repeat(65));
    row("broadcast 100 B: frame encode (once)", &bcast.encode);
    row("  same, fromUserId 7 (fits the size hint)", &bcast.encode_small_id);
    row("broadcast 100 B: 1,000 pushes of clones", &bcast.pushes);
    println!("{:<44} {:>9.4} {:>10}", "broadcast 100 B: per recipient", per_recipient, "");
    for p in &p2ps {
        let size = p.size;
        row(&format!("p2p {size} B: parse + route"), &p.parse_route);
        row(&format!("p2p {size} B: data_event"), &p.data_event);
        row(&format!("p2p {size} B: server_ack"), &p.server_ack);
        row(&format!("p2p {size} B: 2 pushes (warm queues)"), &p.pushes);
        row(&format!("p2p {size} B: total per message"), &p.total);
    }
    for (size, s) in &frames {
        row(&format!("parse_frame {size} B (in place)"), s);
    }
    row("handshake: request parse", &hs.parse);
    row("handshake: gate decide (HS256 verify)", &hs.decide);
    row("handshake: 101 response", &hs.response);
    row("handshake: total", &hs.total);
}

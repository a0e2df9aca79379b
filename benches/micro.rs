//! Micro-benchmarks (criterion) of the connection tier's per-message hot paths, all sans-IO:
//!
//! - `envelope_decode`: `ClientMessage::parse` of a P2P `data_request` with a ~100-byte
//!   payload, alone and followed by the router's decision (`route`).
//! - `p2p_splice_encode`: `data_event` splicing the sender's payload bytes into a frame.
//! - `broadcast`: the one-per-message frame encode of a 100-byte payload, and the
//!   per-recipient cost of queueing it: `OutQueue::push(frame.clone())` into 1,000 queues
//!   (throughput is reported per recipient).
//! - `frame_parse`: `parse_frame` of a masked 100-byte client text frame, unmasked in place.
//! - `timer_wheel`: insert, expire, and insert + expire, reported per entry. The wheel has no
//!   cancel: stale entries are ignored when they fire (see `core::timer`).
//! - `directory`: `shards_of` and `local` lookups with 100,000 users populated.
//!
//! - `handshake` (issue 15): each step of a WebSocket handshake the server takes, on the load
//!   generator's request: `httparse` alone, `request::parse` (httparse + header extraction),
//!   `Gate::decide` (upgrade checks, token lookup, HS256 verification), the HS256 verification
//!   alone, the `Sec-WebSocket-Accept` key (SHA-1 + base64), the whole 101 response, and all of
//!   them together.
//! - `envelope_json` (issue 15): serde_json as the server uses it (`ClientMessage::parse` +
//!   `route`, payloads borrowed as raw bytes) against simd-json on the real envelope shapes:
//!   a structural parse only (`to_tape`), and a DOM parse plus re-encoding the payload, which is
//!   what relaying would need since simd-json keeps no raw spans. simd-json parses in place, so
//!   each iteration first copies the message into a scratch buffer (counted: the frame's bytes
//!   are needed intact for byte-for-byte relaying).
//!
//! Run with `cargo bench --bench micro` (about 60 s); criterion's output is the result.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use customws::core::{ConnKey, Directory, TimerWheel};
use customws::protocol::ClientMessage;
use customws::protocol::envelope::data_event;
use customws::protocol::router::{Route, SenderCaps, route};
use customws::shard::conn::OutQueue;
use customws::ws::frame::{FrameKind, parse_frame};

#[path = "support/messages.rs"]
mod messages;
use messages::{masked_text_frame, p2p_message, payload};
#[path = "support/handshake.rs"]
mod handshake;

/// The sender of every encoded message: a realistic (six-digit) user id.
const FROM: i64 = 777_001;
/// Recipients of one broadcast in the fan-out benchmark.
const RECIPIENTS: usize = 1_000;
/// Users in the directory benchmark.
const USERS: i64 = 100_000;
/// Entries per timer-wheel batch.
const TIMERS: usize = 4_096;
/// Timer wheel geometry: the shard's defaults (10 ms tick, 4096 slots).
const TICK_MS: u64 = 10;
const SLOTS: usize = 4_096;
/// The largest payload `parse_frame` accepts in the benchmark.
const MAX_PAYLOAD: usize = 64 * 1024;

fn envelope_decode(c: &mut Criterion) {
    let raw = p2p_message(&payload(100));
    // The message decodes and routes as P2P, or the benchmark measures the wrong path.
    let msg = ClientMessage::parse(&raw).expect("valid envelope");
    assert!(matches!(route(&msg, SenderCaps::default()), Route::P2p { target: 12345, .. }));

    let mut group = c.benchmark_group("envelope_decode");
    group.throughput(Throughput::Bytes(raw.len() as u64));
    group.bench_function("parse_p2p_100B", |b| {
        b.iter(|| ClientMessage::parse(black_box(&raw)).map(|m| m.target()).ok())
    });
    group.bench_function("parse_and_route_p2p_100B", |b| {
        b.iter(|| {
            let msg = ClientMessage::parse(black_box(&raw)).ok()?;
            match route(&msg, SenderCaps { can_broadcast: false, ..Default::default() }) {
                Route::P2p { target, payload } => Some((target, payload.map(<[u8]>::len))),
                _ => None,
            }
        })
    });
    group.finish();
}

fn p2p_splice_encode(c: &mut Criterion) {
    let body = payload(100);
    let mut group = c.benchmark_group("p2p_splice_encode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("data_event_100B", |b| {
        b.iter(|| data_event(black_box(FROM), Some(black_box(&body[..]))))
    });
    group.finish();
}

fn broadcast(c: &mut Criterion) {
    let body = payload(100);
    let mut group = c.benchmark_group("broadcast");

    group.throughput(Throughput::Elements(1));
    group.bench_function("frame_encode_100B", |b| {
        b.iter(|| data_event(black_box(FROM), Some(black_box(&body[..]))))
    });

    // Queues warmed as in a running shard: each has pushed and flushed a frame before, so its
    // VecDeque already has capacity.
    let frame: Bytes = data_event(FROM, Some(&body));
    let mut queues: Vec<OutQueue> = (0..RECIPIENTS).map(|_| OutQueue::default()).collect();
    for q in &mut queues {
        q.push(frame.clone());
        q.flush(&mut std::io::sink()).expect("sink accepts everything");
    }
    group.throughput(Throughput::Elements(RECIPIENTS as u64));
    group.bench_function("push_clone_1000_recipients", |b| {
        // Only the pushes are timed; emptying the queues for the next round is not.
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                for q in &mut queues {
                    q.push(black_box(&frame).clone());
                }
                total += start.elapsed();
                for q in &mut queues {
                    q.discard_unsent();
                }
            }
            total
        })
    });
    group.finish();
}

fn frame_parse(c: &mut Criterion) {
    let body = payload(100);
    let mut buf = masked_text_frame(&body);
    let frame = parse_frame(&mut buf, MAX_PAYLOAD).expect("valid frame").expect("complete frame");
    assert_eq!(frame.kind, FrameKind::Text);
    assert_eq!(&buf[frame.payload.clone()], &body[..]);

    let mut group = c.benchmark_group("frame_parse");
    group.throughput(Throughput::Bytes(buf.len() as u64));
    group.bench_function("masked_text_100B", |b| {
        // Parsing unmasks in place and leaves the header as it was, so the same buffer is
        // parsed again on the next iteration (its payload alternates masked / unmasked).
        b.iter(|| parse_frame(black_box(&mut buf[..]), MAX_PAYLOAD).ok().flatten().map(|f| f.len))
    });
    group.finish();
}

/// A wheel that walks forward in time: each round schedules [`TIMERS`] entries, two per tick,
/// over the [`TIMERS`]/2 ticks after `now`, and a round ends `span` later, when all have fired.
struct WheelRound {
    wheel: TimerWheel<u32>,
    now: u64,
    due: Vec<u32>,
}

impl WheelRound {
    const SPAN: u64 = (TIMERS as u64 / 2 + 1) * TICK_MS;

    fn new() -> Self {
        let mut round =
            WheelRound { wheel: TimerWheel::new(TICK_MS, SLOTS, 0), now: 0, due: Vec::with_capacity(TIMERS) };
        // One untimed round so every slot's Vec and `due` have their capacity.
        round.insert_all();
        round.expire_all();
        round
    }

    fn insert_all(&mut self) {
        for i in 0..TIMERS as u64 {
            let deadline = self.now + 1 + (i / 2) * TICK_MS;
            self.wheel.insert(black_box(deadline), i as u32);
        }
    }

    fn expire_all(&mut self) {
        self.now += Self::SPAN;
        self.due.clear();
        self.wheel.expire(black_box(self.now), &mut self.due);
        debug_assert_eq!(self.due.len(), TIMERS);
        debug_assert!(self.wheel.is_empty());
    }
}

fn timer_wheel(c: &mut Criterion) {
    let mut group = c.benchmark_group("timer_wheel");
    group.throughput(Throughput::Elements(TIMERS as u64));

    group.bench_function("insert_4096", |b| {
        let mut round = WheelRound::new();
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                round.insert_all();
                total += start.elapsed();
                round.expire_all();
            }
            total
        })
    });

    group.bench_function("expire_4096", |b| {
        let mut round = WheelRound::new();
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                round.insert_all();
                let start = Instant::now();
                round.expire_all();
                total += start.elapsed();
            }
            total
        })
    });

    group.bench_function("insert_expire_4096", |b| {
        let mut round = WheelRound::new();
        b.iter(|| {
            round.insert_all();
            round.expire_all();
            round.due.len()
        })
    });
    group.finish();
}

fn directory(c: &mut Criterion) {
    let mut dir = Directory::default();
    for user in 1..=USERS {
        dir.add_local(user, ConnKey { index: user as u32, generation: 1 });
        dir.set_replica(user, (user % 2) as usize, true);
    }
    assert_eq!(dir.users_online(), USERS as usize);

    // Users visited in a scattered order (a stride coprime with USERS), not sequentially.
    let mut next = {
        let mut user = 0i64;
        move || {
            user = (user + 7_919) % USERS;
            user + 1
        }
    };

    let mut group = c.benchmark_group("directory_100k_users");
    group.throughput(Throughput::Elements(1));
    group.bench_function("shards_of", |b| b.iter(|| dir.shards_of(black_box(next()))));
    group.bench_function("local", |b| b.iter(|| dir.local(black_box(next())).len()));
    group.finish();
}

fn handshake(c: &mut Criterion) {
    use customws::http::Decision;
    use customws::http::request::{Parsed, parse};
    use customws::http::response::switching_protocols;

    let token = handshake::token(777_001);
    let head = handshake::upgrade_head(&token);
    let gate = handshake::gate();
    let Parsed::Complete(request, _) = parse(&head) else { panic!("the head parses") };
    assert!(matches!(gate.decide(&request), Decision::Upgrade { jwt: Ok(_), .. }), "the token verifies");
    let auth = handshake::authenticator();
    let ws_key = request.ws_key.clone().expect("key");

    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    group.bench_function("httparse_only", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; customws::http::request::MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            req.parse(black_box(&head)).ok().map(|s| s.is_complete())
        })
    });
    group.bench_function("request_parse", |b| {
        b.iter(|| matches!(parse(black_box(&head)), Parsed::Complete(..)))
    });
    group.bench_function("jwt_hs256_verify", |b| {
        b.iter(|| auth.verify(black_box(&token)).map(|i| i.user_id).ok())
    });
    group.bench_function("gate_decide", |b| {
        b.iter(|| matches!(gate.decide(black_box(&request)), Decision::Upgrade { jwt: Ok(_), .. }))
    });
    group.bench_function("accept_key_sha1_base64", |b| {
        b.iter(|| tungstenite::handshake::derive_accept_key(black_box(ws_key.as_bytes())))
    });
    group.bench_function("switching_protocols_101", |b| {
        b.iter(|| switching_protocols(black_box(&ws_key), None))
    });
    group.bench_function("all_steps", |b| {
        b.iter(|| {
            let Parsed::Complete(request, _) = parse(black_box(&head)) else { return 0 };
            let Decision::Upgrade { jwt: Ok(identity), .. } = gate.decide(&request) else { return 0 };
            black_box(identity.user_id);
            switching_protocols(request.ws_key.as_deref().unwrap_or(""), None).len()
        })
    });
    group.finish();
}

/// What relaying needs from simd-json: the envelope's fields and the payload's bytes, which
/// simd-json can only give back re-encoded (it keeps no spans of the input).
fn simd_relay(buf: &mut [u8], buffers: &mut simd_json::Buffers) -> Option<(i64, String)> {
    use simd_json::prelude::*;
    let value = simd_json::to_borrowed_value_with_buffers(buf, buffers).ok()?;
    let kind = value.get_str("type")?;
    black_box(kind);
    black_box(value.get_str("pid"));
    let target = value.get_i64("targetUserId").unwrap_or(0);
    let payload = value.get("payload")?.encode();
    Some((target, payload))
}

fn envelope_json(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope_json");
    for (name, raw) in handshake::envelope_shapes() {
        let msg = ClientMessage::parse(&raw).expect("valid envelope");
        assert!(!matches!(route(&msg, SenderCaps::default()), Route::Reject { .. }), "{name} routes");
        group.throughput(Throughput::Bytes(raw.len() as u64));
        group.bench_function(format!("serde_json_parse_only/{name}"), |b| {
            b.iter(|| ClientMessage::parse(black_box(&raw)).map(|m| m.payload_bytes().map(<[u8]>::len)).ok())
        });
        group.bench_function(format!("serde_json_parse_route/{name}"), |b| {
            b.iter(|| {
                let msg = ClientMessage::parse(black_box(&raw)).ok()?;
                Some(matches!(route(&msg, SenderCaps::default()), Route::Reject { .. }))
            })
        });
        // What in-place parsing does to relaying: the parsed buffer is no longer the frame, and
        // the payload simd-json gives back (re-encoded) is not the client's bytes.
        let original = msg.payload_bytes().expect("every shape has a payload").to_vec();
        let mut parsed = raw.clone();
        let reencoded =
            simd_relay(&mut parsed, &mut simd_json::Buffers::default()).expect("simd-json parses").1;
        eprintln!(
            "envelope_json/{name}: {} bytes; buffer changed by the in-place parse: {}; payload re-encoded byte for byte: {}",
            raw.len(),
            parsed != raw,
            reencoded.as_bytes() == original.as_slice()
        );
        // A shard would keep simd-json's working buffers across messages: so does the benchmark.
        let (mut scratch, mut buffers) = (raw.clone(), simd_json::Buffers::new(raw.len()));
        group.bench_function(format!("simd_json_copy_tape/{name}"), |b| {
            b.iter(|| {
                scratch.copy_from_slice(black_box(&raw));
                simd_json::to_tape_with_buffers(&mut scratch, &mut buffers).map(|t| t.0.len()).ok()
            })
        });
        group.bench_function(format!("simd_json_copy_dom_reencode/{name}"), |b| {
            b.iter(|| {
                scratch.copy_from_slice(black_box(&raw));
                simd_relay(&mut scratch, &mut buffers).map(|(t, p)| t as usize + p.len())
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .nresamples(10_000)
        .without_plots()
}

criterion_group! {
    name = micro;
    config = config();
    targets = envelope_decode, p2p_splice_encode, broadcast, frame_parse, timer_wheel, directory, handshake,
        envelope_json
}
criterion_main!(micro);

//! The client thread: one WebSocket connection per user on the loadgen engine, answering every
//! message that carries a `pid` with a `client_ack` at once, or holding the pids while told
//! not to answer and acknowledging them all when told to answer again.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::{Ended, Engine, Handler, push_text};
use crate::util::Minter;

/// Longest pid kept inline (the tier's are `s{shard}.{index}.{generation}`, about 15 bytes).
const PID_MAX: usize = 40;

/// What the client thread and the driver share.
#[derive(Default)]
pub(crate) struct Control {
    /// Answer pids at once (true) or hold them (false).
    pub(crate) answer: AtomicBool,
    /// Leave the loop.
    pub(crate) stop: AtomicBool,
    /// Open connections.
    pub(crate) open: AtomicU64,
    /// Connections that failed to open.
    pub(crate) failed: AtomicU64,
    /// Messages with a pid received.
    pub(crate) pids: AtomicU64,
    /// `client_ack`s written.
    pub(crate) acks: AtomicU64,
    /// Pids currently held.
    pub(crate) held: AtomicU64,
    /// Messages without a pid, or unparsable.
    pub(crate) other: AtomicU64,
    /// Connections that ended while open.
    pub(crate) ended: AtomicU64,
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(borrow, default)]
    pid: Option<Cow<'a, str>>,
}

struct Held {
    conn: usize,
    len: u8,
    pid: [u8; PID_MAX],
}

struct Answerer {
    ctl: Arc<Control>,
    /// Reserved up front so holding pids allocates nothing during the memory phase.
    held: Vec<Held>,
    scratch: Vec<u8>,
    other_samples: Vec<String>,
    ended_why: std::collections::BTreeMap<String, u64>,
}

impl Answerer {
    fn ack_text(scratch: &mut Vec<u8>, pid: &[u8]) {
        scratch.clear();
        scratch.extend_from_slice(br#"{"type":"client_ack","payload":{"acknowledgedPid":""#);
        scratch.extend_from_slice(pid);
        scratch.extend_from_slice(br#"","status":"ok"}}"#);
    }

    fn note_other(&mut self, text: &[u8]) {
        self.ctl.other.fetch_add(1, Ordering::Relaxed);
        if self.other_samples.len() < 5 {
            self.other_samples.push(String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned());
        }
    }
}

impl Handler for Answerer {
    fn on_open(&mut self, _id: usize, _tag: u32, _out: &mut Vec<u8>) -> bool {
        self.ctl.open.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn on_text(&mut self, id: usize, _tag: u32, text: &[u8], out: &mut Vec<u8>) {
        let pid = match serde_json::from_slice::<Incoming<'_>>(text) {
            Ok(Incoming { pid: Some(pid) }) if !pid.is_empty() && pid.len() <= PID_MAX => pid,
            _ => return self.note_other(text),
        };
        self.ctl.pids.fetch_add(1, Ordering::Relaxed);
        if self.ctl.answer.load(Ordering::Acquire) {
            Self::ack_text(&mut self.scratch, pid.as_bytes());
            push_text(out, &self.scratch);
            self.ctl.acks.fetch_add(1, Ordering::Relaxed);
        } else {
            let mut held = Held { conn: id, len: pid.len() as u8, pid: [0; PID_MAX] };
            held.pid[..pid.len()].copy_from_slice(pid.as_bytes());
            self.held.push(held);
            self.ctl.held.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_ended(&mut self, _id: usize, _tag: u32, why: Ended) {
        if matches!(why, Ended::ConnectFailed | Ended::HandshakeFailed) {
            self.ctl.failed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.ctl.open.fetch_sub(1, Ordering::Relaxed);
            self.ctl.ended.fetch_add(1, Ordering::Relaxed);
        }
        *self.ended_why.entry(format!("{why:?}")).or_insert(0) += 1;
    }
}

/// Connects `users` clients (user ids 1..=users) and serves them until told to stop or until
/// `deadline`. Returns a JSON summary of what the client saw.
pub(crate) fn run(
    server: SocketAddr,
    path: &str,
    secret: &str,
    users: usize,
    hold_capacity: usize,
    ctl: Arc<Control>,
    deadline: Instant,
) -> Value {
    crate::counting::mark_client_thread();
    let mut engine = match Engine::new(server, path, Vec::new()) {
        Ok(e) => e,
        Err(e) => {
            ctl.failed.fetch_add(users as u64, Ordering::Relaxed);
            return json!({ "error": format!("client engine: {e}") });
        }
    };
    let minter = Minter::new(secret);
    let mut h = Answerer {
        ctl: Arc::clone(&ctl),
        held: Vec::with_capacity(hold_capacity),
        scratch: Vec::with_capacity(256),
        other_samples: Vec::new(),
        ended_why: Default::default(),
    };
    // Connect with at most 64 upgrades in flight.
    let mut next_user = 1usize;
    let mut batch = Vec::new();
    while !ctl.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        while next_user <= users && engine.pending < 64 {
            let token = minter.token(next_user as i64, &[]);
            if engine.connect(&token, next_user as u32).is_err() {
                ctl.failed.fetch_add(1, Ordering::Relaxed);
            }
            next_user += 1;
        }
        engine.poll_once(&mut h, Duration::from_millis(2));
        if ctl.answer.load(Ordering::Acquire) && !h.held.is_empty() {
            // Answer every held pid, one write per connection.
            h.held.sort_by_key(|x| x.conn);
            let mut i = 0;
            while i < h.held.len() {
                let conn = h.held[i].conn;
                batch.clear();
                while i < h.held.len() && h.held[i].conn == conn {
                    let x = &h.held[i];
                    Answerer::ack_text(&mut h.scratch, &x.pid[..x.len as usize]);
                    push_text(&mut batch, &h.scratch);
                    ctl.acks.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                engine.send_raw(conn, &batch);
            }
            ctl.held.fetch_sub(h.held.len() as u64, Ordering::Relaxed);
            h.held.clear();
        }
    }
    let timed_out = Instant::now() >= deadline;
    engine.close_all();
    json!({
        "timed_out": timed_out,
        "held_unanswered": h.held.len(),
        "unexpected_message_samples": h.other_samples,
        "connections_ended": h.ended_why,
        "engine": engine.stats.to_json(),
    })
}

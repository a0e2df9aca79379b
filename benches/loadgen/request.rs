//! Scenario `request`: request/response round trips client → server → client. P connections
//! each keep F `{"pid":"r<n>","type":"generic_request","payload":{…}}` in flight, M per
//! connection; the server's built-in router answers `{"pid":"r<n>","type":"generic_response",
//! "payload":<same>}` (no application or backend configured). Every answer is checked: its pid
//! must be one in flight on that connection and its payload the exact bytes sent.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::drive::{Wait, wait};
use super::engine::{Ended, Handler, push_text};
use super::util::{self, hist_json, new_hist, r3};
use super::{Common, Ctx, Incoming, establish, now_us, parse_error, payload_at, pump, wait_health};

struct ReqH {
    conns: usize,
    m: u32,
    size: usize,
    sent: Vec<u32>,
    answered: Vec<u32>,
    /// Send time (µs since the epoch of `now_us`) of each request in flight, 0 when none:
    /// `conns × m` slots.
    send_us: Vec<u64>,
    total_answered: u64,
    /// Requests answered with error_notification instead.
    errored: u64,
    /// Responses with an unknown, already answered or missing pid.
    bad_pid: u64,
    /// Responses whose payload is not the bytes sent.
    payload_mismatch: u64,
    /// Responses on a connection other than a request connection.
    stray: u64,
    rtt: Histogram<u64>,
    error_codes: BTreeMap<String, u64>,
    common: Common,
}

impl ReqH {
    /// Queues the next request of connection `i`.
    fn request(&mut self, i: usize, out: &mut Vec<u8>) {
        let seq = self.sent[i];
        self.sent[i] += 1;
        let t = now_us();
        self.send_us[i * self.m as usize + seq as usize] = t;
        let p = payload_at(self.size, seq as u64, t);
        let msg = format!("{{\"pid\":\"r{seq}\",\"type\":\"generic_request\",\"payload\":{p}}}");
        push_text(out, msg.as_bytes());
    }

    /// The slot of `pid` ("r<seq>") on connection `i`, if it names a request of this run.
    fn slot(&self, i: usize, pid: Option<&str>) -> Option<(u32, usize)> {
        let seq: u32 = pid?.strip_prefix('r')?.parse().ok()?;
        (seq < self.m).then(|| (seq, i * self.m as usize + seq as usize))
    }

    /// One request of connection `i` is done: send the next, if any.
    fn next(&mut self, i: usize, out: &mut Vec<u8>) {
        if self.sent[i] < self.m {
            self.request(i, out);
        }
    }
}

impl Handler for ReqH {
    fn on_text(&mut self, _id: usize, tag: u32, text: &[u8], out: &mut Vec<u8>) {
        let now = now_us();
        let msg = match serde_json::from_slice::<Incoming<'_>>(text) {
            Ok(m) => m,
            Err(_) => {
                self.common.parse_errors += 1;
                return;
            }
        };
        let i = tag as usize;
        if i >= self.conns {
            self.stray += 1;
            self.common.other(&msg);
            return;
        }
        match &*msg.ty {
            "generic_response" => {
                let Some((seq, slot)) = self.slot(i, msg.pid.as_deref()) else {
                    self.bad_pid += 1;
                    return;
                };
                let t = self.send_us[slot];
                if t == 0 {
                    self.bad_pid += 1;
                    return;
                }
                self.send_us[slot] = 0;
                let _ = self.rtt.record(now.saturating_sub(t).max(1));
                let same = msg.payload.is_some_and(|p| p.get() == payload_at(self.size, seq as u64, t));
                if !same {
                    self.payload_mismatch += 1;
                }
                self.answered[i] += 1;
                self.total_answered += 1;
                self.next(i, out);
            }
            "error_notification" => {
                self.common.other(&msg);
                let err = parse_error(msg.error);
                let pid = err.original_pid.as_deref().or(msg.pid.as_deref());
                if let Some((_, slot)) = self.slot(i, pid)
                    && self.send_us[slot] != 0
                {
                    self.send_us[slot] = 0;
                    self.errored += 1;
                    let code = msg.error.map_or("?".to_string(), |e| e.get().chars().take(80).collect());
                    *self.error_codes.entry(code).or_insert(0) += 1;
                    self.next(i, out);
                }
            }
            _ => self.common.other(&msg),
        }
    }
    fn on_ended(&mut self, _id: usize, _tag: u32, why: Ended) {
        self.common.ended(why);
    }
}

/// `request --conns P --inflight F --messages M [--size 100]`.
pub(crate) fn request(ctx: &mut Ctx) -> Result<Value, String> {
    let conns: usize = ctx.args.num("conns", 64)?;
    let inflight: u32 = ctx.args.num("inflight", 1)?;
    let m: u32 = ctx.args.num("messages", 1000)?;
    let size: usize = ctx.args.num("size", 100)?;
    let conc: usize = ctx.args.num("concurrency", 256)?;
    if conns == 0 || inflight == 0 || m == 0 {
        return Err("--conns, --inflight and --messages must be at least 1".into());
    }
    if conns as u64 * m as u64 > 200_000_000 {
        return Err("--conns × --messages at most 200 M (8 bytes of bookkeeping each)".into());
    }
    let first_user = ctx.user_offset;
    let mut eng = ctx.engine();
    let mut h = ReqH {
        conns,
        m,
        size,
        sent: vec![0; conns],
        answered: vec![0; conns],
        send_us: vec![0; conns * m as usize],
        total_answered: 0,
        errored: 0,
        bad_pid: 0,
        payload_mismatch: 0,
        stray: 0,
        rtt: new_hist(),
        error_codes: BTreeMap::new(),
        common: Common::default(),
    };
    progress!("request: opening {conns} connections");
    let est = establish(ctx, &mut eng, &mut h, conns, conc, |i| {
        (ctx.minter.token(first_user + i as i64, &[]), i as u32)
    });
    if est.ok < conns as u64 {
        ctx.problems.push(format!("only {} of {conns} connections upgraded", est.ok));
    }
    let (seen, reached, _) = wait_health(ctx, &mut eng, &mut h, Duration::from_secs(10), |c| c >= est.ok);
    if !reached {
        ctx.problems.push(format!("/health reported {seen:?} connections, expected {}", est.ok));
    }
    pump(ctx, &mut eng, &mut h, Duration::from_millis(300));
    let mut clients = Vec::new();
    for id in 0..eng.capacity() {
        if let Some(tag) = eng.tag(id)
            && eng.is_open(id)
        {
            clients.push((id, tag as usize));
        }
    }
    let m0 = ctx.metrics();
    let cpu0 = ctx.server.cpu();
    let self0 = util::self_cpu_us(ctx.server.clk_tck);
    let t0 = Instant::now();
    for &(id, i) in &clients {
        let mut frames = Vec::new();
        for _ in 0..inflight.min(m) {
            h.request(i, &mut frames);
        }
        eng.send_raw(id, &frames);
    }
    let want = clients.len() as u64 * m as u64;
    progress!("request: {} connections started, {want} round trips to go", clients.len());
    let stalled = |_: f64, _: usize| "no progress for 5 s (lost requests or responses?)".to_string();
    wait(
        ctx,
        &mut eng,
        &mut h,
        &Wait::plain("request", Duration::from_secs(5), &stalled),
        |h| h.total_answered + h.errored >= want,
        |h| h.total_answered + h.errored,
        |h| format!("{} answered, {} errors of {want}", h.total_answered, h.errored),
    );
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = ctx.server.cpu();
    let self1 = util::self_cpu_us(ctx.server.clk_tck);
    // Late or duplicate responses.
    pump(ctx, &mut eng, &mut h, Duration::from_millis(200));
    let m1 = ctx.metrics();
    if h.errored > 0 {
        ctx.problems.push(format!("{} of {want} requests answered with error_notification", h.errored));
    }
    if h.total_answered + h.errored < want {
        ctx.problems.push(format!(
            "{} of {want} requests got neither a response nor an error",
            want - h.total_answered - h.errored
        ));
    }
    if h.bad_pid > 0 {
        ctx.problems.push(format!("{} responses with an unknown or duplicate pid", h.bad_pid));
    }
    if h.payload_mismatch > 0 {
        ctx.problems
            .push(format!("{} responses whose payload differs from the request's", h.payload_mismatch));
    }
    let cpu_us = ctx.server.cpu_us(cpu0, cpu1);
    let sched_us = ctx.server.sched_us(cpu0, cpu1);
    let rts = h.total_answered.max(1) as f64;
    let out = json!({
        "conns": conns,
        "inflight": inflight,
        "messages_per_conn": m,
        "size": size,
        "first_user_id": first_user,
        "upgraded": est.ok,
        "connect_secs": r3(est.secs),
        "round_trips": want,
        "answered": h.total_answered,
        "per_conn_answered_min": h.answered.iter().min(),
        "per_conn_answered_max": h.answered.iter().max(),
        "error_notifications": h.errored,
        "error_kinds": h.error_codes,
        "bad_or_duplicate_pids": h.bad_pid,
        "payload_mismatches": h.payload_mismatch,
        "stray_messages": h.stray,
        "wall_secs": r3(wall),
        "round_trips_per_sec": r3(h.total_answered as f64 / wall.max(1e-9)),
        "server_cpu_us": cpu_us,
        "server_cpu_us_per_round_trip": cpu_us.map(|c| r3(c / rts)),
        "server_sched_us": sched_us.map(r3),
        "server_sched_us_per_round_trip": sched_us.map(|c| r3(c / rts)),
        "loadgen_cpu_us": match (self0, self1) { (Some(a), Some(b)) => Some(b - a), _ => None },
        "rtt_note": "request written → response read, per request, in the load generator",
        "rtt": hist_json(&h.rtt),
        "server_metrics_delta": util::metrics_delta(&m0, &m1),
        "client": h.common.json(),
        "engine": eng.stats.to_json(),
    });
    eng.close_all();
    Ok(out)
}

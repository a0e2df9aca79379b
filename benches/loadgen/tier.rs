//! Scenario `tier`: one load-generator process of several holding a cluster's connections, and
//! P2P between random users on different nodes while all of them are connected
//! (`benches/cluster.sh` runs one per node).
//!
//! This process opens `--conns N` connections to its `--url` node as users K..K+N-1
//! (`--user-offset K`), waits until `/health` summed over every `--urls` node reports
//! `--expect-total T` (all processes are in), lets the nodes' views settle, then for
//! `--p2p-secs S` sends `--rate R` `data_request`s per second with a `pid`, each from a random
//! connection of its own to a random user of 1..=U (`--total-users U`) outside K..K+N-1 — held by
//! another process, on another node. It counts the `server_ack`s (`delivered` or not), the
//! `error_notification`s and the `data_event`s it receives from the other processes (their sum
//! over processes should equal the sum of `delivered`), then reports the connections still held
//! and its node's RSS growth per connection. Payload timestamps are wall-clock microseconds,
//! so a receiving process can time a message another process sent.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::engine::{Ended, Engine, Handler, push_text};
use super::util::{self, hist_json, new_hist, r3};
use super::{Common, Ctx, Incoming, establish, parse_error, parse_payload, payload_at, pump, wait_health};

/// Wall-clock microseconds (shared by the processes of a run, unlike `now_us`).
fn wall_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

struct TierH {
    /// Send time of each message by sequence number (0 once answered).
    send_us: Vec<u64>,
    delivered: u64,
    other_status: BTreeMap<String, u64>,
    errored: u64,
    bad_ack: u64,
    received: u64,
    rtt: Histogram<u64>,
    deliv: Histogram<u64>,
    common: Common,
}

impl TierH {
    fn slot(&mut self, pid: Option<&str>) -> Option<&mut u64> {
        let seq: usize = pid?.strip_prefix('t')?.parse().ok()?;
        self.send_us.get_mut(seq).filter(|s| **s != 0)
    }
}

impl Handler for TierH {
    fn on_text(&mut self, _id: usize, _tag: u32, text: &[u8], _out: &mut Vec<u8>) {
        let now = wall_us();
        let m = match serde_json::from_slice::<Incoming<'_>>(text) {
            Ok(m) => m,
            Err(_) => {
                self.common.parse_errors += 1;
                return;
            }
        };
        match &*m.ty {
            "server_ack" => {
                let p = parse_payload(m.payload);
                let status = p.status.as_deref().unwrap_or("?").to_string();
                let Some(slot) = self.slot(p.ack_pid.as_deref()) else {
                    self.bad_ack += 1;
                    return;
                };
                let sent = std::mem::take(slot);
                if status == "delivered" {
                    self.delivered += 1;
                    let _ = self.rtt.record(now.saturating_sub(sent).max(1));
                } else {
                    *self.other_status.entry(status).or_insert(0) += 1;
                }
            }
            "error_notification" => {
                let e = parse_error(m.error);
                if let Some(slot) = self.slot(e.original_pid.as_deref()) {
                    *slot = 0;
                    self.errored += 1;
                }
                self.common.other(&m);
            }
            "data_event" => {
                self.received += 1;
                if let Some(t) = parse_payload(m.payload).t {
                    let _ = self.deliv.record(now.saturating_sub(t).max(1));
                }
            }
            _ => self.common.other(&m),
        }
    }
    fn on_ended(&mut self, _id: usize, _tag: u32, why: Ended) {
        self.common.ended(why);
    }
}

/// xorshift64*: enough to pick senders and targets.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

pub(crate) fn tier(ctx: &mut Ctx) -> Result<Value, String> {
    let n: usize = ctx.args.num("conns", 1000)?;
    let conc: usize = ctx.args.num("concurrency", 256)?;
    let total_users: i64 = ctx.args.num("total-users", 0)?;
    let expect_total: u64 = ctx.args.num("expect-total", n as u64)?;
    let expect_wait: f64 = ctx.args.num("expect-wait-secs", 300.0)?;
    let settle: f64 = ctx.args.num("settle-secs", 3.0)?;
    let p2p_secs: f64 = ctx.args.num("p2p-secs", 10.0)?;
    let rate: f64 = ctx.args.num("rate", 200.0)?;
    let size: usize = ctx.args.num("size", 100)?;
    let tail: f64 = ctx.args.num("tail-secs", 3.0)?;
    let hold: f64 = ctx.args.num("hold-secs", 2.0)?;
    let first = ctx.user_offset;
    let last = first + n as i64 - 1;
    if total_users < last || total_users <= n as i64 {
        return Err("--total-users must cover this process's users and others".into());
    }
    let max_msgs = (rate * p2p_secs).ceil() as usize + 1;
    let mut eng = Engine::new(ctx.server.addr, &ctx.path, util::src_ips(ctx.src_ips, ctx.src_ip_offset))
        .map_err(|e| e.to_string())?;
    let mut h = TierH {
        send_us: vec![0; max_msgs],
        delivered: 0,
        other_status: BTreeMap::new(),
        errored: 0,
        bad_ack: 0,
        received: 0,
        rtt: new_hist(),
        deliv: new_hist(),
        common: Common::default(),
    };
    let node_health_before = ctx.server.health_connections();
    let rss_before = ctx.server.rss();
    let cpu0 = ctx.server.cpu();
    progress!("tier: opening {n} connections to {} as users {first}..={last}", ctx.server.addr);
    let est =
        establish(ctx, &mut eng, &mut h, n, conc, |i| (ctx.minter.token(first + i as i64, &[]), i as u32));
    progress!("tier: {} upgraded, {} failed in {:.2}s", est.ok, est.failed, est.secs);
    if est.ok < n as u64 {
        ctx.problems.push(format!("only {} of {n} connections upgraded", est.ok));
    }
    progress!("tier: waiting for /health over {} node(s) to report {expect_total}", ctx.nodes.len());
    let (seen, reached, wait_s) =
        wait_health(ctx, &mut eng, &mut h, Duration::from_secs_f64(expect_wait), |c| c >= expect_total);
    if !reached {
        ctx.problems.push(format!("/health over all nodes reported {seen:?}, expected {expect_total}"));
    }
    let cpu1 = ctx.server.cpu();
    pump(ctx, &mut eng, &mut h, Duration::from_secs_f64(settle));
    let node_health_open = ctx.server.health_connections();
    let rss_open = ctx.server.rss();
    let own: Vec<usize> = (0..eng.capacity()).filter(|&id| eng.is_open(id)).collect();
    if own.is_empty() {
        return Err("no connection open".into());
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (first as u64).wrapping_mul(0x1000_0000_01b3));
    let others = (total_users - n as i64) as u64;
    progress!("tier: P2P for {p2p_secs}s at {rate}/s to random users on other nodes");
    let p2p_cpu0 = ctx.server.cpu();
    let broker0 = ctx.broker.as_ref().map(|b| b.cpu());
    let t0 = Instant::now();
    let mut sent = 0usize;
    let mut frame = Vec::with_capacity(size + 128);
    while t0.elapsed().as_secs_f64() < p2p_secs && !ctx.timed_out() {
        let due = ((t0.elapsed().as_secs_f64() * rate) as usize).min(max_msgs);
        while sent < due {
            let from = own[rng.below(own.len() as u64) as usize];
            let mut target = rng.below(others) as i64 + 1;
            if target >= first {
                target += n as i64;
            }
            let t = wall_us();
            h.send_us[sent] = t;
            let p = payload_at(size, sent as u64, t);
            frame.clear();
            let msg = format!(
                "{{\"type\":\"data_request\",\"targetUserId\":{target},\"pid\":\"t{sent}\",\"payload\":{p}}}"
            );
            push_text(&mut frame, msg.as_bytes());
            eng.send_raw(from, &frame);
            sent += 1;
        }
        eng.poll_once(&mut h, Duration::from_millis(1));
    }
    let answered = |h: &TierH| h.delivered + h.errored + h.other_status.values().sum::<u64>();
    let end = Instant::now() + Duration::from_secs(10);
    while answered(&h) < sent as u64 && Instant::now() < end && !ctx.timed_out() {
        eng.poll_once(&mut h, Duration::from_millis(10));
    }
    let p2p_wall = t0.elapsed().as_secs_f64();
    let p2p_cpu1 = ctx.server.cpu();
    let broker1 = ctx.broker.as_ref().map(|b| b.cpu());
    let p2p_node_us = ctx.server.sched_us(p2p_cpu0, p2p_cpu1);
    let p2p_broker_us = match (&ctx.broker, broker0, broker1) {
        (Some(b), Some(a0), Some(a1)) => b.sched_us(a0, a1),
        _ => None,
    };
    // Messages the other processes are still sending to this one's users.
    pump(ctx, &mut eng, &mut h, Duration::from_secs_f64(tail));
    let open_after = eng.open;
    let health_total_after = ctx.health_connections();
    let node_health_after = ctx.server.health_connections();
    let rss_after = ctx.server.rss();
    pump(ctx, &mut eng, &mut h, Duration::from_secs_f64(hold));
    if (open_after as u64) < est.ok {
        ctx.problems.push(format!("{} connections ended before the end", est.ok - open_after as u64));
    }
    let unanswered = sent as u64 - answered(&h).min(sent as u64);
    if unanswered > 0 {
        ctx.problems.push(format!("{unanswered} of {sent} messages got neither ack nor error"));
    }
    if h.delivered < sent as u64 {
        ctx.problems.push(format!("{} of {sent} messages not delivered", sent as u64 - h.delivered));
    }
    let counted = match (node_health_before, node_health_open) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => 0,
    };
    let per_conn = match (rss_before, rss_open) {
        (Some(a), Some(b)) if counted > 0 => Some(r3((b as f64 - a as f64) / counted as f64)),
        _ => None,
    };
    let out = json!({
        "conns": n,
        "first_user_id": first,
        "total_users": total_users,
        "expect_total": expect_total,
        "upgraded": est.ok,
        "failed": est.failed,
        "connect_secs": r3(est.secs),
        "handshakes_per_sec": r3(est.ok as f64 / est.secs.max(1e-9)),
        "handshake_latency": hist_json(&eng.handshake_hist),
        "health_total_seen": seen,
        "health_total_reached": reached,
        "health_wait_secs": r3(wait_s),
        "node_health_before": node_health_before,
        "node_health_open": node_health_open,
        "node_health_after": node_health_after,
        "health_total_after": health_total_after,
        "open_after": open_after,
        "node_rss_before_bytes": rss_before,
        "node_rss_open_bytes": rss_open,
        "node_rss_after_p2p_bytes": rss_after,
        "node_rss_hwm_bytes": ctx.server.hwm(),
        "node_rss_bytes_per_conn": per_conn,
        "node_cpu_us_until_all_in": ctx.server.cpu_us(cpu0, cpu1),
        "p2p_secs": p2p_secs,
        "rate": rate,
        "sent": sent,
        "delivered": h.delivered,
        "non_delivered_ack_status": h.other_status,
        "error_notifications": h.errored,
        "bad_or_duplicate_acks": h.bad_ack,
        "received": h.received,
        "p2p_wall_secs": r3(p2p_wall),
        "p2p_node_sched_us": p2p_node_us.map(r3),
        "p2p_node_sched_us_per_msg_sent_or_received": p2p_node_us.map(|c| r3(c / (sent as u64 + h.received).max(1) as f64)),
        "p2p_broker_sched_us": p2p_broker_us.map(r3),
        "ack_rtt": hist_json(&h.rtt),
        "delivery_latency": hist_json(&h.deliv),
        "client": h.common.json(),
        "engine": eng.stats.to_json(),
    });
    eng.close_all();
    Ok(out)
}

//! Scenario `hostile` (hardening issue #9, defects 1 and 2): one room of many members, hostile
//! members asking for `room_presence` and `presence_subscribe` of 1,024 users over and over
//! while reconnecting, and an unrelated P2P pair whose latency is measured before and during
//! the attack. Reports the server's RSS growth during the attack.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::drive::{Wait, wait};
use super::engine::{Ended, Handler, push_text};
use super::util::{self, hist_json, new_hist, r3};
use super::{Common, Ctx, Incoming, establish, now_us, parse_payload, payload, pump};

/// The bound the issue sets on the server's memory growth under this attack.
const RSS_GROWTH_BOUND: u64 = 32 * 1024 * 1024;
/// The bound the issue sets on the P2P pair's p99 under this attack.
const P99_BOUND_US: u64 = 50_000;

struct HostileH {
    members: usize,
    hostiles: usize,
    join_frame: Vec<u8>,
    member_joins: u64,
    /// Per hostile: its open connection and whether it has joined.
    hostile_conn: Vec<Option<usize>>,
    hostile_joined: Vec<bool>,
    answers: u64,
    members_listed: u64,
    snapshot_events: u64,
    acks: u64,
    errors: BTreeMap<i64, u64>,
    hostile_ended: u64,
    /// The pair's receiver got these; latency into `lat` (quiet phase) or `lat_attack`.
    pair_received: u64,
    attack: bool,
    lat_quiet: Histogram<u64>,
    lat_attack: Histogram<u64>,
    common: Common,
}

impl HostileH {
    fn hostile_index(&self, tag: u32) -> Option<usize> {
        let t = tag as usize;
        (t >= self.members && t < self.members + self.hostiles).then(|| t - self.members)
    }
}

impl Handler for HostileH {
    fn on_open(&mut self, id: usize, tag: u32, out: &mut Vec<u8>) -> bool {
        if (tag as usize) < self.members + self.hostiles {
            out.extend_from_slice(&self.join_frame);
        }
        if let Some(k) = self.hostile_index(tag) {
            self.hostile_conn[k] = Some(id);
            self.hostile_joined[k] = false;
        }
        true
    }

    fn on_text(&mut self, _id: usize, tag: u32, text: &[u8], _out: &mut Vec<u8>) {
        let now = now_us();
        let Ok(m) = serde_json::from_slice::<Incoming<'_>>(text) else {
            self.common.parse_errors += 1;
            return;
        };
        let t = tag as usize;
        if t < self.members {
            let p = parse_payload(m.payload);
            if m.ty == "server_ack" && p.ack_pid.as_deref() == Some("j") {
                self.member_joins += 1;
            }
            return; // members see nothing else of interest
        }
        if let Some(k) = self.hostile_index(tag) {
            match &*m.ty {
                "server_ack" => {
                    if parse_payload(m.payload).ack_pid.as_deref() == Some("j") {
                        self.hostile_joined[k] = true;
                    } else {
                        self.acks += 1;
                    }
                }
                "room_presence" => {
                    self.answers += 1;
                    let v: Value =
                        m.payload.and_then(|r| serde_json::from_str(r.get()).ok()).unwrap_or_default();
                    self.members_listed += v["members"].as_array().map_or(0, |a| a.len() as u64);
                }
                "presence_event" => self.snapshot_events += 1,
                "error_notification" => {
                    let v: Value =
                        m.error.and_then(|r| serde_json::from_str(r.get()).ok()).unwrap_or_default();
                    *self.errors.entry(v["code"].as_i64().unwrap_or(0)).or_insert(0) += 1;
                }
                _ => self.common.other(&m),
            }
            return;
        }
        // The pair: the receiver's data_events carry their send time.
        if m.ty == "data_event" && t == self.members + self.hostiles + 1 {
            self.pair_received += 1;
            if let Some(sent) = parse_payload(m.payload).t {
                let hist = if self.attack { &mut self.lat_attack } else { &mut self.lat_quiet };
                let _ = hist.record(now.saturating_sub(sent).max(1));
            }
        } else if m.ty != "server_ack" {
            self.common.other(&m);
        }
    }

    fn on_ended(&mut self, _id: usize, tag: u32, why: Ended) {
        if let Some(k) = self.hostile_index(tag) {
            self.hostile_conn[k] = None;
            self.hostile_ended += 1;
        }
        self.common.ended(why);
    }
}

/// `hostile --members 10000 [--hostiles 2] [--secs 10] [--quiet-secs 2] [--interval-ms 10]
/// [--reconnect-ms 500] [--ids 1024] [--pair-interval-ms 5] [--room hostile-room]`
/// (server: rate limits on, `--room-presence-max-members 0 --max-room-members 1000000`).
pub(crate) fn hostile(ctx: &mut Ctx) -> Result<Value, String> {
    let members: usize = ctx.args.num("members", 10_000)?;
    let hostiles: usize = ctx.args.num("hostiles", 2)?;
    let secs: f64 = ctx.args.num("secs", 10.0)?;
    let quiet_secs: f64 = ctx.args.num("quiet-secs", 2.0)?;
    let interval = Duration::from_millis(ctx.args.num("interval-ms", 10)?);
    let reconnect = Duration::from_millis(ctx.args.num("reconnect-ms", 500)?);
    let ids: usize = ctx.args.num("ids", 1024)?;
    let pair_interval = Duration::from_millis(ctx.args.num("pair-interval-ms", 5)?);
    let conc: usize = ctx.args.num("concurrency", 256)?;
    let room = ctx.args.str("room").unwrap_or("hostile-room").to_string();
    let mut join_frame = Vec::new();
    let join = json!({"type": "join", "pid": "j", "payload": {"room": room}}).to_string();
    push_text(&mut join_frame, join.as_bytes());
    let mut h = HostileH {
        members,
        hostiles,
        join_frame,
        member_joins: 0,
        hostile_conn: vec![None; hostiles],
        hostile_joined: vec![false; hostiles],
        answers: 0,
        members_listed: 0,
        snapshot_events: 0,
        acks: 0,
        errors: BTreeMap::new(),
        hostile_ended: 0,
        pair_received: 0,
        attack: false,
        lat_quiet: new_hist(),
        lat_attack: new_hist(),
        common: Common::default(),
    };
    // Users: members 1..=N, hostiles N+1..=N+H, the pair N+H+1 (sender), N+H+2 (receiver).
    let total = members + hostiles + 2;
    let user_of = |tag: usize| tag as i64 + 1;
    let mut eng = ctx.engine();
    progress!("hostile: opening {members} members, {hostiles} hostile members and a P2P pair");
    let est =
        establish(ctx, &mut eng, &mut h, total, conc, |i| (ctx.minter.token(user_of(i), &[]), i as u32));
    if est.ok < total as u64 {
        ctx.problems.push(format!("only {} of {total} connections upgraded", est.ok));
    }
    let want = members as u64;
    wait(
        ctx,
        &mut eng,
        &mut h,
        &Wait::labelled("member joins", Duration::from_secs(20)),
        |h| h.member_joins >= want,
        |h| h.member_joins,
        |h| format!("{} joined", h.member_joins),
    );
    pump(ctx, &mut eng, &mut h, Duration::from_millis(500));
    let sender_tag = (members + hostiles) as u32;
    let receiver_user = user_of(members + hostiles + 1);
    let sender = (0..eng.capacity())
        .find(|&id| eng.is_open(id) && eng.tag(id) == Some(sender_tag))
        .ok_or("the pair's sender did not open")?;
    let mut seq = 0u64;
    let mut send_pair = |eng: &mut super::engine::Engine| {
        seq += 1;
        let text = format!(
            "{{\"type\":\"data_request\",\"targetUserId\":{receiver_user},\"payload\":{}}}",
            payload(100, seq)
        );
        let mut frame = Vec::new();
        push_text(&mut frame, text.as_bytes());
        eng.send_raw(sender, &frame);
    };

    // Quiet phase: the pair alone.
    let quiet_end = Instant::now() + Duration::from_secs_f64(quiet_secs);
    while Instant::now() < quiet_end && !ctx.timed_out() {
        send_pair(&mut eng);
        pump(ctx, &mut eng, &mut h, pair_interval);
    }

    // Attack.
    let m0 = ctx.metrics();
    let rss_before = ctx.server.rss();
    let cpu0 = ctx.server.cpu();
    let mut rss_max = rss_before.unwrap_or(0);
    h.attack = true;
    progress!("hostile: attack for {secs}s (rss before {rss_before:?})");
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let (mut next_req, mut next_pair, mut next_reconnect, mut next_rss) = (t0, t0, t0 + reconnect, t0);
    let mut requests = 0u64;
    let mut reconnects = 0u64;
    while Instant::now() < end && !ctx.timed_out() {
        let now = Instant::now();
        if now >= next_req {
            next_req += interval;
            for k in 0..hostiles {
                let (Some(id), true) = (h.hostile_conn[k], h.hostile_joined[k]) else { continue };
                requests += 1;
                let text = if requests.is_multiple_of(2) {
                    json!({"type": "room_presence", "pid": format!("rp{requests}"), "payload": {"room": room}})
                } else {
                    let first = (requests as usize * ids) % members.max(1);
                    let list: Vec<i64> = (0..ids).map(|i| ((first + i) % members) as i64 + 1).collect();
                    json!({"type": "presence_subscribe", "pid": format!("ps{requests}"), "payload": {"userIds": list}})
                };
                let mut frame = Vec::new();
                push_text(&mut frame, text.to_string().as_bytes());
                eng.send_raw(id, &frame);
            }
        }
        if now >= next_reconnect {
            next_reconnect += reconnect;
            for k in 0..hostiles {
                if let Some(id) = h.hostile_conn[k].take() {
                    eng.close(id);
                }
                let tag = members + k;
                let _ = eng.connect(&ctx.minter.token(user_of(tag), &[]), tag as u32);
                reconnects += 1;
            }
        }
        if now >= next_pair {
            next_pair += pair_interval;
            send_pair(&mut eng);
        }
        if now >= next_rss {
            next_rss += Duration::from_millis(100);
            rss_max = rss_max.max(ctx.server.rss().unwrap_or(0));
        }
        eng.poll_once(&mut h, Duration::from_millis(1));
    }
    let cpu1 = ctx.server.cpu();
    pump(ctx, &mut eng, &mut h, Duration::from_millis(500));
    let rss_after = ctx.server.rss();
    rss_max = rss_max.max(rss_after.unwrap_or(0));
    let m1 = ctx.metrics();
    let growth = rss_before.map(|b| rss_max.saturating_sub(b));
    let p99 = h.lat_attack.value_at_quantile(0.99);
    if growth.is_some_and(|g| g > RSS_GROWTH_BOUND) {
        ctx.problems.push(format!("server RSS grew {growth:?} bytes during the attack (bound 32 MiB)"));
    }
    if h.lat_attack.is_empty() || p99 >= P99_BOUND_US {
        ctx.problems.push(format!("P2P pair p99 {p99} µs during the attack (bound 50 ms)"));
    }
    eng.close_all();
    Ok(json!({
        "members": members,
        "hostiles": hostiles,
        "attack_secs": secs,
        "interval_ms": interval.as_millis() as u64,
        "reconnect_ms": reconnect.as_millis() as u64,
        "subscribe_ids": ids,
        "hostile_requests": requests,
        "hostile_reconnects": reconnects,
        "hostile_connections_ended": h.hostile_ended,
        "room_presence_answers": h.answers,
        "members_listed": h.members_listed,
        "snapshot_events": h.snapshot_events,
        "subscribe_acks": h.acks,
        "errors_by_code": h.errors,
        "rss_before_bytes": rss_before,
        "rss_max_bytes": rss_max,
        "rss_after_bytes": rss_after,
        "rss_growth_bytes": growth,
        "server_cpu_us": ctx.server.cpu_us(cpu0, cpu1).map(r3),
        "pair_received": h.pair_received,
        "pair_latency_quiet": hist_json(&h.lat_quiet),
        "pair_latency_attack": hist_json(&h.lat_attack),
        "server_metrics_delta": util::metrics_delta(&m0, &m1),
        "client": h.common.json(),
        "engine": eng.stats.to_json(),
    }))
}

//! Scenarios `room` (one room of many members spread over the shards, one member publishing)
//! and `presence` (one user's `presence_update` fanned out to many watchers).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{Value, json};

use super::drive::{Wait, Waited, wait};
use super::engine::{Ended, Engine, Handler, push_text};
use super::util::{self, hist_json, new_hist, r3};
use super::{
    Common, Ctx, Incoming, establish, now_us, parse_error, parse_payload, payload, pump, wait_health,
};

/// The sequence number and send timestamp a scenario embeds in a body or context.
#[derive(Deserialize)]
struct Stamp {
    t: Option<u64>,
    s: Option<i64>,
}

/// `room_message` payload fields looked at.
#[derive(Deserialize)]
struct RoomMsg<'a> {
    from: Option<i64>,
    #[serde(borrow)]
    room: Option<Cow<'a, str>>,
    body: Option<Stamp>,
}

/// `presence_event` payload fields looked at.
#[derive(Deserialize)]
struct PresenceMsg<'a> {
    #[serde(rename = "userId")]
    user_id: Option<i64>,
    #[serde(borrow)]
    status: Option<Cow<'a, str>>,
    context: Option<Stamp>,
}

/// Per-receiver delivery bookkeeping shared by both scenarios: counts, order, latency.
struct Fanout {
    counts: Vec<u32>,
    last_seq: Vec<i64>,
    total: u64,
    out_of_order: u64,
    lat: Histogram<u64>,
    last_at: Option<Instant>,
}

impl Fanout {
    fn new(n: usize) -> Self {
        Fanout {
            counts: vec![0; n],
            last_seq: vec![-1; n],
            total: 0,
            out_of_order: 0,
            lat: new_hist(),
            last_at: None,
        }
    }

    /// One delivery to receiver `i` of message `seq` sent at `t` (µs); `now` is the receipt.
    fn got(&mut self, i: usize, seq: Option<i64>, t: Option<u64>, now: u64) {
        self.counts[i] += 1;
        self.total += 1;
        self.last_at = Some(Instant::now());
        match seq {
            Some(s) if s > self.last_seq[i] => self.last_seq[i] = s,
            _ => self.out_of_order += 1,
        }
        if let Some(t) = t {
            let _ = self.lat.record(now.saturating_sub(t).max(1));
        }
    }

    /// (min, max, receivers below `want`) over the receivers `keep` selects.
    fn spread(&self, want: u32, keep: impl Fn(usize) -> bool) -> (u32, u32, usize) {
        let mut min = u32::MAX;
        let mut max = 0;
        let mut short = 0;
        for (_, &c) in self.counts.iter().enumerate().filter(|(i, _)| keep(*i)) {
            min = min.min(c);
            max = max.max(c);
            if c < want {
                short += 1;
            }
        }
        (if min == u32::MAX { 0 } else { min }, max, short)
    }
}

/// `customws_shard_connections{shard="i"}` of a /metrics reading.
fn shard_connections(m: &Option<BTreeMap<String, f64>>) -> Value {
    let Some(m) = m else {
        return Value::Null;
    };
    let per: BTreeMap<&str, f64> = m
        .iter()
        .filter_map(|(k, v)| {
            let shard = k.strip_prefix("customws_shard_connections{shard=\"")?.strip_suffix("\"}")?;
            Some((shard, *v))
        })
        .collect();
    json!(per)
}

/// The id of the open connection tagged `tag`.
fn conn_of(eng: &Engine, tag: u32) -> Option<usize> {
    (0..eng.capacity()).find(|&id| eng.is_open(id) && eng.tag(id) == Some(tag))
}

/// Moves the fields of `more` into `out` (two `json!` calls: one would hit the macro's
/// recursion limit).
fn merge(out: &mut Value, more: Value) {
    if let (Value::Object(o), Value::Object(m)) = (out, more) {
        o.extend(m);
    }
}

fn opt_delta(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

// ------------------------------------------------------------------------------------------
// room

struct RoomH {
    room: String,
    publisher_tag: u32,
    publisher_user: i64,
    join_frame: Vec<u8>,
    joined: Vec<bool>,
    join_acks: u64,
    join_refused: u64,
    publish_acks: u64,
    /// `room_message`s the publishing connection got back (the README says it gets none).
    own_copies: u64,
    wrong_from: u64,
    wrong_room: u64,
    fan: Fanout,
    common: Common,
}

impl Handler for RoomH {
    fn on_open(&mut self, _id: usize, _tag: u32, out: &mut Vec<u8>) -> bool {
        out.extend_from_slice(&self.join_frame);
        true
    }

    fn on_text(&mut self, _id: usize, tag: u32, text: &[u8], _out: &mut Vec<u8>) {
        let now = now_us();
        let Ok(m) = serde_json::from_slice::<Incoming<'_>>(text) else {
            self.common.parse_errors += 1;
            return;
        };
        let i = tag as usize;
        match &*m.ty {
            "room_message" if i < self.joined.len() => {
                let p: Option<RoomMsg<'_>> = m.payload.and_then(|r| serde_json::from_str(r.get()).ok());
                let Some(p) = p else {
                    self.common.parse_errors += 1;
                    return;
                };
                if p.from != Some(self.publisher_user) {
                    self.wrong_from += 1;
                }
                if p.room.as_deref() != Some(self.room.as_str()) {
                    self.wrong_room += 1;
                }
                if tag == self.publisher_tag {
                    self.own_copies += 1;
                    return;
                }
                let (s, t) = p.body.map_or((None, None), |b| (b.s, b.t));
                self.fan.got(i, s, t, now);
            }
            "server_ack" if i < self.joined.len() => {
                let p = parse_payload(m.payload);
                match (p.ack_pid.as_deref(), p.status.as_deref()) {
                    (Some("j"), Some("joined")) if !self.joined[i] => {
                        self.joined[i] = true;
                        self.join_acks += 1;
                    }
                    (Some(pid), Some("published")) if pid.starts_with('b') => self.publish_acks += 1,
                    _ => self.common.other(&m),
                }
            }
            "error_notification" => {
                if parse_error(m.error).original_pid.as_deref() == Some("j") {
                    self.join_refused += 1;
                }
                self.common.other(&m);
            }
            _ => self.common.other(&m),
        }
    }

    fn on_ended(&mut self, _id: usize, _tag: u32, why: Ended) {
        self.common.ended(why);
    }
}

/// `room --members N --messages M [--size 100] [--rounds 1] [--with-pid 0] [--room bench-room]`:
/// N member connections (users 1..=N) join one room; member 1 publishes M back-to-back
/// `broadcast`s per round; every other member must receive all of them.
pub(crate) fn room(ctx: &mut Ctx) -> Result<Value, String> {
    let n: usize = ctx.args.num("members", 5000)?;
    let m: usize = ctx.args.num("messages", 200)?;
    let size: usize = ctx.args.num("size", 100)?;
    let rounds: usize = ctx.args.num("rounds", 1)?;
    let conc: usize = ctx.args.num("concurrency", 256)?;
    let with_pid: u32 = ctx.args.num("with-pid", 0)?;
    let room = ctx.args.str("room").unwrap_or("bench-room").to_string();
    if n < 2 {
        return Err("--members at least 2".into());
    }
    let mut join_frame = Vec::new();
    let join = json!({"type": "join", "pid": "j", "payload": {"room": room}}).to_string();
    push_text(&mut join_frame, join.as_bytes());
    let mut h = RoomH {
        room: room.clone(),
        publisher_tag: 0,
        publisher_user: 1,
        join_frame,
        joined: vec![false; n],
        join_acks: 0,
        join_refused: 0,
        publish_acks: 0,
        own_copies: 0,
        wrong_from: 0,
        wrong_room: 0,
        fan: Fanout::new(n),
        common: Common::default(),
    };
    let mut eng = ctx.engine();
    let m_setup0 = ctx.metrics();
    let cpu_setup0 = ctx.server.cpu();
    progress!("room: opening {n} member connections, each joining {room:?} as it opens");
    let est = establish(ctx, &mut eng, &mut h, n, conc, |i| (ctx.minter.token(i as i64 + 1, &[]), i as u32));
    if est.ok < n as u64 {
        ctx.problems.push(format!("only {} of {n} connections upgraded", est.ok));
    }
    let want_joins = est.ok;
    wait(
        ctx,
        &mut eng,
        &mut h,
        &Wait::labelled("room joins", Duration::from_secs(10)),
        |h| h.join_acks + h.join_refused >= want_joins,
        |h| h.join_acks + h.join_refused,
        |h| format!("{} joined, {} refused", h.join_acks, h.join_refused),
    );
    let cpu_setup1 = ctx.server.cpu();
    let join_secs = est.secs.max(0.0);
    let setup_secs = ctx.started.elapsed().as_secs_f64();
    if h.join_refused > 0 {
        ctx.problems.push(format!("{} joins refused with error_notification", h.join_refused));
    }
    let (seen, reached, _) = wait_health(ctx, &mut eng, &mut h, Duration::from_secs(10), |c| c >= est.ok);
    if !reached {
        ctx.problems.push(format!("/health reported {seen:?} connections, expected {}", est.ok));
    }
    pump(ctx, &mut eng, &mut h, Duration::from_millis(300));
    let m0 = ctx.metrics();
    let per_shard = shard_connections(&m0);
    let publisher_id = conn_of(&eng, h.publisher_tag).ok_or("publishing member (user 1) did not open")?;
    if !h.joined[h.publisher_tag as usize] {
        return Err("publishing member (user 1) did not join".into());
    }
    // Receivers: joined, still open, not the publisher.
    let mut open_tags = vec![false; n];
    for id in 0..eng.capacity() {
        if eng.is_open(id)
            && let Some(t) = eng.tag(id)
        {
            open_tags[t as usize] = true;
        }
    }
    let receivers = (0..n).filter(|&i| i != h.publisher_tag as usize && h.joined[i] && open_tags[i]).count();
    let per_round = receivers as u64 * m as u64;
    let expected = per_round * rounds as u64;
    let rss0 = ctx.server.rss();
    let cpu0 = ctx.server.cpu();
    let self0 = util::self_cpu_us(ctx.server.clk_tck);
    let mut round_secs = Vec::new();
    let t0 = Instant::now();
    progress!("room: {rounds} round(s) of {m} broadcasts to {receivers} other members ({per_round} each)");
    for round in 0..rounds {
        let tr = Instant::now();
        let mut frames = Vec::with_capacity(m * (size + 96));
        for k in 0..m {
            let seq = (round * m + k) as u64;
            let body = payload(size, seq);
            let msg = if with_pid != 0 {
                format!(
                    "{{\"type\":\"broadcast\",\"pid\":\"b{seq}\",\"payload\":{{\"room\":{},\"body\":{body}}}}}",
                    json!(room)
                )
            } else {
                format!("{{\"type\":\"broadcast\",\"payload\":{{\"room\":{},\"body\":{body}}}}}", json!(room))
            };
            push_text(&mut frames, msg.as_bytes());
        }
        eng.send_raw(publisher_id, &frames);
        let want = per_round * (round as u64 + 1);
        let want_acks = if with_pid != 0 { (m * (round + 1)) as u64 } else { 0 };
        let waited = wait(
            ctx,
            &mut eng,
            &mut h,
            &Wait::labelled(&format!("room round {round}"), Duration::from_secs(5)),
            |h| h.fan.total >= want && h.publish_acks >= want_acks,
            |h| h.fan.total + h.publish_acks,
            |h| format!("{} / {} deliveries", h.fan.total, expected),
        );
        round_secs.push(r3(h.fan.last_at.map_or(0.0, |t| t.saturating_duration_since(tr).as_secs_f64())));
        if waited != Waited::Done {
            break;
        }
    }
    let cpu1 = ctx.server.cpu();
    let self1 = util::self_cpu_us(ctx.server.clk_tck);
    let rss1 = ctx.server.rss();
    let wall = h.fan.last_at.map_or(t0.elapsed().as_secs_f64(), |t| t.duration_since(t0).as_secs_f64());
    // Late, duplicate or own copies.
    pump(ctx, &mut eng, &mut h, Duration::from_millis(300));
    let m1 = ctx.metrics();
    if h.fan.total < expected {
        ctx.problems.push(format!("{} of {expected} room deliveries missing", expected - h.fan.total));
    }
    if h.fan.total > expected {
        ctx.problems.push(format!("{} room deliveries more than expected", h.fan.total - expected));
    }
    if h.fan.out_of_order > 0 {
        ctx.problems.push(format!("{} deliveries duplicated or out of order", h.fan.out_of_order));
    }
    if h.own_copies > 0 {
        ctx.problems.push(format!(
            "the publishing connection got {} of its own room_messages (README: every member other than the sender)",
            h.own_copies
        ));
    }
    if h.wrong_from + h.wrong_room > 0 {
        ctx.problems.push(format!("{} with a wrong from, {} with a wrong room", h.wrong_from, h.wrong_room));
    }
    let cpu_us = ctx.server.cpu_us(cpu0, cpu1);
    let sched_us = ctx.server.sched_us(cpu0, cpu1);
    let publisher = h.publisher_tag as usize;
    let (min, max, short) =
        h.fan.spread((m * rounds) as u32, |i| i != publisher && h.joined[i] && open_tags[i]);
    let nominal = ((n - 1) * m * rounds) as f64;
    let mut out = json!({
        "members": n,
        "room": room,
        "messages": m,
        "rounds": rounds,
        "size": size,
        "with_pid": with_pid != 0,
        "publisher_user": h.publisher_user,
        "sending": "the publishing member writes each round's M broadcasts back-to-back in one buffer",
        "upgraded": est.ok,
        "joined": h.join_acks,
        "join_refused": h.join_refused,
        "connect_secs": r3(join_secs),
        "connect_and_join_secs": r3(setup_secs),
        "server_cpu_us_connect_and_join": ctx.server.cpu_us(cpu_setup0, cpu_setup1),
        "server_cpu_us_per_member_connect_and_join":
            ctx.server.cpu_us(cpu_setup0, cpu_setup1).map(|c| r3(c / est.ok.max(1) as f64)),
        "shard_connections": per_shard,
    });
    let more = json!({
        "receivers": receivers,
        "expected_deliveries": expected,
        "deliveries": h.fan.total,
        "receivers_short": short,
        "per_receiver_min": min,
        "per_receiver_max": max,
        "out_of_order_or_duplicate": h.fan.out_of_order,
        "publisher_own_copies": h.own_copies,
        "wrong_from_user": h.wrong_from,
        "wrong_room": h.wrong_room,
        "publish_acks": h.publish_acks,
        "round_wall_secs": round_secs,
        "wall_secs": r3(wall),
        "deliveries_per_sec": r3(h.fan.total as f64 / wall.max(1e-9)),
        "server_cpu_us": cpu_us,
        "server_cpu_us_per_room_delivery": cpu_us.map(|c| r3(c / nominal.max(1.0))),
        "server_cpu_us_per_room_delivery_note": "server CPU over the publishing rounds / ((members - 1) × messages × rounds)",
        "server_cpu_us_per_received": cpu_us.map(|c| r3(c / (h.fan.total + h.own_copies).max(1) as f64)),
        "server_cpu_us_per_publish": cpu_us.map(|c| r3(c / (m * rounds).max(1) as f64)),
        "server_sched_us": sched_us.map(r3),
        "server_sched_us_per_room_delivery": sched_us.map(|c| r3(c / nominal.max(1.0))),
        "server_sched_note": "the same from the server threads' run time in /proc/PID/task/*/schedstat (ns, not tick-sampled)",
        "loadgen_cpu_us": opt_delta(self0, self1),
        "latency_note": "body timestamp taken when the round's burst was encoded, to receipt at each member",
        "latency": hist_json(&h.fan.lat),
        "rss_before_bytes": rss0,
        "rss_after_bytes": rss1,
        "server_metrics_delta_setup": util::metrics_delta(&m_setup0, &m0),
        "server_metrics_delta": util::metrics_delta(&m0, &m1),
        "client": h.common.json(),
        "engine": eng.stats.to_json(),
    });
    merge(&mut out, more);
    eng.close_all();
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// presence

struct PresenceH {
    /// Watchers are tags 0..watchers; the subject is tag `watchers`.
    watchers: usize,
    subject: i64,
    subscribe_frame: Vec<u8>,
    subscribed: Vec<bool>,
    sub_acks: u64,
    /// Watchers that got the subject's current status right after subscribing.
    initial: Vec<bool>,
    initial_count: u64,
    initial_status: BTreeMap<String, u64>,
    sub_refused: u64,
    update_acks: BTreeMap<String, u64>,
    update_acks_total: u64,
    /// presence_events the subject itself received.
    subject_events: u64,
    wrong_user: u64,
    fan: Fanout,
    common: Common,
}

impl Handler for PresenceH {
    fn on_open(&mut self, _id: usize, tag: u32, out: &mut Vec<u8>) -> bool {
        if (tag as usize) < self.watchers {
            out.extend_from_slice(&self.subscribe_frame);
        }
        true
    }

    fn on_text(&mut self, _id: usize, tag: u32, text: &[u8], _out: &mut Vec<u8>) {
        let now = now_us();
        let Ok(m) = serde_json::from_slice::<Incoming<'_>>(text) else {
            self.common.parse_errors += 1;
            return;
        };
        let i = tag as usize;
        let watcher = i < self.watchers;
        match &*m.ty {
            "presence_event" if watcher => {
                let p: Option<PresenceMsg<'_>> = m.payload.and_then(|r| serde_json::from_str(r.get()).ok());
                let Some(p) = p else {
                    self.common.parse_errors += 1;
                    return;
                };
                if p.user_id != Some(self.subject) || m.from.is_some_and(|f| f != self.subject) {
                    self.wrong_user += 1;
                    return;
                }
                let status = p.status.as_deref().unwrap_or("");
                match status.strip_prefix("busy-").and_then(|s| s.parse::<i64>().ok()) {
                    Some(n) => {
                        let t = p.context.as_ref().and_then(|c| c.t);
                        self.fan.got(i, Some(n), t, now);
                    }
                    None if !self.initial[i] => {
                        self.initial[i] = true;
                        self.initial_count += 1;
                        *self.initial_status.entry(status.to_string()).or_insert(0) += 1;
                    }
                    None => self.common.other(&m),
                }
            }
            "presence_event" => self.subject_events += 1,
            "server_ack" => {
                let p = parse_payload(m.payload);
                let status = p.status.as_deref().unwrap_or("?");
                match p.ack_pid.as_deref() {
                    Some("s") if watcher && !self.subscribed[i] && status == "ok" => {
                        self.subscribed[i] = true;
                        self.sub_acks += 1;
                    }
                    Some(pid) if !watcher && pid.starts_with('u') => {
                        self.update_acks_total += 1;
                        *self.update_acks.entry(status.to_string()).or_insert(0) += 1;
                    }
                    _ => self.common.other(&m),
                }
            }
            "error_notification" => {
                if watcher && parse_error(m.error).original_pid.as_deref() == Some("s") {
                    self.sub_refused += 1;
                }
                self.common.other(&m);
            }
            _ => self.common.other(&m),
        }
    }

    fn on_ended(&mut self, _id: usize, _tag: u32, why: Ended) {
        self.common.ended(why);
    }
}

/// `presence --watchers W --updates U [--size 100] [--rounds 1] [--interval-ms 0]`: one subject
/// (user W+1) connects first; W watchers (users 1..=W) subscribe to it; the subject then sends U
/// `presence_update`s with distinct statuses `busy-N` per round, back-to-back (or one every
/// `--interval-ms`); every watcher must receive every one.
pub(crate) fn presence(ctx: &mut Ctx) -> Result<Value, String> {
    let w: usize = ctx.args.num("watchers", 1000)?;
    let u: usize = ctx.args.num("updates", 200)?;
    let size: usize = ctx.args.num("size", 100)?;
    let rounds: usize = ctx.args.num("rounds", 1)?;
    let interval_ms: f64 = ctx.args.num("interval-ms", 0.0)?;
    let conc: usize = ctx.args.num("concurrency", 256)?;
    let subject = w as i64 + 1;
    let mut subscribe_frame = Vec::new();
    let sub =
        json!({"type": "presence_subscribe", "pid": "s", "payload": {"userIds": [subject]}}).to_string();
    push_text(&mut subscribe_frame, sub.as_bytes());
    let mut h = PresenceH {
        watchers: w,
        subject,
        subscribe_frame,
        subscribed: vec![false; w],
        sub_acks: 0,
        initial: vec![false; w],
        initial_count: 0,
        initial_status: BTreeMap::new(),
        sub_refused: 0,
        update_acks: BTreeMap::new(),
        update_acks_total: 0,
        subject_events: 0,
        wrong_user: 0,
        fan: Fanout::new(w),
        common: Common::default(),
    };
    let mut eng = ctx.engine();
    progress!("presence: subject user {subject} connects, then {w} watchers subscribe to it");
    let est_s = establish(ctx, &mut eng, &mut h, 1, 1, |_| (ctx.minter.token(subject, &[]), w as u32));
    if est_s.ok != 1 {
        return Err("the subject's connection did not open".into());
    }
    // Let the subject's home shard register it online before anyone subscribes.
    pump(ctx, &mut eng, &mut h, Duration::from_millis(200));
    let m_setup0 = ctx.metrics();
    let cpu_setup0 = ctx.server.cpu();
    let est = establish(ctx, &mut eng, &mut h, w, conc, |i| (ctx.minter.token(i as i64 + 1, &[]), i as u32));
    if est.ok < w as u64 {
        ctx.problems.push(format!("only {} of {w} watcher connections upgraded", est.ok));
    }
    let want = est.ok;
    wait(
        ctx,
        &mut eng,
        &mut h,
        &Wait::labelled("presence subscribes", Duration::from_secs(10)),
        |h| h.sub_acks + h.sub_refused >= want && h.initial_count >= h.sub_acks,
        |h| h.sub_acks + h.sub_refused + h.initial_count,
        |h| format!("{} acked, {} refused, {} current statuses", h.sub_acks, h.sub_refused, h.initial_count),
    );
    let cpu_setup1 = ctx.server.cpu();
    if h.sub_refused > 0 {
        ctx.problems.push(format!("{} presence_subscribe refused", h.sub_refused));
    }
    if h.initial_count < h.sub_acks {
        ctx.problems.push(format!(
            "{} of {} subscribed watchers got no current status",
            h.sub_acks - h.initial_count,
            h.sub_acks
        ));
    }
    let (seen, reached, _) = wait_health(ctx, &mut eng, &mut h, Duration::from_secs(10), |c| c > est.ok);
    if !reached {
        ctx.problems.push(format!("/health reported {seen:?} connections, expected {}", est.ok + 1));
    }
    pump(ctx, &mut eng, &mut h, Duration::from_millis(300));
    let m0 = ctx.metrics();
    let per_shard = shard_connections(&m0);
    let subject_id = conn_of(&eng, w as u32).ok_or("the subject's connection closed")?;
    let mut open_tags = vec![false; w];
    for id in 0..eng.capacity() {
        if eng.is_open(id)
            && let Some(t) = eng.tag(id)
            && (t as usize) < w
        {
            open_tags[t as usize] = true;
        }
    }
    let receivers = (0..w).filter(|&i| h.subscribed[i] && open_tags[i]).count();
    let per_round = receivers as u64 * u as u64;
    let expected = per_round * rounds as u64;
    let interval = Duration::from_secs_f64(interval_ms.max(0.0) / 1000.0);
    let rss0 = ctx.server.rss();
    let cpu0 = ctx.server.cpu();
    let self0 = util::self_cpu_us(ctx.server.clk_tck);
    let mut round_secs = Vec::new();
    let t0 = Instant::now();
    progress!(
        "presence: {rounds} round(s) of {u} updates to {receivers} watchers ({})",
        if interval.is_zero() { "back-to-back".to_string() } else { format!("one every {interval_ms} ms") }
    );
    'rounds: for round in 0..rounds {
        let tr = Instant::now();
        let update = |k: usize| {
            let seq = (round * u + k) as u64;
            let ctx_json = payload(size, seq);
            let msg = format!(
                "{{\"type\":\"presence_update\",\"pid\":\"u{seq}\",\"payload\":{{\"status\":\"busy-{seq}\",\"context\":{ctx_json}}}}}"
            );
            let mut f = Vec::with_capacity(msg.len() + 8);
            push_text(&mut f, msg.as_bytes());
            f
        };
        if interval.is_zero() {
            let frames: Vec<u8> = (0..u).flat_map(update).collect();
            eng.send_raw(subject_id, &frames);
        } else {
            let mut next = Instant::now();
            for k in 0..u {
                while Instant::now() < next {
                    if ctx.timed_out() {
                        ctx.problems.push("overall timeout while pacing updates".into());
                        break 'rounds;
                    }
                    let left = next.saturating_duration_since(Instant::now());
                    eng.poll_once(&mut h, left.min(Duration::from_millis(5)));
                }
                eng.send_raw(subject_id, &update(k));
                next += interval;
            }
        }
        let want = per_round * (round as u64 + 1);
        let want_acks = (u * (round + 1)) as u64;
        let waited = wait(
            ctx,
            &mut eng,
            &mut h,
            &Wait::labelled(&format!("presence round {round}"), Duration::from_secs(5)),
            |h| h.fan.total >= want && h.update_acks_total >= want_acks,
            |h| h.fan.total + h.update_acks_total,
            |h| format!("{} / {} events, {} acks", h.fan.total, expected, h.update_acks_total),
        );
        round_secs.push(r3(h.fan.last_at.map_or(0.0, |t| t.saturating_duration_since(tr).as_secs_f64())));
        if waited != Waited::Done {
            break;
        }
    }
    let cpu1 = ctx.server.cpu();
    let self1 = util::self_cpu_us(ctx.server.clk_tck);
    let rss1 = ctx.server.rss();
    let wall = h.fan.last_at.map_or(t0.elapsed().as_secs_f64(), |t| t.duration_since(t0).as_secs_f64());
    pump(ctx, &mut eng, &mut h, Duration::from_millis(300));
    let m1 = ctx.metrics();
    let updates = (u * rounds) as u64;
    if h.fan.total < expected {
        ctx.problems.push(format!("{} of {expected} presence events missing", expected - h.fan.total));
    }
    if h.fan.total > expected {
        ctx.problems.push(format!("{} presence events more than expected", h.fan.total - expected));
    }
    if h.fan.out_of_order > 0 {
        ctx.problems.push(format!("{} events duplicated or out of order", h.fan.out_of_order));
    }
    if h.update_acks.keys().any(|s| s != "ok") {
        ctx.problems.push(format!("presence_update acks other than ok: {:?}", h.update_acks));
    }
    if h.update_acks_total != updates {
        ctx.problems.push(format!("{} acks for {updates} presence_updates", h.update_acks_total));
    }
    if h.wrong_user > 0 {
        ctx.problems.push(format!("{} presence_events about another user", h.wrong_user));
    }
    if h.subject_events > 0 {
        ctx.problems.push(format!("the subject got {} presence_events", h.subject_events));
    }
    let cpu_us = ctx.server.cpu_us(cpu0, cpu1);
    let sched_us = ctx.server.sched_us(cpu0, cpu1);
    let (min, max, short) = h.fan.spread((u * rounds) as u32, |i| h.subscribed[i] && open_tags[i]);
    let nominal_events = (w * u * rounds) as f64;
    let setup_cpu = ctx.server.cpu_us(cpu_setup0, cpu_setup1);
    let mut out = json!({
        "watchers": w,
        "updates": u,
        "rounds": rounds,
        "size": size,
        "subject_user": subject,
        "pacing": if interval.is_zero() {
            "back-to-back: each round's U updates written in one buffer".to_string()
        } else {
            format!("paced: one update every {interval_ms} ms")
        },
        "interval_ms": interval_ms,
        "upgraded_watchers": est.ok,
        "subscribed": h.sub_acks,
        "subscribe_refused": h.sub_refused,
        "initial_status": h.initial_status,
        "connect_secs": r3(est.secs),
        "server_cpu_us_connect_and_subscribe": setup_cpu,
        "server_cpu_us_per_watcher_connect_and_subscribe": setup_cpu.map(|c| r3(c / est.ok.max(1) as f64)),
        "shard_connections": per_shard,
    });
    let more = json!({
        "receivers": receivers,
        "expected_events": expected,
        "events": h.fan.total,
        "watchers_short": short,
        "per_watcher_min": min,
        "per_watcher_max": max,
        "out_of_order_or_duplicate": h.fan.out_of_order,
        "update_acks": h.update_acks,
        "subject_events": h.subject_events,
        "wrong_user": h.wrong_user,
        "round_wall_secs": round_secs,
        "wall_secs": r3(wall),
        "updates_per_sec": r3(updates as f64 / wall.max(1e-9)),
        "events_per_sec": r3(h.fan.total as f64 / wall.max(1e-9)),
        "server_cpu_us": cpu_us,
        "server_cpu_us_per_update": cpu_us.map(|c| r3(c / updates.max(1) as f64)),
        "server_cpu_us_per_event": cpu_us.map(|c| r3(c / nominal_events.max(1.0))),
        "server_sched_us": sched_us.map(r3),
        "server_sched_us_per_update": sched_us.map(|c| r3(c / updates.max(1) as f64)),
        "server_sched_us_per_event": sched_us.map(|c| r3(c / nominal_events.max(1.0))),
        "server_sched_note": "the same from the server threads' run time in /proc/PID/task/*/schedstat (ns, not tick-sampled)",
        "server_cpu_note": "server CPU over the update rounds (including the subject's acks) / (updates × rounds), and / (updates × rounds × watchers)",
        "loadgen_cpu_us": opt_delta(self0, self1),
        "latency_note": "context timestamp taken when each update was encoded (back-to-back: the whole round's burst), to receipt at each watcher",
        "latency": hist_json(&h.fan.lat),
        "rss_before_bytes": rss0,
        "rss_after_bytes": rss1,
        "server_metrics_delta_setup": util::metrics_delta(&m_setup0, &m0),
        "server_metrics_delta": util::metrics_delta(&m0, &m1),
        "client": h.common.json(),
        "engine": eng.stats.to_json(),
    });
    merge(&mut out, more);
    eng.close_all();
    Ok(out)
}

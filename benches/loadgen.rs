//! Load generator for an already running `customws` server.
//!
//! ```text
//! cargo bench --bench loadgen -- SCENARIO --url 127.0.0.1:PORT --server-pid PID --secret S [options]
//!
//! scenarios:
//!   density   --conns N [--concurrency 256] [--hold-secs 2]
//!             [--expect-total T [--expect-wait-secs 60]]   (several processes, one server: below)
//!   broadcast --receivers R --messages M [--size 100] [--with-pid 0] [--rounds 1]
//!   p2p       --pairs P --inflight F --messages M [--size 100]
//!   handshake --conns N --concurrency C
//!   room      --members N --messages M [--size 100] [--rounds 1] [--with-pid 0] [--room bench-room]
//!             (server: --room-presence-max-members 0 --max-room-members 1000000, rate limits off)
//!   presence  --watchers W --updates U [--size 100] [--rounds 1] [--interval-ms 0 = back-to-back]
//!   request   --conns P --inflight F --messages M [--size 100]
//!             (generic_request → generic_response round trips; the server's built-in echo)
//!   hostile   --members 10000 [--hostiles 2] [--secs 10] [--quiet-secs 2] [--interval-ms 10]
//!             [--reconnect-ms 500] [--ids 1024] [--pair-interval-ms 5]
//!             (members of one room; hostile members repeat room_presence / presence_subscribe of
//!             --ids users while reconnecting; a P2P pair's latency and the server's RSS growth;
//!             server: rate limits on, --room-presence-max-members 0 --max-room-members 1000000)
//!   report    --file FILE.jsonl   (Markdown table of a benches/run.sh results file)
//! several nodes of one tier (cluster): --urls A,B,… [--server-pids P1,P2,…] [--broker-pid PID]
//!             p2p: senders on the first node, receivers on the second; broadcast: receivers
//!             spread over the nodes round-robin, the sender on the first; /health counts are
//!             summed over the nodes; server CPU is summed over the pids, and each node's and
//!             the broker's (redis-server, nats-server) are reported apart.
//!   tier      --conns N --user-offset K --total-users U --expect-total T [--p2p-secs 10]
//!             [--rate 200] [--size 100] [--settle-secs 3] [--tail-secs 3] [--hold-secs 2]
//!             [--expect-wait-secs 300]
//!             (one process of several, each holding N connections on its --url node, users
//!             K..K+N-1 of 1..=U; once /health over all --urls reports T, P2P with ack to random
//!             users outside K..K+N-1, i.e. on other nodes; see benches/cluster.sh)
//! common: --src-ips K (127.0.0.2 ..= 127.0.0.(K+1), default 8) --timeout-secs T (default 60)
//!         --clk-tck 100 --path /ws --no-metrics 1
//!         --user-offset K (density, handshake, request: user ids K, K+1, …; default 1)
//!         --src-ip-offset O (source addresses start at 127.0.0.(2+O); default 0)
//! ```
//!
//! Several generator processes can share one run, to pass the per-process open-file limit: give
//! each its own `--user-offset` and a disjoint `--src-ip-offset`, and all of them
//! `--expect-total T` (the sum of their `--conns`): each then waits until the server's /health
//! reports T connections before it reads RSS and holds, and RSS per connection is the server's
//! RSS growth divided by the growth of /health's count, i.e. over all processes. Two processes
//! of 9,000 against one server (`benches/run.sh` runs this as `density-2x9000`):
//!
//! ```text
//! loadgen density --conns 9000 --user-offset 1    --src-ip-offset 0 --expect-total 18000 … &
//! loadgen density --conns 9000 --user-offset 9001 --src-ip-offset 8 --expect-total 18000 … &
//! ```
//!
//! Prints one JSON object on stdout; progress goes to stderr. Server CPU comes from
//! utime+stime of /proc/PID/stat (clock ticks), RSS from VmRSS of /proc/PID/status.

#[path = "loadgen/engine.rs"]
mod engine;
#[path = "loadgen/report.rs"]
mod report;
#[path = "loadgen/util.rs"]
mod util;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{Value, json};

use drive::{Wait, Waited, wait};
use engine::{Ended, Engine, Handler, push_text};
use util::{Args, Minter, Server, hist_json, new_hist, r3};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the process-wide epoch (timestamps embedded in payloads).
fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1
}

macro_rules! progress {
    ($($t:tt)*) => { eprintln!("[loadgen] {}", format!($($t)*)) };
}

// After the macro, so that the scenarios there can use `progress!`.
#[path = "loadgen/drive.rs"]
mod drive;
#[path = "loadgen/hostile.rs"]
mod hostile;
#[path = "loadgen/request.rs"]
mod request;
#[path = "loadgen/rooms.rs"]
mod rooms;
#[path = "loadgen/tier.rs"]
mod tier;

/// A server → client message, only the fields the scenarios look at.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default, borrow)]
    pid: Option<Cow<'a, str>>,
    #[serde(rename = "fromUserId")]
    from: Option<i64>,
    #[serde(default)]
    payload: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    error: Option<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize, Default)]
struct InPayload<'a> {
    t: Option<u64>,
    #[serde(rename = "acknowledgedPid", borrow)]
    ack_pid: Option<Cow<'a, str>>,
    #[serde(borrow)]
    status: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
struct InError<'a> {
    #[serde(rename = "originalPid", borrow)]
    original_pid: Option<Cow<'a, str>>,
}

fn parse_error<'a>(e: Option<&'a serde_json::value::RawValue>) -> InError<'a> {
    e.and_then(|r| serde_json::from_str(r.get()).ok()).unwrap_or_default()
}

fn parse_payload<'a>(p: Option<&'a serde_json::value::RawValue>) -> InPayload<'a> {
    p.and_then(|r| serde_json::from_str(r.get()).ok()).unwrap_or_default()
}

/// Bookkeeping shared by all scenario handlers: unexpected messages, ended connections.
#[derive(Default)]
struct Common {
    parse_errors: u64,
    other_messages: BTreeMap<String, u64>,
    ended: BTreeMap<String, u64>,
}

impl Common {
    fn other(&mut self, m: &Incoming<'_>) {
        let mut k = m.ty.to_string();
        if let Some(e) = m.error {
            // Group by everything but the pid the error refers to.
            let mut v: Value = serde_json::from_str(e.get()).unwrap_or(Value::Null);
            if let Value::Object(o) = &mut v {
                o.remove("originalPid");
            }
            k.push_str(": ");
            k.push_str(&v.to_string().chars().take(120).collect::<String>());
        }
        if self.other_messages.len() < 50 || self.other_messages.contains_key(&k) {
            *self.other_messages.entry(k).or_insert(0) += 1;
        }
    }

    fn ended(&mut self, why: Ended) {
        *self.ended.entry(format!("{why:?}")).or_insert(0) += 1;
    }

    fn json(&self) -> Value {
        json!({
            "parse_errors": self.parse_errors,
            "unexpected_messages": self.other_messages,
            "connections_ended": self.ended,
        })
    }
}

/// Payload of about `size` bytes carrying a send timestamp and a sequence number.
fn payload(size: usize, seq: u64) -> String {
    payload_at(size, seq, now_us())
}

/// [`payload`] with the timestamp given: the same arguments give the same bytes.
fn payload_at(size: usize, seq: u64, t: u64) -> String {
    let head = format!("{{\"t\":{t},\"s\":{seq},\"pad\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut s = String::with_capacity(size + 2);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// Everything a scenario needs.
struct Ctx {
    args: Args,
    server: Server,
    minter: Minter,
    deadline: Instant,
    started: Instant,
    src_ips: usize,
    src_ip_offset: usize,
    /// The first user id of scenarios that take `--user-offset`.
    user_offset: i64,
    path: String,
    metrics: bool,
    problems: Vec<String>,
    /// Every node of the tier (`--urls`, `--server-pids`); `[server]` when one.
    nodes: Vec<Server>,
    /// The broker process (`--broker-pid`).
    broker: Option<Server>,
}

impl Ctx {
    /// An engine whose `connect` goes to the first node and `connect_to(k, …)` to node k.
    fn engine(&self) -> Engine {
        Engine::with_servers(
            self.nodes.iter().map(|n| n.addr).collect(),
            &self.path,
            util::src_ips(self.src_ips, self.src_ip_offset),
        )
        .expect("mio poll")
    }

    /// `/health` connections summed over every node (`None` when one does not answer).
    fn health_connections(&self) -> Option<u64> {
        self.nodes.iter().map(Server::health_connections).sum()
    }

    /// CPU marks of every node, then of the broker.
    fn cpu_all(&self) -> Vec<util::CpuMark> {
        let mut v: Vec<_> = self.nodes.iter().map(Server::cpu).collect();
        v.push(self.broker.as_ref().map(Server::cpu).unwrap_or_default());
        v
    }

    /// Server CPU (µs, clock ticks) summed over the nodes between two [`Ctx::cpu_all`] marks.
    fn nodes_cpu_us(&self, a: &[util::CpuMark], b: &[util::CpuMark]) -> Option<f64> {
        self.nodes.iter().enumerate().map(|(i, n)| n.cpu_us(a[i], b[i])).sum()
    }

    /// Server CPU (µs, schedstat) summed over the nodes.
    fn nodes_sched_us(&self, a: &[util::CpuMark], b: &[util::CpuMark]) -> Option<f64> {
        self.nodes.iter().enumerate().map(|(i, n)| n.sched_us(a[i], b[i])).sum()
    }

    /// Per node and broker: CPU between the marks, and per unit of `work[k]` (the node's
    /// deliveries or messages); all nodes' per `total`; the broker's per `broker_work`.
    fn cluster_json(
        &self,
        a: &[util::CpuMark],
        b: &[util::CpuMark],
        (unit, work, total): (&str, &[u64], u64),
        (broker_unit, broker_work): (&str, u64),
    ) -> Value {
        let per = |us: Option<f64>, n: u64| us.map(|c| r3(c / n.max(1) as f64));
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let w = work.get(i).copied().unwrap_or(0);
                let (cpu, sched) = (n.cpu_us(a[i], b[i]), n.sched_us(a[i], b[i]));
                json!({
                    "url": n.addr.to_string(),
                    "pid": n.pid,
                    unit: w,
                    "cpu_us": cpu,
                    "sched_us": sched.map(r3),
                    format!("sched_us_per_{unit}"): per(sched, w),
                    "rss_bytes": n.rss(),
                })
            })
            .collect();
        let k = self.nodes.len();
        let broker = self.broker.as_ref().map(|br| {
            let sched = br.sched_us(a[k], b[k]);
            json!({
                "pid": br.pid,
                "cpu_us": br.cpu_us(a[k], b[k]),
                "sched_us": sched.map(r3),
                format!("sched_us_per_{broker_unit}"): per(sched, broker_work),
                broker_unit: broker_work,
                "rss_bytes": br.rss(),
            })
        });
        let sched = self.nodes_sched_us(a, b);
        json!({
            "nodes": nodes,
            "broker": broker,
            "nodes_sched_us": sched.map(r3),
            format!("nodes_sched_us_per_{unit}"): per(sched, total),
            format!("{unit}s"): total,
        })
    }

    fn metrics(&self) -> Option<BTreeMap<String, f64>> {
        if self.metrics { self.server.metrics() } else { None }
    }

    fn timed_out(&self) -> bool {
        Instant::now() >= self.deadline
    }
}

struct Established {
    ok: u64,
    failed: usize,
    secs: f64,
}

/// Opens `n` connections with at most `conc` in connect/upgrade at once; `spec(i)` gives the
/// token and tag of the i-th.
fn establish<H: Handler>(
    ctx: &Ctx,
    eng: &mut Engine,
    h: &mut H,
    n: usize,
    conc: usize,
    mut spec: impl FnMut(usize) -> (String, u32),
) -> Established {
    establish_on(ctx, eng, h, n, conc, |i| {
        let (tok, tag) = spec(i);
        (tok, tag, 0)
    })
}

/// [`establish`] where `spec(i)` also names the node (index into `--urls`) of the i-th.
fn establish_on<H: Handler>(
    ctx: &Ctx,
    eng: &mut Engine,
    h: &mut H,
    n: usize,
    conc: usize,
    mut spec: impl FnMut(usize) -> (String, u32, usize),
) -> Established {
    let t0 = Instant::now();
    let ok0 = eng.stats.handshakes_ok;
    let failed0 = eng.failed;
    let mut next = 0usize;
    let mut last_report = Instant::now();
    while (next < n || eng.pending > 0) && !ctx.timed_out() {
        while next < n && eng.pending < conc {
            let (tok, tag, node) = spec(next);
            next += 1;
            let _ = eng.connect_to(node, &tok, tag);
        }
        eng.poll_once(h, Duration::from_millis(2));
        if last_report.elapsed() > Duration::from_secs(1) {
            last_report = Instant::now();
            progress!(
                "connecting: {} started, {} upgraded, {} failed, {} pending",
                next,
                eng.stats.handshakes_ok - ok0,
                eng.failed - failed0,
                eng.pending
            );
        }
    }
    Established {
        ok: eng.stats.handshakes_ok - ok0,
        failed: eng.failed - failed0,
        secs: t0.elapsed().as_secs_f64(),
    }
}

/// Keeps the engine running for `d` (bounded by the deadline).
fn pump<H: Handler>(ctx: &Ctx, eng: &mut Engine, h: &mut H, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end && !ctx.timed_out() {
        eng.poll_once(h, Duration::from_millis(10));
    }
}

/// Polls /health until `pred(connections)` holds or `limit` passes, running the engine between
/// polls. Returns the last reading and whether it was reached.
fn wait_health<H: Handler>(
    ctx: &Ctx,
    eng: &mut Engine,
    h: &mut H,
    limit: Duration,
    pred: impl Fn(u64) -> bool,
) -> (Option<u64>, bool, f64) {
    let t0 = Instant::now();
    let end = t0 + limit;
    let mut last = None;
    loop {
        last = ctx.health_connections().or(last);
        if last.is_some_and(&pred) {
            return (last, true, t0.elapsed().as_secs_f64());
        }
        if Instant::now() >= end || ctx.timed_out() {
            return (last, false, t0.elapsed().as_secs_f64());
        }
        pump(ctx, eng, h, Duration::from_millis(50));
    }
}

// ------------------------------------------------------------------------------------------
// density

struct IdleH {
    common: Common,
}

impl Handler for IdleH {
    fn on_text(&mut self, _id: usize, _tag: u32, text: &[u8], _out: &mut Vec<u8>) {
        match serde_json::from_slice::<Incoming<'_>>(text) {
            Ok(m) => self.common.other(&m),
            Err(_) => self.common.parse_errors += 1,
        }
    }
    fn on_ended(&mut self, _id: usize, _tag: u32, why: Ended) {
        self.common.ended(why);
    }
}

fn density(ctx: &mut Ctx) -> Result<Value, String> {
    let n: usize = ctx.args.num("conns", 1000)?;
    let conc: usize = ctx.args.num("concurrency", 256)?;
    let hold: f64 = ctx.args.num("hold-secs", 2.0)?;
    // Several processes sharing the run: the connections of all of them.
    let expect_total: Option<u64> = match ctx.args.str("expect-total") {
        Some(_) => Some(ctx.args.num("expect-total", 0u64)?),
        None => None,
    };
    let expect_wait: f64 = ctx.args.num("expect-wait-secs", 60.0)?;
    if expect_total.is_some_and(|t| t < n as u64) {
        return Err("--expect-total is less than --conns".into());
    }
    let first_user = ctx.user_offset;
    let mut eng = ctx.engine();
    let mut h = IdleH { common: Common::default() };
    let health_before = ctx.server.health_connections();
    let rss_before = ctx.server.rss();
    let m0 = ctx.metrics();
    let cpu0 = ctx.server.cpu();
    progress!(
        "density: opening {n} connections as users {first_user}..={} (rss before {rss_before:?}, /health {health_before:?})",
        first_user + n as i64 - 1
    );
    let est = establish(ctx, &mut eng, &mut h, n, conc, |i| {
        (ctx.minter.token(first_user + i as i64, &[]), i as u32)
    });
    let mut cpu1 = ctx.server.cpu();
    progress!("density: {} upgraded, {} failed in {:.2}s", est.ok, est.failed, est.secs);
    let (seen, reached, wait_s) = match expect_total {
        None => wait_health(ctx, &mut eng, &mut h, Duration::from_secs(20), |c| c >= est.ok),
        Some(total) => {
            progress!("density: waiting for /health to report {total} connections (all processes)");
            let r = wait_health(ctx, &mut eng, &mut h, Duration::from_secs_f64(expect_wait), |c| c >= total);
            // The handshakes of every process, up to the moment all of them are in.
            cpu1 = ctx.server.cpu();
            r
        }
    };
    if !reached {
        ctx.problems.push(format!(
            "/health reported {seen:?} connections, expected {}",
            expect_total.unwrap_or(est.ok)
        ));
    }
    // The connections the RSS and CPU growth is divided by: this process's alone, or with
    // --expect-total those all processes added to /health since this one started.
    let counted = match (expect_total, seen) {
        (None, _) => est.ok,
        (Some(_), Some(s)) => s.saturating_sub(health_before.unwrap_or(0)),
        (Some(_), None) => 0,
    };
    // Let the allocator settle a little, then read RSS.
    pump(ctx, &mut eng, &mut h, Duration::from_millis(300));
    let rss_after = ctx.server.rss();
    let hwm = ctx.server.hwm();
    progress!("density: rss after {rss_after:?} ({counted} connections counted); holding {hold}s");
    pump(ctx, &mut eng, &mut h, Duration::from_secs_f64(hold));
    let open_after_hold = eng.open;
    let health_hold = ctx.server.health_connections();
    if (open_after_hold as u64) < est.ok {
        ctx.problems.push(format!("{} connections ended during the hold", est.ok - open_after_hold as u64));
    }
    let m1 = ctx.metrics();
    eng.close_all();
    // With other processes, they close at about the same time (all hold as long after the total
    // was reached); only this process's connections must be gone.
    let (after_close, closed, close_s) =
        wait_health(ctx, &mut eng, &mut h, Duration::from_secs(15), |c| c == 0);
    let others_left = expect_total.map_or(0, |t| t - est.ok.min(t));
    if !closed && after_close.is_none_or(|c| c > others_left) {
        ctx.problems.push(format!("/health still reports {after_close:?} connections after closing all"));
    }
    let rss_closed = ctx.server.rss();
    let per_conn = match (rss_before, rss_after) {
        (Some(a), Some(b)) if counted > 0 => Some(r3((b as f64 - a as f64) / counted as f64)),
        _ => None,
    };
    let cpu_us = ctx.server.cpu_us(cpu0, cpu1);
    Ok(json!({
        "conns": n,
        "concurrency": conc,
        "first_user_id": first_user,
        "expect_total": expect_total,
        "conns_counted": counted,
        "upgraded": est.ok,
        "failed": est.failed,
        "connect_secs": r3(est.secs),
        "handshakes_per_sec": r3(est.ok as f64 / est.secs.max(1e-9)),
        "handshake_latency": hist_json(&eng.handshake_hist),
        "server_cpu_us_per_handshake": cpu_us.map(|c| r3(c / counted.max(1) as f64)),
        "health_connections_before": health_before,
        "health_connections_open": seen,
        "health_wait_secs": r3(wait_s),
        "health_connections_after_hold": health_hold,
        "open_after_hold": open_after_hold,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_hwm_bytes": hwm,
        "rss_after_close_bytes": rss_closed,
        "rss_bytes_per_conn": per_conn,
        "health_connections_after_close": after_close,
        "close_drain_secs": r3(close_s),
        "server_threads": ctx.server.threads(),
        "server_metrics_delta": util::metrics_delta(&m0, &m1),
        "client": h.common.json(),
        "engine": eng.stats.to_json(),
    }))
}

// ------------------------------------------------------------------------------------------
// broadcast

struct BcastH {
    receivers: usize,
    counts: Vec<u32>,
    total: u64,
    acks: u64,
    lat: Histogram<u64>,
    last_at: Option<Instant>,
    wrong_from: u64,
    sender_user: i64,
    common: Common,
}

impl Handler for BcastH {
    fn on_text(&mut self, _id: usize, tag: u32, text: &[u8], _out: &mut Vec<u8>) {
        let now = now_us();
        let m = match serde_json::from_slice::<Incoming<'_>>(text) {
            Ok(m) => m,
            Err(_) => {
                self.common.parse_errors += 1;
                return;
            }
        };
        match &*m.ty {
            "data_event" if (tag as usize) < self.receivers => {
                self.counts[tag as usize] += 1;
                self.total += 1;
                self.last_at = Some(Instant::now());
                if m.from != Some(self.sender_user) {
                    self.wrong_from += 1;
                }
                if let Some(t) = parse_payload(m.payload).t {
                    let _ = self.lat.record(now.saturating_sub(t).max(1));
                }
            }
            "server_ack" if tag as usize == self.receivers => self.acks += 1,
            _ => self.common.other(&m),
        }
    }
    fn on_ended(&mut self, _id: usize, _tag: u32, why: Ended) {
        self.common.ended(why);
    }
}

fn broadcast(ctx: &mut Ctx) -> Result<Value, String> {
    let r: usize = ctx.args.num("receivers", 1000)?;
    let m: usize = ctx.args.num("messages", 200)?;
    let size: usize = ctx.args.num("size", 100)?;
    let conc: usize = ctx.args.num("concurrency", 256)?;
    let with_pid: u32 = ctx.args.num("with-pid", 0)?;
    let rounds: usize = ctx.args.num("rounds", 1)?;
    let mut eng = ctx.engine();
    let sender_user = r as i64 + 1;
    let mut h = BcastH {
        receivers: r,
        counts: vec![0; r],
        total: 0,
        acks: 0,
        lat: new_hist(),
        last_at: None,
        wrong_from: 0,
        sender_user,
        common: Common::default(),
    };
    let n_nodes = ctx.nodes.len();
    progress!("broadcast: opening {r} receivers + 1 sender (receivers over {n_nodes} node(s))");
    let est = establish_on(ctx, &mut eng, &mut h, r + 1, conc, |i| {
        if i < r {
            (ctx.minter.token(i as i64 + 1, &[]), i as u32, i % n_nodes)
        } else {
            (ctx.minter.token(sender_user, &["broadcast"]), r as u32, 0)
        }
    });
    if est.ok < (r + 1) as u64 {
        ctx.problems.push(format!("only {} of {} connections upgraded", est.ok, r + 1));
    }
    let (seen, reached, _) = wait_health(ctx, &mut eng, &mut h, Duration::from_secs(10), |c| c >= est.ok);
    if !reached {
        ctx.problems.push(format!("/health reported {seen:?} connections, expected {}", est.ok));
    }
    // Several nodes: let every node learn of the others' users and rooms first.
    pump(ctx, &mut eng, &mut h, Duration::from_millis(if n_nodes > 1 { 1500 } else { 300 }));
    // The sender is the connection tagged `r`.
    let sender_id = (0..eng.capacity())
        .find(|&id| eng.is_open(id) && eng.tag(id) == Some(r as u32))
        .ok_or("sender connection did not open")?;
    let m0 = ctx.metrics();
    let rss0 = ctx.server.rss();
    let cpu0 = ctx.server.cpu();
    let all0 = ctx.cpu_all();
    let self0 = util::self_cpu_us(ctx.server.clk_tck);
    let per_round = (est.ok.saturating_sub(1)) * m as u64;
    let expected = per_round * rounds as u64;
    let want_acks = if with_pid != 0 { m as u64 } else { 0 };
    let mut round_secs = Vec::new();
    let t0 = Instant::now();
    for round in 0..rounds {
        let tr = Instant::now();
        let mut frames = Vec::with_capacity(m * (size + 64));
        for seq in 0..m {
            let p = payload(size, seq as u64);
            let msg = if with_pid != 0 {
                format!("{{\"type\":\"data_request\",\"pid\":\"b{seq}\",\"payload\":{p}}}")
            } else {
                format!("{{\"type\":\"data_request\",\"payload\":{p}}}")
            };
            push_text(&mut frames, msg.as_bytes());
        }
        eng.send_raw(sender_id, &frames);
        let want = per_round * (round as u64 + 1);
        let want_acks = want_acks * (round as u64 + 1);
        if round == 0 {
            progress!("broadcast: {rounds} round(s) of {m} messages, {per_round} deliveries each");
        }
        let stalled = |secs: f64, open: usize| {
            format!(
                "broadcast stalled in round {round}: {open} open connections, no delivery for {secs:.1} s"
            )
        };
        let w = Wait { min_open: 2, ..Wait::plain("broadcast", Duration::from_secs(5), &stalled) };
        let waited = wait(
            ctx,
            &mut eng,
            &mut h,
            &w,
            |h| h.total >= want && h.acks >= want_acks,
            |h| h.total,
            |h| format!("{} / {} deliveries", h.total, expected),
        );
        if waited == Waited::Stopped {
            break;
        }
        round_secs.push(r3(h.last_at.map(|t| t.saturating_duration_since(tr).as_secs_f64()).unwrap_or(0.0)));
        if ctx.timed_out() {
            break;
        }
    }
    let cpu1 = ctx.server.cpu();
    let all1 = ctx.cpu_all();
    let self1 = util::self_cpu_us(ctx.server.clk_tck);
    let rss1 = ctx.server.rss();
    let wall = h.last_at.map(|t| t.duration_since(t0).as_secs_f64()).unwrap_or(t0.elapsed().as_secs_f64());
    // Late or duplicate messages.
    pump(ctx, &mut eng, &mut h, Duration::from_millis(300));
    let m1 = ctx.metrics();
    if h.total < expected {
        ctx.problems.push(format!("{} of {} deliveries missing", expected - h.total, expected));
    }
    if h.total > expected {
        ctx.problems.push(format!("{} deliveries more than expected", h.total - expected));
    }
    let cpu_us = if n_nodes > 1 { ctx.nodes_cpu_us(&all0, &all1) } else { ctx.server.cpu_us(cpu0, cpu1) };
    let mut per_node = vec![0u64; n_nodes];
    for (i, c) in h.counts.iter().enumerate() {
        per_node[i % n_nodes] += u64::from(*c);
    }
    let publishes = (m * round_secs.len()) as u64;
    let cluster = ctx.cluster_json(&all0, &all1, ("delivery", &per_node, h.total), ("publish", publishes));
    let min = h.counts.iter().min().copied().unwrap_or(0);
    let max = h.counts.iter().max().copied().unwrap_or(0);
    let short = h.counts.iter().filter(|&&c| (c as usize) < m * rounds).count();
    let out = json!({
        "receivers": r,
        "messages": m,
        "rounds": rounds,
        "round_wall_secs": round_secs,
        "size": size,
        "with_pid": with_pid != 0,
        "upgraded": est.ok,
        "connect_secs": r3(est.secs),
        "expected_deliveries": expected,
        "deliveries": h.total,
        "receivers_short": short,
        "per_receiver_min": min,
        "per_receiver_max": max,
        "wrong_from_user": h.wrong_from,
        "acks": h.acks,
        "wall_secs": r3(wall),
        "deliveries_per_sec": r3(h.total as f64 / wall.max(1e-9)),
        "server_cpu_us": cpu_us,
        "server_cpu_us_per_delivery": cpu_us.map(|c| r3(c / (h.total.max(1)) as f64)),
        "server_cpu_us_per_delivery_expected": cpu_us.map(|c| r3(c / (expected.max(1)) as f64)),
        "loadgen_cpu_us": match (self0, self1) { (Some(a), Some(b)) => Some(b - a), _ => None },
        "cluster": cluster,
        "latency_note": "send timestamp taken when the whole burst of M was queued (per round)",
        "latency": hist_json(&h.lat),
        "rss_before_bytes": rss0,
        "rss_after_bytes": rss1,
        "server_metrics_delta": util::metrics_delta(&m0, &m1),
        "client": h.common.json(),
        "engine": eng.stats.to_json(),
    });
    eng.close_all();
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// p2p

struct P2pH {
    pairs: usize,
    m: u32,
    size: usize,
    sent: Vec<u32>,
    acked: Vec<u32>,
    received: Vec<u32>,
    send_us: Vec<u64>,
    total_acked: u64,
    total_received: u64,
    rtt: Histogram<u64>,
    deliv: Histogram<u64>,
    ack_status: BTreeMap<String, u64>,
    bad_ack: u64,
    wrong_from: u64,
    extra_received: u64,
    /// Messages answered with error_notification instead of server_ack.
    errored: u64,
    common: Common,
}

impl P2pH {
    fn msg(&mut self, idx: usize, out: &mut Vec<u8>) {
        let seq = self.sent[idx];
        self.sent[idx] += 1;
        let target = 2 * (idx as i64 + 1) + 1;
        let p = payload(self.size, seq as u64);
        self.send_us[idx * self.m as usize + seq as usize] = now_us();
        let msg = format!(
            "{{\"type\":\"data_request\",\"targetUserId\":{target},\"pid\":\"{seq}\",\"payload\":{p}}}"
        );
        push_text(out, msg.as_bytes());
    }
}

impl Handler for P2pH {
    fn on_text(&mut self, _id: usize, tag: u32, text: &[u8], out: &mut Vec<u8>) {
        let now = now_us();
        let msg = match serde_json::from_slice::<Incoming<'_>>(text) {
            Ok(m) => m,
            Err(_) => {
                self.common.parse_errors += 1;
                return;
            }
        };
        let idx = (tag as usize / 2).saturating_sub(1);
        if idx >= self.pairs {
            self.common.other(&msg);
            return;
        }
        let sender = tag.is_multiple_of(2);
        match (&*msg.ty, sender) {
            ("server_ack", true) => {
                let p = parse_payload(msg.payload);
                let status = p.status.as_deref().unwrap_or("?");
                if status != "delivered" {
                    *self.ack_status.entry(status.to_string()).or_insert(0) += 1;
                }
                let seq: Option<u32> = p.ack_pid.as_deref().and_then(|s| s.parse().ok());
                match seq {
                    Some(seq) if seq < self.m => {
                        let slot = &mut self.send_us[idx * self.m as usize + seq as usize];
                        if *slot == 0 {
                            self.bad_ack += 1;
                            return;
                        }
                        let _ = self.rtt.record(now.saturating_sub(*slot).max(1));
                        *slot = 0;
                    }
                    _ => {
                        self.bad_ack += 1;
                        return;
                    }
                }
                self.acked[idx] += 1;
                self.total_acked += 1;
                if self.sent[idx] < self.m {
                    self.msg(idx, out);
                }
            }
            ("error_notification", true) => {
                self.common.other(&msg);
                let seq: Option<u32> =
                    parse_error(msg.error).original_pid.as_deref().and_then(|s| s.parse().ok());
                if let Some(seq) = seq.filter(|&q| q < self.m) {
                    let slot = &mut self.send_us[idx * self.m as usize + seq as usize];
                    if *slot != 0 {
                        *slot = 0;
                        self.errored += 1;
                        if self.sent[idx] < self.m {
                            self.msg(idx, out);
                        }
                    }
                }
            }
            ("data_event", false) => {
                if msg.from != Some(tag as i64 - 1) {
                    self.wrong_from += 1;
                }
                if self.received[idx] >= self.m {
                    self.extra_received += 1;
                } else {
                    self.received[idx] += 1;
                    self.total_received += 1;
                }
                if let Some(t) = parse_payload(msg.payload).t {
                    let _ = self.deliv.record(now.saturating_sub(t).max(1));
                }
            }
            _ => self.common.other(&msg),
        }
    }
    fn on_ended(&mut self, _id: usize, _tag: u32, why: Ended) {
        self.common.ended(why);
    }
}

fn p2p(ctx: &mut Ctx) -> Result<Value, String> {
    let pairs: usize = ctx.args.num("pairs", 64)?;
    let inflight: u32 = ctx.args.num("inflight", 1)?;
    let m: u32 = ctx.args.num("messages", 1000)?;
    let size: usize = ctx.args.num("size", 100)?;
    let conc: usize = ctx.args.num("concurrency", 256)?;
    let mut eng = ctx.engine();
    let mut h = P2pH {
        pairs,
        m,
        size,
        sent: vec![0; pairs],
        acked: vec![0; pairs],
        received: vec![0; pairs],
        send_us: vec![0; pairs * m as usize],
        total_acked: 0,
        total_received: 0,
        rtt: new_hist(),
        deliv: new_hist(),
        ack_status: BTreeMap::new(),
        bad_ack: 0,
        wrong_from: 0,
        extra_received: 0,
        errored: 0,
        common: Common::default(),
    };
    progress!("p2p: opening {pairs} pairs");
    // Receivers first, so that no message targets a user not yet connected. Several nodes:
    // senders on the first, receivers on the second.
    let n_nodes = ctx.nodes.len();
    let est = establish_on(ctx, &mut eng, &mut h, 2 * pairs, conc, |i| {
        if i < pairs {
            let user = 2 * (i as i64 + 1) + 1;
            (ctx.minter.token(user, &[]), user as u32, 1 % n_nodes)
        } else {
            let user = 2 * ((i - pairs) as i64 + 1);
            (ctx.minter.token(user, &[]), user as u32, 0)
        }
    });
    if est.ok < 2 * pairs as u64 {
        ctx.problems.push(format!("only {} of {} connections upgraded", est.ok, 2 * pairs));
    }
    let (seen, reached, _) = wait_health(ctx, &mut eng, &mut h, Duration::from_secs(10), |c| c >= est.ok);
    if !reached {
        ctx.problems.push(format!("/health reported {seen:?} connections, expected {}", est.ok));
    }
    // Several nodes: the senders' node must have learnt the receivers are online elsewhere.
    pump(ctx, &mut eng, &mut h, Duration::from_millis(if n_nodes > 1 { 1500 } else { 300 }));
    let mut senders = Vec::new();
    for id in 0..eng.capacity() {
        if let Some(tag) = eng.tag(id)
            && tag.is_multiple_of(2)
            && eng.is_open(id)
        {
            senders.push((id, (tag as usize / 2) - 1));
        }
    }
    let m0 = ctx.metrics();
    let cpu0 = ctx.server.cpu();
    let all0 = ctx.cpu_all();
    let self0 = util::self_cpu_us(ctx.server.clk_tck);
    let t0 = Instant::now();
    for &(id, idx) in &senders {
        let mut frames = Vec::new();
        for _ in 0..inflight.min(m) {
            h.msg(idx, &mut frames);
        }
        eng.send_raw(id, &frames);
    }
    let want = senders.len() as u64 * m as u64;
    progress!("p2p: {} senders started, {want} messages to go", senders.len());
    let stalled = |_: f64, _: usize| "no progress for 5 s (lost messages or acks?)".to_string();
    wait(
        ctx,
        &mut eng,
        &mut h,
        &Wait::plain("p2p", Duration::from_secs(5), &stalled),
        |h| h.total_acked + h.errored >= want && h.total_received + h.errored >= want,
        |h| h.total_acked + h.total_received,
        |h| format!("{} acked, {} received of {want}", h.total_acked, h.total_received),
    );
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = ctx.server.cpu();
    let all1 = ctx.cpu_all();
    let self1 = util::self_cpu_us(ctx.server.clk_tck);
    pump(ctx, &mut eng, &mut h, Duration::from_millis(200));
    let m1 = ctx.metrics();
    if h.errored > 0 {
        ctx.problems.push(format!("{} of {want} messages answered with error_notification", h.errored));
    }
    if h.total_acked + h.errored < want {
        ctx.problems.push(format!(
            "{} of {want} messages got neither ack nor error",
            want - h.total_acked - h.errored
        ));
    }
    if h.total_received < want {
        ctx.problems.push(format!("{} of {want} deliveries missing", want - h.total_received));
    }
    let cpu_us = if n_nodes > 1 { ctx.nodes_cpu_us(&all0, &all1) } else { ctx.server.cpu_us(cpu0, cpu1) };
    let msgs = h.total_acked.max(1) as f64;
    // Each message costs the senders' node (read, publish, ack) and the receivers' (deliver).
    let mut work = vec![0u64; n_nodes];
    work[0] = h.total_acked;
    if n_nodes > 1 {
        work[1] = h.total_acked;
    }
    let cluster = ctx.cluster_json(&all0, &all1, ("msg", &work, h.total_acked), ("msg", h.total_acked));
    let out = json!({
        "pairs": pairs,
        "inflight": inflight,
        "messages_per_sender": m,
        "size": size,
        "upgraded": est.ok,
        "connect_secs": r3(est.secs),
        "messages": want,
        "acked": h.total_acked,
        "received": h.total_received,
        "extra_received": h.extra_received,
        "non_delivered_ack_status": h.ack_status,
        "error_notifications": h.errored,
        "bad_or_duplicate_acks": h.bad_ack,
        "wrong_from_user": h.wrong_from,
        "wall_secs": r3(wall),
        "msgs_per_sec": r3(h.total_acked as f64 / wall.max(1e-9)),
        "server_cpu_us": cpu_us,
        "server_cpu_us_per_msg": cpu_us.map(|c| r3(c / msgs)),
        "loadgen_cpu_us": match (self0, self1) { (Some(a), Some(b)) => Some(b - a), _ => None },
        "cluster": cluster,
        "ack_rtt": hist_json(&h.rtt),
        "delivery_latency": hist_json(&h.deliv),
        "server_metrics_delta": util::metrics_delta(&m0, &m1),
        "client": h.common.json(),
        "engine": eng.stats.to_json(),
    });
    eng.close_all();
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// handshake

struct HsH {
    common: Common,
}

impl Handler for HsH {
    fn on_open(&mut self, _id: usize, _tag: u32, _out: &mut Vec<u8>) -> bool {
        false
    }
    fn on_text(&mut self, _id: usize, _tag: u32, text: &[u8], _out: &mut Vec<u8>) {
        match serde_json::from_slice::<Incoming<'_>>(text) {
            Ok(m) => self.common.other(&m),
            Err(_) => self.common.parse_errors += 1,
        }
    }
    fn on_ended(&mut self, _id: usize, _tag: u32, why: Ended) {
        self.common.ended(why);
    }
}

fn handshake(ctx: &mut Ctx) -> Result<Value, String> {
    let n: usize = ctx.args.num("conns", 5000)?;
    let conc: usize = ctx.args.num("concurrency", 64)?;
    let tokens: Vec<String> = (0..n).map(|i| ctx.minter.token(ctx.user_offset + i as i64, &[])).collect();
    let mut eng = ctx.engine();
    let mut h = HsH { common: Common::default() };
    let m0 = ctx.metrics();
    let cpu0 = ctx.server.cpu();
    let self0 = util::self_cpu_us(ctx.server.clk_tck);
    progress!("handshake: {n} connections, {conc} at a time");
    let est = establish(ctx, &mut eng, &mut h, n, conc, |i| (tokens[i].clone(), i as u32));
    let cpu_mid = ctx.server.cpu();
    let self1 = util::self_cpu_us(ctx.server.clk_tck);
    // Let the server finish the closes, so their cost is counted too.
    let (left, drained, drain_s) = wait_health(ctx, &mut eng, &mut h, Duration::from_secs(10), |c| c == 0);
    let cpu1 = ctx.server.cpu();
    let m1 = ctx.metrics();
    if !drained {
        ctx.problems.push(format!("/health still reports {left:?} connections after all were closed"));
    }
    if (est.ok as usize) < n {
        ctx.problems.push(format!("only {} of {n} handshakes succeeded", est.ok));
    }
    let cpu_us = ctx.server.cpu_us(cpu0, cpu1);
    Ok(json!({
        "conns": n,
        "concurrency": conc,
        "close": "client sends close frame 1000 right after the 101, then closes the socket",
        "upgraded": est.ok,
        "failed": est.failed,
        "wall_secs": r3(est.secs),
        "handshakes_per_sec": r3(est.ok as f64 / est.secs.max(1e-9)),
        "server_cpu_us": cpu_us,
        "server_cpu_us_until_last_101": ctx.server.cpu_us(cpu0, cpu_mid),
        "server_cpu_us_per_handshake": cpu_us.map(|c| r3(c / est.ok.max(1) as f64)),
        "loadgen_cpu_us": match (self0, self1) { (Some(a), Some(b)) => Some(b - a), _ => None },
        "handshake_latency": hist_json(&eng.handshake_hist),
        "health_connections_after": left,
        "close_drain_secs": r3(drain_s),
        "server_metrics_delta": util::metrics_delta(&m0, &m1),
        "client": h.common.json(),
        "engine": eng.stats.to_json(),
    }))
}

// ------------------------------------------------------------------------------------------

fn run() -> Result<(), String> {
    let args = Args::parse()?;
    let scenario = args
        .scenario
        .clone()
        .ok_or("usage: loadgen density|broadcast|p2p|handshake|room|presence|request --url HOST:PORT --server-pid PID --secret S [options] | report FILE.jsonl")?;
    if scenario == "report" {
        let file = args.str("file").ok_or("usage: loadgen report --file FILE.jsonl")?;
        return report::report(file);
    }
    // Several nodes: --urls A,B,… with --server-pids aligned; --url and --server-pid default to
    // the first of each.
    let urls: Vec<std::net::SocketAddr> = match args.str("urls") {
        Some(list) => list.split(',').map(util::parse_url).collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let pids: Vec<String> = args
        .str("server-pids")
        .map(|l| l.split(',').filter(|p| !p.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    if !pids.is_empty() && pids.len() != urls.len() {
        return Err("--server-pids needs one pid per --urls entry".into());
    }
    let addr = match (args.str("url"), urls.first()) {
        (Some(u), _) => util::parse_url(u)?,
        (None, Some(a)) => *a,
        (None, None) => util::parse_url("127.0.0.1:8082")?,
    };
    let clk_tck: u64 = args.num("clk-tck", 100)?;
    let timeout: f64 = args.num("timeout-secs", 60.0)?;
    let src_ips: usize = args.num("src-ips", 8)?;
    if src_ips > 250 {
        return Err("--src-ips at most 250".into());
    }
    let src_ip_offset: usize = args.num("src-ip-offset", 0)?;
    if src_ip_offset + src_ips > 60_000 {
        return Err("--src-ip-offset + --src-ips at most 60000".into());
    }
    let user_offset: i64 = args.num("user-offset", 1)?;
    if user_offset < 1 {
        return Err("--user-offset: user ids start at 1".into());
    }
    let secret = args.str("secret").unwrap_or("secret").to_string();
    let server_pid = args.str("server-pid").map(str::to_string).or_else(|| {
        // The pid of --url among --urls.
        urls.iter().position(|u| *u == addr).and_then(|i| pids.get(i).cloned())
    });
    let server = Server { pid: server_pid, clk_tck, addr };
    let nodes: Vec<Server> = if urls.is_empty() {
        vec![server.clone()]
    } else {
        urls.iter()
            .enumerate()
            .map(|(i, &addr)| Server { pid: pids.get(i).cloned(), clk_tck, addr })
            .collect()
    };
    for n in &nodes {
        if let Some(p) = &n.pid
            && util::proc_cpu_ticks(p).is_none()
        {
            return Err(format!("no process {p}"));
        }
    }
    let broker = args.str("broker-pid").map(|p| Server { pid: Some(p.to_string()), clk_tck, addr });
    if let Some(p) = &server.pid
        && util::proc_cpu_ticks(p).is_none()
    {
        return Err(format!("no process {p}"));
    }
    let _ = now_us();
    let started = Instant::now();
    let mut ctx = Ctx {
        path: args.str("path").unwrap_or("/ws").to_string(),
        metrics: args.str("no-metrics").is_none_or(|v| v == "0"),
        args,
        server,
        minter: Minter::new(&secret),
        deadline: started + Duration::from_secs_f64(timeout),
        started,
        src_ips,
        src_ip_offset,
        user_offset,
        problems: Vec::new(),
        nodes,
        broker,
    };
    let result: Value = match scenario.as_str() {
        "density" => density(&mut ctx),
        "broadcast" => broadcast(&mut ctx),
        "p2p" => p2p(&mut ctx),
        "handshake" => handshake(&mut ctx),
        "room" => rooms::room(&mut ctx),
        "presence" => rooms::presence(&mut ctx),
        "request" => request::request(&mut ctx),
        "hostile" => hostile::hostile(&mut ctx),
        "tier" => tier::tier(&mut ctx),
        other => Err(format!("unknown scenario {other:?}")),
    }?;
    if ctx.timed_out() {
        ctx.problems.push(format!("overall timeout of {timeout}s reached"));
    }
    let codes = &result["engine"]["server_close_codes"];
    if codes.as_object().is_some_and(|o| !o.is_empty()) {
        ctx.problems.push(format!("server closed connections with close codes {codes}"));
    }
    let eof = result["engine"]["eof_on_open"].as_u64().unwrap_or(0);
    if eof > 0 {
        ctx.problems.push(format!("{eof} open connections hit EOF/reset without a close frame"));
    }
    for key in
        ["protocol_errors", "io_errors", "connect_errors", "handshake_http_status", "handshake_other_errors"]
    {
        let v = &result["engine"][key];
        if v.as_object().is_some_and(|o| !o.is_empty()) {
            ctx.problems.push(format!("{key}: {v}"));
        }
    }
    if !ctx.server.alive() {
        ctx.problems.push("server process is gone".into());
    }
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let argv: Vec<String> =
        std::env::args().skip(1).filter(|a| a != "--bench").map(|a| util::shell_quote(&a)).collect();
    let mut out = json!({
        "scenario": scenario,
        "command": format!("cargo bench --bench loadgen -- {}", argv.join(" ")),
        "options": ctx.args.all(),
        "url": addr.to_string(),
        "server_pid": ctx.server.pid,
        "src_ips": ctx.src_ips,
        "src_ip_offset": ctx.src_ip_offset,
        "user_offset": ctx.user_offset,
        "clk_tck": clk_tck,
        "unix_time": unix,
        "elapsed_secs": r3(ctx.started.elapsed().as_secs_f64()),
        "ok": ctx.problems.is_empty(),
        "problems": ctx.problems,
    });
    if let (Value::Object(o), Value::Object(r)) = (&mut out, result) {
        o.extend(r);
    }
    println!("{out}");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

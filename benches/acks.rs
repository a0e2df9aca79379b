//! Send-for-ack bench: server CPU per round trip, latency at a fixed number of outstanding
//! acks, and heap bytes held per outstanding ack, against an in-process server.
//!
//! ```text
//! cargo bench --bench acks -- [--users 100] [--outstanding 1000] [--total 200000] [--hold 10000]
//!                              [--warmup 10000] [--hold-rounds 2] [--timeout-secs 120]
//! ```
//!
//! The server runs in this process (`customws::start`, 2 shards, HS256); one client thread
//! holds `--users` WebSocket connections (the loadgen engine) and answers every message that
//! carries a `pid` with a `client_ack` at once. The driver (main thread) keeps exactly
//! `--outstanding` acks in flight through `Handle::submit(Op::Ack …)`, submitting one as each
//! completes, until `--total` complete. Server CPU is the shard threads' only
//! (`/proc/self/task/TID/stat` utime + stime, and the per-thread CPU clocks for precision).
//! Then the clients stop answering, `--hold` acks are submitted, and the growth of live heap
//! bytes (a counting global allocator) once every client has its message gives the bytes held
//! per outstanding ack. Prints one JSON object on stdout and a summary on stderr; everything is
//! bounded by `--timeout-secs`, after which what was measured so far is printed and the exit
//! status is 2.

#[path = "acks/client.rs"]
mod client;
#[path = "acks/counting.rs"]
mod counting;
#[path = "acks/cpu.rs"]
mod cpu;
#[allow(dead_code)]
#[path = "loadgen/engine.rs"]
mod engine;
#[allow(dead_code)]
#[path = "loadgen/util.rs"]
mod util;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use customws::app::handle::Op;
use customws::app::{Completion, Handle, OutMessage, Outcome, WaitError};
use customws::core::Directory;
use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

use client::Control;
use util::{Args, hist_json, new_hist, r3, shell_quote};

#[global_allocator]
static GLOBAL: counting::Counting = counting::Counting;

const SECRET: &str = "acks-bench-secret";
/// Tags at or above this belong to the memory phase.
const HOLD_TAG: u64 = 1 << 40;

type Report = Arc<Mutex<Map<String, Value>>>;

struct Opts {
    users: usize,
    outstanding: usize,
    total: u64,
    hold: usize,
    hold_rounds: usize,
    warmup: u64,
    timeout: Duration,
    hold_timeout: Duration,
}

impl Opts {
    fn parse() -> Result<Opts, String> {
        let a = Args::parse()?;
        if let Some(s) = &a.scenario {
            return Err(format!("unexpected argument {s:?}"));
        }
        let known = [
            "users",
            "outstanding",
            "total",
            "hold",
            "hold-rounds",
            "warmup",
            "timeout-secs",
            "hold-timeout-secs",
        ];
        if let Some(k) = a.all().keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!("unknown option --{k}"));
        }
        let o = Opts {
            users: a.num("users", 100)?,
            outstanding: a.num("outstanding", 1000)?,
            total: a.num("total", 200_000)?,
            hold: a.num("hold", 10_000)?,
            hold_rounds: a.num("hold-rounds", 2)?,
            warmup: a.num("warmup", 10_000)?,
            timeout: Duration::from_secs_f64(a.num("timeout-secs", 120.0)?),
            hold_timeout: Duration::from_secs_f64(a.num("hold-timeout-secs", 300.0)?),
        };
        if o.users == 0 || o.users > 20_000 || o.outstanding == 0 || o.total == 0 || o.hold_rounds > 10 {
            return Err("need 1 <= users <= 20000, outstanding >= 1, total >= 1, hold-rounds <= 10".into());
        }
        Ok(o)
    }

    fn json(&self) -> Value {
        json!({
            "users": self.users,
            "outstanding": self.outstanding,
            "total": self.total,
            "hold": self.hold,
            "hold_rounds": self.hold_rounds,
            "warmup": self.warmup,
            "timeout_secs": self.timeout.as_secs_f64(),
            "hold_timeout_secs": self.hold_timeout.as_secs_f64(),
        })
    }
}

macro_rules! progress {
    ($($t:tt)*) => { eprintln!("[acks] {}", format!($($t)*)) };
}

fn set(report: &Report, key: &str, v: Value) {
    if let Ok(mut m) = report.lock() {
        m.insert(key.to_string(), v);
    }
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench" && a != "--nocapture")
        .map(|a| shell_quote(&a))
        .collect();
    if args.is_empty() {
        "cargo bench --bench acks".to_string()
    } else {
        format!("cargo bench --bench acks -- {}", args.join(" "))
    }
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string());
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    json!({
        "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": model,
        "kernel": kernel,
        "git_head": git,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_string()),
    })
}

/// Prints what is known and exits 2 when the global deadline passes.
fn spawn_watchdog(report: Report, done: Arc<AtomicBool>, deadline: Instant) {
    let spawned = std::thread::Builder::new().name("acks-watchdog".into()).spawn(move || {
        while !done.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                let mut out = Map::new();
                for _ in 0..50 {
                    if let Ok(m) = report.try_lock() {
                        out = m.clone();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                out.insert("ok".into(), json!(false));
                out.insert("error".into(), json!("global timeout: printing what was measured so far"));
                println!("{}", Value::Object(out.clone()));
                eprintln!("{}", summary(&out));
                std::process::exit(2);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    if let Err(e) = spawned {
        progress!("cannot start the watchdog thread: {e}");
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    let opts = match Opts::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("acks: {e}");
            eprintln!(
                "usage: cargo bench --bench acks -- [--users 100] [--outstanding 1000] [--total 200000] \
                 [--hold 10000] [--warmup 10000] [--hold-rounds 2] [--timeout-secs 120] [--hold-timeout-secs 300]"
            );
            return ExitCode::from(2);
        }
    };
    let deadline = started + opts.timeout;
    let report: Report = Arc::new(Mutex::new(Map::new()));
    set(&report, "bench", json!("acks"));
    set(&report, "command", json!(command_line()));
    set(&report, "options", opts.json());
    set(&report, "machine", machine());
    let done = Arc::new(AtomicBool::new(false));
    // The phases stop themselves at `deadline`; the watchdog is the backstop for anything that
    // blocks (a shutdown that hangs), with a grace period for the orderly exit.
    spawn_watchdog(Arc::clone(&report), Arc::clone(&done), deadline + Duration::from_secs(10));

    let result = run(&opts, &report, deadline);
    done.store(true, Ordering::Release);
    set(&report, "wall_secs", json!(r3(started.elapsed().as_secs_f64())));
    let timed_out = Instant::now() >= deadline;
    let ok = match &result {
        Ok(()) => true,
        Err(e) if timed_out => {
            set(&report, "error", json!(format!("global timeout ({} s): {e}", opts.timeout.as_secs_f64())));
            false
        }
        Err(e) => {
            set(&report, "error", json!(e));
            false
        }
    };
    set(&report, "ok", json!(ok));
    let out = report.lock().map(|m| m.clone()).unwrap_or_default();
    println!("{}", Value::Object(out.clone()));
    eprintln!("{}", summary(&out));
    match (ok, timed_out) {
        (true, _) => ExitCode::SUCCESS,
        (false, true) => ExitCode::from(2),
        (false, false) => ExitCode::from(1),
    }
}

/// Settings given as flags so that the bench does not depend on their field names: the abuse
/// limits would otherwise refuse the clients' acks (by default 100 messages/s and 1 MiB/s per
/// connection).
const EXTRA_FLAGS: &[&str] = &["--rate-limit=0", "--rate-limit-bytes=0"];

/// The server configuration, and which of [`EXTRA_FLAGS`] this build accepted.
fn config() -> (customws::Config, Value) {
    let mut applied = Map::new();
    let mut c = customws::Config::default();
    // Loading validates, and HS256 needs its secret.
    let mut accepted: Vec<String> = vec![format!("--jwt-secret={SECRET}")];
    for flag in EXTRA_FLAGS {
        let flags = accepted.iter().cloned().chain([flag.to_string()]);
        match customws::Config::load(flags, std::iter::empty()) {
            Ok(loaded) => {
                c = loaded;
                accepted.push(flag.to_string());
                applied.insert(flag.to_string(), json!("applied"));
            }
            Err(e) => {
                applied.insert(flag.to_string(), json!(format!("not applied: {e}")));
            }
        }
    }
    c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c.shards = 2;
    c.jwt_secret = Some(SECRET.to_string());
    c.pong_wait = Duration::from_secs(600);
    c.ping_period = Duration::from_secs(540);
    c.ack_timeout = Duration::from_secs(30);
    c.send_queue = 4096;
    c.send_queue_bytes = 16 << 20;
    c.shutdown_timeout = Duration::from_secs(5);
    c.log_level = "warn".into();
    (c, Value::Object(applied))
}

fn run(opts: &Opts, report: &Report, deadline: Instant) -> Result<(), String> {
    let (cfg, extra) = config();
    set(
        report,
        "server_config",
        json!({
            "listen": cfg.listen.to_string(), "shards": cfg.shards, "ack_timeout_secs": cfg.ack_timeout.as_secs(),
            "pong_wait_secs": cfg.pong_wait.as_secs(), "ping_period_secs": cfg.ping_period.as_secs(),
            "send_queue": cfg.send_queue, "send_queue_bytes": cfg.send_queue_bytes,
            "extra_flags": extra,
        }),
    );
    let server = customws::start(cfg).map_err(|e| format!("server start: {e}"))?;
    let addr = server.local_addr();
    let handle = server.handle();
    progress!("server on {addr}, 2 shards");

    let ctl = Arc::new(Control::default());
    let client = {
        let ctl = Arc::clone(&ctl);
        let (users, cap) = (opts.users, opts.hold + opts.outstanding + 1024);
        std::thread::Builder::new()
            .name("acks-client".into())
            .spawn(move || client::run(addr, "/ws", SECRET, users, cap, ctl, deadline))
            .map_err(|e| format!("client thread: {e}"))?
    };
    ctl.answer.store(true, Ordering::Release);

    let result = phases(opts, report, deadline, &handle, &ctl);
    if let Err(e) = &result {
        progress!("error: {e}");
    }

    // Shutdown: release anything held, stop the server, then the client.
    ctl.answer.store(true, Ordering::Release);
    let t = Instant::now();
    server.shutdown();
    server.wait();
    let shutdown_ms = t.elapsed().as_secs_f64() * 1e3;
    ctl.stop.store(true, Ordering::Release);
    let client_summary = client.join().unwrap_or_else(|_| json!({ "error": "client thread panicked" }));
    set(report, "client", client_summary);
    set(report, "shutdown", json!({ "ms": r3(shutdown_ms) }));
    progress!("server shut down in {shutdown_ms:.1} ms");
    result
}

/// Everything between the server start and its shutdown.
fn phases(
    opts: &Opts,
    report: &Report,
    deadline: Instant,
    handle: &Handle,
    ctl: &Control,
) -> Result<(), String> {
    // Connections.
    let t = Instant::now();
    let connect_deadline = deadline.min(t + Duration::from_secs(30));
    while (ctl.open.load(Ordering::Relaxed) as usize) < opts.users {
        let failed = ctl.failed.load(Ordering::Relaxed);
        if failed > 0 {
            return Err(format!("{failed} client connections failed to open"));
        }
        if Instant::now() >= connect_deadline {
            return Err(format!("only {} of {} clients open", ctl.open.load(Ordering::Relaxed), opts.users));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let connect_ms = t.elapsed().as_secs_f64() * 1e3;
    // The home shards must know every user before the first ack (Offline otherwise).
    let mut on_home = 0;
    let mut per_shard = [0u64; 2];
    for user in 1..=opts.users as i64 {
        let conns = loop {
            let conns =
                handle.user_connections(user).wait_timeout(Duration::from_secs(2)).unwrap_or_default();
            if !conns.is_empty() {
                break conns;
            }
            if Instant::now() >= connect_deadline {
                return Err(format!("user {user} is not online at its home shard"));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if conns.iter().any(|c| c.shard == Directory::home_of(user, 2)) {
            on_home += 1;
        }
        for c in &conns {
            if let Some(n) = per_shard.get_mut(c.shard) {
                *n += 1;
            }
        }
    }
    set(
        report,
        "connect",
        json!({
            "users": opts.users,
            "ms": r3(connect_ms),
            "connections_per_shard": per_shard,
            "users_connected_on_their_home_shard": on_home,
        }),
    );
    progress!(
        "{} clients open in {connect_ms:.0} ms ({per_shard:?} per shard, {on_home} on their home shard)",
        opts.users
    );

    let shards = cpu::tasks("customws-shard");
    if shards.len() != 2 {
        return Err(format!("expected 2 shard threads named customws-shard*, found {}", shards.len()));
    }
    let client_tasks = cpu::tasks("acks-client");
    let main_task: Vec<cpu::Task> =
        cpu::my_tid().map(|tid| cpu::Task { tid, comm: "main (driver)".into() }).into_iter().collect();
    let all_tasks = cpu::tasks("");
    let tck = cpu::clk_tck();

    let msg = OutMessage::new("data_event", r#"{"seq":1,"body":"0123456789abcdef0123456789abcdef"}"#)
        .map_err(|e| e.to_string())?;
    let (tx, rx) = crossbeam_channel::unbounded::<(u64, Outcome)>();
    let mut driver = Driver { handle, msg: &msg, tx: &tx, rx: &rx, users: opts.users, next_user: 0 };

    // Warm-up (not measured).
    if opts.warmup > 0 {
        let mut hist = new_hist();
        let w = driver.round_trips(opts.outstanding, opts.warmup, deadline, &mut hist);
        progress!("warm-up: {} acks in {:.2} s", w.completed, w.wall.as_secs_f64());
        if w.completed != opts.warmup {
            return Err(format!("warm-up: {} of {} acks completed", w.completed, opts.warmup));
        }
    }

    // Round trips.
    progress!("round trips: {} acks, {} outstanding, {} users", opts.total, opts.outstanding, opts.users);
    let (live0, client_live0) = counting::live();
    let allocs0 = counting::allocations();
    let machine0 = cpu::Machine::take();
    let marks0 = [&shards, &client_tasks, &main_task, &all_tasks].map(|t| cpu::Mark::take(t));
    let mut hist = new_hist();
    let rt = driver.round_trips(opts.outstanding, opts.total, deadline, &mut hist);
    let marks1 = [&shards, &client_tasks, &main_task, &all_tasks].map(|t| cpu::Mark::take(t));
    let machine1 = cpu::Machine::take();
    let allocs1 = counting::allocations();
    let (live1, client_live1) = counting::live();
    let spent: Vec<cpu::Spent> =
        marks0.iter().zip(&marks1).map(|(a, b)| cpu::Spent::between(a, b, tck)).collect();
    let n = rt.completed.max(1);
    let secs = rt.wall.as_secs_f64();
    let shard_us = spent[0].ticks_us.map(|us| r3(us / n as f64));
    let shard_us_clock = spent[0].clock_us.map(|us| r3(us / n as f64));
    let rt_json = json!({
        "total": opts.total,
        "outstanding": opts.outstanding,
        "submitted": rt.submitted,
        "completed": rt.completed,
        "acked": rt.acked,
        "ack_status_not_ok": rt.not_ok,
        "failed": rt.failed,
        "lost": rt.submitted - rt.completed,
        "wall_secs": r3(secs),
        "acks_per_sec": r3(rt.completed as f64 / secs.max(1e-9)),
        "latency_us": hist_json(&hist),
        "littles_law_latency_us": r3(opts.outstanding as f64 * secs / n as f64 * 1e6),
        "shard_cpu_us_per_ack": shard_us,
        "shard_cpu_us_per_ack_clock": shard_us_clock,
        "shard_cpu": spent[0].json(n),
        "client_thread_cpu": spent[1].json(n),
        "driver_thread_cpu": spent[2].json(n),
        "process_cpu_us_per_ack_clock": spent[3].clock_us.map(|us| r3(us / n as f64)),
        "machine_during_phase": cpu::Machine::between(machine0, machine1, tck),
        "loadavg_after": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_string()),
        "allocations_per_ack_process": r3((allocs1 - allocs0) as f64 / n as f64),
        "heap_growth_bytes_process": (live1 - live0) - (client_live1 - client_live0),
        "heap_growth_bytes_per_completed_ack": r3(((live1 - live0) - (client_live1 - client_live0)) as f64 / n as f64),
        "heap_growth_bytes_client_thread": client_live1 - client_live0,
    });
    set(report, "round_trip", rt_json);
    progress!(
        "round trips: {} of {} in {secs:.2} s ({:.0}/s), p50 {} µs p99 {} µs, shard CPU {:?} µs/ack (clock {:?})",
        rt.completed,
        opts.total,
        rt.completed as f64 / secs.max(1e-9),
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        shard_us,
        shard_us_clock
    );
    if rt.completed != opts.total || rt.acked != opts.total {
        return Err(format!(
            "round trips: {} submitted, {} completed, {} acked, failures {:?}",
            rt.submitted, rt.completed, rt.acked, rt.failed
        ));
    }

    // Memory.
    let mut rounds = Vec::new();
    for round in 0..opts.hold_rounds {
        let r = hold_round(&mut driver, opts, ctl, &shards, tck, deadline)?;
        progress!(
            "hold round {}: {} acks held: {:?} B per outstanding ack (sampled peak {:?} B), released in {:?} ms",
            round + 1,
            opts.hold,
            r.get("bytes_per_outstanding_ack"),
            r.get("sampled_peak_bytes_per_ack"),
            r.get("release_ms")
        );
        rounds.push(r);
        set(report, "memory", memory_json(opts, &rounds));
        if rounds.last().and_then(|r| r.get("error")).is_some() {
            return Err(format!("hold round {} did not complete cleanly", round + 1));
        }
    }
    Ok(())
}

fn memory_json(opts: &Opts, rounds: &[Value]) -> Value {
    use customws::app::Completion;
    use customws::core::pending::{Wait, WaitKey};
    use customws::shard::TimerKey;
    json!({
        "hold": opts.hold,
        "bytes_per_outstanding_ack": rounds.first().and_then(|r| r.get("bytes_per_outstanding_ack")),
        "bytes_per_outstanding_ack_warm": rounds.get(1).and_then(|r| r.get("bytes_per_outstanding_ack")),
        "rounds": rounds,
        "method": "live heap bytes of the whole process (counting #[global_allocator]) minus the client \
                   thread's own, read once every client has received its held message, minus the same \
                   reading just before the submits; divided by --hold. Round 1 is cold (the shards' \
                   tables grow to fit); later rounds reuse the capacity left by round 1.",
        "includes": "the shard's pending-table slab entry (Wait with its Completion, whose channel Sender \
                     clone is a refcount, no heap), the timer-wheel entry, the WaitKey in the connection's \
                     wait list, and any capacity those Vecs/slabs grew by (amortised doubling)",
        "excludes": "the queued frame (already written when measured: every client has its message), \
                     in-flight ShardMsgs (drained), the client thread's buffers, and the caller's side: the \
                     outcome channel holds nothing while the acks are outstanding and the driver's \
                     bookkeeping is preallocated, so the caller contributes ~0 here (with answers flowing, \
                     each undelivered outcome would add a channel slot)",
        "inline_sizes_bytes": {
            "pending_slab_value_(u32,Wait<Completion>)": std::mem::size_of::<(u32, Wait<Completion>)>(),
            "wheel_entry_(u64,TimerKey)": std::mem::size_of::<(u64, TimerKey)>(),
            "conn_wait_list_WaitKey": std::mem::size_of::<WaitKey>(),
            "Completion": std::mem::size_of::<Completion>(),
        },
    })
}

/// Submits and collects acks through the handle.
struct Driver<'a> {
    handle: &'a Handle,
    msg: &'a OutMessage,
    tx: &'a Sender<(u64, Outcome)>,
    rx: &'a Receiver<(u64, Outcome)>,
    users: usize,
    next_user: usize,
}

#[derive(Default)]
struct RoundTrips {
    submitted: u64,
    completed: u64,
    acked: u64,
    not_ok: u64,
    failed: BTreeMap<String, u64>,
    wall: Duration,
}

impl Driver<'_> {
    fn submit(&mut self, tag: u64, timeout: Option<Duration>) {
        let user = 1 + (self.next_user % self.users) as i64;
        self.next_user += 1;
        let parts = self
            .handle
            .submit(Op::Ack { user, msg: self.msg, timeout }, &Completion::new(self.tx.clone(), tag, None));
        debug_assert_eq!(parts, 1);
    }

    /// Keeps `outstanding` acks in flight until `total` complete (or `deadline`).
    fn round_trips(
        &mut self,
        outstanding: usize,
        total: u64,
        deadline: Instant,
        hist: &mut Histogram<u64>,
    ) -> RoundTrips {
        let mut r = RoundTrips::default();
        let t0 = Instant::now();
        let slots = (outstanding as u64).min(total) as usize;
        let mut started = vec![t0; slots];
        for (slot, at) in started.iter_mut().enumerate() {
            *at = Instant::now();
            self.submit(slot as u64, None);
            r.submitted += 1;
        }
        while r.completed < r.submitted {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let (tag, outcome) = match self.rx.recv_timeout((deadline - now).min(Duration::from_secs(1))) {
                Ok(x) => x,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let Some(at) = started.get_mut(tag as usize) else {
                *r.failed.entry(format!("unexpected tag {tag}")).or_insert(0) += 1;
                continue;
            };
            let done = Instant::now();
            let _ = hist.record((done - *at).as_micros().max(1) as u64);
            r.completed += 1;
            count_outcome(&mut r, outcome);
            if r.submitted < total {
                *at = done;
                self.submit(tag, None);
                r.submitted += 1;
            }
        }
        r.wall = t0.elapsed();
        r
    }
}

fn count_outcome(r: &mut RoundTrips, outcome: Outcome) {
    match outcome {
        Outcome::Ack(reply) => {
            r.acked += 1;
            if reply.status.as_deref() != Some("ok") || reply.error.is_some() {
                r.not_ok += 1;
            }
        }
        Outcome::Failed(e) => *r.failed.entry(wait_error(e)).or_insert(0) += 1,
        other => *r.failed.entry(format!("unexpected outcome {other:?}")).or_insert(0) += 1,
    }
}

fn wait_error(e: WaitError) -> String {
    format!("{e:?}")
}

/// One memory round: clients stop answering, `hold` acks go out, live heap is read once every
/// client has its message; then the clients answer and every ack must complete.
fn hold_round(
    driver: &mut Driver<'_>,
    opts: &Opts,
    ctl: &Control,
    shards: &[cpu::Task],
    tck: u64,
    deadline: Instant,
) -> Result<Value, String> {
    ctl.answer.store(false, Ordering::Release);
    // Let every thread settle (nothing is outstanding: the previous phase drained).
    std::thread::sleep(Duration::from_millis(300));
    let pids0 = ctl.pids.load(Ordering::Relaxed);
    let (live0, client0) = counting::live();
    let allocs0 = counting::allocations();
    let mark0 = cpu::Mark::take(shards);
    let t0 = Instant::now();
    for i in 0..opts.hold {
        driver.submit(HOLD_TAG + i as u64, Some(opts.hold_timeout));
    }
    let submit_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Wait for every client to have its message, sampling the live heap.
    let mut peak = live0 - client0;
    let mut early = RoundTrips::default();
    let wait_deadline = deadline.min(Instant::now() + Duration::from_secs(30));
    loop {
        let (l, c) = counting::live();
        peak = peak.max(l - c);
        while let Ok((_, outcome)) = driver.rx.try_recv() {
            early.completed += 1;
            count_outcome(&mut early, outcome);
        }
        if ctl.pids.load(Ordering::Relaxed) - pids0 >= opts.hold as u64 || Instant::now() >= wait_deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let received = ctl.pids.load(Ordering::Relaxed) - pids0;
    let received_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Let the shards finish writing and go idle.
    std::thread::sleep(Duration::from_millis(200));
    let mark1 = cpu::Mark::take(shards);
    let (live1, client1) = counting::live();
    let allocs1 = counting::allocations();
    let held = ctl.held.load(Ordering::Relaxed);
    let server_delta = (live1 - live0) - (client1 - client0);
    let hold = opts.hold.max(1) as f64;
    let send_cpu = cpu::Spent::between(&mark0, &mark1, tck);

    // Release: the clients answer every held pid; every ack must come back as an Ack.
    ctl.answer.store(true, Ordering::Release);
    let t1 = Instant::now();
    let mut released = RoundTrips::default();
    let expect = opts.hold as u64 - early.completed;
    let release_deadline = deadline.min(t1 + Duration::from_secs(30));
    while released.completed < expect {
        let now = Instant::now();
        if now >= release_deadline {
            break;
        }
        match driver.rx.recv_timeout((release_deadline - now).min(Duration::from_secs(1))) {
            Ok((_, outcome)) => {
                released.completed += 1;
                count_outcome(&mut released, outcome);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let release_ms = t1.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(Duration::from_millis(200));
    let (live2, client2) = counting::live();
    let retained = (live2 - live0) - (client2 - client0);

    let mut v = json!({
        "submitted": opts.hold,
        "submit_ms": r3(submit_ms),
        "clients_received": received,
        "clients_received_ms": r3(received_ms),
        "held_by_clients": held,
        "live_before": live0 - client0,
        "live_held": live1 - client1,
        "client_thread_delta": client1 - client0,
        "server_delta_bytes": server_delta,
        "bytes_per_outstanding_ack": r3(server_delta as f64 / hold),
        "sampled_peak_bytes_per_ack": r3((peak - (live0 - client0)) as f64 / hold),
        "allocations_per_held_ack": r3((allocs1 - allocs0) as f64 / hold),
        "shard_cpu_per_send_without_ack": send_cpu.json(opts.hold as u64),
        "completed_before_release": early.completed,
        "failed_before_release": early.failed,
        "release_ms": r3(release_ms),
        "completed_after_release": released.completed,
        "acked_after_release": released.acked,
        "failed_after_release": released.failed,
        "bytes_per_ack_still_held_after_all_completed": r3(retained as f64 / hold),
    });
    let clean = received == opts.hold as u64
        && early.completed == 0
        && released.acked == opts.hold as u64
        && released.failed.is_empty();
    if !clean && let Value::Object(m) = &mut v {
        m.insert("error".into(), json!("not every held ack was received, held and then acknowledged"));
    }
    Ok(v)
}

/// The human summary (stderr).
fn summary(r: &Map<String, Value>) -> String {
    let g = |path: &[&str]| -> String {
        let mut v = r.get(path[0]);
        for k in &path[1..] {
            v = v.and_then(|x| x.get(k));
        }
        match v {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "-".into(),
        }
    };
    let mut s = String::new();
    s.push_str(&format!("acks bench: {}\n", g(&["command"])));
    s.push_str(&format!(
        "  machine: {} × {} , kernel {}, {} build\n",
        g(&["machine", "nproc"]),
        g(&["machine", "cpu_model"]),
        g(&["machine", "kernel"]),
        g(&["machine", "profile"])
    ));
    s.push_str(&format!(
        "  round trips: {} acked of {} at {} outstanding over {} users, {} acks/s\n",
        g(&["round_trip", "acked"]),
        g(&["round_trip", "total"]),
        g(&["round_trip", "outstanding"]),
        g(&["connect", "users"]),
        g(&["round_trip", "acks_per_sec"])
    ));
    s.push_str(&format!(
        "  server (shard threads) CPU per round trip: {} µs (ticks), {} µs (thread clocks); \
         client thread {} µs, driver {} µs\n",
        g(&["round_trip", "shard_cpu_us_per_ack"]),
        g(&["round_trip", "shard_cpu_us_per_ack_clock"]),
        g(&["round_trip", "client_thread_cpu", "us_per_op_clock"]),
        g(&["round_trip", "driver_thread_cpu", "us_per_op_clock"])
    ));
    s.push_str(&format!(
        "  latency submit → outcome: p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs\n",
        g(&["round_trip", "latency_us", "p50_us"]),
        g(&["round_trip", "latency_us", "p99_us"]),
        g(&["round_trip", "latency_us", "p999_us"]),
        g(&["round_trip", "latency_us", "max_us"])
    ));
    s.push_str(&format!(
        "  heap held per outstanding ack: {} B cold, {} B warm (of {} held)\n",
        g(&["memory", "bytes_per_outstanding_ack"]),
        g(&["memory", "bytes_per_outstanding_ack_warm"]),
        g(&["memory", "hold"])
    ));
    s.push_str(&format!("  ok: {}  error: {}", g(&["ok"]), g(&["error"])));
    s
}

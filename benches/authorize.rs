//! The cost of `Application::authorize` per P2P message, end to end through a real server.
//!
//! One in-process server (1 shard, rate limits off) and two WebSocket clients: a sender that
//! keeps `WINDOW` `data_request`s with a pid in flight to a receiver, `MESSAGES` per round.
//! Two applications, alternated round by round so machine noise falls on both alike:
//! - **default**: does not override `authorize` (the default allows);
//! - **callback**: overrides it with a rule that reads the user and the targets and allows.
//!
//! Per message: the shard thread's CPU time (`/proc/self/task/TID/schedstat`, nanoseconds on
//! the CPU) and heap allocations made on the shard thread (a counting global allocator that
//! counts only on threads flagged from `on_connect`, which runs on the shard). Prints the
//! median and the minimum of the rounds for each.
//!
//! `cargo bench --bench authorize [-- ROUNDS MESSAGES]` (defaults 8 and 20000).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use customws::prelude::*;
use tungstenite::{Message, WebSocket};

/// `data_request`s in flight per sender.
const WINDOW: usize = 16;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

/// [`System`], counting allocation calls made on flagged threads (the shard).
struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// counter is an atomic and the flag a const thread-local `Cell`: neither allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTED.try_with(Cell::get).unwrap_or(false) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `alloc`, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTED.try_with(Cell::get).unwrap_or(false) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `realloc`, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The shard thread's id, learnt in `on_connect`.
static SHARD_TID: Mutex<Option<String>> = Mutex::new(None);

fn mark_shard_thread() {
    COUNTED.with(|c| c.set(true));
    let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    let tid = link.file_name().expect("tid").to_string_lossy().into_owned();
    *SHARD_TID.lock().unwrap() = Some(tid);
}

/// Nanoseconds the shard thread has spent on a CPU.
fn shard_cpu_ns() -> u64 {
    let tid = SHARD_TID.lock().unwrap().clone().expect("shard thread seen");
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).expect("schedstat");
    stat.split_whitespace().next().and_then(|n| n.parse().ok()).expect("schedstat run time")
}

/// Does not override `authorize`.
struct Default_;

impl Application for Default_ {
    fn on_connect(&self, _conn: &mut Conn<'_>) {
        mark_shard_thread();
    }
}

/// Overrides `authorize` with a rule that looks at the user and the targets, and allows.
struct Callback;

impl Application for Callback {
    fn on_connect(&self, _conn: &mut Conn<'_>) {
        mark_shard_thread();
    }

    fn authorize(&self, conn: &mut Conn<'_>, op: &Operation<'_>) -> Verdict {
        let user = conn.user_id();
        let allowed = match op.targets() {
            Targets::Users(ids) => ids.iter().all(|&t| std::hint::black_box(t) != user),
            Targets::Room(room) => !room.is_empty(),
            Targets::None => true,
        };
        if allowed { Verdict::Allow } else { Verdict::forbidden() }
    }
}

fn client(addr: std::net::SocketAddr, user: i64) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let url = format!("ws://{addr}/ws?userId={user}");
    tungstenite::client(url, stream).expect("handshake").0
}

/// One round: `messages` P2P messages with acks; (shard ns per message, allocations per message).
fn round(app: Arc<dyn Application>, messages: usize) -> (f64, f64) {
    let mut config = Config::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.api_listen = "127.0.0.1:0".parse().unwrap();
    config.shards = 1;
    config.allow_insecure_user_id = true;
    config.rate_limit = 0;
    config.rate_limit_bytes = 0;
    let server = start_with(config, app).expect("start");
    let addr = server.local_addr();
    let mut sender = client(addr, 1);
    let mut receiver = client(addr, 2);
    let reader = std::thread::spawn(move || {
        let mut got = 0;
        while got < messages {
            if let Message::Text(_) = receiver.read().expect("receiver read") {
                got += 1;
            }
        }
    });
    let payload = format!("{{\"blob\":\"{}\"}}", "x".repeat(80));
    let send = |ws: &mut WebSocket<TcpStream>, i: usize| {
        let text = format!(r#"{{"type":"data_request","pid":"p{i}","targetUserId":2,"payload":{payload}}}"#);
        ws.send(Message::text(text)).expect("send");
    };
    // Warm up the queues and the directory before measuring.
    send(&mut sender, 0);
    while !matches!(sender.read().expect("ack"), Message::Text(_)) {}
    let (cpu0, allocs0, start) = (shard_cpu_ns(), ALLOCS.load(Ordering::Relaxed), Instant::now());
    let mut sent = 0;
    let mut acked = 0;
    while acked < messages {
        while sent < messages && sent - acked < WINDOW {
            send(&mut sender, sent + 1);
            sent += 1;
        }
        if let Message::Text(_) = sender.read().expect("ack") {
            acked += 1;
        }
    }
    reader.join().unwrap();
    let (cpu, allocs) = (shard_cpu_ns() - cpu0, ALLOCS.load(Ordering::Relaxed) - allocs0);
    let wall = start.elapsed();
    server.shutdown();
    server.wait();
    eprintln!("  {messages} messages in {wall:?}");
    (cpu as f64 / messages as f64, allocs as f64 / messages as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rounds = args.first().copied().unwrap_or(8);
    let messages = args.get(1).copied().unwrap_or(20_000);
    let (mut default_cpu, mut default_allocs, mut callback_cpu, mut callback_allocs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        eprintln!("round {r}: default");
        let (cpu, allocs) = round(Arc::new(Default_), messages);
        default_cpu.push(cpu);
        default_allocs.push(allocs);
        eprintln!("round {r}: callback");
        let (cpu, allocs) = round(Arc::new(Callback), messages);
        callback_cpu.push(cpu);
        callback_allocs.push(allocs);
    }
    let (dc, cc) = (median(default_cpu.clone()), median(callback_cpu.clone()));
    println!(
        "{}",
        serde_json::json!({
            "rounds": rounds, "messages": messages, "window": WINDOW,
            "default": {"shard_ns_per_msg": dc, "min_ns": default_cpu.iter().copied().fold(f64::MAX, f64::min), "allocs_per_msg": median(default_allocs), "all_ns": default_cpu},
            "callback": {"shard_ns_per_msg": cc, "min_ns": callback_cpu.iter().copied().fold(f64::MAX, f64::min), "allocs_per_msg": median(callback_allocs), "all_ns": callback_cpu},
            "callback_minus_default_ns": cc - dc,
        })
    );
}

//! End-to-end chat throughput and server CPU per message, SQLite.
//!
//! `P` pairs of contacts; each sender keeps up to `W` messages in flight to its partner, whose
//! client acknowledges each `NEW_CHAT_MESSAGE`; a message counts when the sender has its
//! `MESSAGE_STATUS_UPDATE delivered` — stored, pushed, acknowledged, stored again, reported.
//! Server CPU is the on-CPU time (`/proc/self/task/*/schedstat`) of the server's threads only
//! (shards, workers, the ack collector), not of the in-process clients.
//!
//! Run: `cargo bench -p customws-chat --bench chat -- [--pairs 50] [--messages 200] [--window 8]`

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// On-CPU nanoseconds of this process's server threads.
fn server_cpu_ns() -> u64 {
    let mut total = 0;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if !(comm.starts_with("customws-shard")
            || comm.starts_with("customws-worke")
            || comm.starts_with("chat-acks"))
        {
            continue;
        }
        let sched = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += sched.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    total
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let pairs = arg("--pairs", 50);
    let messages = arg("--messages", 200);
    let window = arg("--window", 8).max(1);
    let dir = common::temp_dir("bench");
    let url = format!("sqlite://{}", dir.join("bench.db").display());
    let db = customws_chat::Db::open(&url, 2).expect("open");
    let users = customws_chat::seed::pairs(&db, "load", pairs).expect("seed pairs");
    drop(db);
    let mut cfg = common::test_config();
    cfg.shards = 2;
    cfg.ack_timeout = Duration::from_secs(30);
    cfg.send_queue = 4096;
    let options = customws_chat::ChatOptions { database: url.clone(), workers: 8, ..Default::default() };
    let server = customws_chat::start(cfg, &options).expect("start");
    let addr = server.local_addr();
    let mut clients = Vec::new();
    for (a, b) in &users {
        let sender = common::Client::connect(addr, &a.token, true);
        let receiver = common::Client::connect(addr, &b.token, true);
        clients.push((sender, receiver, b.id));
    }
    // Let every connection's presence and backlog work finish.
    std::thread::sleep(Duration::from_millis(300));
    let cpu_before = server_cpu_ns();
    let started = Instant::now();
    let mut threads = Vec::new();
    for (mut sender, mut receiver, to) in clients {
        threads.push(std::thread::Builder::new().name("bench-recv".into()).spawn(move || {
            for _ in 0..messages {
                receiver
                    .next_where(Duration::from_secs(60), "chat message", |v| v["type"] == "NEW_CHAT_MESSAGE");
            }
            Vec::new()
        }));
        threads.push(std::thread::Builder::new().name("bench-send".into()).spawn(move || {
            let mut latencies = Vec::with_capacity(messages);
            let (mut sent, mut delivered) = (0, 0);
            let mut sent_at: HashMap<String, Instant> = HashMap::new();
            let mut id_sent_at: HashMap<String, Instant> = HashMap::new();
            while delivered < messages {
                while sent < messages && sent - delivered < window {
                    let pid = sender.request(
                        "SEND_CHAT_MESSAGE",
                        json!({ "toUserId": to, "text": format!("message {sent}") }),
                    );
                    sent_at.insert(pid, Instant::now());
                    sent += 1;
                }
                let v = sender.next_where(Duration::from_secs(60), "ack or status", |v| {
                    v["type"] == "SERVER_ACK" || v["type"] == "MESSAGE_STATUS_UPDATE"
                });
                if v["type"] == "SERVER_ACK" {
                    if let (Some(pid), Some(id)) = (v["pid"].as_str(), v["payload"]["messageId"].as_str())
                        && let Some(at) = sent_at.remove(pid)
                    {
                        id_sent_at.insert(id.to_string(), at);
                    }
                } else if v["payload"]["status"] == "delivered" {
                    for id in v["payload"]["messageIds"].as_array().into_iter().flatten() {
                        if let Some(at) = id.as_str().and_then(|id| id_sent_at.remove(id)) {
                            latencies.push(at.elapsed());
                        }
                        delivered += 1;
                    }
                }
            }
            latencies
        }));
    }
    let mut latencies: Vec<Duration> = Vec::new();
    for thread in threads {
        latencies.extend(thread.expect("spawn").join().expect("client thread"));
    }
    let elapsed = started.elapsed();
    let cpu = server_cpu_ns().saturating_sub(cpu_before);
    latencies.sort_unstable();
    let total = pairs * messages;
    println!(
        "chat bench: {pairs} pairs x {messages} messages, window {window}, SQLite (WAL, synchronous=NORMAL), 2 shards, 8 workers"
    );
    println!(
        "  {total} messages delivered in {elapsed:.2?}: {:.0} messages/s",
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  server CPU {:.2?} total, {:.1} µs per message (persist + deliver + ack + status)",
        Duration::from_nanos(cpu),
        cpu as f64 / 1000.0 / total as f64
    );
    println!(
        "  send → delivered update: p50 {:.2?} p99 {:.2?} max {:.2?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

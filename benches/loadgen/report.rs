//! `loadgen report FILE.jsonl`: a Markdown table of the JSON lines written by `benches/run.sh`.

use serde_json::Value;

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_f64()
}

fn f(v: &Value, path: &[&str], digits: usize) -> String {
    match num(v, path) {
        Some(x) => format!("{x:.digits$}"),
        None => "n/a".to_string(),
    }
}

fn lat(v: &Value, key: &str) -> String {
    let h = &v[key];
    if h.is_null() {
        return "n/a".into();
    }
    format!(
        "p50 {} / p99 {} / p999 {} / max {} µs",
        f(h, &["p50_us"], 0),
        f(h, &["p99_us"], 0),
        f(h, &["p999_us"], 0),
        f(h, &["max_us"], 0)
    )
}

fn kib(v: &Value, path: &[&str]) -> String {
    match num(v, path) {
        Some(x) => format!("{:.1} MiB", x / 1048576.0),
        None => "n/a".into(),
    }
}

fn cpu_total(v: &Value) -> String {
    format!(
        "server CPU {} ms, loadgen CPU {} ms, tick {} ms",
        num(v, &["server_cpu_us"]).map_or("n/a".into(), |x| format!("{:.0}", x / 1000.0)),
        num(v, &["loadgen_cpu_us"]).map_or("n/a".into(), |x| format!("{:.0}", x / 1000.0)),
        num(v, &["clk_tck"]).map_or("n/a".into(), |x| format!("{:.0}", 1000.0 / x)),
    )
}

/// ", N bursts" when there was more than one round.
fn rounds(v: &Value) -> String {
    match num(v, &["rounds"]) {
        Some(r) if r > 1.0 => format!(", {r} bursts"),
        _ => String::new(),
    }
}

/// Connections per shard, "a/b/…".
fn shards(v: &Value) -> String {
    match v["shard_connections"].as_object() {
        Some(o) if !o.is_empty() => o
            .values()
            .map(|x| x.as_f64().map_or("?".into(), |n| format!("{n:.0}")))
            .collect::<Vec<_>>()
            .join("/"),
        _ => "n/a".into(),
    }
}

/// (scenario label, parameters, figures)
fn row(v: &Value) -> (String, String, Vec<String>) {
    let sc = v["scenario"].as_str().unwrap_or("?").to_string();
    match sc.as_str() {
        "density" => (
            sc,
            format!("{} conns, {} src IPs", f(v, &["conns"], 0), f(v, &["src_ips"], 0)),
            vec![
                format!(
                    "**{} bytes RSS/conn** ({} → {}; after close {})",
                    f(v, &["rss_bytes_per_conn"], 0),
                    kib(v, &["rss_before_bytes"]),
                    kib(v, &["rss_after_bytes"]),
                    kib(v, &["rss_after_close_bytes"])
                ),
                format!(
                    "{} upgraded, /health {}, {} open after hold",
                    f(v, &["upgraded"], 0),
                    f(v, &["health_connections_open"], 0),
                    f(v, &["open_after_hold"], 0)
                ),
                format!(
                    "{} handshakes/s (concurrency {}), server {} µs CPU/handshake",
                    f(v, &["handshakes_per_sec"], 0),
                    f(v, &["concurrency"], 0),
                    f(v, &["server_cpu_us_per_handshake"], 1)
                ),
            ],
        ),
        "broadcast" => (
            sc,
            format!(
                "{} receivers × {} msgs of {} B{}",
                f(v, &["receivers"], 0),
                f(v, &["messages"], 0),
                f(v, &["size"], 0),
                match num(v, &["rounds"]) {
                    Some(r) if r > 1.0 => format!(", {r} bursts"),
                    _ => String::new(),
                }
            ),
            vec![
                format!(
                    "**{} µs server CPU/delivery** ({})",
                    f(v, &["server_cpu_us_per_delivery"], 3),
                    cpu_total(v)
                ),
                format!(
                    "{} deliveries/s, {} of {} delivered in {} s in all",
                    f(v, &["deliveries_per_sec"], 0),
                    f(v, &["deliveries"], 0),
                    f(v, &["expected_deliveries"], 0),
                    f(v, &["wall_secs"], 3)
                ),
                format!("latency from burst start: {}", lat(v, "latency")),
            ],
        ),
        "p2p" => (
            sc,
            format!(
                "{} pairs, inflight {}, {} msgs/sender",
                f(v, &["pairs"], 0),
                f(v, &["inflight"], 0),
                f(v, &["messages_per_sender"], 0)
            ),
            vec![
                format!(
                    "**{} µs server CPU/msg** (incl. ack; {})",
                    f(v, &["server_cpu_us_per_msg"], 3),
                    cpu_total(v)
                ),
                format!(
                    "{} msgs/s; {} acked, {} received of {}",
                    f(v, &["msgs_per_sec"], 0),
                    f(v, &["acked"], 0),
                    f(v, &["received"], 0),
                    f(v, &["messages"], 0)
                ),
                format!("ack RTT {}", lat(v, "ack_rtt")),
            ],
        ),
        "handshake" => (
            sc,
            format!("{} conns, concurrency {}", f(v, &["conns"], 0), f(v, &["concurrency"], 0)),
            vec![
                format!(
                    "**{} handshakes/s**, **{} µs server CPU/handshake** (incl. close)",
                    f(v, &["handshakes_per_sec"], 0),
                    f(v, &["server_cpu_us_per_handshake"], 1)
                ),
                format!("{} upgraded; {}", f(v, &["upgraded"], 0), cpu_total(v)),
                format!("connect→101 {}", lat(v, "handshake_latency")),
            ],
        ),
        "room" => (
            sc,
            format!(
                "{} members (shards {}) × {} msgs of {} B{}",
                f(v, &["members"], 0),
                shards(v),
                f(v, &["messages"], 0),
                f(v, &["size"], 0),
                rounds(v)
            ),
            vec![
                format!(
                    "**{} µs server CPU/room delivery** (schedstat {}; {})",
                    f(v, &["server_cpu_us_per_room_delivery"], 3),
                    f(v, &["server_sched_us_per_room_delivery"], 3),
                    cpu_total(v)
                ),
                format!(
                    "{} deliveries/s, {} of {} delivered in {} s in all; {} own copies to the sender",
                    f(v, &["deliveries_per_sec"], 0),
                    f(v, &["deliveries"], 0),
                    f(v, &["expected_deliveries"], 0),
                    f(v, &["wall_secs"], 3),
                    f(v, &["publisher_own_copies"], 0)
                ),
                format!("latency from burst start: {}", lat(v, "latency")),
            ],
        ),
        "presence" => (
            sc,
            format!(
                "{} watchers (shards {}) × {} updates, {}{}",
                f(v, &["watchers"], 0),
                shards(v),
                f(v, &["updates"], 0),
                match num(v, &["interval_ms"]) {
                    Some(ms) if ms > 0.0 => format!("one every {ms} ms"),
                    _ => "back-to-back".into(),
                },
                rounds(v)
            ),
            vec![
                format!(
                    "**{} µs server CPU/presence_update**, **{} µs per event** (schedstat {} / {}; {})",
                    f(v, &["server_cpu_us_per_update"], 1),
                    f(v, &["server_cpu_us_per_event"], 3),
                    f(v, &["server_sched_us_per_update"], 1),
                    f(v, &["server_sched_us_per_event"], 3),
                    cpu_total(v)
                ),
                format!(
                    "{} events/s, {} of {} delivered in {} s in all",
                    f(v, &["events_per_sec"], 0),
                    f(v, &["events"], 0),
                    f(v, &["expected_events"], 0),
                    f(v, &["wall_secs"], 3)
                ),
                format!("latency from update sent: {}", lat(v, "latency")),
            ],
        ),
        "floor" => (
            "floor (kernel)".into(),
            format!("{} loopback pairs, {} B", f(v, &["pairs"], 0), f(v, &["size"], 0)),
            vec![
                format!("**{} µs CPU/write**", f(v, &["summary", "cpu_us_per_write"], 3)),
                format!(
                    "**{} µs CPU/frame** with writev of {} ({} µs/call)",
                    f(v, &["summary", "cpu_us_per_frame_writev"], 3),
                    f(v, &["batch"], 0),
                    f(v, &["summary", "cpu_us_per_writev_call"], 3)
                ),
                format!(
                    "**{} µs CPU/read** ({} with the EAGAIN read; {} reading right after the write)",
                    f(v, &["summary", "cpu_us_per_read"], 3),
                    f(v, &["summary", "cpu_us_per_read_plus_eagain"], 3),
                    f(v, &["summary", "cpu_us_per_read_immediately_after_write"], 3)
                ),
            ],
        ),
        _ => (sc, String::new(), vec![]),
    }
}

/// Prints the Markdown report of a results file.
pub(crate) fn report(path: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let lines: Vec<Value> =
        text.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mut out = String::new();
    if let Some(meta) = lines.iter().find(|v| v["scenario"] == "meta") {
        out.push_str(&format!(
            "### customws benchmarks — {}\n\nMachine: {} CPUs (`nproc`), {}, kernel {}; git {}.  \nServer: `{}`  \n\n",
            meta["date"].as_str().unwrap_or("?"),
            meta["nproc"],
            meta["cpu_model"].as_str().unwrap_or("?"),
            meta["kernel"].as_str().unwrap_or("?"),
            meta["git"].as_str().unwrap_or("?"),
            meta["server_command"].as_str().unwrap_or("?"),
        ));
    }
    out.push_str("| # | Scenario | Parameters | Figures | Problems |\n|---|---|---|---|---|\n");
    let mut cmds = Vec::new();
    for v in lines.iter().filter(|v| v["scenario"] != "meta") {
        let (sc, params, figs) = row(v);
        let mut cmd = format!("`{}`", v["command"].as_str().unwrap_or("?"));
        if let Some(extra) = v["server_extra"].as_str().filter(|e| !e.is_empty()) {
            cmd.push_str(&format!(" (server started with also `{extra}`)"));
        }
        cmds.push(cmd);
        let problems = match v["problems"].as_array() {
            Some(p) if !p.is_empty() => {
                p.iter().map(|x| x.as_str().unwrap_or("?").to_string()).collect::<Vec<_>>().join("; ")
            }
            _ => "none".into(),
        };
        out.push_str(&format!(
            "| [{}] | {} | {} | {} | {} |\n",
            cmds.len(),
            sc,
            params,
            figs.join("<br>"),
            problems.replace('|', "\\|")
        ));
    }
    out.push_str("\nCommands (server restarted before each loadgen run):\n\n");
    for (i, c) in cmds.iter().enumerate() {
        out.push_str(&format!("{}. {}\n", i + 1, c));
    }
    print!("{out}");
    Ok(())
}

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
        "request" => (
            sc,
            format!(
                "{} conns, inflight {}, {} requests/conn of {} B",
                f(v, &["conns"], 0),
                f(v, &["inflight"], 0),
                f(v, &["messages_per_conn"], 0),
                f(v, &["size"], 0)
            ),
            vec![
                format!(
                    "**{} µs server CPU/round trip** (schedstat {}; {})",
                    f(v, &["server_cpu_us_per_round_trip"], 3),
                    f(v, &["server_sched_us_per_round_trip"], 3),
                    cpu_total(v)
                ),
                format!(
                    "{} round trips/s; {} answered of {}, {} payload mismatches",
                    f(v, &["round_trips_per_sec"], 0),
                    f(v, &["answered"], 0),
                    f(v, &["round_trips"], 0),
                    f(v, &["payload_mismatches"], 0)
                ),
                format!("RTT {}", lat(v, "rtt")),
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
        "hostile" => (
            sc,
            format!(
                "{} members; {} hostile members, one request every {} ms each (room_presence / presence_subscribe of {} ids), reconnecting every {} ms; {} s",
                f(v, &["members"], 0),
                f(v, &["hostiles"], 0),
                f(v, &["interval_ms"], 0),
                f(v, &["subscribe_ids"], 0),
                f(v, &["reconnect_ms"], 0),
                f(v, &["attack_secs"], 0)
            ),
            vec![
                format!(
                    "**server RSS +{}** during the attack ({} → peak {}; after {})",
                    kib(v, &["rss_growth_bytes"]),
                    kib(v, &["rss_before_bytes"]),
                    kib(v, &["rss_max_bytes"]),
                    kib(v, &["rss_after_bytes"])
                ),
                format!("**P2P pair during the attack: {}**", lat(v, "pair_latency_attack")),
                format!("P2P pair before: {}", lat(v, "pair_latency_quiet")),
                format!(
                    "{} requests, {} room_presence answers listing {} members, {} snapshot events, errors by code {}",
                    f(v, &["hostile_requests"], 0),
                    f(v, &["room_presence_answers"], 0),
                    f(v, &["members_listed"], 0),
                    f(v, &["snapshot_events"], 0),
                    v["errors_by_code"]
                ),
            ],
        ),
        _ => (sc, String::new(), vec![]),
    }
}

/// `--server-pid N` → `--server-pid PID` and `--secret X` → `--secret S`: both change with
/// every run, the rest of the command is as run.
fn generic_command(cmd: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut it = cmd.split(' ');
    while let Some(w) = it.next() {
        out.push(w);
        let placeholder = match w {
            "--server-pid" => "PID",
            "--secret" => "S",
            _ => continue,
        };
        if it.next().is_some() {
            out.push(placeholder);
        }
    }
    out.join(" ")
}

/// The command cell of one results line.
fn command(v: &Value) -> String {
    let mut cmd = format!("`{}`", generic_command(v["command"].as_str().unwrap_or("?")));
    if let Some(extra) = v["server_extra"].as_str().filter(|e| !e.is_empty()) {
        cmd.push_str(&format!(" (server also `{extra}`)"));
    }
    cmd
}

fn problems(v: &Value) -> Vec<String> {
    match v["problems"].as_array() {
        Some(p) => p.iter().map(|x| x.as_str().unwrap_or("?").to_string()).collect(),
        None => vec![],
    }
}

/// First field of a `/proc/loadavg` reading ("2.41 2.30 2.50").
fn load1(v: &Value) -> String {
    v["loadavg"].as_str().and_then(|l| l.split_whitespace().next()).unwrap_or("n/a").to_string()
}

fn sum(vs: &[&Value], path: &[&str]) -> f64 {
    vs.iter().filter_map(|v| num(v, path)).sum()
}

/// Several generator processes of one run (`density --expect-total`): one row.
fn group_row(vs: &[&Value]) -> (String, String, Vec<String>) {
    let v = vs[0];
    let n = vs.len();
    let list = |path: &[&str]| vs.iter().map(|v| f(v, path, 0)).collect::<Vec<_>>().join(", ");
    if v["scenario"] != "density" {
        let (sc, params, figs) = row(v);
        return (format!("{sc} ({n} processes; first shown)"), params, figs);
    }
    let per_conn = vs.iter().map(|v| f(v, &["rss_bytes_per_conn"], 0)).collect::<Vec<_>>().join(" / ");
    let connect = vs.iter().filter_map(|v| num(v, &["connect_secs"])).fold(0.0, f64::max);
    (
        format!("density, {n} processes"),
        format!(
            "{n} × {} conns (first user ids {}; src IP offsets {}, {} IPs each), `--expect-total {}`",
            f(v, &["conns"], 0),
            list(&["first_user_id"]),
            list(&["src_ip_offset"]),
            f(v, &["src_ips"], 0),
            f(v, &["expect_total"], 0)
        ),
        vec![
            format!(
                "**{} bytes RSS/conn** over {} connections ({} → {}; after close {}; as seen by each process: {})",
                f(v, &["rss_bytes_per_conn"], 0),
                f(v, &["conns_counted"], 0),
                kib(v, &["rss_before_bytes"]),
                kib(v, &["rss_after_bytes"]),
                kib(v, &["rss_after_close_bytes"]),
                per_conn
            ),
            format!(
                "{:.0} upgraded, /health {}, {:.0} open after hold",
                sum(vs, &["upgraded"]),
                f(v, &["health_connections_open"], 0),
                sum(vs, &["open_after_hold"])
            ),
            format!(
                "{:.0} handshakes/s together, server {} µs CPU/handshake",
                sum(vs, &["upgraded"]) / connect.max(1e-9),
                f(v, &["server_cpu_us_per_handshake"], 1)
            ),
        ],
    )
}

/// Prints the Markdown report of a results file.
pub(crate) fn report(path: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let lines: Vec<Value> =
        text.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mut out = String::new();
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or("?").to_string();
    if let Some(meta) = lines.iter().find(|v| v["scenario"] == "meta") {
        let end = lines.iter().find(|v| v["scenario"] == "meta_end");
        let mut scope = String::new();
        if meta["quick"] == 1 {
            scope.push_str(" (QUICK=1: small sizes)");
        }
        if let Some(only) = meta["only"].as_str().filter(|o| !o.is_empty()) {
            scope.push_str(&format!(" (only: {only})"));
        }
        out.push_str(&format!(
            "## Latest `benches/run.sh` results — {}{scope}\n\n\
             Written by `bash benches/run.sh --write` between the `run.sh:begin` / `run.sh:end` markers of \
             BENCHMARKS.md; everything outside them is written by hand.  \n\
             Machine: {} CPUs (`nproc`), {}, {} RAM, kernel {}, {} open files per process; \
             load average (1/5/15 min) {} at the start, {} at the end.  \n\
             Git: `{}`.  \nServer (restarted before each loadgen run): `{}`\n\n",
            s(meta, "date"),
            meta["nproc"],
            s(meta, "cpu_model"),
            s(meta, "mem_total"),
            s(meta, "kernel"),
            s(meta, "nofile"),
            s(meta, "loadavg"),
            end.map_or("?".to_string(), |e| s(e, "loadavg")),
            s(meta, "git"),
            s(meta, "server_command"),
        ));
    }
    out.push_str("| Run | Scenario | Parameters | Figures | Problems | Load¹ | Command |\n|---|---|---|---|---|---|---|\n");
    // Consecutive lines of one run (several generator processes) make one row.
    let body: Vec<&Value> =
        lines.iter().filter(|v| !matches!(v["scenario"].as_str(), Some("meta" | "meta_end"))).collect();
    let mut i = 0;
    while i < body.len() {
        let name = body[i]["run"].as_str();
        let mut j = i + 1;
        while j < body.len()
            && name.is_some()
            && body[j]["run"].as_str() == name
            && body[j]["process"].is_number()
        {
            j += 1;
        }
        let group = &body[i..j];
        let (sc, params, figs) = if group.len() > 1 { group_row(group) } else { row(group[0]) };
        let probs: Vec<String> = group
            .iter()
            .enumerate()
            .flat_map(|(k, v)| {
                let p = problems(v);
                let prefix = if group.len() > 1 { format!("process {}: ", k + 1) } else { String::new() };
                p.into_iter().map(move |x| format!("{prefix}{x}"))
            })
            .collect();
        let probs = if probs.is_empty() { "none".to_string() } else { probs.join("; ") };
        let cmds = group.iter().map(|v| command(v)).collect::<Vec<_>>().join(" &<br>");
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            name.unwrap_or(""),
            sc,
            params,
            figs.join("<br>"),
            probs.replace('|', "\\|"),
            load1(group[0]),
            cmds.replace('|', "\\|")
        ));
        i = j;
    }
    out.push_str(
        "\n¹ 1-minute load average just before the run (others may be compiling on the same 2 cores). \
         `PID` is the server's pid and `S` the JWT secret, both new for each run; processes joined by `&` ran at once.\n",
    );
    print!("{out}");
    Ok(())
}

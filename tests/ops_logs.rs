//! Logs an operator can act on: JSON lines, per-module filters, the real client IP behind a
//! trusted proxy, refusal floods summarised, and shutdown named as such. Each test runs the
//! real binary and reads its stderr.

mod common;
mod ops_support;

use std::time::Duration;

use common::*;
use ops_support::Bin;
use serde_json::Value;

/// Every stderr line parsed as JSON (panics naming the first line that is not).
fn json_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
        })
        .collect()
}

fn bad_token_refusal(addr: std::net::SocketAddr, headers: &[(&str, &str)]) {
    let mut all = vec![("Authorization", "Bearer not.a.token")];
    all.extend_from_slice(headers);
    let (status, _) = expect_refused(addr, "/ws", &all);
    assert_eq!(status, 401);
}

#[test]
fn json_format_is_one_object_per_line_and_shutdown_is_named() {
    let bin =
        Bin::start("json", &["--jwt-secret", SECRET, "--log-format", "json", "--log-level", "debug"], &[]);
    let mut client = connect(bin.addr, 7, &[]);
    client.roundtrip("json-1");
    bad_token_refusal(bin.addr, &[]);
    bin.wait_for_line(Duration::from_secs(5), "the connect line", |l| l.contains("\"connect\""));
    bin.signal("TERM");
    let reason = client.expect_close(1001);
    assert!(reason.starts_with("server restarting"), "close reason {reason:?}");
    let stderr = bin.wait_exit();
    let lines = json_lines(&stderr);
    assert!(lines.len() >= 5, "expected several lines:\n{stderr}");
    for line in &lines {
        for key in ["ts", "level", "target", "msg"] {
            assert!(line[key].is_string(), "{key} missing in {line}");
        }
        assert!(line["fields"].is_object(), "fields missing in {line}");
    }
    let connect = lines.iter().find(|l| l["msg"] == "connect").expect("a connect line");
    assert_eq!(connect["level"], "DEBUG", "per-connection lines are debug: {connect}");
    assert_eq!(connect["fields"]["user"], 7);
    assert_eq!(connect["fields"]["client"], "127.0.0.1");
    let refused = lines.iter().find(|l| l["msg"] == "handshake refused").expect("a refusal line");
    assert_eq!(refused["fields"]["status"], 401);
    let disconnect = lines.iter().find(|l| l["msg"] == "disconnect").expect("a disconnect line");
    assert_eq!(disconnect["fields"]["reason"], "server shutdown", "{disconnect}");
}

#[test]
fn text_format_at_info_has_no_per_connection_lines() {
    let bin = Bin::start("info", &["--jwt-secret", SECRET], &[]);
    let mut client = connect(bin.addr, 8, &[]);
    client.roundtrip("info-1");
    drop(client);
    let stderr = bin.stop();
    assert!(stderr.contains("listening on"), "{stderr}");
    assert!(!stderr.lines().any(|l| l.contains("] connect ") || l.contains("] disconnect ")), "{stderr}");
    assert!(!stderr.lines().any(|l| l.trim_start().starts_with('{')), "text is the default: {stderr}");
}

#[test]
fn module_filters_and_rust_log_are_honoured() {
    // Only the shard module at debug: its connect line, but not the server's info lines.
    let bin =
        Bin::start("filter", &["--jwt-secret", SECRET, "--log-level", "warn,customws::shard=debug"], &[]);
    connect(bin.addr, 9, &[]).roundtrip("filter-1");
    bin.wait_for_line(Duration::from_secs(5), "the connect line", |l| l.contains("connect user=9"));
    let stderr = bin.stop();
    assert!(!stderr.contains("listening on"), "customws::server is at warn:\n{stderr}");

    // RUST_LOG adds directives on top of log_level.
    let bin = Bin::start("rustlog", &["--jwt-secret", SECRET], &[("RUST_LOG", "customws::shard=debug")]);
    connect(bin.addr, 10, &[]).roundtrip("rustlog-1");
    bin.wait_for_line(Duration::from_secs(5), "the connect line", |l| l.contains("connect user=10"));
    let stderr = bin.stop();
    assert!(stderr.contains("listening on"), "log_level info still applies:\n{stderr}");
}

#[test]
fn forwarded_client_ip_from_a_trusted_proxy_is_logged() {
    let bin = Bin::start(
        "xff",
        &[
            "--jwt-secret",
            SECRET,
            "--trusted-proxies",
            "127.0.0.1",
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ],
        &[],
    );
    let auth = format!("Bearer {}", token(11, &[]));
    let mut client =
        connect_with(bin.addr, 11, "/ws", &[("Authorization", &auth), ("X-Forwarded-For", "203.0.113.7")]);
    client.roundtrip("xff-1");
    bad_token_refusal(bin.addr, &[("X-Forwarded-For", "198.51.100.9, 127.0.0.1")]);
    bin.wait_for_line(Duration::from_secs(5), "the refusal line", |l| l.contains("handshake refused"));
    drop(client);
    let lines = json_lines(&bin.stop());
    let connect = lines.iter().find(|l| l["msg"] == "connect").expect("a connect line");
    assert_eq!(connect["fields"]["client"], "203.0.113.7", "{connect}");
    assert!(connect["fields"]["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{connect}");
    let refused = lines.iter().find(|l| l["msg"] == "handshake refused").expect("a refusal line");
    assert_eq!(refused["fields"]["client"], "198.51.100.9", "{refused}");
    let disconnect = lines.iter().find(|l| l["msg"] == "disconnect").expect("a disconnect line");
    assert_eq!(disconnect["fields"]["client"], "203.0.113.7", "{disconnect}");
}

#[test]
fn a_refusal_flood_is_summarised() {
    let bin = Bin::start("flood", &["--jwt-secret", SECRET, "--log-format", "json"], &[]);
    for _ in 0..50 {
        bad_token_refusal(bin.addr, &[]);
    }
    let lines = json_lines(&bin.stop());
    let full = lines.iter().filter(|l| l["msg"] == "handshake refused").count();
    let summaries: Vec<&Value> =
        lines.iter().filter(|l| l["msg"].as_str().unwrap_or("").contains("more 401 refusals")).collect();
    let suppressed: u64 = summaries.iter().map(|l| l["fields"]["suppressed"].as_u64().unwrap()).sum();
    // One full line per shard and 10 s interval (2 shards; a slow machine may span a few
    // intervals); the rest counted in summaries.
    assert!((1..=10).contains(&full), "{full} full refusal lines for 50 refusals: {lines:#?}");
    assert!(!summaries.is_empty(), "a summary line: {lines:#?}");
    assert_eq!(full as u64 + suppressed, 50, "every refusal is accounted for: {summaries:?}");
    assert!(
        summaries.iter().all(|l| l["msg"].as_str().unwrap().ends_with("in the last 10 s")),
        "{summaries:?}"
    );
}

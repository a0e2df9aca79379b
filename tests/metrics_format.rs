//! `/metrics` is a valid exposition (issue #9, item 14): checked by real parsers, not by
//! string matching.
//!
//! After many observations — including messages larger than the last size bucket — the
//! default scrape is the Prometheus text format 0.0.4 that its `Content-Type` announces and
//! passes `promtool check metrics`; a scrape that asks for OpenMetrics gets OpenMetrics, which
//! the Python `prometheus_client` OpenMetrics parser accepts. Both are then checked family by
//! family: HELP and TYPE present, cumulative buckets monotonic, `+Inf` bucket = `_count`, and
//! `_count`/`_sum`/overflow of `ws_message_size_bytes` equal to what was sent.
//!
//! Needs `promtool` (Debian package `prometheus`) and `target/venv` with `prometheus_client`;
//! `.ci/setup` installs both.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Runs `program args` with `input` on stdin; returns (success, stdout, stderr).
fn run_with_stdin(program: &str, args: &[&str], input: &str) -> (bool, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}); run .ci/setup to install it"));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn venv_python() -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run .ci/setup (it creates target/venv with prometheus_client)",
        python.display()
    );
    python
}

/// Parses `body` with `prometheus_client`'s parser for `format` ("openmetrics" or "text");
/// returns the families as JSON `[{name, type, help, samples: [[name, labels, value]]}]`.
/// A parse error fails the test with the parser's message.
fn parse_with_prometheus_client(body: &str, format: &str) -> Vec<Value> {
    const SCRIPT: &str = r#"
import json, math, sys
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
text = sys.stdin.read()
out = []
for f in text_string_to_metric_families(text):
    samples = [[s.name, s.labels, "+Inf" if math.isinf(s.value) else s.value] for s in f.samples]
    out.append({"name": f.name, "type": f.type, "help": f.documentation, "samples": samples})
print(json.dumps(out))
"#;
    let python = venv_python();
    let (ok, stdout, stderr) = run_with_stdin(python.to_str().unwrap(), &["-c", SCRIPT, format], body);
    assert!(ok, "prometheus_client ({format}) rejected the scrape: {stderr}\n{body}");
    serde_json::from_str::<Value>(&stdout).unwrap().as_array().unwrap().clone()
}

/// Checks every family: HELP and TYPE, and for histograms cumulative monotonic buckets in
/// bound order, `+Inf` present and equal to `_count`. Returns the families by name.
fn check_families(families: &[Value], format: &str) -> std::collections::HashMap<String, Value> {
    let mut by_name = std::collections::HashMap::new();
    for family in families {
        let name = family["name"].as_str().unwrap();
        let kind = family["type"].as_str().unwrap();
        assert!(!family["help"].as_str().unwrap_or("").is_empty(), "{format}: family {name} has no HELP");
        assert!(kind != "unknown" && kind != "untyped", "{format}: family {name} has no TYPE");
        if kind == "histogram" {
            let samples = family["samples"].as_array().unwrap();
            let value = |suffix: &str| {
                samples
                    .iter()
                    .find(|s| s[0] == format!("{name}{suffix}"))
                    .and_then(|s| s[2].as_f64())
                    .unwrap_or_else(|| panic!("{format}: {name}{suffix} missing"))
            };
            let count = value("_count");
            let mut last = (f64::NEG_INFINITY, 0.0);
            let mut inf = None;
            for s in samples.iter().filter(|s| s[0] == format!("{name}_bucket")) {
                let le = s[1]["le"].as_str().unwrap();
                let bound = if le == "+Inf" { f64::INFINITY } else { le.parse::<f64>().unwrap() };
                let n = s[2].as_f64().unwrap();
                assert!(bound > last.0, "{format}: {name} buckets out of order at le={le}");
                assert!(n >= last.1, "{format}: {name} buckets not cumulative at le={le}: {n} < {}", last.1);
                last = (bound, n);
                if bound.is_infinite() {
                    inf = Some(n);
                }
            }
            assert_eq!(inf, Some(count), "{format}: {name} +Inf bucket must equal _count");
        }
        by_name.insert(name.to_string(), family.clone());
    }
    by_name
}

fn sample(family: &Value, name: &str, le: Option<&str>) -> f64 {
    family["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[0] == name && le.is_none_or(|le| s[1]["le"] == le))
        .and_then(|s| s[2].as_f64())
        .unwrap_or_else(|| panic!("no {name} {le:?} in {family}"))
}

#[test]
fn metrics_scrapes_pass_real_parsers() {
    let server = start(|c| c.max_message_size = 4 << 20);
    let addr = server.local_addr();
    // Sizes in every bucket, on both shards, and three above the last bound (1 MiB).
    let sizes: Vec<usize> = (0..120)
        .map(|i| [10, 100, 1000, 3000, 10_000, 40_000, 500_000][i % 7] + i)
        .chain([1 << 21; 3])
        .collect();
    let mut clients: Vec<Client> = (0..4).map(|i| connect(addr, 10 + i, &[])).collect();
    for (i, &size) in sizes.iter().enumerate() {
        // Not a valid message: each is counted and sized, then answered with a 400 notice.
        let n = clients.len();
        clients[i % n].send_json(&"x".repeat(size));
    }
    let expected_count = sizes.len() as f64;
    let expected_sum: usize = sizes.iter().sum();
    wait_until(Duration::from_secs(20), "every message observed", || {
        metric_sum(&metrics(addr), "ws_message_size_bytes_count") == Some(expected_count)
    });

    // Default scrape: text format 0.0.4, as its Content-Type says; promtool must accept it.
    let text = http_get(addr, "/metrics", &[]);
    assert_eq!(text.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let (ok, stdout, stderr) = run_with_stdin("promtool", &["check", "metrics"], &text.body);
    assert!(
        ok && stdout.is_empty() && stderr.is_empty(),
        "promtool check metrics: {stdout}{stderr}\n{}",
        text.body
    );
    let text_families = parse_with_prometheus_client(&text.body, "text");

    // A scraper asking for OpenMetrics (as Prometheus does) gets OpenMetrics.
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let om = http_get(addr, "/metrics", &[("Accept", accept)]);
    assert_eq!(om.header("content-type"), Some(OPENMETRICS));
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    let om_families = parse_with_prometheus_client(&om.body, "openmetrics");

    for (format, families) in [("text", &text_families), ("openmetrics", &om_families)] {
        let families = check_families(families, format);
        let sizes_family = &families["ws_message_size_bytes"];
        let count = sample(sizes_family, "ws_message_size_bytes_count", None);
        assert_eq!(count, expected_count, "{format}");
        assert_eq!(sample(sizes_family, "ws_message_size_bytes_sum", None), expected_sum as f64, "{format}");
        let below_inf = sample(sizes_family, "ws_message_size_bytes_bucket", Some("1048576.0"));
        assert_eq!(count - below_inf, 3.0, "{format}: values above the last bucket");
        let latency = &families["ws_latency_seconds"];
        assert!(sample(latency, "ws_latency_seconds_count", None) >= 1.0, "{format}: latency observed");
        for name in
            ["ws_connections", "ws_messages", "ws_errors", "ws_connections_current", "ws_clients_current"]
        {
            assert!(families.contains_key(name), "{format}: no family {name}");
        }
    }
}

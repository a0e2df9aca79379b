//! Helpers of the load generator: command line, /proc readings, plain HTTP GETs, JWT minting,
//! histogram summaries.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// `--key value` options plus one positional scenario name.
pub(crate) struct Args {
    pub(crate) scenario: Option<String>,
    opts: BTreeMap<String, String>,
}

impl Args {
    pub(crate) fn parse() -> Result<Self, String> {
        let mut scenario = None;
        let mut opts = BTreeMap::new();
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            if a == "--bench" || a == "--nocapture" {
                // Added by `cargo bench`.
                continue;
            }
            if let Some(k) = a.strip_prefix("--") {
                if let Some((k, v)) = k.split_once('=') {
                    opts.insert(k.to_string(), v.to_string());
                } else {
                    let v = it.next().ok_or(format!("missing value for --{k}"))?;
                    opts.insert(k.to_string(), v);
                }
            } else if scenario.is_none() {
                scenario = Some(a);
            } else {
                return Err(format!("unexpected argument {a:?}"));
            }
        }
        Ok(Args { scenario, opts })
    }

    pub(crate) fn str(&self, k: &str) -> Option<&str> {
        self.opts.get(k).map(String::as_str)
    }

    pub(crate) fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> Result<T, String> {
        match self.opts.get(k) {
            None => Ok(default),
            Some(v) => v.replace('_', "").parse().map_err(|_| format!("bad value for --{k}: {v:?}")),
        }
    }

    /// Every option given, for the results record.
    pub(crate) fn all(&self) -> &BTreeMap<String, String> {
        &self.opts
    }
}

/// Parses `127.0.0.1:PORT`, `ws://127.0.0.1:PORT/ws` or `http://…`.
pub(crate) fn parse_url(u: &str) -> Result<SocketAddr, String> {
    let s = u.trim_start_matches("ws://").trim_start_matches("http://");
    let s = s.split('/').next().unwrap_or(s);
    s.parse().map_err(|_| format!("bad --url {u:?}"))
}

/// Source addresses 127.0.0.(2+offset) ..= 127.0.0.(k+1+offset), counting on into the third
/// octet past 255 (127.0.1.0, …): all of 127/8 is loopback. Processes sharing a run take
/// disjoint ranges with `--src-ip-offset`.
pub(crate) fn src_ips(k: usize, offset: usize) -> Vec<Ipv4Addr> {
    (0..k)
        .map(|i| {
            let n = 2 + (offset + i) as u32;
            Ipv4Addr::new(127, (n >> 16) as u8, (n >> 8) as u8, n as u8)
        })
        .collect()
}

/// Process CPU time (utime + stime) in clock ticks, from /proc/PID/stat.
pub(crate) fn proc_cpu_ticks(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Field 3 (state) is f[0]; utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `/proc/PID/status` field in kB, returned in bytes (VmRSS, VmHWM).
pub(crate) fn proc_status_bytes(pid: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix(field) {
            let rest = rest.trim_start_matches(':').trim();
            let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
            return Some(kb * 1024);
        }
    }
    None
}

/// Server CPU/RSS probe (all `None` without `--server-pid`).
#[derive(Clone)]
pub(crate) struct Server {
    pub(crate) pid: Option<String>,
    pub(crate) clk_tck: u64,
    pub(crate) addr: SocketAddr,
}

/// A CPU reading of the server process.
#[derive(Clone, Copy, Default)]
pub(crate) struct CpuMark {
    ticks: Option<u64>,
    /// Sum of the threads' run time from /proc/PID/task/*/schedstat, in ns (not tick-sampled;
    /// threads that exited in between are missing).
    ns: Option<u64>,
}

/// Sum of the first field (time spent on the CPU, ns) of /proc/PID/task/*/schedstat.
pub(crate) fn proc_sched_ns(pid: &str) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        // A thread may exit between the listing and the read.
        if let Ok(s) = std::fs::read_to_string(path) {
            total += s.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

impl Server {
    pub(crate) fn cpu(&self) -> CpuMark {
        let pid = self.pid.as_deref();
        CpuMark { ticks: pid.and_then(proc_cpu_ticks), ns: pid.and_then(proc_sched_ns) }
    }

    /// Server CPU microseconds between two marks from the threads' schedstat run times.
    pub(crate) fn sched_us(&self, a: CpuMark, b: CpuMark) -> Option<f64> {
        Some(b.ns?.saturating_sub(a.ns?) as f64 / 1e3)
    }

    /// Server CPU microseconds between two marks.
    pub(crate) fn cpu_us(&self, a: CpuMark, b: CpuMark) -> Option<f64> {
        Some((b.ticks? - a.ticks?) as f64 * 1e6 / self.clk_tck as f64)
    }

    pub(crate) fn rss(&self) -> Option<u64> {
        proc_status_bytes(self.pid.as_deref()?, "VmRSS")
    }

    pub(crate) fn hwm(&self) -> Option<u64> {
        proc_status_bytes(self.pid.as_deref()?, "VmHWM")
    }

    pub(crate) fn threads(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid.as_deref()?)).ok()?;
        s.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok())
    }

    pub(crate) fn alive(&self) -> bool {
        match &self.pid {
            Some(p) => std::path::Path::new(&format!("/proc/{p}")).exists(),
            None => true,
        }
    }

    /// `connections` from GET /health.
    pub(crate) fn health_connections(&self) -> Option<u64> {
        let body = http_get(self.addr, "/health").ok()?;
        let v: Value = serde_json::from_slice(&body).ok()?;
        find_number(&v, "connections")
    }

    /// GET /metrics as name{labels} → value, histogram buckets left out.
    pub(crate) fn metrics(&self) -> Option<BTreeMap<String, f64>> {
        let body = http_get(self.addr, "/metrics").ok()?;
        let text = String::from_utf8_lossy(&body);
        let mut m = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((name, val)) = line.rsplit_once(' ') else {
                continue;
            };
            if name.contains("_bucket") {
                continue;
            }
            if let Ok(v) = val.trim().parse::<f64>() {
                m.insert(name.trim().to_string(), v);
            }
        }
        Some(m)
    }
}

/// Differences of the metrics that changed.
pub(crate) fn metrics_delta(a: &Option<BTreeMap<String, f64>>, b: &Option<BTreeMap<String, f64>>) -> Value {
    let (Some(a), Some(b)) = (a, b) else {
        return Value::Null;
    };
    let mut out = serde_json::Map::new();
    for (k, vb) in b {
        let va = a.get(k).copied().unwrap_or(0.0);
        if (vb - va).abs() > 0.0 {
            out.insert(k.clone(), json!(vb - va));
        }
    }
    Value::Object(out)
}

fn find_number(v: &Value, key: &str) -> Option<u64> {
    match v {
        Value::Object(m) => {
            if let Some(n) = m.get(key).and_then(Value::as_u64) {
                return Some(n);
            }
            m.values().find_map(|x| find_number(x, key))
        }
        Value::Array(a) => a.iter().find_map(|x| find_number(x, key)),
        _ => None,
    }
}

/// A blocking HTTP/1.1 GET returning the body (bounded to 5 s).
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        if Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "http get"));
        }
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(hlen)) => {
                if resp.code != Some(200) {
                    return Err(io::Error::other(format!("HTTP {:?}", resp.code)));
                }
                let clen = resp.headers.iter().find_map(|h| {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok()
                    } else {
                        None
                    }
                });
                match clen {
                    Some(cl) if buf.len() >= hlen + cl => return Ok(buf[hlen..hlen + cl].to_vec()),
                    None if n == 0 => return Ok(buf[hlen..].to_vec()),
                    _ => {}
                }
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "http get"));
        }
    }
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    user_id: i64,
    exp: u64,
    roles: &'a [&'a str],
}

/// HS256 JWT minter.
pub(crate) struct Minter {
    key: jsonwebtoken::EncodingKey,
    header: jsonwebtoken::Header,
    exp: u64,
}

impl Minter {
    pub(crate) fn new(secret: &str) -> Self {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Minter {
            key: jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            header: jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            exp: now + 3600,
        }
    }

    pub(crate) fn token(&self, user_id: i64, roles: &[&str]) -> String {
        let claims = Claims { user_id, exp: self.exp, roles };
        jsonwebtoken::encode(&self.header, &claims, &self.key).expect("jwt encode")
    }
}

/// CPU time (utime + stime) of this process, in microseconds.
pub(crate) fn self_cpu_us(clk_tck: u64) -> Option<f64> {
    proc_cpu_ticks("self").map(|t| t as f64 * 1e6 / clk_tck as f64)
}

pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram")
}

/// p50/p99/p999/max (µs) of a histogram of microseconds.
pub(crate) fn hist_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "count": h.len(),
        "mean_us": (h.mean() * 10.0).round() / 10.0,
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

/// Rounds to 3 decimals for the report.
pub(crate) fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Quotes `s` for a POSIX shell when needed.
pub(crate) fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

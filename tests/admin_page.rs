//! The admin page (`GET /admin/clients` on the API listener, operator issue #12 item 1) and
//! the JSON it reads: the paged connection listing, the rooms listing and the event stream.
//! The page itself is driven in headless Chromium (`tests/browser/admin.mjs`, playwright-core)
//! while this test connects, joins and is disconnected through real WebSocket clients; the
//! screenshot is kept at `target/admin-clients.png`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::api::*;
use common::*;
use serde_json::{Value, json};

fn join(c: &mut Client, room: &str, pid: &str) {
    c.send_value(&json!({"type": "join", "pid": pid, "payload": {"room": room}}));
    let ack = c.recv_of_type("server_ack");
    assert_eq!(ack["payload"]["acknowledgedPid"], pid, "expected the join ack: {ack}");
}

/// A `generic_request` and its answer (room presence events in between are skipped).
fn ask(c: &mut Client, pid: &str) {
    c.send_value(&json!({"pid": pid, "type": "generic_request", "payload": {}}));
    loop {
        let msg = c.recv_json();
        if msg["type"] == "generic_response" && msg["pid"] == pid {
            return;
        }
        assert_eq!(msg["type"], "presence_event", "waiting for the answer to {pid}: {msg}");
    }
}

/// A GET on the API with `authorization` (None: no header); status, headers, body.
fn api_get(api: SocketAddr, path: &str, authorization: Option<&str>) -> HttpResponse {
    let header = authorization.map(|a| [("Authorization", a)]);
    http_get(api, path, header.as_ref().map_or(&[][..], |h| &h[..]))
}

#[test]
fn the_page_loads_without_the_key_but_no_data_does() {
    let (server, ws, api) = api_server(|_| {});
    let _c = connect(ws, 5, &[]);
    let page = api_get(api, "/admin/clients", None);
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(page.header("content-security-policy").is_some_and(|csp| csp.contains("default-src 'none'")));
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    assert!(page.body.contains("id=\"login-form\""), "the page has its login form");
    for path in ["/api/v1/connections", "/api/v1/connections?limit=1", "/api/v1/rooms", "/api/v1/events"] {
        for key in [None, Some("apikey wrong"), Some("Bearer k")] {
            let answer = api_get(api, path, key);
            assert_eq!(answer.status, 401, "{path} with {key:?}: {}", answer.body);
            assert!(!answer.body.contains("\"userId\""), "no data without the key: {}", answer.body);
        }
    }
    // Never on the public WebSocket port.
    assert_eq!(http_get(server.local_addr(), "/admin/clients", &[]).status, 404);
}

#[test]
fn connections_are_listed_page_by_page_across_shards() {
    let (_server, ws, api) = api_server(|_| {});
    let mut clients: Vec<Client> =
        (0..23).map(|i| connect_on_shard(ws, 1000 + i, &[], (i % 2) as usize)).collect();
    let mut extra = connect_on_shard(ws, 1003, &[], 0);
    join(&mut clients[3], "lobby", "j1");
    join(&mut extra, "lobby", "j2");
    join(&mut clients[4], "team:1", "j3");
    for n in 0..3 {
        ask(&mut clients[3], &format!("r{n}"));
    }

    // Seven at a time, in open order, every connection once, then no cursor.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    for page in 0.. {
        assert!(page < 10, "paging does not end");
        let answer = get(api, &format!("/api/v1/connections?limit=7&cursor={cursor}"));
        assert_ok(&answer);
        let list = answer.body["connections"].as_array().unwrap().clone();
        assert!(list.len() <= 7, "{}", answer.raw);
        seen.extend(list.iter().map(|c| c["userId"].as_i64().unwrap()));
        match &answer.body["nextCursor"] {
            Value::String(next) => cursor = next.clone(),
            Value::Null => break,
            other => panic!("nextCursor: {other}"),
        }
    }
    let mut expected: Vec<i64> = (1000..1023).collect();
    expected.push(1003);
    assert_eq!(seen, expected, "every connection once, in the order they opened");

    // One user's connections: both of 1003's, with their shard, rooms and counters.
    let answer = get(api, "/api/v1/connections?user=1003");
    let list = answer.body["connections"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{}", answer.raw);
    let first = &list[0];
    assert_eq!((first["shard"].as_u64(), first["ip"].as_str()), (Some(1), Some("127.0.0.1")), "{first}");
    assert_eq!(first["rooms"], json!(["lobby"]));
    assert_eq!(first["messagesIn"], 4, "one join and three requests: {first}");
    let out = first["messagesOut"].as_u64().unwrap();
    assert!((4..=6).contains(&out), "the ack, three answers and room presence events: {first}");
    for field in ["connectedAt", "lastActive"] {
        assert_rfc3339(first[field].as_str().unwrap());
    }
    assert_eq!(list[1]["shard"], 0);
    assert_eq!(answer.body["nextCursor"], Value::Null);
    assert_eq!(get(api, "/api/v1/connections?limit=0").status, 400);

    // Rooms with their members on all shards, largest first.
    let rooms = get(api, "/api/v1/rooms");
    assert_eq!(
        rooms.body,
        json!({"rooms": [{"room": "lobby", "members": 2}, {"room": "team:1", "members": 1}], "total": 2})
    );
    assert_eq!(get(api, "/api/v1/rooms?limit=1").body["rooms"].as_array().unwrap().len(), 1);
}

#[test]
fn the_event_stream_sends_a_snapshot_every_second() {
    let (_server, ws, api) = api_server(|_| {});
    let _clients: Vec<Client> = (0..3).map(|i| connect(ws, 40 + i, &[])).collect();
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = format!("GET /api/v1/events HTTP/1.1\r\nHost: {api}\r\nAuthorization: apikey {KEY}\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let started = Instant::now();
    let mut text = String::new();
    let mut chunk = [0u8; 4096];
    while text.matches("\n\n").count() < 3 + 1 {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the stream ended: {text}");
        text.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    let took = started.elapsed();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("Content-Type: text/event-stream\r\n"), "{text}");
    let events: Vec<Value> = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(events.len() >= 3, "{text}");
    // The users gauge is kept by each user's home shard, one channel hop after the 101: the
    // first snapshot may predate it, a later one may not.
    let last = events.last().unwrap();
    assert_eq!((last["connections"].as_u64(), last["users"].as_u64()), (Some(3), Some(3)), "{text}");
    assert!(events[2]["ts"].as_u64() > events[0]["ts"].as_u64());
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(4),
        "three snapshots took {took:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// In a real browser
// ---------------------------------------------------------------------------------------------

/// `node tests/browser/admin.mjs` driving headless Chromium; one command line in, one answer
/// line out.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Browser {
    fn start(url: &str, key: &str, screenshot: &Path) -> Browser {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("tests/browser");
        assert!(
            dir.join("node_modules/playwright-core").is_dir(),
            "tests/browser/node_modules is missing: run .ci/setup (npm ci in tests/browser)"
        );
        assert!(
            Path::new("/usr/bin/chromium").exists(),
            "/usr/bin/chromium is missing: run .ci/setup (installs the Debian chromium package)"
        );
        let mut child = Command::new("node")
            .arg(dir.join("admin.mjs"))
            .args([url, key])
            .arg(screenshot)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run node ({e}): run .ci/setup"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut browser = Browser { child, stdin, lines };
        assert_eq!(browser.next_line(Duration::from_secs(60)), "ready");
        browser
    }

    fn next_line(&mut self, within: Duration) -> String {
        match self.lines.recv_timeout(within) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => panic!("the browser script said nothing within {within:?}"),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("the browser script exited: {:?}", self.child.try_wait())
            }
        }
    }

    /// Runs one command; it must answer `ok`.
    fn step(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        let answer = self.next_line(Duration::from_secs(30));
        assert!(answer.starts_with("ok"), "browser step `{command}`: {answer}");
        answer
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_admin_page_in_headless_chromium() {
    let (_server, ws, api) = api_server(|_| {});
    let mut a = connect_on_shard(ws, 101, &[], 0);
    let mut b = connect_on_shard(ws, 102, &[], 1);
    let mut c = connect_on_shard(ws, 103, &[], 0);
    let screenshot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/admin-clients.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut browser = Browser::start(&format!("http://{api}/admin/clients"), KEY, &screenshot);

    browser.step("login-wrong");
    browser.step("login");
    browser.step("live");
    browser.step("users 101,102,103");
    browser.step("metric connections 3");
    browser.step("metric users 3");

    // A room join shows in the rooms panel and in the connection's row.
    join(&mut a, "lobby", "j1");
    join(&mut b, "lobby", "j2");
    join(&mut b, "support", "j3");
    browser.step("room lobby 2");
    browser.step("room support 1");
    for n in 0..20 {
        ask(&mut a, &format!("p{n}"));
    }

    // Search by user id, then back to everyone.
    browser.step("search 102");
    browser.step("users 102");
    browser.step("clear");
    browser.step("users 101,102,103");

    // Disconnect from the page: confirmed in the dialog, done through the API.
    browser.step("disconnect 103");
    c.expect_close(1000);
    browser.step("status Disconnected 1 connection(s) of user 103");
    browser.step("users 101,102");
    browser.step("metric connections 2");
    browser.step("key-in-url");
    browser.step("screenshot");
    let size = std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot {} has {size} bytes", screenshot.display());
    drop(browser);
    ask(&mut a, "still-open");
}

//! Several customws processes as one tier (issue #11): real `customws` binaries as child
//! processes joined through a real `redis-server` or `nats-server` started by the test on free
//! loopback ports (installed by `.ci/setup`). Every scenario runs on both engines: cross-node
//! P2P (`delivered`, 404), broadcasts (client and API, with exclusions), room publish and
//! member counts, presence online/offline to a watcher on the other node, a node killed with
//! SIGKILL, and the broker stopped and started again.
//!
//! Waits are bounded and wait for a condition (an event, a `/health` field), never a sleep.
#![cfg(all(feature = "cluster-redis", feature = "cluster-nats", feature = "cli"))]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::brokers::{BrokerServer as Broker, Engine};
use common::{Client, connect, free_port, subscribe, wait_until};
use serde_json::{Value, json};

/// Node heartbeat and time-to-live used by every node here.
const HEARTBEAT_MS: u64 = 100;
const NODE_TTL_MS: u64 = 400;
/// An extra argument for [`Node::start_with`]: serve `/metrics` and `/health` on the public port.
const PUBLIC_METRICS: &str = "(public metrics)";
const API_KEY: &str = "cluster-test-key";

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("customws-cluster-{}-{name}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One customws node: the real binary as a child process (so that it can be SIGKILLed).
struct Node {
    name: String,
    ws: SocketAddr,
    internal: SocketAddr,
    api: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// Starts node `name`; on a port taken meanwhile by another test's process (the node
    /// exits at once), tries other free ports.
    fn start(broker: &Broker, prefix: &str, name: &str) -> Node {
        Node::start_with(broker, prefix, name, &[])
    }

    /// As [`Node::start`], with extra command-line arguments.
    fn start_with(broker: &Broker, prefix: &str, name: &str, extra: &[&str]) -> Node {
        for _ in 0..3 {
            if let Some(node) = Node::try_start(broker, prefix, name, extra) {
                return node;
            }
        }
        panic!("node {name} did not start on free ports three times");
    }

    fn try_start(broker: &Broker, prefix: &str, name: &str, extra: &[&str]) -> Option<Node> {
        let dir = scratch(name);
        // `PUBLIC_METRICS` among the extras: no `internal_listen` (`/metrics` and `/health` on
        // the WebSocket port, the default).
        let public = extra.contains(&PUBLIC_METRICS);
        let extra: Vec<&str> = extra.iter().copied().filter(|&arg| arg != PUBLIC_METRICS).collect();
        let (ws, api) = (free_port(), free_port());
        let internal = if public { ws } else { free_port() };
        let at = |port: u16| -> SocketAddr { format!("127.0.0.1:{port}").parse().unwrap() };
        let log = std::fs::File::create(dir.join("node.log")).unwrap();
        let internal_args =
            if public { vec![] } else { vec!["--internal-listen".to_string(), at(internal).to_string()] };
        let child = Command::new(env!("CARGO_BIN_EXE_customws"))
            .args(["--listen", &at(ws).to_string()])
            .args(&internal_args)
            .args(["--api-listen", &at(api).to_string()])
            .args(["--shards", "2", "--rate-limit", "0", "--rate-limit-bytes", "0"])
            .args(["--shutdown-timeout", "2s", "--log-level", "info"])
            .args(["--cluster", &broker.url(), "--node-id", name, "--cluster-prefix", prefix])
            .args(["--cluster-heartbeat", &format!("{HEARTBEAT_MS}ms")])
            .args(["--cluster-node-ttl", &format!("{NODE_TTL_MS}ms")])
            .args(["--cluster-timeout", "1s"])
            .args(["--transient-ttl", "300ms", "--presence-coalesce", "0s"])
            .args(&extra)
            .env("CUSTOMWS_JWT_SECRET", common::SECRET)
            .env("CUSTOMWS_API_KEY", API_KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run the customws binary");
        let mut node = Node {
            name: name.to_string(),
            ws: at(ws),
            internal: at(internal),
            api: at(api),
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if node.health().is_some_and(|h| h["cluster"]["broker"] == "up") {
                return Some(node);
            }
            if let Some(child) = node.child.as_mut()
                && child.try_wait().unwrap().is_some()
            {
                eprintln!("node {name} exited at start: {}", node.log());
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "node {name} not up on the broker within 15 s:\n{}",
                node.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// `/health`, or `None` when the node does not answer.
    fn health(&self) -> Option<Value> {
        let body = http(self.internal, "GET", "/health", None)?;
        serde_json::from_str(&body).ok()
    }

    fn metrics(&self) -> String {
        http(self.internal, "GET", "/metrics", None).unwrap_or_default()
    }

    fn api(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        let text =
            http(self.api, method, path, body).unwrap_or_else(|| panic!("node {}: no API answer", self.name));
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Waits until this node sees `n` nodes (itself included) with the broker up.
    fn wait_nodes(&self, n: u64) {
        wait_until(Duration::from_secs(10), &format!("node {} sees {n} nodes", self.name), || {
            self.health().is_some_and(|h| h["cluster"]["broker"] == "up" && h["cluster"]["nodes"] == n)
        });
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- node {} log (last lines):", self.name);
            let log = self.log();
            for line in log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev() {
                eprintln!("{line}");
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A bounded HTTP/1.1 call with `Connection: close`; the body, or `None` on any failure.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: apikey {API_KEY}\r\n"
    );
    if let Some(body) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    s.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8(out).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

fn prefix(test: &str, engine: Engine) -> String {
    format!("t{}-{test}-{engine:?}", std::process::id())
}

/// The next message that is not a presence event about someone else than `user`... the next
/// presence event about `user`.
fn next_presence(c: &mut Client, user: i64) -> String {
    loop {
        let v = c.recv_json();
        let about_a_room = v["payload"]["context"]["room"].is_string(); // joined / left
        if v["type"] == "presence_event" && v["payload"]["userId"] == user && !about_a_room {
            return v["payload"]["status"].as_str().unwrap_or_default().to_string();
        }
    }
}

/// Subscribes `w` to `user` and waits until `w`'s node reports `user` `status`.
fn watch_until(w: &mut Client, user: i64, status: &str, pid: &str) {
    let snapshot = subscribe(w, &[user], pid);
    if snapshot[0]["payload"]["status"] != status {
        assert_eq!(next_presence(w, user), status);
    }
}

/// A `data_request` with `pid`; returns the answer (ack or error).
fn p2p(c: &mut Client, target: i64, pid: &str) -> Value {
    c.send_value(&json!({"pid": pid, "type": "data_request", "targetUserId": target, "payload": {"n": pid}}));
    loop {
        let v = c.recv_json();
        let acked = v["payload"]["acknowledgedPid"] == pid || v["error"]["originalPid"] == pid;
        if acked {
            return v;
        }
    }
}

fn status_of(answer: &Value) -> String {
    if answer["type"] == "server_ack" {
        answer["payload"]["status"].as_str().unwrap_or_default().to_string()
    } else {
        answer["error"]["code"].to_string()
    }
}

fn metric(text: &str, name: &str) -> f64 {
    common::metric_sum(text, name).unwrap_or(0.0)
}

/// A broker and two nodes `a` and `b` on it (each started with `extra`), each seeing both.
fn two_nodes(engine: Engine, test: &str, extra: &[&str]) -> (Broker, Node, Node) {
    let broker = Broker::start(engine);
    let prefix = prefix(test, engine);
    let a = Node::start_with(&broker, &prefix, "a", extra);
    let b = Node::start_with(&broker, &prefix, "b", extra);
    a.wait_nodes(2);
    b.wait_nodes(2);
    (broker, a, b)
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

fn p2p_broadcast_rooms_presence(engine: Engine) {
    let (_broker, a, b) = two_nodes(engine, "basic", &[]);

    // Presence online across nodes: a watcher on A, the user connects on B.
    let mut w = connect(a.ws, 1, &[]);
    let snapshot = subscribe(&mut w, &[2], "s1");
    assert_eq!(snapshot[0]["payload"]["status"], "offline", "{snapshot:?}");
    let mut t = connect(b.ws, 2, &[]);
    assert_eq!(next_presence(&mut w, 2), "online");

    // P2P A → B: one publish on user 2's subject, `delivered`; a user connected nowhere: 404.
    let published = metric(&a.metrics(), "customws_cluster_published_total");
    w.send_p2p_acked(2, "p1", &json!({"hello": "from a"}));
    let ev = t.recv_of_type("data_event");
    assert_eq!((ev["fromUserId"].as_i64(), &ev["payload"]["hello"]), (Some(1), &json!("from a")), "{ev}");
    assert_eq!(status_of(&p2p(&mut w, 99, "p2")), "404");
    // B → A: B learns of user 1 (its snapshot, or a later event), then delivers.
    watch_until(&mut t, 1, "online", "s2");
    t.send_p2p_acked(1, "p3", &json!({"hello": "from b"}));
    assert_eq!(w.recv_of_type("data_event")["fromUserId"], 2);
    let sent = metric(&a.metrics(), "customws_cluster_published_total") - published;
    // p1 and p2 (one publish each) plus a few heartbeats and records, never one per node.
    assert!(sent >= 2.0, "published {sent}");

    // A status set on B reaches the watcher on A; a transient one (typing) expires back to it.
    t.send_value(&json!({"pid": "st1", "type": "presence_update", "payload": {"status": "busy"}}));
    assert_eq!(next_presence(&mut w, 2), "busy");
    let typed = Instant::now();
    t.send_value(&json!({"pid": "st2", "type": "presence_update", "payload": {"status": "typing"}}));
    assert_eq!(next_presence(&mut w, 2), "typing");
    assert_eq!(next_presence(&mut w, 2), "busy");
    assert!(typed.elapsed() >= Duration::from_millis(300), "typing reverted after {:?}", typed.elapsed());
    // A node that did not see the update stores it: a new watcher on A gets "busy" at once.
    let mut w2 = connect(a.ws, 5, &[]);
    assert_eq!(subscribe(&mut w2, &[2], "s5")[0]["payload"]["status"], "busy");
    for pid in ["st1", "st2"] {
        let v = t.recv_json();
        assert_eq!(v["payload"]["acknowledgedPid"], pid, "{v}");
    }

    // A client broadcast on A reaches B's connections (and A's), the sender excluded.
    let mut caster = connect(a.ws, 3, &["broadcast"]);
    let mut u4 = connect(b.ws, 4, &[]);
    watch_until(&mut caster, 4, "online", "s3"); // A knows B holds 4: its subscriptions are in place
    caster.send_value(&json!({"pid": "b1", "type": "data_request", "payload": {"all": 1}}));
    assert_eq!(status_of(&caster.recv_json()), "broadcast");
    for c in [&mut w, &mut t, &mut u4] {
        let ev = c.recv_of_type("data_event");
        assert_eq!(ev["fromUserId"], 3, "user {}: {ev}", c.user_id);
    }

    // An API broadcast on A with an exclusion: user 2 (on B) is skipped, user 4 (on B) gets it.
    let answer = a.api("POST", "/api/v1/broadcast", Some(r#"{"message":{"type":"news"},"exclude":[2]}"#));
    // Counted on both nodes: users 1, 3 and 5 on A, 4 on B (2 excluded).
    assert_eq!(answer["delivered"], 4, "{answer}");
    assert_eq!(u4.recv_of_type("news")["type"], "news");
    assert_eq!(w.recv_of_type("news")["type"], "news");
    t.roundtrip("after-news"); // nothing for user 2 before this answer

    // Rooms: members on both nodes, the count seen on each node, a publish from A reaches B.
    let counts = |node: &Node, n: i64| {
        wait_until(
            Duration::from_secs(5),
            &format!("node {} counts {n} members of lobby", node.name),
            || {
                let rooms = node.api("GET", "/api/v1/rooms?limit=10", None);
                rooms["rooms"]
                    .as_array()
                    .is_some_and(|list| list.iter().any(|r| r["room"] == "lobby" && r["members"] == n))
            },
        );
    };
    for (c, pid) in [(&mut w, "j1"), (&mut t, "j2")] {
        c.send_value(&json!({"type": "join", "pid": pid, "payload": {"room": "lobby"}}));
        loop {
            let v = c.recv_json();
            if v["payload"]["acknowledgedPid"] == pid {
                break;
            }
        }
        if pid == "j1" {
            // B counts A's member once A's subscription to the room is in place (a join is
            // acknowledged before that: a publish from another node meanwhile may miss it).
            counts(&b, 1);
        }
    }
    for node in [&a, &b] {
        counts(node, 2);
    }
    // The API's member list and room presence of either node cover both nodes.
    for node in [&a, &b] {
        let listed = node.api("GET", "/api/v1/rooms/lobby", None);
        assert_eq!(listed["members"], json!([1, 2]), "node {}: {listed}", node.name);
        let presence = node.api("GET", "/api/v1/rooms/lobby/presence", None);
        let ids: Vec<i64> =
            presence["members"].as_array().unwrap().iter().map(|m| m["userId"].as_i64().unwrap()).collect();
        assert_eq!(ids, [1, 2], "node {}: {presence}", node.name);
    }
    w.send_value(&json!({"type": "broadcast", "pid": "r1", "payload": {"room": "lobby", "body": {"x": 1}}}));
    // The room's joined event for user 2 (from B) reaches w on A, before or after the ack.
    let joined = |v: &Value| v["type"] == "presence_event" && v["payload"]["status"] == "joined";
    let mut saw_joined = false;
    loop {
        let v = w.recv_json();
        saw_joined |= joined(&v) && v["payload"]["userId"] == 2;
        if v["payload"]["acknowledgedPid"] == "r1" {
            assert_eq!(v["payload"]["status"], "published", "{v}");
            break;
        }
    }
    while !saw_joined {
        let v = w.recv_json();
        saw_joined = joined(&v) && v["payload"]["userId"] == 2;
    }
    let mut got = t.recv_json();
    while got["type"] != "room_message" {
        got = t.recv_json();
    }
    assert_eq!(
        (got["payload"]["room"].as_str(), got["payload"]["from"].as_i64()),
        (Some("lobby"), Some(1)),
        "{got}"
    );

    // A member's room_presence on either node lists the members of both nodes.
    for (c, pid) in [(&mut w, "rp1"), (&mut t, "rp2")] {
        c.send_value(&json!({"type": "room_presence", "pid": pid, "payload": {"room": "lobby"}}));
        let page = loop {
            let v = c.recv_json();
            if v["type"] == "room_presence" && v["pid"] == pid {
                break v;
            }
            assert_ne!(v["error"]["originalPid"], pid, "{v}");
        };
        let members = page["payload"]["members"].as_array().unwrap();
        let ids: Vec<i64> = members.iter().map(|m| m["userId"].as_i64().unwrap()).collect();
        assert_eq!(ids, [1, 2], "user {}: {page}", c.user_id);
        let statuses: Vec<&str> = members.iter().map(|m| m["status"].as_str().unwrap()).collect();
        assert_eq!(statuses, ["online", "busy"], "{page}"); // 2 set `busy` on B above
        assert_eq!(page["payload"]["next"], Value::Null, "{page}");
    }

    // The API's room publish on B reaches both nodes' members, and counts them.
    let answer = b.api("POST", "/api/v1/rooms/lobby/publish", Some(r#"{"body":{"api":1}}"#));
    assert_eq!(answer["delivered"], 2, "{answer}");
    let mut got = w.recv_json();
    while got["type"] != "room_message" {
        got = w.recv_json();
    }
    assert_eq!(got["payload"]["body"], json!({"api": 1}), "{got}");

    // Offline on the last connection anywhere: user 2 leaves B, the watcher on A hears it.
    t.close();
    assert_eq!(next_presence(&mut w, 2), "offline");
    assert_eq!(status_of(&p2p(&mut w, 2, "p4")), "404");
}

fn node_killed(engine: Engine) {
    let (_broker, a, mut b) = two_nodes(engine, "kill", &[]);
    let mut w = connect(a.ws, 1, &[]);
    subscribe(&mut w, &[2], "s1");
    let _t = connect(b.ws, 2, &[]);
    assert_eq!(next_presence(&mut w, 2), "online");

    let killed = Instant::now();
    b.kill9();
    // Meanwhile a send to user 2 is never `delivered`, and 404 only once 2 is known offline.
    // Its answer and the offline event may arrive in either order.
    w.send_value(&json!({"pid": "during", "type": "data_request", "targetUserId": 2, "payload": {}}));
    let (mut answer, mut offline_at) = (None, None);
    while answer.is_none() || offline_at.is_none() {
        let v = w.recv_json();
        if v["payload"]["acknowledgedPid"] == "during" || v["error"]["originalPid"] == "during" {
            answer = Some(v);
        } else if v["type"] == "presence_event"
            && v["payload"]["userId"] == 2
            && v["payload"]["status"] == "offline"
        {
            offline_at = Some(killed.elapsed());
        }
    }
    let answer = answer.unwrap();
    assert!(matches!(status_of(&answer).as_str(), "503" | "404"), "{answer}");
    let took = offline_at.unwrap();
    let bound = Duration::from_millis(NODE_TTL_MS + HEARTBEAT_MS + 1000);
    assert!(took < bound, "offline after {took:?}, bound {bound:?}");
    assert_eq!(status_of(&p2p(&mut w, 2, "after")), "404");
    a.wait_nodes(1);
    assert!(metric(&a.metrics(), "customws_cluster_node_down_total") >= 1.0);
}

fn broker_stopped_and_started(engine: Engine) {
    let mut broker = Broker::start(engine);
    let prefix = prefix("restart", engine);
    // A serves /metrics and /health on its public port (no internal_listen): the cluster's
    // state and counters are there too.
    let a = Node::start_with(&broker, &prefix, "a", &[PUBLIC_METRICS]);
    let b = Node::start(&broker, &prefix, "b");
    a.wait_nodes(2);
    let mut w = connect(a.ws, 1, &[]);
    let mut local = connect(a.ws, 3, &[]);
    subscribe(&mut w, &[2], "s1");
    let mut t = connect(b.ws, 2, &[]);
    assert_eq!(next_presence(&mut w, 2), "online");

    broker.stop();
    wait_until(Duration::from_secs(10), "node a reports the broker down", || {
        a.health().is_some_and(|h| h["status"] == "DEGRADED" && h["cluster"]["broker"] == "down")
    });
    // B's users age out of A's view (a partition looks like a dead node). Read first: the
    // sends below skip what arrives before their answers.
    assert_eq!(next_presence(&mut w, 2), "offline");
    // Local traffic continues; a cross-node send fails fast with 503 (with the broker down,
    // nobody can tell whether a user is connected elsewhere: never 404).
    w.send_p2p_acked(3, "local", &json!({}));
    assert_eq!(local.recv_of_type("data_event")["fromUserId"], 1);
    let asked = Instant::now();
    assert_eq!(status_of(&p2p(&mut w, 2, "cross")), "503");
    assert!(asked.elapsed() < Duration::from_millis(500), "503 after {:?}", asked.elapsed());
    let text = a.metrics();
    assert!(metric(&text, "customws_cluster_down_total") >= 1.0, "{text}");
    assert!(metric(&text, "customws_cluster_unavailable_total") >= 1.0, "{text}");

    broker.restart();
    a.wait_nodes(2);
    b.wait_nodes(2);
    // Both resubscribed and republished: user 2 is back at A, and reachable.
    assert_eq!(next_presence(&mut w, 2), "online");
    w.send_p2p_acked(2, "again", &json!({}));
    assert_eq!(t.recv_of_type("data_event")["fromUserId"], 1);
}

fn server_ops_across_nodes(engine: Engine) {
    let (_broker, a, b) = two_nodes(engine, "ops", &[]);
    let mut w = connect(a.ws, 1, &[]);
    subscribe(&mut w, &[2], "s1");
    let mut t = connect(b.ws, 2, &[]);
    assert_eq!(next_presence(&mut w, 2), "online");
    // The API's user query on A counts the connection on B.
    let user = a.api("GET", "/api/v1/users/2", None);
    assert_eq!(
        (&user["online"], &user["connections"], &user["presence"]["status"]),
        (&json!(true), &json!(1), &json!("online")),
        "{user}"
    );
    let second = connect(b.ws, 2, &[]);
    let connections = |n: i64| a.api("GET", "/api/v1/users/2", None)["connections"] == n;
    wait_until(Duration::from_secs(5), "A counts user 2's two connections on B", || connections(2));
    second.close();
    wait_until(Duration::from_secs(5), "A counts user 2's one connection on B", || connections(1));
    let api = a.api;
    let post = move |path: &'static str, body: &'static str| {
        std::thread::spawn(move || {
            let text = http(api, "POST", path, Some(body)).expect("an API answer");
            serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text))
        })
    };

    // A plain send from A's API to user 2 on B: delivered there, and counted.
    let answer =
        post("/api/v1/send", r#"{"userId":2,"message":{"type":"note","payload":{"n":0}}}"#).join().unwrap();
    assert_eq!(answer["delivered"], 1, "{answer}");
    assert_eq!(t.recv_of_type("note")["payload"]["n"], 0);

    // Send-for-ack from A's API to user 2, whose connection is on B: the ack comes back to A.
    let call = post(
        "/api/v1/send",
        r#"{"userId":2,"message":{"type":"ping","payload":{"n":1}},"ack":true,"timeoutMs":3000}"#,
    );
    let ping = t.recv_of_type("ping");
    let pid = ping["pid"].as_str().expect("a server pid").to_string();
    t.send_value(&json!({"type": "client_ack", "payload": {"acknowledgedPid": pid, "status": "read"}}));
    let answer = call.join().unwrap();
    assert_eq!(answer["ack"]["status"], "read", "{answer}");

    // A request: the client's reply comes back to A's API caller.
    let call = post(
        "/api/v1/request",
        r#"{"userId":2,"message":{"type":"question","payload":{"q":1}},"timeoutMs":3000}"#,
    );
    let question = t.recv_of_type("question");
    let pid = question["pid"].as_str().expect("a server pid").to_string();
    t.send_value(&json!({"pid": pid, "type": "answer", "payload": {"a": 2}}));
    let answer = call.join().unwrap();
    assert_eq!(answer["response"]["payload"]["a"], 2, "{answer}");

    // Unanswered: a timeout, as on one node (504), not sooner than asked.
    let asked = Instant::now();
    let call = post("/api/v1/send", r#"{"userId":2,"message":{"type":"ping"},"ack":true,"timeoutMs":300}"#);
    t.recv_of_type("ping");
    let answer = call.join().unwrap();
    assert!(answer["error"].is_string() || answer["error"].is_object(), "{answer}");
    assert!(asked.elapsed() >= Duration::from_millis(300), "{:?}", asked.elapsed());

    // A user connected nowhere: offline, not a wait.
    let answer =
        post("/api/v1/send", r#"{"userId":77,"message":{"type":"ping"},"ack":true,"timeoutMs":3000}"#)
            .join()
            .unwrap();
    assert!(answer["error"].is_string() || answer["error"].is_object(), "{answer}");

    // Disconnect from A's API closes the user's connection on B, and counts it.
    let answer = a.api("DELETE", "/api/v1/users/2/connections", None);
    assert_eq!(answer["disconnected"], 1, "{answer}");
    t.expect_close(1000);
    assert_eq!(next_presence(&mut w, 2), "offline");
}

fn connections_per_user_across_nodes(engine: Engine) {
    let (_broker, a, b) = two_nodes(engine, "peruser", &["--connections-per-user", "1"]);
    let mut w = connect(a.ws, 1, &[]);
    subscribe(&mut w, &[9], "s1");
    let mut old = connect(b.ws, 9, &[]);
    assert_eq!(next_presence(&mut w, 9), "online");
    // The user's newer connection on A replaces the older one on B (4000), as on one node.
    let mut new = connect(a.ws, 9, &[]);
    old.expect_close(4000);
    new.roundtrip("still-open");
    // The user stays online throughout (no offline for the replaced connection).
    w.roundtrip("no-presence-blip");
    wait_until(Duration::from_secs(5), "A counts user 9's one connection", || {
        a.api("GET", "/api/v1/users/9", None)["connections"] == 1
    });
    drop(b);
}

fn duplicate_node_id_is_reported(engine: Engine) {
    let broker = Broker::start(engine);
    let prefix = prefix("dup", engine);
    let first = Node::start(&broker, &prefix, "same");
    let second = Node::start(&broker, &prefix, "same");
    for node in [&first, &second] {
        wait_until(Duration::from_secs(5), "the duplicate node_id reported on /health", || {
            node.health()
                .is_some_and(|h| h["status"] == "DEGRADED" && h["cluster"]["duplicateNodeId"] == true)
        });
    }
}

/// The hold on a `101` or a join's ack lasts until the broker confirms, at most
/// `cluster_timeout` (1 s in these tests): with sixteen scenarios' brokers and nodes on two
/// cores a confirmation once took longer, and the released `101` met a 404. These tests are
/// about the hold, not its bound, so it is longer here.
const HOLD_UNDER_LOAD: &[&str] = &["--cluster-timeout", "10s"];

/// A user's connection is reachable from every node as soon as its client has the `101`: a
/// P2P from another node sent right after the connect is delivered, never 404 (the `101`
/// waits until the node's subscription to the user is in place).
fn reachable_from_other_nodes_once_connected(engine: Engine) {
    let (_broker, a, b) = two_nodes(engine, "reach", HOLD_UNDER_LOAD);
    let mut sender = connect(a.ws, 1, &[]);
    for user in 100..120 {
        let mut fresh = connect(b.ws, user, &[]);
        let pid = format!("reach-{user}");
        let answer = p2p(&mut sender, user, &pid);
        assert_eq!(status_of(&answer), "delivered", "user {user}: {answer}");
        assert_eq!(fresh.recv_of_type("data_event")["fromUserId"], 1);
    }
}

/// A room member is reachable from every node as soon as its join is acknowledged: a publish
/// from another node right after the ack reaches it (the ack waits until the node's
/// subscription to the room is in place).
fn room_reachable_once_joined(engine: Engine) {
    let (_broker, a, b) = two_nodes(engine, "roomreach", HOLD_UNDER_LOAD);
    let mut member = connect(b.ws, 7, &[]);
    for n in 0..20 {
        let (room, pid) = (format!("fresh-{n}"), format!("j{n}"));
        member.send_value(&json!({"type": "join", "pid": pid, "payload": {"room": room}}));
        let ack = member.recv_json();
        assert_eq!(ack["payload"]["acknowledgedPid"], pid, "{ack}");
        let body = json!({"body": {"n": n}}).to_string();
        a.api("POST", &format!("/api/v1/rooms/{room}/publish"), Some(&body));
        let got = member.recv_of_type("room_message");
        assert_eq!(
            (got["payload"]["room"].as_str(), &got["payload"]["body"]["n"]),
            (Some(&*room), &json!(n))
        );
    }
}

macro_rules! for_both_engines {
    ($($scenario:ident),* $(,)?) => {
        mod redis {
            $(#[test] fn $scenario() { super::$scenario(super::Engine::Redis) })*
        }
        mod nats {
            $(#[test] fn $scenario() { super::$scenario(super::Engine::Nats) })*
        }
    };
}

for_both_engines!(
    p2p_broadcast_rooms_presence,
    node_killed,
    broker_stopped_and_started,
    server_ops_across_nodes,
    connections_per_user_across_nodes,
    duplicate_node_id_is_reported,
    reachable_from_other_nodes_once_connected,
    room_reachable_once_joined,
);

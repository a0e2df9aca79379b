//! Backend forwarding (issue 3 item 5): with `backend_url`, `generic_request` and unknown
//! message types are POSTed to the backend and its answer comes back as `generic_response`
//! (or `error_notification` 4xx/5xx from the backend, 502 down, 504 slow, 503 queue full),
//! while the shard keeps serving everyone else.
//!
//! The backend is a tiny HTTP/1.1 server written here (`TcpListener` + a thread per
//! connection, keep-alive) whose behaviour is chosen by the forwarded message's
//! `payload.mode`.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use customws::backend::BackendApp;
use customws::{Config, ServerHandle};
use serde_json::{Value, json};

/// `backend_timeout` of every test server.
const BACKEND_TIMEOUT: Duration = Duration::from_millis(300);
/// How long mode `slow` sleeps: well past [`BACKEND_TIMEOUT`].
const SLOW: Duration = Duration::from_millis(1200);

// ---------------------------------------------------------------------------------------------
// The test backend
// ---------------------------------------------------------------------------------------------

/// One request the backend received.
type Received = http_backend::BackendRequest;

struct TestBackend {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl TestBackend {
    fn start() -> TestBackend {
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&received);
        let addr = http_backend::serve_backend(move |request| {
            log.lock().unwrap().push(request.clone());
            behave(&request.body)
        });
        TestBackend { addr, received }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// The answer chosen by `message.payload.mode`.
fn behave(request: &Value) -> (u16, Vec<u8>) {
    let message = &request["message"];
    let ok = || json!({"echo": message, "user": request["userId"], "claims": request["claims"]});
    match message["payload"]["mode"].as_str().unwrap_or("ok") {
        "error" => (422, br#"{"error":"nope"}"#.to_vec()),
        "server_error" => (500, b"<html>oops</html>".to_vec()),
        "slow" => {
            std::thread::sleep(SLOW);
            (200, ok().to_string().into_bytes())
        }
        "bad_json" => (200, b"{this is not json".to_vec()),
        "huge" => (200, format!(r#"{{"blob":"{}"}}"#, "x".repeat(2 << 20)).into_bytes()),
        "envelope" => (200, br#"{"type":"custom_event","payload":{"from":"backend"}}"#.to_vec()),
        _ => (200, ok().to_string().into_bytes()),
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A test server whose application is a `BackendApp` for `url`.
fn start_backend_server(url: &str, tweak: impl FnOnce(&mut Config)) -> ServerHandle {
    let mut config = test_config();
    config.backend_url = Some(url.to_owned());
    config.backend_timeout = BACKEND_TIMEOUT;
    tweak(&mut config);
    let app = BackendApp::new(&config).expect("backend app");
    customws::start_with(config, Arc::new(app)).expect("customws::start_with failed")
}

fn assert_error(v: &Value, code: i64, pid: Option<&str>) {
    assert_eq!(v["type"], "error_notification", "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    match pid {
        Some(pid) => assert_eq!(v["error"]["originalPid"], pid, "{v}"),
        None => assert!(v["error"].get("originalPid").is_none(), "{v}"),
    }
}

/// A port on 127.0.0.1 with nothing listening.
fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn generic_request_is_forwarded_and_answered_with_the_same_pid() {
    let backend = TestBackend::start();
    let server = start_backend_server(&backend.url(), |_| {});
    let mut a = connect(server.local_addr(), 7, &["reader"]);

    let message = json!({"pid": "g1", "type": "generic_request", "payload": {"mode": "ok", "q": [1, 2]}});
    a.send_value(&message);
    let v = a.recv_of_type("generic_response");
    assert_eq!(v["pid"], "g1", "{v}");
    assert_eq!(v["payload"]["echo"], message, "the backend got the client's whole message: {v}");
    assert_eq!(v["payload"]["user"], 7, "{v}");
    assert_eq!(v["payload"]["claims"]["user_id"], 7, "{v}");
    assert_eq!(v["payload"]["claims"]["roles"], json!(["reader"]), "{v}");

    let got = backend.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let req = &got[0];
    assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/hook"));
    assert!(req.content_type.as_deref().is_some_and(|t| t.starts_with("application/json")), "{req:?}");
    assert_eq!(req.body["userId"], 7);
    assert_eq!(req.body["claims"]["user_id"], 7);
    assert!(req.body["claims"]["exp"].is_i64(), "{req:?}");
    assert_eq!(req.body["message"], message);

    // Several in a row on the same (pooled) backend connection, answered in order.
    for i in 0..5 {
        let pid = format!("seq{i}");
        a.send_value(&json!({"pid": pid, "type": "generic_request", "payload": {"n": i}}));
        let v = a.recv_of_type("generic_response");
        assert_eq!(v["pid"], pid.as_str(), "{v}");
        assert_eq!(v["payload"]["echo"]["payload"]["n"], i, "{v}");
    }
}

#[test]
fn unknown_types_are_forwarded_with_and_without_pid() {
    let backend = TestBackend::start();
    let server = start_backend_server(&backend.url(), |_| {});
    let mut a = connect(server.local_addr(), 8, &[]);

    // With a pid: answered as generic_response like generic_request.
    let order = json!({"pid": "u1", "type": "order_create", "targetUserId": 3, "payload": {"item": "x"}});
    a.send_value(&order);
    let v = a.recv_of_type("generic_response");
    assert_eq!(v["pid"], "u1", "{v}");
    assert_eq!(v["payload"]["echo"], order, "{v}");

    // Without a pid, a backend answer that is an envelope (object with "type") is delivered.
    a.send_value(&json!({"type": "subscribe_feed", "payload": {"mode": "envelope"}}));
    let v = a.recv_of_type("custom_event");
    assert_eq!(v["payload"]["from"], "backend", "{v}");

    // Without a pid, any other answer is dropped (fire-and-forget) ...
    a.send_value(&json!({"type": "telemetry", "payload": {"mode": "ok"}}));
    a.expect_silence(Duration::from_millis(300));
    // ... but a failure is still reported, without originalPid.
    a.send_value(&json!({"type": "telemetry", "payload": {"mode": "error"}}));
    assert_error(&a.recv_json(), 422, None);

    let kinds: Vec<Value> = backend.received().iter().map(|r| r.body["message"]["type"].clone()).collect();
    assert_eq!(
        kinds,
        [json!("order_create"), json!("subscribe_feed"), json!("telemetry"), json!("telemetry")]
    );

    // Built-in types never reach the backend; a generic_request without pid is refused by the
    // router before any application sees it.
    a.send_json(r#"{"type":"HEARTBEAT"}"#);
    a.recv_of_type("HEARTBEAT_ACK");
    a.send_json(r#"{"pid":"np","type":"generic_request"}"#);
    let v = a.recv_of_type("generic_response");
    assert_eq!(v["pid"], "np");
    a.send_json(r#"{"type":"generic_request","payload":{}}"#);
    assert_error(&a.recv_json(), 400, None);
    assert_eq!(backend.received().len(), 5, "only the generic_request with a pid was forwarded");
}

#[test]
fn backend_errors_become_error_notifications() {
    let backend = TestBackend::start();
    let server = start_backend_server(&backend.url(), |_| {});
    let mut a = connect(server.local_addr(), 9, &[]);

    a.send_value(&json!({"pid": "e1", "type": "generic_request", "payload": {"mode": "error"}}));
    let v = a.recv_json();
    assert_error(&v, 422, Some("e1"));
    assert!(v["error"]["message"].as_str().unwrap().contains("nope"), "quotes the backend: {v}");

    a.send_value(&json!({"pid": "e2", "type": "generic_request", "payload": {"mode": "server_error"}}));
    assert_error(&a.recv_json(), 500, Some("e2"));

    a.send_value(&json!({"pid": "e3", "type": "generic_request", "payload": {"mode": "bad_json"}}));
    assert_error(&a.recv_json(), 502, Some("e3"));

    a.send_value(&json!({"pid": "e4", "type": "generic_request", "payload": {"mode": "huge"}}));
    let v = a.recv_json();
    assert_error(&v, 502, Some("e4"));

    // The connection and the backend path still work afterwards.
    a.send_value(&json!({"pid": "e5", "type": "generic_request", "payload": {"mode": "ok"}}));
    assert_eq!(a.recv_of_type("generic_response")["pid"], "e5");
}

#[test]
fn backend_down_answers_502() {
    let url = format!("http://127.0.0.1:{}/hook", dead_port());
    let server = start_backend_server(&url, |_| {});
    let mut a = connect(server.local_addr(), 10, &[]);

    a.send_value(&json!({"pid": "d1", "type": "generic_request", "payload": {}}));
    assert_error(&a.recv_json(), 502, Some("d1"));
    a.send_value(&json!({"pid": "d2", "type": "whatever_type", "payload": {}}));
    assert_error(&a.recv_json(), 502, Some("d2"));
    // Built-in traffic is unaffected.
    a.send_json(r#"{"type":"HEARTBEAT"}"#);
    a.recv_of_type("HEARTBEAT_ACK");
    // Operators see the failures in /metrics.
    let text = metrics(server.local_addr());
    assert_eq!(metric_sum(&text, "customws_backend_failures_total"), Some(2.0), "{text}");
    assert_eq!(metric_sum(&text, "customws_backend_forwarded_total"), Some(2.0), "{text}");
}

#[test]
fn slow_backend_answers_504_and_never_stalls_the_shard() {
    let backend = TestBackend::start();
    // One shard: the slow call's connection and the others share it.
    let server = start_backend_server(&backend.url(), |c| c.shards = 1);
    let addr = server.local_addr();
    let mut a = connect(addr, 11, &[]);
    let mut b = connect(addr, 12, &[]);
    let mut c = connect(addr, 13, &[]);

    let sent = Instant::now();
    a.send_value(&json!({"pid": "s1", "type": "generic_request", "payload": {"mode": "slow"}}));
    std::thread::sleep(Duration::from_millis(20));

    // While the backend sleeps, the shard serves: HEARTBEAT, P2P and presence, each fast.
    for round in 0..3 {
        let t = Instant::now();
        b.send_json(r#"{"type":"HEARTBEAT"}"#);
        b.recv_of_type("HEARTBEAT_ACK");
        b.send_p2p_acked(13, &format!("p2p{round}"), &json!({"round": round}));
        assert_eq!(c.recv_of_type("data_event")["payload"]["round"], round);
        // The slow caller's own connection is not blocked either.
        a.send_json(r#"{"type":"HEARTBEAT"}"#);
        a.recv_of_type("HEARTBEAT_ACK");
        let took = t.elapsed();
        assert!(took < Duration::from_millis(100), "round {round} took {took:?} during a slow backend call");
    }
    assert!(sent.elapsed() < BACKEND_TIMEOUT, "the rounds ran while the call was outstanding");

    let v = a.recv_json();
    let waited = sent.elapsed();
    assert_error(&v, 504, Some("s1"));
    assert!(waited >= BACKEND_TIMEOUT - Duration::from_millis(20), "504 after {waited:?}");
    assert!(waited < SLOW, "504 came from the timeout, not the backend's answer: {waited:?}");
}

#[test]
fn full_queue_answers_503_at_once() {
    let backend = TestBackend::start();
    let server = start_backend_server(&backend.url(), |c| {
        c.backend_concurrency = 1;
        c.backend_queue = 1;
    });
    let mut a = connect(server.local_addr(), 14, &[]);

    const N: usize = 6;
    let sent = Instant::now();
    for i in 0..N {
        a.send_value(
            &json!({"pid": format!("q{i}"), "type": "generic_request", "payload": {"mode": "slow"}}),
        );
    }
    let mut codes = Vec::new();
    let mut busy_within = Duration::ZERO;
    for _ in 0..N {
        let v = a.recv_json();
        assert_eq!(v["type"], "error_notification", "{v}");
        let code = v["error"]["code"].as_i64().unwrap();
        if code == 503 {
            busy_within = busy_within.max(sent.elapsed());
            assert_eq!(v["error"]["message"], "backend busy", "{v}");
        }
        codes.push(code);
    }
    let busy = codes.iter().filter(|&&c| c == 503).count();
    let timed_out = codes.iter().filter(|&&c| c == 504).count();
    // One call in flight plus one queued; the rest are refused.
    assert!(busy >= N - 2, "codes {codes:?}");
    assert!(timed_out >= 1 && busy + timed_out == N, "codes {codes:?}");
    assert!(busy_within < BACKEND_TIMEOUT, "503s are immediate, got the last after {busy_within:?}");

    // Once the backlog drains, calls are accepted again.
    a.send_value(&json!({"pid": "after", "type": "generic_request", "payload": {"mode": "ok"}}));
    assert_eq!(a.recv_of_type("generic_response")["pid"], "after");
}

#[test]
fn invalid_backend_url_is_refused() {
    let mut config = test_config();
    config.backend_url = Some("not a url".into());
    assert!(BackendApp::new(&config).is_err());
    config.backend_url = None;
    assert!(BackendApp::from_config(&config).unwrap().is_none());
}

/// With only `presence_webhook_url` set, the application posts presence transitions and
/// forwards no message: there is no backend URL, messages get the built-in behaviour, and no
/// backend counters are exported.
#[test]
fn webhook_only_configuration_forwards_nothing() {
    let hook = TestBackend::start();
    let mut config = test_config();
    config.presence_webhook_url = Some(hook.url());
    config.backend_timeout = BACKEND_TIMEOUT;
    let app = BackendApp::from_config(&config).unwrap().expect("the webhook makes a BackendApp");
    assert_eq!(app.url(), None, "no forwarding URL without backend_url");
    let server = customws::start_with(config, Arc::new(app.clone())).expect("customws::start_with failed");
    let events = |event: &str| hook.received().iter().filter(|r| r.body["event"] == event).count();

    let mut a = connect(server.local_addr(), 7, &[]);
    wait_until(Duration::from_secs(5), "the online call", || events("online") == 1);
    a.send_value(&json!({"pid": "g1", "type": "generic_request", "payload": {"x": 1}}));
    let v = a.recv_of_type("generic_response");
    assert_eq!((&v["pid"], &v["payload"]), (&json!("g1"), &json!({"x": 1})), "the built-in echo: {v}");
    a.send_value(&json!({"pid": "u1", "type": "custom_kind"}));
    assert_error(&a.recv_of_type("error_notification"), 400, Some("u1"));
    let text = metrics(server.local_addr());
    assert_eq!(metric_sum(&text, "customws_backend_forwarded_total"), None, "{text}");
    assert_eq!(metric_sum(&text, "customws_presence_webhook_sent_total"), Some(1.0), "{text}");
    drop(a);
    wait_until(Duration::from_secs(5), "the offline call", || events("offline") == 1);

    let got = hook.received();
    assert!(got.iter().all(|r| r.body.get("message").is_none() && r.path == "/hook"), "{got:?}");
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(app.stats(), customws::backend::BackendStats::default());
}

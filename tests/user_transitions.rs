//! `Application::on_user_online` / `on_user_offline`: exactly one of each per user transition,
//! in order, even when a user's connections open and close at the same instant on two shards
//! (and one `presence_webhook_url` call each, in order); the webhook's failures; and the
//! last-seen time an offline user's presence reports afterwards.

mod common;

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use customws::app::application::Conn;
use customws::backend::BackendApp;
use customws::{Application, Config, Handle};
use serde_json::Value;

/// Webhook bodies per user, in arrival order.
type Hooks = Arc<Mutex<HashMap<i64, Vec<Value>>>>;

/// The user whose `online` calls the hook server answers 20 ms late.
const SLOW_HOOK_USER: i64 = 500;

/// A keep-alive HTTP/1.1 server answering 204 to every POST and keeping its JSON body.
fn start_hook_server() -> (String, Hooks) {
    let hooks: Hooks = Arc::default();
    let log = Arc::clone(&hooks);
    let addr = http_backend::serve_backend(move |request| {
        let user = request.body["userId"].as_i64().unwrap_or(i64::MIN);
        let slow = user == SLOW_HOOK_USER && request.body["event"] == "online";
        log.lock().unwrap().entry(user).or_default().push(request.body.clone());
        if slow {
            // Answered late: the user's offline call must wait for this one, not overtake it.
            std::thread::sleep(Duration::from_millis(20));
        }
        (204, Vec::new())
    });
    (format!("http://{addr}/presence"), hooks)
}

/// One user transition as the application saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Online(u64),
    Offline(u64),
}

/// Records every transition per user, and the shard thread each connection opened on.
#[derive(Default)]
struct Recorder {
    events: Mutex<HashMap<i64, Vec<Seen>>>,
    shards: Mutex<HashMap<i64, Vec<String>>>,
    /// `on_disconnect` calls per user.
    disconnects: Mutex<HashMap<i64, usize>>,
    /// The binary's application (here for its presence webhook), told of every transition.
    backend: Option<BackendApp>,
}

impl Application for Recorder {
    fn on_connect(&self, conn: &mut Conn<'_>) {
        let thread = std::thread::current().name().unwrap_or("?").to_owned();
        self.shards.lock().unwrap().entry(conn.user_id()).or_default().push(thread);
    }

    fn on_disconnect(&self, event: &customws::app::application::Disconnect<'_>) {
        *self.disconnects.lock().unwrap().entry(event.user_id).or_default() += 1;
    }

    fn on_user_online(&self, user_id: i64, at_ms: u64, handle: &Handle) {
        self.events.lock().unwrap().entry(user_id).or_default().push(Seen::Online(at_ms));
        if let Some(backend) = &self.backend {
            backend.on_user_online(user_id, at_ms, handle);
        }
    }

    fn on_user_offline(&self, user_id: i64, last_seen_ms: u64, handle: &Handle) {
        self.events.lock().unwrap().entry(user_id).or_default().push(Seen::Offline(last_seen_ms));
        if let Some(backend) = &self.backend {
            backend.on_user_offline(user_id, last_seen_ms, handle);
        }
    }

    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        self.backend.as_ref().map(Application::counters).unwrap_or_default()
    }
}

impl Recorder {
    fn events(&self, user: i64) -> Vec<Seen> {
        self.events.lock().unwrap().get(&user).cloned().unwrap_or_default()
    }

    /// The distinct shard threads the user's connections opened on.
    fn shards(&self, user: i64) -> Vec<String> {
        let mut list = self.shards.lock().unwrap().get(&user).cloned().unwrap_or_default();
        list.sort();
        list.dedup();
        list
    }
}

/// A recorder whose transitions also go to `presence_webhook_url = url`, on a pool of
/// `backend_concurrency` threads (so per-user order is the webhook's doing, not one thread's).
fn recorder_with_webhook(url: &str) -> (Config, Arc<Recorder>) {
    let mut config = test_config();
    config.presence_webhook_url = Some(url.to_owned());
    config.backend_concurrency = 4;
    config.backend_timeout = Duration::from_millis(500);
    let backend = BackendApp::from_config(&config).unwrap().expect("the webhook makes a BackendApp");
    (config, Arc::new(Recorder { backend: Some(backend), ..Recorder::default() }))
}

/// RFC 3339 text → Unix ms.
fn unix_ms(stamp: &Value) -> u64 {
    let time = humantime::parse_rfc3339(stamp.as_str().unwrap()).unwrap();
    time.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Runs `f` on two threads released at the same instant; returns both results.
fn twice_at_once<T: Send + 'static>(f: impl Fn() -> T + Send + Sync + 'static) -> (T, T) {
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(2));
    let spawn = || {
        let (f, barrier) = (Arc::clone(&f), Arc::clone(&barrier));
        std::thread::spawn(move || {
            barrier.wait();
            f()
        })
    };
    let (a, b) = (spawn(), spawn());
    (a.join().unwrap(), b.join().unwrap())
}

#[test]
fn two_shards_opening_and_closing_at_once_give_one_online_and_one_offline() {
    let (url, hooks) = start_hook_server();
    let (config, app) = recorder_with_webhook(&url);
    let server = customws::start_with(config, app.clone()).unwrap();
    let addr = server.local_addr();
    let mut across = 0; // rounds whose two connections landed on different shards
    let mut user = 1000;
    while across < 200 {
        user += 1;
        assert!(user < 1000 + 2000, "only {across} of 2000 rounds put the two connections on two shards");
        let (a, b) = twice_at_once(move || connect(addr, user, &[]));
        let two_shards = app.shards(user).len() == 2;
        // Both close at the same instant too (each on its own shard when `two_shards`).
        let clients = Arc::new(Mutex::new(vec![a, b]));
        twice_at_once(move || {
            let client = clients.lock().unwrap().pop();
            client.expect("one client per thread").close();
        });
        wait_until(Duration::from_secs(5), "the offline callback", || {
            app.events(user).iter().any(|e| matches!(e, Seen::Offline(_)))
        });
        let events = app.events(user);
        let (on, off) = match events.as_slice() {
            [Seen::Online(on), Seen::Offline(off)] if on <= off => (*on, *off),
            other => panic!("user {user}: expected one online then one offline, got {other:?}"),
        };
        // The webhook: one call each, in order, with the same times.
        wait_until(Duration::from_secs(5), "the two webhook calls", || {
            hooks.lock().unwrap().get(&user).is_some_and(|calls| calls.len() >= 2)
        });
        let calls = hooks.lock().unwrap()[&user].clone();
        assert_eq!(calls.len(), 2, "user {user}: {calls:?}");
        assert_eq!(
            (calls[0]["event"].as_str(), calls[1]["event"].as_str()),
            (Some("online"), Some("offline"))
        );
        assert_eq!((unix_ms(&calls[0]["at"]), unix_ms(&calls[1]["at"])), (on, off), "{calls:?}");
        if two_shards {
            across += 1;
        }
    }
    // Nothing late: no third event for any user once all went offline.
    std::thread::sleep(Duration::from_millis(50));
    for u in 1001..=user {
        assert_eq!(app.events(u).len(), 2, "user {u}: {:?}", app.events(u));
        assert_eq!(hooks.lock().unwrap()[&u].len(), 2, "user {u}");
    }
}

#[test]
fn a_close_racing_an_open_never_leaves_the_user_offline_with_a_connection() {
    let app = Arc::new(Recorder::default());
    let server = customws::start_with(test_config(), app.clone()).unwrap();
    let (addr, handle) = (server.local_addr(), server.handle());
    for user in 3000..3100 {
        let first = connect(addr, user, &[]);
        wait_until(Duration::from_secs(5), "online", || app.events(user).len() == 1);
        // The first connection closes while the second opens.
        let closing = Arc::new(Mutex::new(Some(first)));
        let (a, b) = twice_at_once(move || {
            let mine = closing.lock().unwrap().take();
            match mine {
                Some(client) => {
                    client.close();
                    None
                }
                None => Some(connect(addr, user, &[])),
            }
        });
        let mut second = a.or(b).expect("one thread opened the second connection");
        // Both reached the home shard's inbox before this query (one queue, in order): its
        // answer comes after both were handled.
        wait_until(Duration::from_secs(5), "the first connection's disconnect", || {
            app.disconnects.lock().unwrap().get(&user) == Some(&1)
        });
        assert_eq!(handle.user_connections(user).wait().unwrap().len(), 1);
        let events = app.events(user);
        match events.as_slice() {
            [Seen::Online(_)] | [Seen::Online(_), Seen::Offline(_), Seen::Online(_)] => {}
            other => panic!("user {user} has a connection, but its transitions were {other:?}"),
        }
        assert_eq!(handle.presence(user).wait().unwrap().status, "online");
        second.roundtrip("still here");
        second.close();
        wait_until(Duration::from_secs(5), "offline", || {
            matches!(app.events(user).last(), Some(Seen::Offline(_)))
        });
    }
}

#[test]
fn a_user_coming_and_going_fast_gets_its_webhook_calls_in_order() {
    let (url, hooks) = start_hook_server();
    let (config, app) = recorder_with_webhook(&url);
    let server = customws::start_with(config, app.clone()).unwrap();
    for _ in 0..30 {
        connect(server.local_addr(), SLOW_HOOK_USER, &[]).close();
    }
    wait_until(Duration::from_secs(5), "60 transitions", || app.events(SLOW_HOOK_USER).len() == 60);
    wait_until(Duration::from_secs(5), "60 webhook calls", || {
        hooks.lock().unwrap().get(&SLOW_HOOK_USER).is_some_and(|calls| calls.len() == 60)
    });
    let calls = hooks.lock().unwrap()[&SLOW_HOOK_USER].clone();
    for (i, call) in calls.iter().enumerate() {
        let expected = if i % 2 == 0 { "online" } else { "offline" };
        assert_eq!(call["event"], expected, "call {i}: {calls:?}");
    }
    let times: Vec<u64> = calls.iter().map(|c| unix_ms(&c["at"])).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
}

#[test]
fn webhook_failures_are_counted() {
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (config, app) = recorder_with_webhook(&format!("http://{dead}/presence"));
    let server = customws::start_with(config, app.clone()).unwrap();
    connect(server.local_addr(), 600, &[]).close();
    wait_until(Duration::from_secs(5), "two failed webhook calls", || {
        metric_sum(&metrics(server.local_addr()), "customws_presence_webhook_failures_total") == Some(2.0)
    });
    let text = metrics(server.local_addr());
    assert_eq!(metric_sum(&text, "customws_presence_webhook_sent_total"), Some(0.0));
}

#[test]
fn an_offline_user_reports_the_time_of_its_last_disconnect() {
    let app = Arc::new(Recorder::default());
    let mut config = test_config();
    config.api_listen = "127.0.0.1:0".parse().unwrap();
    config.api_key = Some(common::api::KEY.into());
    let server = customws::start_with(config, app.clone()).unwrap();
    let before = wall_ms();
    let client = connect(server.local_addr(), 77, &[]);
    client.close();
    wait_until(Duration::from_secs(5), "the offline callback", || app.events(77).len() == 2);
    let Seen::Offline(last_seen) = app.events(77)[1] else { panic!("{:?}", app.events(77)) };
    assert!(last_seen >= before);
    // Asked well after the disconnect, the presence still says when the user left.
    std::thread::sleep(Duration::from_millis(30));
    let presence = server.handle().presence(77).wait().unwrap();
    assert_eq!(presence.status, "offline");
    assert_eq!(presence.since_ms, last_seen, "since = the last disconnect, not the query");
    let api = server.api_addr().expect("api");
    let answer = common::api::get(api, "/api/v1/users/77");
    let since = answer.body["presence"]["since"].as_str().unwrap_or_else(|| panic!("{}", answer.raw));
    let stamp = humantime::parse_rfc3339(since).unwrap();
    assert_eq!(stamp.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64, last_seen);
    // A user never seen is offline since the query, as before.
    let never = server.handle().presence(78).wait().unwrap();
    assert!(never.since_ms > last_seen);
}

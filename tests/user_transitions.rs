//! `Application::on_user_online` / `on_user_offline`: exactly one of each per user transition,
//! in order, even when a user's connections open and close at the same instant on two shards;
//! and the last-seen time an offline user's presence reports afterwards.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use customws::app::application::Conn;
use customws::{Application, Handle};

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
}

impl Application for Recorder {
    fn on_connect(&self, conn: &mut Conn<'_>) {
        let thread = std::thread::current().name().unwrap_or("?").to_owned();
        self.shards.lock().unwrap().entry(conn.user_id()).or_default().push(thread);
    }

    fn on_user_online(&self, user_id: i64, at_ms: u64, _handle: &Handle) {
        self.events.lock().unwrap().entry(user_id).or_default().push(Seen::Online(at_ms));
    }

    fn on_user_offline(&self, user_id: i64, last_seen_ms: u64, _handle: &Handle) {
        self.events.lock().unwrap().entry(user_id).or_default().push(Seen::Offline(last_seen_ms));
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
    let app = Arc::new(Recorder::default());
    let server = customws::start_with(test_config(), app.clone()).unwrap();
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
        match events.as_slice() {
            [Seen::Online(on), Seen::Offline(off)] => assert!(on <= off, "user {user}: {events:?}"),
            other => panic!("user {user}: expected one online then one offline, got {other:?}"),
        }
        if two_shards {
            across += 1;
        }
    }
    // Nothing late: no third event for any user once all went offline.
    std::thread::sleep(Duration::from_millis(50));
    for u in 1001..=user {
        assert_eq!(app.events(u).len(), 2, "user {u}: {:?}", app.events(u));
    }
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

//! `examples/sqlite_auth.rs` against a real server: session tokens looked up in an on-disk
//! SQLite table on worker threads. A lookup held up for 200 ms (the database locked by a
//! writer) delays only its own client: the shard's other clients keep their P2P round trips
//! under 50 ms, and the slow client is admitted once the lookup ends.

mod common;

#[path = "../examples/sqlite_auth.rs"]
#[allow(dead_code)]
mod sqlite_auth;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::json;

/// A database file under the temp directory, removed at the end.
struct TempDb(PathBuf);

impl TempDb {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("customws-{name}-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        TempDb(path)
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(self.0.with_extension("db-journal"));
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A server with one shard (every client on the same event loop) running the example's app.
fn server_with_sessions(db: &TempDb, sessions: &[(i64, &str, u64)]) -> customws::ServerHandle {
    let conn = sqlite_auth::open(&db.0).unwrap();
    for &(user, token, expires_at) in sessions {
        sqlite_auth::add_session(&conn, user, token, expires_at).unwrap();
    }
    let mut config = test_config();
    config.shards = 1;
    let app = sqlite_auth::SessionAuth::new(db.0.clone(), 2, 16);
    customws::start_with(config, Arc::new(app)).unwrap()
}

fn connect_session(addr: std::net::SocketAddr, user: i64, token: &str) -> Client {
    connect_with(addr, user, &format!("/ws?token={token}"), &[])
}

#[test]
fn a_slow_lookup_does_not_delay_other_clients() {
    let db = TempDb::new("slow-lookup");
    let later = unix_now() + 3600;
    let server = server_with_sessions(&db, &[(1, "t1", later), (2, "t2", later), (3, "t3", later)]);
    let addr = server.local_addr();
    let mut a = connect_session(addr, 1, "t1");
    let mut b = connect_session(addr, 2, "t2");
    a.roundtrip("ready");
    b.roundtrip("ready");

    // The next lookup waits for this writer's lock, released 200 ms from now.
    let locker = sqlite_auth::open(&db.0).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let started = Instant::now();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        locker.execute_batch("COMMIT").unwrap();
    });
    let slow = std::thread::spawn(move || {
        let client = connect_session(addr, 3, "t3");
        (client, started.elapsed())
    });

    // Meanwhile, P2P between two clients of the same (only) shard.
    let (mut worst, mut rounds) = (Duration::ZERO, 0);
    while !slow.is_finished() {
        assert!(started.elapsed() < Duration::from_secs(5), "the slow client was never admitted");
        let t = Instant::now();
        let pid = format!("p{rounds}");
        a.send_p2p_acked(2, &pid, &json!({"n": rounds}));
        let event = b.recv_of_type("data_event");
        assert_eq!(event["payload"]["n"], rounds);
        worst = worst.max(t.elapsed());
        rounds += 1;
    }
    release.join().unwrap();
    let (mut c, admitted_after) = slow.join().unwrap();
    println!(
        "{rounds} P2P rounds while the lookup waited, worst {worst:?}; admitted after {admitted_after:?}"
    );
    assert!(rounds >= 5, "only {rounds} P2P rounds ran while the lookup waited");
    assert!(worst < Duration::from_millis(50), "a P2P round took {worst:?} during the lookup");
    assert!(admitted_after >= Duration::from_millis(200), "admitted after {admitted_after:?}");
    assert!(admitted_after < Duration::from_millis(1500), "admitted after {admitted_after:?}");
    // The slow client is an ordinary connection of user 3.
    c.roundtrip("after");
    a.send_p2p_acked(3, "to-c", &json!({"hello": 3}));
    assert_eq!(c.recv_of_type("data_event")["payload"]["hello"], 3);
}

#[test]
fn unknown_and_expired_tokens_are_refused_and_jwts_take_the_fast_path() {
    let db = TempDb::new("refusals");
    let server = server_with_sessions(&db, &[(5, "old", unix_now() - 10), (6, "good", unix_now() + 60)]);
    let addr = server.local_addr();
    let (status, body) = expect_refused(addr, "/ws?token=nope", &[]);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unknown session token"), "{body}");
    let (status, body) = expect_refused(addr, "/ws?token=old", &[]);
    assert_eq!((status, body.contains("session expired")), (401, true), "{body}");
    let (status, _) = expect_refused(addr, "/ws", &[]);
    assert_eq!(status, 401);
    // A session token, and a JWT (no database involved).
    connect_session(addr, 6, "good").roundtrip("s");
    connect(addr, 7, &[]).roundtrip("j");
}

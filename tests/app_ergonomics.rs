//! The library's application API (issue 10, item 6), over real TCP where a connection is
//! involved: `Workers` with per-thread state and a joining shutdown, `on_disconnect` with the
//! user data and the handle, `ClientMessage::pid_owned` moved into a job, and the
//! `Handle::ack`/`error`/`respond` answer by connection id — all through `customws::prelude`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::*;
use customws::prelude::*;
use serde_json::json;

/// Per-thread state that counts how many were made and dropped.
struct State {
    id: usize,
    dropped: Arc<AtomicUsize>,
}

impl Drop for State {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn workers_make_state_once_per_thread_and_shutdown_runs_the_queue_then_joins() {
    let (made, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (m, d) = (Arc::clone(&made), Arc::clone(&dropped));
    let pool = Workers::with_init(3, 256, move || State {
        id: m.fetch_add(1, Ordering::SeqCst),
        dropped: Arc::clone(&d),
    });
    let ran = Arc::new(Mutex::new(Vec::new()));
    for job in 0..60 {
        let ran = Arc::clone(&ran);
        pool.spawn_with(move |state: &mut State| {
            std::thread::sleep(Duration::from_millis(2));
            ran.lock().unwrap().push((job, state.id));
        })
        .expect("queue has room");
    }
    let clone = pool.clone();
    pool.shutdown();
    // Returned: every queued job ran, and every thread dropped its state and exited.
    let ran = ran.lock().unwrap().clone();
    assert_eq!(ran.len(), 60, "shutdown runs what was queued before returning");
    assert!(ran.iter().all(|&(_, id)| id < 3), "jobs only see the three states: {ran:?}");
    assert_eq!(made.load(Ordering::SeqCst), 3, "init runs once per thread");
    assert_eq!(dropped.load(Ordering::SeqCst), 3, "shutdown joined the threads (their state is dropped)");
    // The pool is closed for every clone.
    assert_eq!(clone.spawn_with(|_| {}), Err(Busy));
    clone.shutdown(); // a second shutdown returns at once
}

#[test]
fn every_job_accepted_while_shutdown_races_with_spawners_runs() {
    let pool = Workers::new(2, 1024);
    let (accepted, ran) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let spawners: Vec<_> = (0..4)
        .map(|_| {
            let (pool, accepted, ran) = (pool.clone(), Arc::clone(&accepted), Arc::clone(&ran));
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    let ran = Arc::clone(&ran);
                    let job = move || {
                        ran.fetch_add(1, Ordering::SeqCst);
                    };
                    match pool.spawn(job) {
                        Ok(()) => {
                            accepted.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(Busy) => std::thread::yield_now(),
                    }
                }
            })
        })
        .collect();
    wait_until(Duration::from_secs(5), "some jobs accepted", || accepted.load(Ordering::SeqCst) > 100);
    pool.shutdown();
    let after_shutdown = ran.load(Ordering::SeqCst);
    for spawner in spawners {
        spawner.join().unwrap();
    }
    assert_eq!(after_shutdown, accepted.load(Ordering::SeqCst), "accepted jobs ran before shutdown returned");
    assert_eq!(ran.load(Ordering::SeqCst), after_shutdown, "nothing ran after shutdown returned");
}

#[test]
fn dropping_the_last_workers_does_not_wait_for_a_running_job() {
    let pool = Workers::new(1, 4);
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    pool.spawn(move || {
        let _ = release_rx.recv_timeout(READ_TIMEOUT);
        done_tx.send("finished").unwrap();
    })
    .unwrap();
    let started = Instant::now();
    drop(pool);
    assert!(started.elapsed() < Duration::from_secs(1), "drop waited {:?}", started.elapsed());
    release_tx.send(()).unwrap();
    assert_eq!(done_rx.recv_timeout(READ_TIMEOUT), Ok("finished"), "the job still completes");
}

#[test]
fn shutdown_from_one_of_the_pools_own_jobs_does_not_deadlock() {
    let pool = Workers::new(2, 4);
    let (tx, rx) = mpsc::channel();
    let inner = pool.clone();
    pool.spawn(move || {
        inner.shutdown();
        tx.send("returned").unwrap();
    })
    .unwrap();
    assert_eq!(rx.recv_timeout(READ_TIMEOUT), Ok("returned"));
    assert_eq!(pool.spawn(|| {}), Err(Busy));
}

#[test]
fn a_panicking_init_leaves_a_pool_that_refuses_instead_of_queueing_forever() {
    let pool: Workers<()> = Workers::with_init(2, 4, || panic!("no database"));
    wait_until(Duration::from_secs(5), "both threads gone, spawn refused", || pool.spawn(|| {}).is_err());
    let started = Instant::now();
    pool.shutdown();
    assert!(started.elapsed() < Duration::from_secs(1), "shutdown of a dead pool waited");
}

// ----- on a server ---------------------------------------------------------------------------

struct Profile {
    name: String,
}

/// Admits `?name=<n>&id=<id>` with a `Profile`; tells user 2 who left; answers `lookup`,
/// `confirm` and `refuse` from a worker with per-thread state.
struct Lobby {
    workers: Workers<String>,
}

impl Application for Lobby {
    fn authenticate(
        &self,
        request: &Request,
        jwt: Result<Identity, AuthError>,
    ) -> Result<Admission, Rejection> {
        if let Ok(identity) = jwt {
            return Ok(Admission { identity, user_data: None });
        }
        let name = request.query_param("name").ok_or(Rejection { status: 401, message: "name".into() })?;
        let user_id = request.query_param("id").and_then(|s| s.parse().ok()).unwrap_or(0);
        let identity =
            Identity { user_id, roles: Roles::default(), claims: "{}".into(), expires_at: u64::MAX };
        Ok(Admission { identity, user_data: Some(Box::new(Profile { name })) })
    }

    fn on_message(&self, conn: &mut Conn<'_>, msg: &ClientMessage<'_>, _raw: &[u8]) -> Handled {
        let kind = msg.kind.to_string();
        if !["lookup", "confirm", "refuse"].contains(&kind.as_str()) {
            return Handled::No;
        }
        // The owned pid moves into the job; `msg.pid` could not (it borrows the frame).
        let (id, handle, pid) = (conn.id(), conn.handle().clone(), msg.pid_owned());
        let job = move |db: &mut String| {
            let pid = pid.as_deref().unwrap_or("");
            match kind.as_str() {
                "lookup" => handle.respond(id, pid, "lookup_result", &json!({ "db": db }).to_string()),
                "confirm" => handle.ack(id, pid, "done"),
                _ => handle.error(id, Some(pid), 409, "refused by the worker"),
            }
        };
        if self.workers.spawn_with(job).is_err() {
            conn.error(msg.pid.as_deref(), 503, "busy");
        }
        Handled::Yes
    }

    fn on_disconnect(&self, event: &Disconnect<'_>) {
        let Some(profile) = event.user_data::<Profile>() else {
            return;
        };
        let note = OutMessage::json("left", &json!({ "user": event.user_id, "name": profile.name })).unwrap();
        drop(event.handle().send_to_user(2, &note));
    }
}

fn start_lobby() -> ServerHandle {
    let workers = Workers::with_init(2, 64, || String::from("per-thread connection"));
    customws::start_with(test_config(), Arc::new(Lobby { workers })).expect("start")
}

#[test]
fn on_disconnect_reads_the_user_data_and_reaches_another_user_through_the_handle() {
    let server = start_lobby();
    let addr = server.local_addr();
    let mut watcher = connect(addr, 2, &[]);
    let ada = connect_with(addr, 21, "/ws?name=ada&id=21", &[]);
    ada.close();
    let v = watcher.recv_of_type("left");
    assert_eq!(v["payload"], json!({ "user": 21, "name": "ada" }), "{v}");
    // A connection without user data (JWT) leaves silently.
    let jwt_user = connect(addr, 22, &[]);
    jwt_user.close();
    watcher.expect_silence(Duration::from_millis(300));
}

#[test]
fn a_worker_answers_by_connection_id_with_the_owned_pid() {
    let server = start_lobby();
    let mut c = connect(server.local_addr(), 5, &[]);
    c.send_json(r#"{"pid":"q1","type":"lookup"}"#);
    let v = c.recv_json();
    assert_eq!(
        v,
        json!({ "pid": "q1", "type": "lookup_result", "payload": { "db": "per-thread connection" } })
    );
    c.send_json(r#"{"pid":"q2","type":"confirm"}"#);
    let v = c.recv_json();
    assert_eq!(
        (v["type"].clone(), v["payload"].clone()),
        (json!("server_ack"), json!({ "acknowledgedPid": "q2", "status": "done" })),
        "{v}"
    );
    c.send_json(r#"{"pid":"q3","type":"refuse"}"#);
    let v = c.recv_json();
    let error = json!({ "code": 409, "message": "refused by the worker", "originalPid": "q3" });
    assert_eq!((v["type"].clone(), v["error"].clone()), (json!("error_notification"), error), "{v}");
}

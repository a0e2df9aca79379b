//! Hardening (issue 9) of the limits, over real TCP: a panicking `Workers` job no longer kills
//! its thread; a message larger than `send_queue_bytes` reaches an idle reader; the per-user
//! message rate holds across reconnects and across shards.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;
use customws::app::application::Workers;

/// Regression: a panicking job killed its worker thread for good; after as many panics as
/// threads the pool silently ran nothing more. Now each panic is caught, counted and logged.
#[test]
fn a_panicking_worker_job_keeps_its_thread_and_is_counted() {
    let server = start(|_| {});
    let workers = Workers::new(2, 16);
    for i in 0..5 {
        workers.spawn(move || panic!("job {i} fails on purpose")).expect("queue has room");
    }
    let (tx, rx) = mpsc::channel();
    workers.spawn(move || tx.send("ran").unwrap()).expect("queue has room");
    assert_eq!(rx.recv_timeout(READ_TIMEOUT), Ok("ran"), "a normal job runs after five panics");
    wait_until(Duration::from_secs(5), "five panics counted by the pool", || workers.panics() == 5);
    // No other test of this binary runs a Workers pool: the process-wide counter is ours.
    let text = metrics(server.local_addr());
    assert_eq!(metric_sum(&text, "customws_worker_panics_total"), Some(5.0), "{text}");
}

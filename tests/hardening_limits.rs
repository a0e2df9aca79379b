//! Hardening (issue 9) of the limits, over real TCP: a panicking `Workers` job no longer kills
//! its thread; a message larger than `send_queue_bytes` reaches an idle reader; the per-user
//! message rate holds across reconnects and across shards.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;
use customws::app::application::Workers;
use serde_json::json;

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

/// Regression: a message larger than `send_queue_bytes` closed its receiver 1013 "slow
/// consumer" even when nothing else was queued for it.
#[test]
fn a_message_larger_than_send_queue_bytes_reaches_an_idle_reader() {
    let server = start(|c| {
        c.max_message_size = 4 * 1024 * 1024;
        c.send_queue_bytes = 64 * 1024;
    });
    let addr = server.local_addr();
    let mut sender = connect(addr, 1, &[]);
    let mut reader = connect(addr, 2, &[]);
    let blob: String = (0..2 * 1024 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    sender.send_p2p_acked(2, "big", &json!({ "blob": blob }));
    let v = reader.recv_of_type("data_event");
    assert_eq!(v["fromUserId"], 1, "{}", &v.to_string()[..200]);
    assert!(v["payload"]["blob"] == blob.as_str(), "the 2 MB payload arrives intact");
    // Still open, and a second one right behind a small frame goes through too.
    sender.send_p2p_acked(2, "small", &json!({ "n": 1 }));
    sender.send_p2p_acked(2, "big-2", &json!({ "blob": blob }));
    assert_eq!(reader.recv_of_type("data_event")["payload"]["n"], 1);
    assert!(reader.recv_of_type("data_event")["payload"]["blob"] == blob.as_str());
    reader.roundtrip("reader-open");
    let text = metrics(addr);
    assert_eq!(metric_sum(&text, "customws_slow_consumer_closes_total"), Some(0.0));
}

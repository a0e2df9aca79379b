//! A slow database query holds one worker and one pooled connection, never the shard thread
//! and never another user's requests.

mod common;

use std::time::{Duration, Instant};

use common::{Fixture, flows};
use customws_chat::SlowQuery;
use serde_json::Value;

#[test]
fn a_200ms_query_does_not_delay_other_users_messages() {
    let delay = Duration::from_millis(200);
    let f = Fixture::sqlite_with(|cfg, options| {
        // One shard: were the query run on the shard thread, every message below would wait.
        cfg.shards = 1;
        options.slow_query = Some(SlowQuery { kind: "GET_NOTIFICATIONS".into(), delay });
    });
    let bob_id = f.user("bob").id;
    let mut dave = f.connect("dave");
    let mut alice = f.connect("alice");
    let mut bob = f.connect("bob");
    // Warm up (statement caches, pooled connections), and check the hook is really slow.
    flows::send(&mut alice, bob_id, "warm-up");
    bob.expect("NEW_CHAT_MESSAGE");
    let t = Instant::now();
    assert_eq!(dave.call("GET_NOTIFICATIONS", Value::Null)["type"], "NOTIFICATION_LIST");
    assert!(t.elapsed() >= delay, "the slow-query hook took only {:?}", t.elapsed());

    let started = Instant::now();
    let slow = dave.request("GET_NOTIFICATIONS", Value::Null);
    let mut round_trips = Vec::new();
    while started.elapsed() < delay - Duration::from_millis(60) {
        let t = Instant::now();
        flows::send(&mut alice, bob_id, "¿me oyes?");
        let got = bob.expect("NEW_CHAT_MESSAGE");
        assert_eq!(got["payload"]["text"], "¿me oyes?");
        round_trips.push(t.elapsed());
    }
    let answer = dave.expect_pid(&slow);
    let slow_took = started.elapsed();
    assert_eq!(answer["type"], "NOTIFICATION_LIST");
    assert!(slow_took >= delay, "the slow request answered after {slow_took:?}");
    assert!(round_trips.len() >= 3, "only {} round trips while the query ran", round_trips.len());
    let worst = round_trips.iter().max().copied().unwrap_or_default();
    eprintln!("{} round trips during a {delay:?} query, worst {worst:?}", round_trips.len());
    assert!(worst < Duration::from_millis(50), "a round trip took {worst:?} while another user's query ran");
}

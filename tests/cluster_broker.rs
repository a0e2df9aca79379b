//! The cluster's broker layer against real brokers: a `redis-server` and a `nats-server`
//! started on free loopback ports (installed by `.ci/setup`), two broker clients as two nodes.
//! Not yet the shards (issue #11 step 2: the wiring comes next).
#![cfg(all(feature = "cluster-redis", feature = "cluster-nats"))]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use customws::cluster::broker::{Broker, BrokerConfig, BrokerError, Event};
use customws::cluster::core::{Action, Core, CoreConfig, Effects};
use customws::cluster::view::{Change, Delivery};

use common::brokers::{BrokerServer as Server, Engine};

const HEARTBEAT: Duration = Duration::from_millis(100);
const NODE_TTL: Duration = Duration::from_millis(400);

/// One node: the sans-IO core driven over a real broker client, as the link thread will be.
struct Node {
    core: Core,
    broker: Option<Box<dyn Broker>>,
    events: Receiver<Event>,
    changes: Vec<Change>,
    deliveries: Vec<(String, Bytes)>,
    receivers: HashMap<u64, Result<u32, BrokerError>>,
    states: Vec<Event>,
}

impl Node {
    fn new(server: &Server, name: &str, tweak: impl FnOnce(&mut BrokerConfig)) -> Node {
        let (tx, events) = crossbeam_channel::unbounded();
        let mut config = BrokerConfig::new(&server.url(), name);
        config.timeout = Duration::from_millis(500);
        tweak(&mut config);
        let broker = customws::cluster::connect(&config, tx).unwrap();
        let mut node = Node {
            core: Core::new(CoreConfig::new("t", name, HEARTBEAT, NODE_TTL)),
            broker: Some(broker),
            events,
            changes: Vec::new(),
            deliveries: Vec::new(),
            receivers: HashMap::new(),
            states: Vec::new(),
        };
        let effects = node.core.start();
        node.apply(effects);
        node
    }

    fn broker(&self) -> &dyn Broker {
        self.broker.as_deref().expect("alive")
    }

    fn apply(&mut self, effects: Effects) {
        self.changes.extend(effects.changes);
        self.deliveries.extend(effects.deliveries);
        let Some(broker) = self.broker.as_deref() else { return };
        for action in effects.actions {
            match action {
                Action::Publish { subject, payload } => {
                    let _ = broker.publish(&subject, payload, None);
                }
                Action::Subscribe(subjects) => broker.subscribe(subjects),
                Action::Unsubscribe(subjects) => broker.unsubscribe(subjects),
                _ => {}
            }
        }
    }

    /// Handles what is there, ticking the core.
    fn pump(&mut self) {
        let effects = self.core.tick(Instant::now());
        self.apply(effects);
        while let Ok(event) = self.events.recv_timeout(Duration::from_millis(2)) {
            let effects = match event {
                Event::Message { subject, payload } => {
                    self.core.on_message(Instant::now(), &subject, payload)
                }
                Event::Receivers { token, n } => {
                    self.receivers.insert(token, Ok(n));
                    continue;
                }
                Event::Failed { token, error } => {
                    self.receivers.insert(token, Err(error));
                    continue;
                }
                Event::Resubscribed(n) => {
                    self.states.push(Event::Resubscribed(n));
                    self.core.on_resubscribed()
                }
                other => {
                    if let Event::Subscribed(subjects) = &other {
                        self.core.on_subscribed(subjects);
                    }
                    self.states.push(other);
                    continue;
                }
            };
            self.apply(effects);
        }
    }

    fn set_user(&mut self, user: &str, count: u32) {
        let effects = self.core.set_user(user, count);
        self.apply(effects);
    }

    fn saw_state(&self, what: fn(&Event) -> bool) -> bool {
        self.states.iter().any(what)
    }
}

/// Pumps `nodes` until `cond` holds, or fails after `timeout` naming `what`.
fn pump_until(
    nodes: &mut [&mut Node],
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut(&mut [&mut Node]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        for node in nodes.iter_mut() {
            node.pump();
        }
        if cond(nodes) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
    }
}

fn up(event: &Event) -> bool {
    matches!(event, Event::Resubscribed(_))
}

fn down(event: &Event) -> bool {
    matches!(event, Event::Down(_))
}

/// Publishes `frame` to `user` from `node` with `token`, and waits for the receiver count.
fn send_to_user(nodes: &mut [&mut Node], from: usize, user: &str, token: u64) -> Result<u32, BrokerError> {
    let subject = nodes[from].core.subjects().user(user);
    let payload = nodes[from].core.deliver_payload(format!("frame for {user}").as_bytes());
    nodes[from].broker().publish(&subject, payload, Some(token))?;
    pump_until(nodes, Duration::from_secs(5), "receiver count", |n| n[from].receivers.contains_key(&token));
    nodes[from].receivers[&token].clone()
}

fn two_nodes(server: &Server) -> (Node, Node) {
    let mut a = Node::new(server, "a", |_| {});
    let mut b = Node::new(server, "b", |_| {});
    pump_until(&mut [&mut a, &mut b], Duration::from_secs(5), "both up", |n| {
        n.iter().all(|n| n.saw_state(up))
    });
    (a, b)
}

fn user_publish_reaches_the_holder_and_counts_receivers(engine: Engine) {
    let server = Server::start(engine);
    let (mut a, mut b) = two_nodes(&server);
    a.set_user("42", 1);
    // Once the engine confirms A's subscription, a publish from B reaches it: the first one.
    pump_until(&mut [&mut a, &mut b], Duration::from_secs(5), "subscription confirmed", |n| {
        n[0].states.contains(&Event::Subscribed(vec!["t.u.42".into()]))
    });
    let nodes = &mut [&mut a, &mut b];
    let n = send_to_user(nodes, 1, "42", 1).unwrap();
    assert_eq!(n, 1, "one node holds 42");
    // B learns from A's records that 42 is online.
    pump_until(nodes, Duration::from_secs(5), "42 online on b", |n| {
        n[1].changes.contains(&Change::Online("42".into()))
    });
    assert_eq!(nodes[1].core.decide("42", Ok(n)), Delivery::Delivered);
    pump_until(nodes, Duration::from_secs(5), "delivery on a", |n| !n[0].deliveries.is_empty());
    assert_eq!(nodes[0].deliveries[0], ("t.u.42".to_string(), Bytes::from_static(b"frame for 42")));
    // Nobody holds 7: Redis PUBLISH counts 0; NATS answers "no responders". Either way 404.
    let n = send_to_user(nodes, 1, "7", 1000).unwrap();
    assert_eq!(n, 0);
    assert_eq!(nodes[1].core.decide("7", Ok(n)), Delivery::NotFound);
    // Pipelining: a burst of publishes costs far fewer round trips than messages.
    let started = Instant::now();
    let subject = nodes[1].core.subjects().user("42");
    for i in 0..5000u64 {
        let payload = nodes[1].core.deliver_payload(&i.to_be_bytes());
        nodes[1].broker().publish(&subject, payload, (i == 4999).then_some(5000)).unwrap();
    }
    pump_until(nodes, Duration::from_secs(20), "burst delivered", |n| n[0].deliveries.len() > 5000);
    eprintln!("{engine:?}: 5000 cross-node publishes delivered in {:?}", started.elapsed());
    let last = &nodes[0].deliveries.last().unwrap().1;
    assert_eq!(&last[..], &4999u64.to_be_bytes());
}

fn a_dropped_node_goes_offline_within_the_ttl(engine: Engine) {
    let server = Server::start(engine);
    let (mut a, mut b) = two_nodes(&server);
    a.set_user("42", 2);
    let effects = a.core.set_room("lobby", 3);
    a.apply(effects);
    pump_until(&mut [&mut a, &mut b], Duration::from_secs(5), "42 online on b", |n| {
        n[1].changes.contains(&Change::Online("42".into()))
            && n[1].changes.contains(&Change::RoomCount { room: "lobby".into(), count: 3 })
    });
    // A dies: its broker connection goes and it never beats again.
    drop(a.broker.take());
    let killed = Instant::now();
    let mut unavailable = 0;
    let mut token = 0;
    pump_until(&mut [&mut b], NODE_TTL + HEARTBEAT + Duration::from_secs(2), "42 offline on b", |n| {
        if !n[0].changes.contains(&Change::Offline("42".into())) {
            // Meanwhile a send to 42 is never "delivered" once A's subscription is gone, and
            // never a 404 while the view still lists A: 503.
            token += 1;
            let subject = n[0].core.subjects().user("42");
            let payload = n[0].core.deliver_payload(b"x");
            if n[0].broker().publish(&subject, payload, Some(token)).is_ok() {
                let deadline = Instant::now() + Duration::from_secs(2);
                while !n[0].receivers.contains_key(&token) && Instant::now() < deadline {
                    n[0].pump();
                }
                if let Some(Ok(count)) = n[0].receivers.get(&token).cloned()
                    && count == 0
                    && !n[0].changes.contains(&Change::Offline("42".into()))
                {
                    assert_eq!(n[0].core.decide("42", Ok(0)), Delivery::Unavailable);
                    unavailable += 1;
                }
            }
            return false;
        }
        true
    });
    let took = killed.elapsed();
    eprintln!(
        "{engine:?}: offline after {took:?} (ttl {NODE_TTL:?}); {unavailable} sends answered 503 meanwhile"
    );
    assert!(took >= NODE_TTL - HEARTBEAT, "not before the TTL: {took:?}");
    assert!(took <= NODE_TTL + HEARTBEAT + Duration::from_millis(500), "within ttl + heartbeat: {took:?}");
    assert!(b.changes.contains(&Change::RoomCount { room: "lobby".into(), count: 0 }));
    assert!(b.changes.contains(&Change::NodeDown("a".into())));
    assert!(unavailable > 0, "the window between the kill and the expiry answers 503");
    let n = send_to_user(&mut [&mut b], 0, "42", 99_999).unwrap();
    assert_eq!(b.core.decide("42", Ok(n)), Delivery::NotFound);
}

fn broker_down_fails_fast_and_the_return_resubscribes(engine: Engine) {
    let mut server = Server::start(engine);
    let (mut a, mut b) = two_nodes(&server);
    a.set_user("42", 1);
    pump_until(&mut [&mut a, &mut b], Duration::from_secs(5), "42 online on b", |n| {
        n[1].changes.contains(&Change::Online("42".into()))
    });
    server.stop();
    pump_until(&mut [&mut a, &mut b], Duration::from_secs(5), "down on both", |n| {
        n.iter().all(|n| n.saw_state(down) && !n.broker().is_up())
    });
    // Cross-node operations fail at once: no queueing, no waiting for a timeout.
    let started = Instant::now();
    let payload = b.core.deliver_payload(b"x");
    let result = b.broker().publish(&b.core.subjects().user("42"), payload.clone(), Some(1));
    assert_eq!(result, Err(BrokerError::Down));
    assert_eq!(b.broker().request(&b.core.subjects().user("42"), payload, 2), Err(BrokerError::Down));
    assert!(started.elapsed() < Duration::from_millis(50), "{:?}", started.elapsed());
    for node in [&mut a, &mut b] {
        node.states.clear();
    }
    // The broker returns on the same port: both reconnect and resubscribe by themselves.
    server.restart();
    pump_until(&mut [&mut a, &mut b], Duration::from_secs(15), "up again on both", |n| {
        n.iter().all(|n| n.saw_state(|e| *e == Event::Up) && n.saw_state(up) && n.broker().is_up())
    });
    let before = a.deliveries.len();
    let n = send_to_user(&mut [&mut a, &mut b], 1, "42", 3).unwrap();
    assert_eq!(n, 1, "a's subscription to 42 is back");
    pump_until(&mut [&mut a, &mut b], Duration::from_secs(5), "delivery after the return", |n| {
        n[0].deliveries.len() > before
    });
    // The state was republished: a user arriving on a after the return is seen by b.
    a.set_user("43", 1);
    pump_until(&mut [&mut a, &mut b], Duration::from_secs(5), "43 online on b", |n| {
        n[1].changes.contains(&Change::Online("43".into()))
    });
}

#[test]
fn redis_user_publish_reaches_the_holder_and_counts_receivers() {
    user_publish_reaches_the_holder_and_counts_receivers(Engine::Redis);
}

#[test]
fn nats_user_publish_reaches_the_holder_and_no_responders_is_404() {
    user_publish_reaches_the_holder_and_counts_receivers(Engine::Nats);
}

#[test]
fn redis_a_dropped_node_goes_offline_within_the_ttl() {
    a_dropped_node_goes_offline_within_the_ttl(Engine::Redis);
}

#[test]
fn nats_a_dropped_node_goes_offline_within_the_ttl() {
    a_dropped_node_goes_offline_within_the_ttl(Engine::Nats);
}

#[test]
fn redis_down_fails_fast_and_the_return_resubscribes() {
    broker_down_fails_fast_and_the_return_resubscribes(Engine::Redis);
}

#[test]
fn nats_down_fails_fast_and_the_return_resubscribes() {
    broker_down_fails_fast_and_the_return_resubscribes(Engine::Nats);
}

#[test]
fn redis_stalled_sheds_with_a_count_and_recovers() {
    let server = Server::start(Engine::Redis);
    const LIMIT: usize = 64 * 1024;
    let mut b = Node::new(&server, "b", |c| c.queue_bytes = LIMIT);
    pump_until(&mut [&mut b], Duration::from_secs(5), "up", |n| n[0].saw_state(up));
    server.signal("-STOP");
    let subject = b.core.subjects().user("42");
    let frame = Bytes::from(vec![b'x'; 1024]);
    let (mut ok, mut full, mut down_refusals) = (0u64, 0u64, 0u64);
    let mut max_backlog = 0;
    let started = Instant::now();
    // Keep publishing into the stalled broker: the queue never grows past its bound, the excess
    // is shed with a count, and once the timeout declares the link down, publishes fail at once.
    while !b.saw_state(down) {
        assert!(started.elapsed() < Duration::from_secs(10), "stalled redis never declared down");
        for _ in 0..200 {
            match b.broker().publish(&subject, frame.clone(), None) {
                Ok(()) => ok += 1,
                Err(BrokerError::Full) => full += 1,
                Err(BrokerError::Down) => down_refusals += 1,
                Err(other) => panic!("{other}"),
            }
            max_backlog = max_backlog.max(b.broker().stats().backlog_bytes);
        }
        b.pump();
    }
    let stats = b.broker().stats();
    eprintln!(
        "stalled: {ok} queued, {full} shed, {down_refusals} refused as down, max backlog {max_backlog} B, {stats:?}"
    );
    assert!(max_backlog <= LIMIT + 1024 + subject.len(), "backlog {max_backlog} over the bound");
    assert!(full > 0 && stats.shed == full, "the excess is shed and counted");
    assert!(started.elapsed() < Duration::from_secs(3), "down within the timeout: {:?}", started.elapsed());
    assert_eq!(b.broker().publish(&subject, frame.clone(), None), Err(BrokerError::Down));
    // What was queued is failed and released, not kept for the broker's return.
    pump_until(&mut [&mut b], Duration::from_secs(2), "backlog released", |n| {
        n[0].broker().stats().backlog_bytes == 0
    });
    b.states.clear();
    server.signal("-CONT");
    pump_until(&mut [&mut b], Duration::from_secs(15), "up after SIGCONT", |n| {
        n[0].saw_state(up) && n[0].broker().is_up()
    });
    assert!(b.broker().stats().backlog_bytes <= LIMIT);
    b.set_user("42", 1);
    pump_until(&mut [&mut b], Duration::from_secs(5), "own subscription", |n| {
        n[0].states.contains(&Event::Subscribed(vec!["t.u.42".into()]))
    });
    let n = send_to_user(&mut [&mut b], 0, "42", 1).unwrap();
    assert_eq!(n, 1, "publishes flow again after the stall");
}

#[test]
fn redis_a_busy_publisher_keeps_its_quiet_subscriber_link_alive() {
    // The node publishes without pause to subjects nobody listens on and receives nothing: the
    // subscriber connection must still be probed (not declared dead after the read timeout).
    let server = Server::start(Engine::Redis);
    let mut b = Node::new(&server, "b", |_| {});
    pump_until(&mut [&mut b], Duration::from_secs(5), "up", |n| n[0].saw_state(up));
    b.states.clear();
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_millis(1600) {
        for _ in 0..50 {
            if b.broker().publish("nobody.listens", Bytes::from_static(b"x"), None).is_ok() {
                sent += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
        while b.events.try_recv().map(|e| b.states.push(e)).is_ok() {}
    }
    assert!(sent > 1000, "{sent}");
    assert!(!b.saw_state(down), "link declared down while busy: {:?}", b.states);
    assert!(b.broker().is_up());
}

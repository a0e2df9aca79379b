//! The broker abstraction every engine implements, and the pieces engines share.
//!
//! A [`Broker`] never blocks its caller: publishes are queued for the engine's IO thread(s)
//! (bounded in bytes; beyond the bound they are refused with [`BrokerError::Full`] and counted as
//! shed), and refused at once with [`BrokerError::Down`] while the broker is unreachable, so a
//! cross-node operation fails fast instead of waiting. Everything the broker has to say comes back
//! as [`Event`]s on the channel given when it was started: received messages, receiver counts of
//! publishes that asked for one, failures, and connection state (down, up, resubscribed).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::Sender;

/// What an engine reports, in order, on its event channel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message arrived on a subscribed subject.
    Message {
        /// The subject it was published on.
        subject: String,
        /// The payload as published.
        payload: Bytes,
    },
    /// How many nodes received the publish or request that carried `token` (Redis: `PUBLISH`'s
    /// reply; NATS request: 0 on "no responders", 1 on the first reply).
    Receivers {
        /// The caller's token.
        token: u64,
        /// Receiving nodes.
        n: u32,
    },
    /// The publish or request that carried `token` was not confirmed: the broker went away or
    /// did not answer in time. The message may or may not have been delivered.
    Failed {
        /// The caller's token.
        token: u64,
        /// Why.
        error: BrokerError,
    },
    /// The connection is up (first connect or reconnect); subscriptions may still be pending.
    Up,
    /// Every subscription is in place again after a (re)connection (follows [`Event::Up`]);
    /// carries how many. The node should now resynchronise its state.
    Resubscribed(usize),
    /// These subjects, asked for with [`Broker::subscribe`] while up, are now in place on the
    /// broker: messages published on them from now on reach this node.
    Subscribed(Vec<String>),
    /// These subjects, given to [`Broker::unsubscribe`] while up, are gone from the broker:
    /// messages published on them from now on do not reach this node.
    Unsubscribed(Vec<String>),
    /// The broker became unreachable; publishes fail until [`Event::Up`].
    Down(String),
}

/// Why a broker operation was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker is unreachable (503 `cluster_unavailable`).
    #[error("cluster broker unavailable")]
    Down,
    /// The outgoing queue is full (a slow or stalled broker); the message was shed.
    #[error("cluster broker queue full")]
    Full,
    /// No confirmation within the configured timeout.
    #[error("cluster broker timed out")]
    Timeout,
    /// The URL names no engine this build has, or is malformed.
    #[error("cluster broker: {0}")]
    Config(String),
}

/// Counters an engine keeps (for `/metrics` and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Bytes of payload queued and not yet written to the broker.
    pub backlog_bytes: usize,
    /// Messages refused because the queue was full.
    pub shed: u64,
    /// Messages handed to the broker.
    pub published: u64,
    /// Messages received from the broker.
    pub received: u64,
}

/// A connection to the cluster's broker, shared by the threads that publish.
pub trait Broker: Send + Sync {
    /// Publishes `payload` on `subject`. With a `token`, an [`Event::Receivers`] (or
    /// [`Event::Failed`]) follows with the number of receiving nodes, where the engine knows it.
    fn publish(&self, subject: &str, payload: Bytes, token: Option<u64>) -> Result<(), BrokerError>;

    /// Publishes `payload` to whoever listens on `subject` and reports [`Event::Receivers`] for
    /// `token`: 0 when nobody listens (NATS "no responders"; Redis `PUBLISH` = 0), ≥ 1 when a node
    /// received it. On NATS, receiving nodes answer requests automatically.
    fn request(&self, subject: &str, payload: Bytes, token: u64) -> Result<(), BrokerError>;

    /// Adds subscriptions (sent in batches); [`Event::Subscribed`] follows once they are in
    /// place (or [`Event::Resubscribed`], if the link was down meanwhile).
    fn subscribe(&self, subjects: Vec<String>);

    /// Removes subscriptions.
    fn unsubscribe(&self, subjects: Vec<String>);

    /// Whether the broker is reachable now (read without blocking).
    fn is_up(&self) -> bool;

    /// Current counters.
    fn stats(&self) -> BrokerStats;
}

/// How to reach the broker and the bounds to keep; built from the configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// `redis://host:port[/db]` or `nats://host:port`.
    pub url: String,
    /// Name the connections carry on the broker (`CLIENT SETNAME`, NATS `name`).
    pub client_name: String,
    /// Bound on connecting and on a command's reply.
    pub timeout: Duration,
    /// Bytes that may wait for the broker before publishes are shed.
    pub queue_bytes: usize,
    /// Requests in flight at once.
    pub max_pending: usize,
    /// Subject the engine publishes to itself to wake and check its subscriber link.
    pub probe: String,
}

impl BrokerConfig {
    /// A configuration for `url` with the defaults of the configuration keys.
    pub fn new(url: &str, client_name: &str) -> BrokerConfig {
        BrokerConfig {
            url: url.to_string(),
            client_name: client_name.to_string(),
            timeout: Duration::from_secs(2),
            queue_bytes: 16 * 1024 * 1024,
            max_pending: 65_536,
            probe: format!("{client_name}.probe"),
        }
    }

    /// From the server configuration; `None` when `cluster` is unset.
    pub fn from_config(config: &crate::Config, node: &str) -> Option<BrokerConfig> {
        let url = config.cluster.as_deref()?;
        let mut out = BrokerConfig::new(url, &format!("{}:{node}", config.cluster_prefix));
        out.timeout = config.cluster_timeout;
        out.queue_bytes = config.cluster_queue_bytes;
        out.max_pending = config.cluster_max_pending;
        out.probe = super::subjects::Subjects::new(&config.cluster_prefix, node).probe();
        Some(out)
    }
}

/// State shared by an engine's caller side and IO side: connection flag, byte backlog with its
/// bound, counters, and the event channel. Emits [`Event::Up`]/[`Event::Down`] once per
/// transition.
#[cfg_attr(not(any(feature = "cluster-redis", feature = "cluster-nats")), allow(dead_code))]
#[derive(Debug)]
pub(crate) struct Shared {
    up: AtomicBool,
    backlog: AtomicUsize,
    limit: usize,
    shed: AtomicU64,
    published: AtomicU64,
    received: AtomicU64,
    events: Sender<Event>,
    state: std::sync::Mutex<bool>,
}

#[cfg_attr(not(any(feature = "cluster-redis", feature = "cluster-nats")), allow(dead_code))]
impl Shared {
    pub(crate) fn new(limit: usize, events: Sender<Event>) -> Arc<Shared> {
        Arc::new(Shared {
            up: AtomicBool::new(false),
            backlog: AtomicUsize::new(0),
            limit,
            shed: AtomicU64::new(0),
            published: AtomicU64::new(0),
            received: AtomicU64::new(0),
            events,
            state: std::sync::Mutex::new(false),
        })
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Reserves `bytes` of backlog, or refuses: down, or over the bound (counted as shed).
    pub(crate) fn admit(&self, bytes: usize) -> Result<(), BrokerError> {
        if !self.is_up() {
            return Err(BrokerError::Down);
        }
        let before = self.backlog.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > self.limit && before > 0 {
            self.backlog.fetch_sub(bytes, Ordering::AcqRel);
            self.shed.fetch_add(1, Ordering::Relaxed);
            return Err(BrokerError::Full);
        }
        Ok(())
    }

    /// Releases `bytes` of backlog (written, or dropped).
    pub(crate) fn release(&self, bytes: usize) {
        self.backlog.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub(crate) fn count_published(&self, n: u64) {
        self.published.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn emit(&self, event: Event) {
        if matches!(event, Event::Message { .. }) {
            self.received.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.events.send(event);
    }

    /// Records the connection state; emits `Up`/`Down` only on a change.
    pub(crate) fn set_up(&self, up: bool, reason: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state == up {
            return;
        }
        *state = up;
        self.up.store(up, Ordering::Release);
        self.emit(if up { Event::Up } else { Event::Down(reason.to_string()) });
    }

    pub(crate) fn stats(&self) -> BrokerStats {
        BrokerStats {
            backlog_bytes: self.backlog.load(Ordering::Acquire),
            shed: self.shed.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
        }
    }
}

/// Reconnect delays: 100 ms doubling to 2 s, with up to 25 % jitter.
#[cfg_attr(not(any(feature = "cluster-redis", feature = "cluster-nats")), allow(dead_code))]
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

#[cfg_attr(not(any(feature = "cluster-redis", feature = "cluster-nats")), allow(dead_code))]
impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff { next: Duration::from_millis(100) }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(2));
        let mut byte = [0u8; 1];
        let _ = getrandom::fill(&mut byte);
        base + base * u32::from(byte[0]) / 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_is_bounded_and_sheds_with_a_count() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Shared::new(100, tx);
        assert_eq!(shared.admit(10), Err(BrokerError::Down));
        shared.set_up(true, "");
        shared.set_up(true, "");
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [Event::Up]);
        assert!(shared.admit(60).is_ok());
        assert_eq!(shared.admit(60), Err(BrokerError::Full));
        assert!(shared.admit(40).is_ok());
        assert_eq!(shared.stats().backlog_bytes, 100);
        assert_eq!(shared.stats().shed, 1);
        shared.release(100);
        // One message bigger than the whole bound still passes when nothing is queued.
        assert!(shared.admit(1000).is_ok());
        shared.set_up(false, "gone");
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [Event::Down("gone".into())]);
    }

    #[test]
    fn backoff_doubles_to_two_seconds() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] < Duration::from_millis(126));
        assert!(delays[7] >= Duration::from_secs(2) && delays[7] < Duration::from_millis(2501));
        backoff.reset();
        assert!(backoff.next_delay() < Duration::from_millis(126));
    }
}

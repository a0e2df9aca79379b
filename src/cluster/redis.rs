//! The Redis engine, on the `redis` crate's sync API: two connections, one thread each.
//!
//! - **Command connection** (`cluster-redis-tx`): publishes go into a queue bounded in bytes
//!   ([`BrokerConfig::queue_bytes`]; beyond it they are shed and counted) and are written as one
//!   pipeline per batch (up to [`BATCH`] messages: one write, N replies), so throughput is not one
//!   round trip per message. `PUBLISH`'s reply is the number of receiving nodes. Every command has
//!   the configured timeout; an error or timeout drops the connection (a timed-out reply could
//!   otherwise be read as the next one, redis-rs #1252), fails the batch and reconnects with
//!   backoff. It publishes to the probe channel at least every third of the timeout.
//! - **Subscriber connection** (`cluster-redis-rx`): a blocking read with the configured
//!   timeout. The probe (and every message) wakes it; silence for the whole timeout means the
//!   link is dead and it reconnects. `SUBSCRIBE`/`UNSUBSCRIBE` go in batches of [`SUB_BATCH`];
//!   confirmations are counted: [`Event::Subscribed`] names the confirmed channels (at most a
//!   batch at a time), and after a reconnection [`Event::Resubscribed`] follows the last one.
//!
//! The broker is up while both connections are; [`Event::Up`] and [`Event::Resubscribed`]
//! follow a reconnection once every subscription is back.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Sender;
use redis::{Connection, Msg, Value};

use super::broker::{Backoff, Broker, BrokerConfig, BrokerError, BrokerStats, Event, Shared};

/// Most messages in one pipeline.
pub const BATCH: usize = 1024;
/// Most channels in one `SUBSCRIBE`/`UNSUBSCRIBE`.
pub const SUB_BATCH: usize = 512;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct Item {
    subject: String,
    payload: Bytes,
    token: Option<u64>,
}

impl Item {
    fn cost(&self) -> usize {
        self.subject.len() + self.payload.len()
    }
}

#[derive(Debug, Default)]
struct Subs {
    /// Every subscription the caller wants (restored on reconnect).
    wanted: HashSet<String>,
    add: Vec<String>,
    remove: Vec<String>,
}

#[derive(Debug, Default)]
struct LinkState {
    tx_ok: bool,
    rx_ok: bool,
    reason: String,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    config: BrokerConfig,
    client: redis::Client,
    queue: Mutex<VecDeque<Item>>,
    ready: Condvar,
    subs: Mutex<Subs>,
    link: Mutex<LinkState>,
    stop: AtomicBool,
}

impl Inner {
    /// Records one connection's state and emits the broker's transitions.
    fn set(&self, tx: Option<bool>, rx: Option<bool>, reason: &str) {
        let mut link = lock(&self.link);
        if let Some(ok) = tx {
            link.tx_ok = ok;
        }
        if let Some(ok) = rx {
            link.rx_ok = ok;
        }
        if !reason.is_empty() {
            link.reason = reason.to_string();
        }
        let up = link.tx_ok && link.rx_ok;
        let was = self.shared.is_up();
        self.shared.set_up(up, &link.reason);
        if up && !was {
            self.shared.emit(Event::Resubscribed(lock(&self.subs).wanted.len()));
        }
    }

    /// Fails every queued publish (the broker went away).
    fn fail_queue(&self, error: &BrokerError) {
        let items: Vec<Item> = lock(&self.queue).drain(..).collect();
        self.fail(items, error);
    }

    fn fail(&self, items: Vec<Item>, error: &BrokerError) {
        for item in items {
            self.shared.release(item.cost());
            if let Some(token) = item.token {
                self.shared.emit(Event::Failed { token, error: error.clone() });
            }
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Sleeps `delay` in short steps, returning early on stop.
    fn pause(&self, delay: Duration) {
        let until = Instant::now() + delay;
        while !self.stopped() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10).min(until - Instant::now()));
        }
    }

    fn connect(&self) -> redis::RedisResult<Connection> {
        let mut con = self.client.get_connection_with_timeout(self.config.timeout)?;
        con.set_read_timeout(Some(self.config.timeout))?;
        con.set_write_timeout(Some(self.config.timeout))?;
        redis::cmd("CLIENT").arg("SETNAME").arg(&self.config.client_name).query::<()>(&mut con)?;
        Ok(con)
    }

    fn run_tx(&self) {
        let mut backoff = Backoff::new();
        while !self.stopped() {
            let mut con = match self.connect() {
                Ok(con) => con,
                Err(error) => {
                    self.set(Some(false), None, &format!("redis: {error}"));
                    self.fail_queue(&BrokerError::Down);
                    self.pause(backoff.next_delay());
                    continue;
                }
            };
            backoff.reset();
            self.set(Some(true), None, "");
            if let Err(error) = self.publish_loop(&mut con) {
                let reason = format!("redis: {error}");
                let error = if error.is_timeout() { BrokerError::Timeout } else { BrokerError::Down };
                self.set(Some(false), None, &reason);
                self.fail_queue(&error);
            }
        }
    }

    fn publish_loop(&self, con: &mut Connection) -> redis::RedisResult<()> {
        let idle = self.config.timeout / 3;
        let mut last_probe = Instant::now();
        loop {
            let batch: Vec<Item> = {
                let mut queue = lock(&self.queue);
                if queue.is_empty() {
                    queue = self.ready.wait_timeout(queue, idle).unwrap_or_else(|e| e.into_inner()).0;
                }
                let n = queue.len().min(BATCH);
                queue.drain(..n).collect()
            };
            let mut pipe = redis::pipe();
            for item in &batch {
                pipe.cmd("PUBLISH").arg(&item.subject).arg(&item.payload[..]);
            }
            // At least every third of the timeout, busy or idle: keeps the subscriber link's read
            // from timing out, and tests it.
            let probe = batch.is_empty() || last_probe.elapsed() >= idle;
            if probe {
                pipe.cmd("PUBLISH").arg(&self.config.probe).arg("");
            }
            // Written at once, replies read one by one: the first error or timeout abandons the
            // connection (the pipeline API would wait out the timeout once per reply).
            if let Err(error) = con.send_packed_command(&pipe.get_packed_pipeline()) {
                self.fail(batch, &BrokerError::Down);
                return Err(error);
            }
            let mut rest = batch.into_iter();
            self.shared.count_published(rest.len() as u64);
            while let Some(item) = rest.next() {
                match con.recv_response() {
                    Ok(reply) => {
                        self.shared.release(item.cost());
                        if let Some(token) = item.token {
                            let n = match reply {
                                Value::Int(n) => u32::try_from(n).unwrap_or(0),
                                _ => 0,
                            };
                            self.shared.emit(Event::Receivers { token, n });
                        }
                    }
                    Err(error) => {
                        let kind = if error.is_timeout() { BrokerError::Timeout } else { BrokerError::Down };
                        self.fail(std::iter::once(item).chain(rest).collect(), &kind);
                        return Err(error);
                    }
                }
            }
            if probe {
                con.recv_response()?;
                last_probe = Instant::now();
            }
            if self.stopped() {
                return Ok(());
            }
        }
    }

    fn run_rx(&self) {
        let mut backoff = Backoff::new();
        while !self.stopped() {
            let mut con = match self.connect() {
                Ok(con) => con,
                Err(error) => {
                    self.set(None, Some(false), &format!("redis: {error}"));
                    self.pause(backoff.next_delay());
                    continue;
                }
            };
            backoff.reset();
            if let Err(error) = self.read_loop(&mut con) {
                self.set(None, Some(false), &format!("redis subscriber: {error}"));
            }
        }
    }

    fn read_loop(&self, con: &mut Connection) -> redis::RedisResult<()> {
        // Everything wanted is subscribed again on this connection, plus the probe.
        let mut pending = {
            let mut subs = lock(&self.subs);
            subs.add.clear();
            subs.remove.clear();
            let mut all: Vec<String> = subs.wanted.iter().cloned().collect();
            all.push(self.config.probe.clone());
            send_batches(con, "SUBSCRIBE", &all)?
        };
        let mut resubscribing = true;
        let mut confirmed: Vec<String> = Vec::new();
        while !self.stopped() {
            let (add, remove) = {
                let mut subs = lock(&self.subs);
                (std::mem::take(&mut subs.add), std::mem::take(&mut subs.remove))
            };
            pending += send_batches(con, "SUBSCRIBE", &add)?;
            send_batches(con, "UNSUBSCRIBE", &remove)?;
            let value = con.recv_response()?;
            if let Some(msg) = Msg::from_value(&value) {
                if msg.get_channel_name() != self.config.probe {
                    let subject = msg.get_channel_name().to_string();
                    let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
                    self.shared.emit(Event::Message { subject, payload });
                }
                continue;
            }
            if let Some(channel) = confirmation(&value, b"unsubscribe") {
                if !resubscribing {
                    self.shared
                        .emit(Event::Unsubscribed(vec![String::from_utf8_lossy(channel).into_owned()]));
                }
                continue;
            }
            let Some(channel) = confirmation(&value, b"subscribe") else { continue };
            pending = pending.saturating_sub(1);
            if resubscribing {
                if pending == 0 {
                    resubscribing = false;
                    self.set(None, Some(true), "");
                }
                continue;
            }
            if channel != self.config.probe.as_bytes() {
                confirmed.push(String::from_utf8_lossy(channel).into_owned());
            }
            if (pending == 0 || confirmed.len() >= SUB_BATCH) && !confirmed.is_empty() {
                self.shared.emit(Event::Subscribed(std::mem::take(&mut confirmed)));
            }
        }
        Ok(())
    }
}

/// Sends `command` for `channels` in batches without waiting; returns how many confirmations
/// will follow.
fn send_batches(con: &mut Connection, command: &str, channels: &[String]) -> redis::RedisResult<usize> {
    for chunk in channels.chunks(SUB_BATCH) {
        con.send_packed_command(&redis::cmd(command).arg(chunk).get_packed_command())?;
    }
    Ok(channels.len())
}

/// The channel of a `[kind, channel, count]` (un)subscribe confirmation of `kind`.
fn confirmation<'a>(value: &'a Value, kind: &[u8]) -> Option<&'a [u8]> {
    match value {
        Value::Array(items) | Value::Push { data: items, .. } => match &items[..] {
            [Value::BulkString(k), Value::BulkString(channel), ..] if k.eq_ignore_ascii_case(kind) => {
                Some(channel)
            }
            _ => None,
        },
        _ => None,
    }
}

/// A node's connection to Redis (see the module documentation).
#[derive(Debug)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

impl RedisBroker {
    /// Starts the two IO threads; the connection is made in the background.
    pub fn start(config: &BrokerConfig, events: Sender<Event>) -> Result<RedisBroker, BrokerError> {
        let client =
            redis::Client::open(config.url.as_str()).map_err(|e| BrokerError::Config(e.to_string()))?;
        let inner = Arc::new(Inner {
            shared: Shared::new(config.queue_bytes, events),
            config: config.clone(),
            client,
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            subs: Mutex::new(Subs::default()),
            link: Mutex::new(LinkState::default()),
            stop: AtomicBool::new(false),
        });
        let spawn = |name: &str, run: fn(&Inner)| {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || run(&inner))
                .map_err(|e| BrokerError::Config(format!("cannot start a thread: {e}")))
        };
        spawn("cluster-redis-tx", Inner::run_tx)?;
        spawn("cluster-redis-rx", Inner::run_rx)?;
        Ok(RedisBroker { inner })
    }

    fn enqueue(&self, item: Item) -> Result<(), BrokerError> {
        self.inner.shared.admit(item.cost())?;
        lock(&self.inner.queue).push_back(item);
        self.inner.ready.notify_one();
        Ok(())
    }

    /// Wakes the subscriber link so it applies subscription changes now.
    fn wake_subscriber(&self) {
        let probe = Item { subject: self.inner.config.probe.clone(), payload: Bytes::new(), token: None };
        let _ = self.enqueue(probe);
    }
}

impl Broker for RedisBroker {
    fn publish(&self, subject: &str, payload: Bytes, token: Option<u64>) -> Result<(), BrokerError> {
        self.enqueue(Item { subject: subject.to_string(), payload, token })
    }

    fn request(&self, subject: &str, payload: Bytes, token: u64) -> Result<(), BrokerError> {
        self.publish(subject, payload, Some(token))
    }

    fn subscribe(&self, subjects: Vec<String>) {
        {
            let mut subs = lock(&self.inner.subs);
            let new: Vec<String> = subjects.into_iter().filter(|s| subs.wanted.insert(s.clone())).collect();
            subs.remove.retain(|s| !new.contains(s));
            subs.add.extend(new);
        }
        self.wake_subscriber();
    }

    fn unsubscribe(&self, subjects: Vec<String>) {
        {
            let mut subs = lock(&self.inner.subs);
            let gone: Vec<String> = subjects.into_iter().filter(|s| subs.wanted.remove(s)).collect();
            subs.add.retain(|s| !gone.contains(s));
            subs.remove.extend(gone);
        }
        self.wake_subscriber();
    }

    fn is_up(&self) -> bool {
        self.inner.shared.is_up()
    }

    fn stats(&self) -> BrokerStats {
        self.inner.shared.stats()
    }
}

impl Drop for RedisBroker {
    /// Stops both threads: the publisher at once, the subscriber at its next read (the probe
    /// wakes it) or timeout. Neither is joined, so dropping never blocks on a stalled broker.
    fn drop(&mut self) {
        self.wake_subscriber();
        self.inner.stop.store(true, Ordering::Release);
        self.inner.ready.notify_all();
    }
}

//! The NATS engine, on `async-nats` with a `current_thread` tokio runtime confined to one thread
//! (`cluster-nats`), off the data path: callers hand commands over through an unbounded tokio
//! channel whose content is bounded in bytes by `Shared` (shed beyond
//! [`BrokerConfig::queue_bytes`], refused at once while down).
//!
//! NATS core publishes do not say how many received them, so a publish or request that wants a
//! count is sent as a NATS request: every node answers requests on its subscriptions at once
//! (an empty reply), the server answers "no responders" when nobody listens, which gives 1 or 0.
//! Requests in flight are capped by [`BrokerConfig::max_pending`]. async-nats reconnects (with
//! our backoff) and resubscribes by itself; after a reconnection we flush (PING/PONG, so the
//! server has the subscriptions) before reporting [`Event::Up`] and [`Event::Resubscribed`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::Sender;
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::broker::{Broker, BrokerConfig, BrokerError, BrokerStats, Event, Shared};

enum Cmd {
    Publish { subject: String, payload: Bytes, cost: usize },
    Request { subject: String, payload: Bytes, token: u64, cost: usize, permit: OwnedSemaphorePermit },
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    Connected,
    Stop,
}

/// A node's connection to NATS (see the module documentation).
#[derive(Debug)]
pub struct NatsBroker {
    shared: Arc<Shared>,
    cmds: mpsc::UnboundedSender<Cmd>,
    requests: Arc<Semaphore>,
}

impl NatsBroker {
    /// Starts the IO thread; the connection is made in the background.
    pub fn start(config: &BrokerConfig, events: Sender<Event>) -> Result<NatsBroker, BrokerError> {
        let shared = Shared::new(config.queue_bytes, events);
        let (cmds, rx) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BrokerError::Config(format!("cannot start the NATS runtime: {e}")))?;
        let requests = Arc::new(Semaphore::new(config.max_pending.max(1)));
        let (thread_shared, thread_cmds, config) = (shared.clone(), cmds.clone(), config.clone());
        std::thread::Builder::new()
            .name("cluster-nats".to_string())
            .spawn(move || runtime.block_on(run(config, thread_shared, thread_cmds, rx)))
            .map_err(|e| BrokerError::Config(format!("cannot start a thread: {e}")))?;
        Ok(NatsBroker { shared, cmds, requests })
    }

    fn send(&self, cmd: Cmd) -> Result<(), BrokerError> {
        self.cmds.send(cmd).map_err(|_| BrokerError::Down)
    }
}

impl Broker for NatsBroker {
    fn publish(&self, subject: &str, payload: Bytes, token: Option<u64>) -> Result<(), BrokerError> {
        if let Some(token) = token {
            return self.request(subject, payload, token);
        }
        let cost = subject.len() + payload.len();
        self.shared.admit(cost)?;
        self.send(Cmd::Publish { subject: subject.to_string(), payload, cost })
    }

    fn request(&self, subject: &str, payload: Bytes, token: u64) -> Result<(), BrokerError> {
        let permit = self.requests.clone().try_acquire_owned().map_err(|_| BrokerError::Full)?;
        let cost = subject.len() + payload.len();
        self.shared.admit(cost)?;
        self.send(Cmd::Request { subject: subject.to_string(), payload, token, cost, permit })
    }

    fn subscribe(&self, subjects: Vec<String>) {
        let _ = self.send(Cmd::Subscribe(subjects));
    }

    fn unsubscribe(&self, subjects: Vec<String>) {
        let _ = self.send(Cmd::Unsubscribe(subjects));
    }

    fn is_up(&self) -> bool {
        self.shared.is_up()
    }

    fn stats(&self) -> BrokerStats {
        self.shared.stats()
    }
}

impl Drop for NatsBroker {
    /// Stops the IO thread, which closes the connection (not joined: never blocks).
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Stop);
    }
}

async fn run(
    config: BrokerConfig,
    shared: Arc<Shared>,
    cmds: mpsc::UnboundedSender<Cmd>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
) {
    let callback_shared = shared.clone();
    let options = async_nats::ConnectOptions::new()
        .name(&config.client_name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(config.timeout)
        .request_timeout(Some(config.timeout))
        .ping_interval(config.timeout.max(Duration::from_millis(100)))
        .reconnect_delay_callback(|attempts| {
            let exp = u32::try_from(attempts.min(5)).unwrap_or(5);
            (Duration::from_millis(100) * 2u32.pow(exp)).min(Duration::from_secs(2))
        })
        .event_callback(move |event| {
            let (shared, cmds) = (callback_shared.clone(), cmds.clone());
            async move {
                match event {
                    async_nats::Event::Connected => {
                        let _ = cmds.send(Cmd::Connected);
                    }
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        shared.set_up(false, &format!("nats: {event}"));
                    }
                    _ => {}
                }
            }
        });
    let client = match options.connect(config.url.as_str()).await {
        Ok(client) => client,
        Err(error) => {
            shared.set_up(false, &format!("nats: {error}"));
            return;
        }
    };
    let mut subs: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Cmd::Publish { subject, payload, cost } => {
                let _ = client.publish(subject, payload).await;
                shared.release(cost);
                shared.count_published(1);
            }
            Cmd::Request { subject, payload, token, cost, permit } => {
                let (client, shared) = (client.clone(), shared.clone());
                tokio::spawn(async move {
                    let result = client.request(subject, payload).await;
                    shared.release(cost);
                    shared.count_published(1);
                    drop(permit);
                    shared.emit(match result {
                        Ok(_) => Event::Receivers { token, n: 1 },
                        Err(error) => match error.kind() {
                            async_nats::RequestErrorKind::NoResponders => Event::Receivers { token, n: 0 },
                            async_nats::RequestErrorKind::TimedOut => {
                                Event::Failed { token, error: BrokerError::Timeout }
                            }
                            _ => Event::Failed { token, error: BrokerError::Down },
                        },
                    });
                });
            }
            Cmd::Subscribe(subjects) => {
                let mut added = Vec::new();
                for subject in subjects {
                    if subs.contains_key(&subject) {
                        continue;
                    }
                    let Ok(subscriber) = client.subscribe(subject.clone()).await else { continue };
                    subs.insert(
                        subject.clone(),
                        tokio::spawn(forward(client.clone(), shared.clone(), subscriber)),
                    );
                    added.push(subject);
                }
                // The flush's PONG follows the SUBs: the server has them.
                if !added.is_empty() && client.flush().await.is_ok() && shared.is_up() {
                    shared.emit(Event::Subscribed(added));
                }
            }
            Cmd::Unsubscribe(subjects) => {
                let mut removed = Vec::new();
                for subject in subjects {
                    if let Some(task) = subs.remove(&subject) {
                        // Dropping the subscriber (with the task) unsubscribes; waiting for the
                        // aborted task queues the UNSUB before anything published after it.
                        task.abort();
                        let _ = task.await;
                        removed.push(subject);
                    }
                }
                // The flush's PONG follows the UNSUBs: the server has dropped them.
                if !removed.is_empty() && client.flush().await.is_ok() && shared.is_up() {
                    shared.emit(Event::Unsubscribed(removed));
                }
            }
            Cmd::Connected => {
                // A disconnection may have followed the event; report only a live link.
                let live = client.flush().await.is_ok();
                if live && client.connection_state() == async_nats::connection::State::Connected {
                    shared.set_up(true, "");
                    shared.emit(Event::Resubscribed(subs.len()));
                }
            }
            Cmd::Stop => break,
        }
    }
    for task in subs.into_values() {
        task.abort();
    }
}

/// Forwards one subscription's messages, answering requests at once (the delivered signal).
async fn forward(client: async_nats::Client, shared: Arc<Shared>, mut subscriber: async_nats::Subscriber) {
    while let Some(message) = subscriber.next().await {
        if let Some(reply) = message.reply {
            let _ = client.publish(reply, Bytes::new()).await;
        }
        shared.emit(Event::Message { subject: message.subject.to_string(), payload: message.payload });
    }
}

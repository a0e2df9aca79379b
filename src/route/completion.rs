//! What comes back from server-initiated operations, and how a result reaches whoever waits
//! for it (a blocking caller, or the HTTP API's event loop).

use std::sync::{Arc, Mutex, PoisonError};

use crossbeam_channel::Sender;
use mio::Waker;

/// A client's answer to a send-for-ack: the `client_ack` payload's `status` and `error`.
#[derive(Debug, Clone, PartialEq)]
pub struct AckReply {
    /// `status`, if the client gave one.
    pub status: Option<String>,
    /// `error`, if the client reported one (any JSON).
    pub error: Option<serde_json::Value>,
}

/// A client's reply to a request: its whole message, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientReply {
    /// The client message's JSON text.
    pub raw: String,
}

impl ClientReply {
    /// The message parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.raw).unwrap_or(serde_json::Value::Null)
    }
}

/// One connection of a user, as reported by [`Outcome::User`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// Owning shard; `usize::MAX` for a connection on another node of a cluster (then `seq`
    /// is 0).
    pub shard: usize,
    /// Global open order (higher is newer).
    pub seq: u64,
}

/// A user's presence as the home shard stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPresence {
    /// The user.
    pub user_id: i64,
    /// `online`, `offline`, or the last status the user set.
    pub status: String,
    /// The status's context, raw JSON (`None`: null).
    pub context: Option<String>,
    /// When it was set, Unix milliseconds.
    pub since_ms: u64,
    /// The user's `presence_info_claim` value, raw JSON (`None`: key unset, claim absent or
    /// user offline).
    pub info: Option<String>,
}

/// One open connection as the admin listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnSummary {
    /// The user.
    pub user: i64,
    /// Owning shard.
    pub shard: usize,
    /// Global open order: the listing's cursor.
    pub seq: u64,
    /// The client's address as counted for admission (through `trusted_proxies`).
    pub ip: std::net::IpAddr,
    /// When the WebSocket opened, Unix milliseconds.
    pub connected_ms: u64,
    /// Rooms the connection is in.
    pub rooms: Vec<String>,
    /// Frames queued for the client now.
    pub queued: usize,
    /// Messages received from the client (wraps at 2^32).
    pub messages_in: u32,
    /// Frames queued to the client (wraps at 2^32).
    pub messages_out: u32,
    /// When the client last sent a message (or connected), Unix milliseconds, 1 s precision.
    pub last_active_ms: u64,
}

/// A room and its member count on all shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomCount {
    /// The room.
    pub room: String,
    /// Member connections on all shards, as announced.
    pub members: usize,
}

/// Why a wait ended without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// No answer within the timeout.
    #[error("timed out waiting for the client")]
    TimedOut,
    /// The user has no connection.
    #[error("user is not connected")]
    Offline,
    /// The connection closed before answering.
    #[error("connection closed before the client answered")]
    Closed,
    /// The server is shutting down.
    #[error("server shutting down")]
    ShuttingDown,
    /// [`Waiter::wait`](super::Waiter::wait) (or `wait_timeout`) was called on a shard's
    /// event-loop thread, e.g. from an `Application` callback. The answer may have to come
    /// from that very shard, which cannot produce it while its thread is blocked: the wait
    /// would deadlock (or stall every connection of the shard until the timeout). Await the
    /// `Waiter` as a future from async code, or hand the wait to a `Workers` job instead.
    #[error("Waiter::wait called on a shard thread (it would wait for itself); wait from a worker")]
    OnShardThread,
    /// The operation's input was refused (a list longer than the call allows, an invalid
    /// room name or status); nothing was done.
    #[error("invalid input: {0}")]
    Invalid(&'static str),
    /// A limit stopped the operation (the watcher's watch list is full); nothing was done.
    #[error("limit reached: {0}")]
    Limit(&'static str),
    /// The user is on another node and the cluster cannot reach it now (broker down, queue
    /// full, or the node went away).
    #[error("cluster unavailable")]
    Unavailable,
}

/// The answer to [`Handle::join_room`](super::Handle::join_room): the user's connections that
/// are members now (joined by this call or already members), and those refused by
/// `max_rooms_per_connection` or a full room (`max_room_members`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Joined {
    /// Connections in the room after the call.
    pub joined: usize,
    /// Connections the room's or the connection's limit kept out.
    pub refused: usize,
}

/// What an operation produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Connections the message was queued on.
    Delivered(usize),
    /// The client acknowledged.
    Ack(AckReply),
    /// The client replied.
    Reply(ClientReply),
    /// A user's connections (empty: offline).
    User(Vec<ConnInfo>),
    /// User ids of a room's members on one shard.
    Members(Vec<i64>),
    /// A user's current presence (status `offline` when not connected).
    Presence(UserPresence),
    /// One shard's page of open connections, by `seq`.
    Connections {
        /// The connections, lowest `seq` first.
        page: Vec<ConnSummary>,
        /// The shard has more past the page.
        more: bool,
    },
    /// Rooms with their member counts, largest first.
    Rooms {
        /// Up to the asked limit.
        rooms: Vec<RoomCount>,
        /// Rooms with members in all.
        total: usize,
    },
    /// One shard's connections of a user put into a room ([`Joined`]).
    Joined(Joined),
    /// Presences of users homed on one shard, by user id.
    Presences(Vec<UserPresence>),
    /// No answer.
    Failed(WaitError),
}

/// Where an outcome goes: a channel, a tag to tell operations apart, and an optional waker for
/// an event loop that receives on that channel.
#[derive(Debug, Clone)]
pub struct Completion {
    tx: Sender<(u64, Outcome)>,
    tag: u64,
    waker: Option<Arc<Waker>>,
    /// The task waiting on a [`Waiter`](super::Waiter) polled as a future, if any.
    task: Option<Arc<TaskSlot>>,
}

/// Where a [`Waiter`](super::Waiter) polled as a future leaves its task's waker: the
/// completing shard takes it after sending (one short lock per outcome of an operation a
/// `Handle` started, never per delivered message).
#[derive(Debug, Default)]
pub(crate) struct TaskSlot(Mutex<Option<std::task::Waker>>);

impl TaskSlot {
    /// Leaves `waker` to be woken by the next outcome (or by the last completion's drop).
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *slot {
            Some(old) if old.will_wake(waker) => {}
            other => *other = Some(waker.clone()),
        }
    }

    fn wake(&self) {
        let waker = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Completion {
    /// A completion sending `(tag, outcome)` on `tx`, waking `waker` if given.
    pub fn new(tx: Sender<(u64, Outcome)>, tag: u64, waker: Option<Arc<Waker>>) -> Self {
        Completion { tx, tag, waker, task: None }
    }

    /// A completion for a [`Waiter`](super::Waiter): also wakes the task that polls it.
    pub(crate) fn for_waiter(tx: Sender<(u64, Outcome)>, task: Arc<TaskSlot>) -> Self {
        Completion { tx, tag: 0, waker: None, task: Some(task) }
    }

    /// Whether this completion delivers on `tx`'s channel.
    pub fn same_channel(&self, tx: &Sender<(u64, Outcome)>) -> bool {
        self.tx.same_channel(tx)
    }

    /// Delivers the outcome. A receiver that went away is not an error: nobody waits any more.
    pub fn complete(self, outcome: Outcome) {
        if self.tx.send((self.tag, outcome)).is_ok()
            && let Some(waker) = &self.waker
        {
            let _ = waker.wake();
        }
        // The task, if any, is woken by the drop that follows.
    }
}

impl Drop for Completion {
    /// Wakes a task polling the [`Waiter`](super::Waiter): after an outcome was sent, and also
    /// when a message carrying the completion is dropped unanswered (a shard stopping), so the
    /// future sees the channel closed instead of waiting forever.
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.wake();
        }
    }
}

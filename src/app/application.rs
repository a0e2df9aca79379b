//! Application callbacks: the Rust counterpart of the seed's `Callbacks[TUserData]`.
//!
//! Callbacks run on the shard thread that owns the connection, between socket reads. They must
//! return quickly: a blocking call here stalls every connection of the shard. Blocking work
//! (a database, a remote service) goes to a [`Workers`] pool, and its result goes back to the
//! connection through [`Handle::send_to_conn`] from the worker thread, which reaches the shard
//! through its channel.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use crossbeam_channel::{Sender, TrySendError};

use super::handle::Handle;
use super::ops::OutMessage;
use crate::http::auth::{AuthError, Identity};
use crate::http::request::Request;
use crate::protocol::ClientMessage;
use crate::protocol::envelope::{Envelope, error_notification, server_ack};

/// Application data attached to a connection at authentication.
pub type UserData = Box<dyn Any + Send + Sync>;

/// A refused handshake: answered with this HTTP status and `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP status (401, 403, 429, …).
    pub status: u16,
    /// Message for the body and the log.
    pub message: String,
}

/// Who a connection belongs to, decided at the handshake.
#[derive(Debug)]
pub struct Admission {
    /// The verified identity (user id, roles, claims).
    pub identity: Identity,
    /// The application's data for this connection.
    pub user_data: Option<UserData>,
}

pub use crate::route::handle::ConnId;

/// A connection as a callback sees it. Frames queued through it are sent after the callback
/// returns, in order, before anything else the shard writes to that connection.
pub struct Conn<'a> {
    pub(crate) id: ConnId,
    pub(crate) user: i64,
    pub(crate) claims: &'a str,
    pub(crate) user_data: Option<&'a (dyn Any + Send + Sync)>,
    pub(crate) handle: &'a Handle,
    pub(crate) out: &'a mut Vec<Bytes>,
}

impl std::fmt::Debug for Conn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("id", &self.id).field("user", &self.user).finish()
    }
}

impl Conn<'_> {
    /// This connection's id, for answering later from another thread.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The authenticated user id.
    pub fn user_id(&self) -> i64 {
        self.user
    }

    /// The token's claim set as JSON text.
    pub fn claims(&self) -> &str {
        self.claims
    }

    /// The application's data, if it is a `T`.
    pub fn user_data<T: Any>(&self) -> Option<&T> {
        self.user_data.and_then(|data| data.downcast_ref::<T>())
    }

    /// The server handle, for operations on other users.
    pub fn handle(&self) -> &Handle {
        self.handle
    }

    /// Queues a message to this connection.
    pub fn send(&mut self, msg: &OutMessage) {
        self.out.push(msg.frame(None));
    }

    /// Queues `server_ack` `{acknowledgedPid, status}`.
    pub fn ack(&mut self, pid: &str, status: &str) {
        self.out.push(server_ack(pid, status));
    }

    /// Queues `error_notification` `{originalPid?, code, message}`.
    pub fn error(&mut self, pid: Option<&str>, code: u16, message: &str) {
        self.out.push(error_notification(pid, code, message));
    }

    /// Queues `{"pid": pid, "type": kind, "payload": payload}` (e.g. a `generic_response`).
    pub fn respond(&mut self, pid: &str, kind: &str, payload_json: &str) {
        self.out.push(Envelope::new(kind).pid(Some(pid)).raw_payload(Some(payload_json.as_bytes())).frame());
    }
}

/// Whether `on_message` took care of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The application handled it (answered now, or will answer later).
    Yes,
    /// Not ours: the built-in behaviour applies (echo for `generic_request`, 400 otherwise).
    No,
}

/// Why a connection ended, for `on_disconnect`.
#[derive(Debug, Clone, Copy)]
pub struct Disconnect<'a> {
    /// The user.
    pub user_id: i64,
    /// The connection.
    pub id: ConnId,
    /// Human-readable reason (`peer closed the connection`, `pong timeout`, …).
    pub reason: &'a str,
}

/// The application's callbacks. Every method has a default, so an application implements
/// only what it needs. All run on shard threads and must not block.
pub trait Application: Send + Sync + 'static {
    /// Decides who the client is. `jwt` is the result of the configured JWT check; the default
    /// accepts exactly what it accepts. An application with its own scheme inspects `request`.
    fn authenticate(
        &self,
        _request: &Request,
        jwt: Result<Identity, AuthError>,
    ) -> Result<Admission, Rejection> {
        jwt.map(|identity| Admission { identity, user_data: None })
            .map_err(|e| Rejection { status: 401, message: e.to_string() })
    }

    /// A connection opened (after the 101 was queued).
    fn on_connect(&self, _conn: &mut Conn<'_>) {}

    /// A client message the built-in router does not consume, and every `generic_request`.
    /// `raw` is the message's JSON text.
    fn on_message(&self, _conn: &mut Conn<'_>, _msg: &ClientMessage<'_>, _raw: &[u8]) -> Handled {
        Handled::No
    }

    /// A connection closed.
    fn on_disconnect(&self, _event: &Disconnect<'_>) {}

    /// The application's own counters for `/metrics`: `(name, help, value)`; each is exposed
    /// as a Prometheus counter `<name>_total`. Called on every scrape, from any thread.
    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }
}

/// The application used when none is given: JWT authentication, built-in behaviour only.
#[derive(Debug, Default)]
pub struct BuiltIn;

impl Application for BuiltIn {}

/// Jobs that panicked on any [`Workers`] pool of the process (`customws_worker_panics_total`).
static WORKER_PANICS: AtomicU64 = AtomicU64::new(0);

/// Jobs that panicked on any [`Workers`] pool of the process since start.
pub fn worker_panics_total() -> u64 {
    WORKER_PANICS.load(Ordering::Relaxed)
}

/// A bounded pool of threads for blocking work started from callbacks. A job that panics is
/// logged and counted (here and in `/metrics`); its thread goes on with the next job.
#[derive(Debug, Clone)]
pub struct Workers {
    tx: Sender<Box<dyn FnOnce() + Send>>,
    panics: Arc<AtomicU64>,
}

/// The pool's queue is full: shed the work (answer 503/429) instead of queuing without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("worker queue full")]
pub struct Busy;

impl Workers {
    /// `threads` workers sharing a queue of at most `queue` jobs.
    pub fn new(threads: usize, queue: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<Box<dyn FnOnce() + Send>>(queue);
        let panics = Arc::new(AtomicU64::new(0));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let panics = Arc::clone(&panics);
            let spawned = std::thread::Builder::new().name(format!("customws-worker-{i}")).spawn(move || {
                for job in rx {
                    // A job's panic must not take the thread with it: a pool whose threads
                    // all died would only ever answer "busy".
                    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
                        panics.fetch_add(1, Ordering::Relaxed);
                        WORKER_PANICS.fetch_add(1, Ordering::Relaxed);
                        log::error!("worker job panicked: {}", panic_message(payload.as_ref()));
                    }
                }
            });
            if let Err(e) = spawned {
                log::error!("cannot start worker thread: {e}");
            }
        }
        Workers { tx, panics }
    }

    /// Jobs of this pool that panicked.
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    /// Runs `job` on a worker, or refuses when the queue is full.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) -> Result<(), Busy> {
        match self.tx.try_send(Box::new(job)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(Busy),
        }
    }
}

/// The text of a panic payload (`panic!` with a literal or a format), for the log.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string payload)")
}

/// Shared application object.
pub type App = Arc<dyn Application>;

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

use super::authorize::{Operation, Verdict};
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

/// What [`Application::authenticate_deferred`] decided.
#[derive(Debug)]
pub enum Authentication {
    /// Decided on the shard thread, now: the fast path (a JWT check, a cache hit).
    Now(Result<Admission, Rejection>),
    /// Decided later through the [`PendingAuth`] taken with [`Defer::later`]: the connection
    /// waits in its handshake (its bytes are kept, not processed) until then, at most until
    /// `handshake_timeout`.
    Later,
}

/// Lets [`Application::authenticate_deferred`] answer later; see [`Defer::later`].
pub struct Defer<'a> {
    pub(crate) conn: ConnId,
    pub(crate) handle: &'a Handle,
    pub(crate) taken: &'a std::cell::Cell<bool>,
}

impl std::fmt::Debug for Defer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Defer").field("conn", &self.conn).finish()
    }
}

impl Defer<'_> {
    /// The connection's answer-to-be, to move into a [`Workers`] job; return
    /// [`Authentication::Later`]. If the shard already holds `auth_max_pending` waiting
    /// authentications, the handshake is refused 503 at once and the answer, when it comes,
    /// is ignored.
    pub fn later(self) -> PendingAuth {
        self.taken.set(true);
        PendingAuth { conn: self.conn, handle: Some(self.handle.clone()) }
    }
}

/// A handshake waiting for the application's answer, from any thread: [`PendingAuth::admit`],
/// [`PendingAuth::reject`] or [`PendingAuth::complete`]. The answer reaches the connection's
/// shard through its inbox. Dropped without an answer (a job that panicked, a pool shut
/// down), it refuses the handshake with 500: authentication fails closed. A client that went
/// away meanwhile, or whose `handshake_timeout` passed, is gone; the answer is then dropped.
pub struct PendingAuth {
    conn: ConnId,
    handle: Option<Handle>,
}

impl std::fmt::Debug for PendingAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAuth").field("conn", &self.conn).finish()
    }
}

impl PendingAuth {
    /// The waiting connection.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Opens the WebSocket for `admission`.
    pub fn admit(self, admission: Admission) {
        self.complete(Ok(admission));
    }

    /// Refuses the handshake with `rejection`'s status and message.
    pub fn reject(self, rejection: Rejection) {
        self.complete(Err(rejection));
    }

    /// Admits or refuses.
    pub fn complete(mut self, answer: Result<Admission, Rejection>) {
        if let Some(handle) = self.handle.take() {
            let answer = answer.map(|a| (a.identity, a.user_data)).map_err(|r| (r.status, r.message));
            handle.complete_auth(self.conn, answer);
        }
    }
}

impl Drop for PendingAuth {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            log::warn!("a PendingAuth was dropped without an answer; refusing the handshake (500)");
            handle.complete_auth(self.conn, Err((500, "authentication was not completed".into())));
        }
    }
}

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

/// Why a connection ended, for `on_disconnect`: who, why, the application's data for the
/// connection and the server handle (to tell other users, or to start work on a [`Workers`]
/// pool with a clone of it).
#[derive(Debug, Clone, Copy)]
pub struct Disconnect<'a> {
    /// The user.
    pub user_id: i64,
    /// The connection.
    pub id: ConnId,
    /// Human-readable reason (`peer closed the connection`, `pong timeout`, …).
    pub reason: &'a str,
    pub(crate) user_data: Option<&'a (dyn Any + Send + Sync)>,
    pub(crate) handle: &'a Handle,
}

impl Disconnect<'_> {
    /// The application's data for the connection (from [`Admission::user_data`]), if it is a
    /// `T`. Dropped after `on_disconnect` returns: clone what a job needs.
    pub fn user_data<T: Any>(&self) -> Option<&T> {
        self.user_data.and_then(|data| data.downcast_ref::<T>())
    }

    /// The server handle, for operations on other users. The connection itself is gone:
    /// operations on it find nothing.
    pub fn handle(&self) -> &Handle {
        self.handle
    }
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

    /// Decides who the client is, now or later. The shard calls this one; the default answers
    /// now with [`Application::authenticate`].
    ///
    /// `authenticate` runs on the shard thread, so it suits checks without I/O: the JWT check
    /// is the fast path and needs nothing more. An application whose check needs I/O (a
    /// session-token table) overrides this method instead: it copies what it needs out of
    /// `request`, takes the answer-to-be with [`Defer::later`], moves it into a [`Workers`]
    /// job that completes it, and returns [`Authentication::Later`]. Meanwhile the
    /// connection waits in its handshake, and the shard serves its other connections. At
    /// most `auth_max_pending` wait per shard (beyond: 503); a client that disconnects frees
    /// its slot, and `handshake_timeout` bounds the wait. See `examples/sqlite_auth.rs`.
    ///
    /// ```
    /// use customws::prelude::*;
    ///
    /// struct SlowAuth(Workers);
    ///
    /// impl Application for SlowAuth {
    ///     fn authenticate_deferred(
    ///         &self,
    ///         request: &Request,
    ///         _jwt: Result<Identity, AuthError>,
    ///         defer: Defer<'_>,
    ///     ) -> Authentication {
    ///         let token = request.query_param("token");
    ///         let pending = defer.later();
    ///         let job = move || match token.as_deref().and_then(|t| t.parse::<i64>().ok()) {
    ///             // … a database lookup here …
    ///             Some(user_id) => pending.admit(Admission {
    ///                 identity: Identity { user_id, roles: Roles::default(), claims: "{}".into(), expires_at: 0 },
    ///                 user_data: None,
    ///             }),
    ///             None => pending.reject(Rejection { status: 401, message: "unknown token".into() }),
    ///         };
    ///         match self.0.spawn(job) {
    ///             Ok(()) => Authentication::Later,
    ///             // The job (and the PendingAuth in it) is dropped: the answer below wins.
    ///             Err(_busy) => Authentication::Now(Err(Rejection { status: 503, message: "busy".into() })),
    ///         }
    ///     }
    /// }
    /// ```
    fn authenticate_deferred(
        &self,
        request: &Request,
        jwt: Result<Identity, AuthError>,
        _defer: Defer<'_>,
    ) -> Authentication {
        Authentication::Now(self.authenticate(request, jwt))
    }

    /// A connection opened (after the 101 was queued).
    fn on_connect(&self, _conn: &mut Conn<'_>) {}

    /// A client message the built-in router does not consume, and every `generic_request`.
    /// `raw` is the message's JSON text.
    fn on_message(&self, _conn: &mut Conn<'_>, _msg: &ClientMessage<'_>, _raw: &[u8]) -> Handled {
        Handled::No
    }

    /// Decides whether a built-in client operation runs: `data_request` (to a user, and
    /// broadcast), `presence_subscribe`, `presence_update`, `join`, room `broadcast`,
    /// `room_presence` (after `disabled_ops` and the built-in checks such as the broadcast
    /// role). Answer [`Verdict::Allow`], [`Verdict::Refuse`], or [`Verdict::Later`] after
    /// [`Operation::defer`] to decide from a worker. The default allows everything, at the
    /// cost of this call. See [`crate::app::authorize`] for order, bounds and failures.
    fn authorize(&self, _conn: &mut Conn<'_>, _op: &Operation<'_>) -> Verdict {
        Verdict::Allow
    }

    /// A connection closed.
    fn on_disconnect(&self, _event: &Disconnect<'_>) {}

    /// `user_id`'s first connection anywhere opened, at `at_ms` (Unix milliseconds).
    ///
    /// Called once per transition, on the user's home shard (the single authority for the
    /// user's connection list), so it is ordered with [`Application::on_user_offline`] for
    /// the same user and exact across shards: two connections opening at once on two shards
    /// give one call; a close racing an open gives online, offline, online or nothing at all,
    /// never two of a kind in a row. Runs on a shard thread: must not block (hand I/O to a
    /// [`Workers`] pool; jobs started here for one user run in order only if the pool has
    /// one thread or orders them itself, as `presence_webhook_url` does).
    fn on_user_online(&self, _user_id: i64, _at_ms: u64, _handle: &Handle) {}

    /// `user_id`'s last connection closed at `last_seen_ms` (Unix milliseconds; also the
    /// offline user's `since` in presence answers). See [`Application::on_user_online`].
    fn on_user_offline(&self, _user_id: i64, _last_seen_ms: u64, _handle: &Handle) {}

    /// The application's own counters for `/metrics`: `(name, help, value)`; each is exposed
    /// as a Prometheus counter `<name>_total`. Called on every scrape, from any thread.
    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }

    /// Whether [`Conn::claims`] is read. When false (and `presence_info_claim` is unset) a
    /// connection does not keep its token's claims and `claims()` is empty, which saves
    /// their bytes on every idle connection. Asked once per connection.
    fn reads_claims(&self) -> bool {
        true
    }
}

/// The application used when none is given: JWT authentication, built-in behaviour only.
#[derive(Debug, Default)]
pub struct BuiltIn;

impl Application for BuiltIn {
    fn reads_claims(&self) -> bool {
        false
    }
}

/// Jobs that panicked on any [`Workers`] pool of the process (`customws_worker_panics_total`).
static WORKER_PANICS: AtomicU64 = AtomicU64::new(0);

/// Jobs that panicked on any [`Workers`] pool of the process since start.
pub fn worker_panics_total() -> u64 {
    WORKER_PANICS.load(Ordering::Relaxed)
}

/// A job of a pool whose threads keep a `S` each.
type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// A bounded pool of threads for blocking work started from callbacks. A job that panics is
/// logged and counted (here and in `/metrics`); its thread goes on with the next job.
///
/// Each thread may keep its own state `S` (a database connection, a client), made once on
/// that thread by [`Workers::with_init`]; jobs given to [`Workers::spawn_with`] borrow it.
/// [`Workers::new`] is the pool without state (`S = ()`), whose jobs take no argument.
///
/// Clones share the pool. [`Workers::shutdown`] stops it for every clone and joins the
/// threads. Dropping the last clone without `shutdown` does not wait: the threads run what is
/// queued and then exit on their own. Either way, a job `spawn` accepted runs.
///
/// ```
/// use customws::app::application::Workers;
///
/// // One "connection" per thread, made on that thread.
/// let pool = Workers::with_init(2, 64, || String::from("db connection"));
/// let (tx, rx) = std::sync::mpsc::channel();
/// pool.spawn_with(move |db: &mut String| tx.send(db.len()).unwrap()).unwrap();
/// assert_eq!(rx.recv().unwrap(), 13);
/// pool.shutdown(); // runs what is queued, then joins
/// ```
pub struct Workers<S = ()> {
    pool: Arc<Pool<S>>,
}

/// What every clone of a [`Workers`] shares. The threads hold only the receiving side: when
/// the sender goes (`shutdown`, or the last clone dropped) they drain the queue and exit.
struct Pool<S> {
    /// `None` once shut down. `spawn` queues under the read lock, `shutdown` takes it away
    /// under the write lock: nothing is queued after the threads were told to finish.
    tx: std::sync::RwLock<Option<Sender<Job<S>>>>,
    panics: Arc<AtomicU64>,
    /// The threads, taken by the first `shutdown` to join them.
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl<S> Clone for Workers<S> {
    fn clone(&self) -> Self {
        Workers { pool: Arc::clone(&self.pool) }
    }
}

impl<S> std::fmt::Debug for Workers<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tx = self.pool.tx.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Workers")
            .field("queued", &tx.as_ref().map(Sender::len))
            .field("panics", &self.pool.panics.load(Ordering::Relaxed))
            .finish()
    }
}

/// The pool's queue is full: shed the work (answer 503/429) instead of queuing without bound.
/// Also the answer of a pool that was shut down or has no thread left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("worker queue full")]
pub struct Busy;

impl Workers {
    /// `threads` workers sharing a queue of at most `queue` jobs.
    pub fn new(threads: usize, queue: usize) -> Self {
        Workers::with_init(threads, queue, || ())
    }

    /// Runs `job` on a worker, or refuses when the queue is full.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) -> Result<(), Busy> {
        self.spawn_with(move |_: &mut ()| job())
    }
}

impl<S: 'static> Workers<S> {
    /// `threads` workers sharing a queue of at most `queue` jobs; each thread first calls
    /// `init` once to make its own `S`, on that thread (so `S` need not be `Send`). A thread
    /// whose `init` panics logs it and exits; when none is left, `spawn_with` refuses.
    pub fn with_init(threads: usize, queue: usize, init: impl Fn() -> S + Send + Sync + 'static) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<Job<S>>(queue);
        let panics = Arc::new(AtomicU64::new(0));
        let init = Arc::new(init);
        let mut handles = Vec::with_capacity(threads.max(1));
        for i in 0..threads.max(1) {
            let (rx, panics, init) = (rx.clone(), Arc::clone(&panics), Arc::clone(&init));
            let spawned = std::thread::Builder::new().name(format!("customws-worker-{i}")).spawn(move || {
                let mut state = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&*init)) {
                    Ok(state) => state,
                    Err(payload) => {
                        log::error!("worker init panicked: {}", panic_message(payload.as_ref()));
                        return;
                    }
                };
                // Ends when the sender is gone and the queue is empty.
                for job in rx {
                    // A job's panic must not take the thread with it: a pool whose threads
                    // all died would only ever answer "busy". The state stays as the job
                    // left it.
                    let run = std::panic::AssertUnwindSafe(|| job(&mut state));
                    if let Err(payload) = std::panic::catch_unwind(run) {
                        panics.fetch_add(1, Ordering::Relaxed);
                        WORKER_PANICS.fetch_add(1, Ordering::Relaxed);
                        log::error!("worker job panicked: {}", panic_message(payload.as_ref()));
                    }
                }
            });
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => log::error!("cannot start worker thread: {e}"),
            }
        }
        let pool =
            Pool { tx: std::sync::RwLock::new(Some(tx)), panics, threads: std::sync::Mutex::new(handles) };
        Workers { pool: Arc::new(pool) }
    }

    /// Runs `job` on a worker with that thread's state, or refuses when the queue is full
    /// or the pool was shut down.
    pub fn spawn_with(&self, job: impl FnOnce(&mut S) + Send + 'static) -> Result<(), Busy> {
        let tx = self.pool.tx.read().unwrap_or_else(|e| e.into_inner());
        match tx.as_ref().map(|tx| tx.try_send(Box::new(job))) {
            Some(Ok(())) => Ok(()),
            None | Some(Err(TrySendError::Full(_) | TrySendError::Disconnected(_))) => Err(Busy),
        }
    }

    /// Jobs of this pool that panicked.
    pub fn panics(&self) -> u64 {
        self.pool.panics.load(Ordering::Relaxed)
    }

    /// Stops the pool for every clone and waits for its threads: `spawn` refuses from now
    /// on, the jobs already queued run, then each thread drops its state and exits. Blocks
    /// while jobs run, so do not call it from a callback (a shard thread). Called from one of
    /// the pool's own jobs, it does not wait for that thread. A second call returns at once.
    pub fn shutdown(self) {
        let tx = self.pool.tx.write().unwrap_or_else(|e| e.into_inner()).take();
        if tx.is_none() {
            return;
        }
        // Dropping the only sender: the threads finish the queue, then see the end.
        drop(tx);
        let threads = std::mem::take(&mut *self.pool.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let me = std::thread::current().id();
        for thread in threads {
            if thread.thread().id() != me && thread.join().is_err() {
                log::error!("worker thread panicked");
            }
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

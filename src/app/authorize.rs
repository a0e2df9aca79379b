//! Authorization of built-in client operations: the application decides whether a client's
//! `data_request` (to a user, or a broadcast), `presence_subscribe`, `presence_update`,
//! `join`, room `broadcast` or `room_presence` runs.
//!
//! [`Application::authorize`](super::application::Application::authorize) sees the
//! connection and the [`Operation`] with its [`Targets`] and answers a [`Verdict`]:
//!
//! - [`Verdict::Allow`]: the operation runs now (the default; it costs one call that returns
//!   a constant: no allocation, no boxing).
//! - [`Verdict::Refuse`]: the client gets `error_notification` with the code (403 usually),
//!   the message and the pid; nothing is executed and the targets hear nothing.
//! - [`Verdict::Later`], after [`Operation::defer`]: the answer comes from another thread
//!   through the [`Decision`] (a database lookup on a [`Workers`](super::application::Workers)
//!   job). The shard goes on with its other connections meanwhile.
//!
//! **Order.** A connection's messages are executed in the order they arrived: while one of
//! its operations waits for a decision, every later message of that connection (built-in or
//! the application's own type, authorized or not) waits behind it, and its answers come in
//! order. Later operations are asked about at once (their decisions may complete in any
//! order); they run when everything before them has been decided. Answers to the server's own
//! waits (`client_ack`, replies carrying a server pid) are not held back.
//!
//! **Bounds.** At most `authorize_max_pending` messages of one connection wait this way; one
//! more is refused with `error_notification` 429 `too many operations waiting for
//! authorization`. A connection that closes drops what waits, and answers that arrive later
//! find nothing.
//!
//! **Fail closed.** A [`Decision`] dropped without an answer (a job that panicked, a queue that
//! refused the job) refuses the operation (403 `authorization not answered`). `Later` returned
//! without calling [`Operation::defer`] refuses it too (500), as does a panicking callback.

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use super::handle::Handle;
pub use crate::protocol::router::BuiltinOp;
use crate::route::handle::ConnId;

/// What an operation is aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targets<'a> {
    /// Nothing in particular: a broadcast, or a presence update for the user's watchers.
    None,
    /// These users: `data_request` (one), `presence_subscribe` (the list), a targeted
    /// `presence_update` (one).
    Users(&'a [i64]),
    /// This room: `join`, room `broadcast`, `room_presence`.
    Room(&'a str),
}

/// A built-in operation a client asked for, as [`Application::authorize`] sees it.
///
/// [`Application::authorize`]: super::application::Application::authorize
pub struct Operation<'a> {
    pub(crate) op: BuiltinOp,
    pub(crate) targets: Targets<'a>,
    pub(crate) pid: Option<&'a str>,
    pub(crate) conn: ConnId,
    pub(crate) seq: u64,
    pub(crate) handle: &'a Handle,
    pub(crate) deferred: Cell<bool>,
}

impl std::fmt::Debug for Operation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operation").field("op", &self.op).field("targets", &self.targets).finish()
    }
}

impl Operation<'_> {
    /// Which operation.
    pub fn op(&self) -> BuiltinOp {
        self.op
    }

    /// What it is aimed at.
    pub fn targets(&self) -> Targets<'_> {
        self.targets
    }

    /// The client's pid for the message, if it sent one.
    pub fn pid(&self) -> Option<&str> {
        self.pid
    }

    /// The decision object for answering later, from any thread; return [`Verdict::Later`]
    /// after calling this. Call it once per operation.
    pub fn defer(&self) -> Decision {
        self.deferred.set(true);
        Decision { handle: Some(self.handle.clone()), conn: self.conn, seq: self.seq }
    }
}

/// The answer of [`Application::authorize`](super::application::Application::authorize).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Run the operation.
    Allow,
    /// Do not run it: the client gets `error_notification` `{code, message, originalPid}`.
    Refuse {
        /// HTTP-like status (403 usually).
        code: u16,
        /// The reason, for the client.
        message: Cow<'static, str>,
    },
    /// The [`Decision`] from [`Operation::defer`] will answer.
    Later,
}

impl Verdict {
    /// `Refuse` 403 `not authorized`.
    pub const fn forbidden() -> Verdict {
        Verdict::Refuse { code: 403, message: Cow::Borrowed(NOT_AUTHORIZED) }
    }
}

/// The refusal message of [`Verdict::forbidden`] and [`Decision::answer`]`(false)`.
pub const NOT_AUTHORIZED: &str = "not authorized";

/// A deferred authorization: `Send`, so it moves to a worker; answered once by
/// [`Decision::allow`], [`Decision::refuse`] or [`Decision::answer`]. Dropped without an
/// answer, it refuses (fail closed). An answer for a connection that has gone meanwhile is
/// dropped by its shard.
#[derive(Debug)]
pub struct Decision {
    /// `None` once answered.
    handle: Option<Handle>,
    conn: ConnId,
    seq: u64,
}

impl Decision {
    /// A decision the tier itself answers (the authorization backend).
    #[cfg_attr(not(feature = "backend"), allow(dead_code))]
    pub(crate) fn new(handle: Handle, conn: ConnId, seq: u64) -> Decision {
        Decision { handle: Some(handle), conn, seq }
    }

    /// The connection whose operation this decides.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Runs the operation.
    pub fn allow(mut self) {
        self.send(None);
    }

    /// Refuses the operation: the client gets `error_notification` `{code, message}`.
    pub fn refuse(mut self, code: u16, message: impl Into<Cow<'static, str>>) {
        self.send(Some((code, message.into())));
    }

    /// [`Decision::allow`] when `allowed`, else refuses 403 `not authorized`.
    pub fn answer(self, allowed: bool) {
        if allowed { self.allow() } else { self.refuse(403, NOT_AUTHORIZED) }
    }

    fn send(&mut self, refusal: Option<(u16, Cow<'static, str>)>) {
        if let Some(handle) = self.handle.take() {
            handle.decide(self.conn, self.seq, refusal);
        }
    }
}

impl Drop for Decision {
    fn drop(&mut self) {
        if self.handle.is_some() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            self.send(Some((403, Cow::Borrowed("authorization not answered"))));
        }
    }
}

static DEFERRED: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static OVER_BOUND: AtomicU64 = AtomicU64::new(0);
static BACKEND_FAILED: AtomicU64 = AtomicU64::new(0);

/// What the process's authorization counters count.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Count {
    /// An operation waited for a decision.
    Deferred,
    /// An operation was refused (synchronously, by a decision or by the backend).
    Refused,
    /// A message was refused 429 because too many waited on its connection.
    OverBound,
    /// The authorization backend failed (timeout, error status, garbage, busy).
    #[cfg_attr(not(feature = "backend"), allow(dead_code))]
    BackendFailed,
}

pub(crate) fn count(what: Count) {
    let counter = match what {
        Count::Deferred => &DEFERRED,
        Count::Refused => &REFUSED,
        Count::OverBound => &OVER_BOUND,
        Count::BackendFailed => &BACKEND_FAILED,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The process's authorization counters `(name, help, value)`, for `/metrics`.
pub fn counters() -> Vec<(&'static str, &'static str, u64)> {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    vec![
        (
            "customws_authorize_deferred",
            "Client operations that waited for a deferred decision.",
            get(&DEFERRED),
        ),
        ("customws_authorize_refused", "Client operations refused by the authorization.", get(&REFUSED)),
        ("customws_authorize_dropped", "Decisions dropped without an answer (refused).", get(&DROPPED)),
        (
            "customws_authorize_over_bound",
            "Client messages refused 429: authorize_max_pending were waiting.",
            get(&OVER_BOUND),
        ),
        (
            "customws_authorize_backend_failures",
            "authorize_url calls that failed (timeout, error, garbage, busy): refused.",
            get(&BACKEND_FAILED),
        ),
    ]
}

//! Authorization of built-in client operations on the shard (see [`crate::app::authorize`]
//! for the rules): the application's callback, decisions that come back through the inbox
//! (`OpMsg::Decided`), the `authorize_url` backend, and each connection's queue of messages
//! waiting, in arrival order, for their decisions.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};

use super::Shard;
use crate::app::application::ConnId;
use crate::app::authorize::{Count, Operation, Targets, Verdict, count};
use crate::core::ConnKey;
use crate::protocol::ClientMessage;
use crate::protocol::envelope::error_notification;
use crate::protocol::router::{BuiltinOp, Route, SenderCaps, route};

/// The messages waiting for authorization decisions, per connection (only connections with
/// something waiting have an entry: an idle connection pays nothing for this).
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// By slab index.
    queues: HashMap<u32, Queue, foldhash::fast::RandomState>,
    /// The next decision's number on this shard (a decision names its connection by slot and
    /// generation, and its operation by this number).
    next_seq: u64,
}

/// One connection's messages waiting, in arrival order.
#[derive(Debug)]
struct Queue {
    generation: u32,
    entries: VecDeque<Entry>,
}

#[derive(Debug)]
struct Entry {
    /// The decision this entry waits for (when `Waiting`).
    seq: u64,
    state: State,
    /// The message's JSON text, routed again when it runs.
    text: Box<[u8]>,
}

#[derive(Debug)]
enum State {
    /// A decision is out. `then_backend`: the application's, after which `authorize_url` is
    /// asked too.
    Waiting { then_backend: bool },
    /// Runs when everything before it has run.
    Allowed,
    /// Answered `error_notification` when its turn comes.
    Refused(u16, Cow<'static, str>),
}

/// The operation `decision` executes, with its targets: what authorization decides on.
pub(super) fn gate<'r>(decision: &'r Route<'_>) -> Option<(BuiltinOp, Targets<'r>)> {
    Some(match decision {
        Route::P2p { target, .. } => (BuiltinOp::DataRequest, Targets::Users(std::slice::from_ref(target))),
        Route::Broadcast { .. } => (BuiltinOp::Broadcast, Targets::None),
        Route::Presence(update) => {
            let targets = match &update.target_user_id {
                Some(target) if *target != 0 => Targets::Users(std::slice::from_ref(target)),
                _ => Targets::None,
            };
            (BuiltinOp::PresenceUpdate, targets)
        }
        Route::Subscribe(ids) => (BuiltinOp::PresenceSubscribe, Targets::Users(ids)),
        Route::Join(room) => (BuiltinOp::Join, Targets::Room(room)),
        Route::RoomPublish(publish) => (BuiltinOp::RoomBroadcast, Targets::Room(&publish.room)),
        Route::RoomPresence(room) => (BuiltinOp::RoomPresence, Targets::Room(room)),
        Route::GenericEcho { .. }
        | Route::Unsubscribe(_)
        | Route::Ack(_)
        | Route::Leave(_)
        | Route::AuthRefresh(_)
        | Route::Heartbeat
        | Route::Disconnect
        | Route::Unhandled
        | Route::Reject { .. } => return None,
    })
}

impl Shard {
    /// Before a client message runs: true when authorization took it (refused now, or queued
    /// until its decision and those of the messages before it are in).
    pub(super) fn authorize_first(
        &mut self,
        key: ConnKey,
        user: i64,
        msg: &ClientMessage<'_>,
        text: &[u8],
        decision: &Route<'_>,
    ) -> bool {
        let queued = match self.authz.queues.is_empty() {
            true => 0, // nobody on this shard waits: the common case, no lookup
            false => self.authz_queue(key).map_or(0, |q| q.entries.len()),
        };
        let gate = gate(decision);
        if queued == 0 && gate.is_none() {
            return false;
        }
        let pid = msg.pid.as_deref();
        if queued >= self.shared.config.authorize_max_pending {
            self.over_bound(key, pid);
            return true;
        }
        let (seq, state) = match gate {
            Some((op, targets)) => self.ask(key, user, op, targets, pid),
            None => (0, State::Allowed),
        };
        match state {
            State::Allowed if queued == 0 => false,
            State::Refused(code, message) if queued == 0 => {
                self.refuse_op(key, pid, code, &message);
                true
            }
            state => {
                if queued == 0 && self.shared.config.authorize_max_pending == 0 {
                    self.over_bound(key, pid);
                    return true;
                }
                let fresh = Queue { generation: key.generation, entries: VecDeque::new() };
                let queue = self.authz.queues.entry(key.index).or_insert(fresh);
                if queue.generation != key.generation {
                    // A previous occupant's leftovers (its close already forgot them).
                    *queue = Queue { generation: key.generation, entries: VecDeque::new() };
                }
                queue.entries.push_back(Entry { seq, state, text: text.into() });
                true
            }
        }
    }

    /// A decision arrived for `key`'s operation `seq`.
    pub(super) fn on_decided(&mut self, key: ConnKey, seq: u64, refusal: Option<(u16, Cow<'static, str>)>) {
        let Some(queue) = self.authz_queue(key) else {
            return; // the connection is gone: what waited went with it
        };
        let Some(entry) = queue.entries.iter_mut().find(|e| e.seq == seq) else {
            return; // not deferred after all, or answered twice
        };
        let State::Waiting { then_backend } = entry.state else {
            return;
        };
        match refusal {
            Some((code, message)) => entry.state = State::Refused(code, message),
            None if then_backend => {
                let text = entry.text.clone();
                let (next, state) = self.ask_backend_again(key, &text);
                if let Some(entry) =
                    self.authz_queue(key).and_then(|q| q.entries.iter_mut().find(|e| e.seq == seq))
                {
                    (entry.seq, entry.state) = (next, state);
                }
            }
            None => entry.state = State::Allowed,
        }
        self.run_decided(key);
    }

    /// Runs or refuses, in order, the connection's messages whose decisions are in, up to the
    /// first that still waits.
    fn run_decided(&mut self, key: ConnKey) {
        loop {
            if !self.conn_mut(key).is_some_and(|c| c.phase == super::conn::Phase::Open) {
                return; // closing: nothing more runs; what waits goes when it is dropped
            }
            let Some(queue) = self.authz_queue(key) else { return };
            if queue.entries.is_empty() {
                self.authz.queues.remove(&key.index); // give the memory back
                return;
            }
            if queue.entries.front().is_some_and(|e| matches!(e.state, State::Waiting { .. })) {
                return;
            }
            let Some(entry) = queue.entries.pop_front() else { return };
            let Some((user, caps)) = self.sender(key) else { return };
            let Ok(msg) = ClientMessage::parse(&entry.text) else { continue };
            match entry.state {
                State::Refused(code, message) => self.refuse_op(key, msg.pid.as_deref(), code, &message),
                State::Allowed | State::Waiting { .. } => {
                    let decision = route(&msg, caps);
                    self.as_client_work(|s| s.execute(key, user, &msg, &entry.text, decision));
                }
            }
        }
    }

    /// Asks the application (and then, if it allows, `authorize_url`) about one operation;
    /// the decision's number and where the operation stands.
    fn ask(
        &mut self,
        key: ConnKey,
        user: i64,
        op: BuiltinOp,
        targets: Targets<'_>,
        pid: Option<&str>,
    ) -> (u64, State) {
        let seq = self.next_decision();
        let answer = self.call_app(key, |app, conn| {
            let operation = Operation {
                op,
                targets,
                pid,
                conn: conn.id(),
                seq,
                handle: conn.handle,
                deferred: Cell::new(false),
            };
            let verdict = app.authorize(conn, &operation);
            (verdict, operation.deferred.get())
        });
        match answer {
            // The callback panicked (the connection is closing) or the session is gone.
            None => (seq, State::Refused(500, Cow::Borrowed("internal error"))),
            Some((Verdict::Allow, _)) if self.backend_covers(op) => self.ask_backend(key, user, op, targets),
            Some((Verdict::Allow, _)) => (seq, State::Allowed),
            Some((Verdict::Refuse { code, message }, _)) => (seq, State::Refused(code, message)),
            Some((Verdict::Later, true)) => {
                count(Count::Deferred);
                (seq, State::Waiting { then_backend: self.backend_covers(op) })
            }
            Some((Verdict::Later, false)) => {
                log::error!(user; "authorize answered Later without Operation::defer: refused");
                (seq, State::Refused(500, Cow::Borrowed("authorization answered Later without a decision")))
            }
        }
    }

    /// Whether `authorize_url` decides `op`.
    fn backend_covers(&self, op: BuiltinOp) -> bool {
        #[cfg(feature = "backend")]
        {
            self.shared.authorizer.as_ref().is_some_and(|a| a.covers(op))
        }
        #[cfg(not(feature = "backend"))]
        {
            let _ = op;
            false
        }
    }

    /// Sends `op` to `authorize_url` on the backend pool; its answer comes back as a decision.
    fn ask_backend(&mut self, key: ConnKey, user: i64, op: BuiltinOp, targets: Targets<'_>) -> (u64, State) {
        let seq = self.next_decision();
        #[cfg(feature = "backend")]
        if let Some(authorizer) = self.shared.authorizer.clone() {
            let claims = self.conn_mut(key).and_then(|c| c.session.as_deref()).map_or("", |s| s.claims());
            let body = crate::backend::authorize_body(op, user, claims, targets);
            let decision =
                crate::app::authorize::Decision::new(self.handle.clone(), ConnId(self.addr(key)), seq);
            count(Count::Deferred);
            return match authorizer.ask(decision, body, user) {
                Ok(()) => (seq, State::Waiting { then_backend: false }),
                Err(_busy) => {
                    count(Count::BackendFailed);
                    (seq, State::Refused(503, Cow::Borrowed("authorization busy")))
                }
            };
        }
        let _ = (key, user, op, targets, ConnId(self.addr(key)));
        (seq, State::Allowed)
    }

    /// `ask_backend` for a queued message the application allowed later.
    fn ask_backend_again(&mut self, key: ConnKey, text: &[u8]) -> (u64, State) {
        let Some((user, caps)) = self.sender(key) else {
            return (0, State::Refused(500, Cow::Borrowed("internal error")));
        };
        let Ok(msg) = ClientMessage::parse(text) else {
            return (0, State::Refused(400, Cow::Borrowed("malformed message")));
        };
        let decision = route(&msg, caps);
        match gate(&decision) {
            Some((op, targets)) => self.ask_backend(key, user, op, targets),
            None => (0, State::Allowed),
        }
    }

    fn next_decision(&mut self) -> u64 {
        self.authz.next_seq += 1;
        self.authz.next_seq
    }

    fn authz_queue(&mut self, key: ConnKey) -> Option<&mut Queue> {
        self.authz.queues.get_mut(&key.index).filter(|q| q.generation == key.generation)
    }

    /// A connection is gone: what it had waiting goes with it (decisions arriving later find
    /// nothing).
    pub(super) fn forget_authorizations(&mut self, key: ConnKey) {
        if self.authz.queues.get(&key.index).is_some_and(|q| q.generation == key.generation) {
            self.authz.queues.remove(&key.index);
        }
    }

    /// The connection's user and what it may do, as `on_text` reckons them.
    fn sender(&mut self, key: ConnKey) -> Option<(i64, SenderCaps)> {
        let allow_client_broadcast = self.shared.config.allow_client_broadcast;
        let disabled = self.rates.disabled_ops;
        let session = self.conn_mut(key)?.session.as_deref()?;
        let caps = SenderCaps { can_broadcast: session.roles.broadcast || allow_client_broadcast, disabled };
        Some((session.user, caps))
    }

    fn refuse_op(&mut self, key: ConnKey, pid: Option<&str>, code: u16, message: &str) {
        count(Count::Refused);
        self.sink.push(&mut self.conns, key, error_notification(pid, code, message));
    }

    fn over_bound(&mut self, key: ConnKey, pid: Option<&str>) {
        count(Count::OverBound);
        let frame = error_notification(pid, 429, "too many operations waiting for authorization");
        self.sink.push(&mut self.conns, key, frame);
    }
}

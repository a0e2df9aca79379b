//! Server-initiated operations arriving from the application handle: sends, broadcasts with
//! exclusions, user queries, disconnects, and waits for a client's ack or reply.

use std::sync::Arc;

use bytes::Bytes;

use super::conn::Phase;
use super::{Shard, TimerKey};
use crate::core::ConnKey;
use crate::core::pending::{Wait, WaitKey, WaitKind};
use crate::protocol::ClientMessage;
use crate::protocol::envelope::ClientAck;
use crate::route::msg::{DeliverMsg, DirMsg, OpMsg};
use crate::route::{AckReply, ClientReply, Completion, ConnInfo, OutMessage, Outcome, WaitError};
use crate::ws::close;

impl Shard {
    /// Handles the operations that come from the application handle.
    pub(super) fn on_op(&mut self, msg: OpMsg) {
        match msg {
            OpMsg::SendUser { user, frame, done } => self.send_user(user, frame, done),
            OpMsg::BroadcastExcept { frame, exclude, done } => self.broadcast_except(&frame, &exclude, done),
            OpMsg::Await { user, msg, kind, timeout_ms, done } => {
                self.route_wait(user, msg, kind, timeout_ms, done)
            }
            OpMsg::AwaitOn { key, msg, kind, timeout_ms, done } => {
                self.start_wait(key, &msg, kind, timeout_ms, done)
            }
            OpMsg::QueryUser { user, done } => {
                let conns = self.directory.home_conns(user);
                let list =
                    conns.iter().map(|(seq, addr)| ConnInfo { shard: addr.shard, seq: *seq }).collect();
                self.query_user_across_nodes(user, list, done);
            }
            OpMsg::Decided { key, seq, refusal } => self.on_decided(key, seq, refusal),
            OpMsg::DisconnectUser { user, done } => {
                let addrs: Vec<_> = self.directory.home_conns(user).iter().map(|(_, a)| *a).collect();
                let count = addrs.len();
                for addr in addrs {
                    let msg = DirMsg::Close {
                        key: addr.key,
                        code: close::NORMAL,
                        reason: "disconnected by the server",
                    };
                    self.send_to(addr.shard, msg);
                }
                if let Some(done) = done {
                    done.complete(Outcome::Delivered(count));
                }
            }
        }
    }

    /// Home shard: one frame to each of the user's connections.
    fn send_user(&mut self, user: i64, frame: Bytes, done: Option<Completion>) {
        let addrs: Vec<_> = self.directory.home_conns(user).iter().map(|(_, a)| *a).collect();
        for addr in &addrs {
            self.send_to(addr.shard, DeliverMsg::DeliverConn { key: addr.key, frame: frame.clone() });
        }
        if self.held_elsewhere(user) {
            self.send_user_elsewhere(user, frame, addrs.len(), done);
            return;
        }
        if let Some(done) = done {
            done.complete(Outcome::Delivered(addrs.len()));
        }
    }

    fn broadcast_except(&mut self, frame: &Bytes, exclude: &[i64], done: Option<Completion>) {
        let Shard { conns, sink, .. } = self;
        let mut count = 0;
        for (index, conn) in conns.iter_mut() {
            let Some(user) = conn.user() else { continue };
            if conn.phase == Phase::Open && exclude.binary_search(&user).is_err() {
                let key = ConnKey { index: index as u32, generation: conn.generation };
                sink.offer(key, conn, frame.clone());
                count += 1;
            }
        }
        if let Some(done) = done {
            done.complete(Outcome::Delivered(count));
        }
    }

    /// Home shard: the wait goes to the user's newest connection, the one most likely to be
    /// in front of the user; an ack is one answer, so exactly one connection is asked.
    fn route_wait(
        &mut self,
        user: i64,
        msg: Arc<OutMessage>,
        kind: WaitKind,
        timeout_ms: u64,
        done: Completion,
    ) {
        let newest = self.directory.home_conns(user).iter().max_by_key(|(seq, _)| *seq).map(|(_, a)| *a);
        match newest {
            None if self.shared.fabric.cluster.is_some() => {
                self.await_on_other_node(user, msg, kind, timeout_ms, done)
            }
            None => done.complete(Outcome::Failed(WaitError::Offline)),
            Some(addr) => {
                self.send_to(addr.shard, OpMsg::AwaitOn { key: addr.key, msg, kind, timeout_ms, done })
            }
        }
    }

    /// Owning shard: register the wait, send the message with its pid.
    fn start_wait(
        &mut self,
        key: ConnKey,
        msg: &OutMessage,
        kind: WaitKind,
        timeout_ms: u64,
        done: Completion,
    ) {
        if self.shutdown_deadline.is_some() {
            done.complete(Outcome::Failed(WaitError::ShuttingDown));
            return;
        }
        if !self.conn_mut(key).is_some_and(|c| c.phase == Phase::Open) {
            done.complete(Outcome::Failed(WaitError::Closed));
            return;
        }
        let deadline = self.now + timeout_ms;
        let wait = self.pending.insert(Wait { conn: key, kind, deadline, completion: done });
        let frame = msg.frame(Some(&self.pending.pid(wait)));
        if let Some(conn) = self.conn_mut(key) {
            conn.waits.push(wait);
        }
        self.wheel.insert(deadline, TimerKey::Wait(wait));
        self.sink.push(&mut self.conns, key, frame);
    }

    /// A wait's timer fired.
    pub(super) fn expire_wait(&mut self, wait: WaitKey) {
        if let Some(entry) = self.pending.expire(wait, self.now) {
            self.forget_wait(entry.conn, wait);
            entry.completion.complete(Outcome::Failed(WaitError::TimedOut));
        }
    }

    /// A `client_ack` arrived on `key`.
    pub(super) fn on_client_ack(&mut self, key: ConnKey, ack: &ClientAck<'_>) {
        let Some(wait) = self.pending.parse_pid(&ack.acknowledged_pid) else {
            log::debug!("client_ack for unknown pid {:?}", ack.acknowledged_pid);
            return;
        };
        let Some(entry) = self.pending.resolve(wait, key, WaitKind::Ack) else { return };
        self.forget_wait(key, wait);
        let reply = AckReply {
            status: ack.status.as_deref().map(str::to_string),
            error: ack
                .error
                .and_then(|raw| serde_json::from_str(raw.get()).ok())
                .filter(|v: &serde_json::Value| !v.is_null()),
        };
        entry.completion.complete(Outcome::Ack(reply));
    }

    /// Whether `msg` answers a wait pending on this connection (a `client_ack` for it, or a
    /// reply carrying its pid), without resolving it.
    pub(super) fn is_wait_answer(&self, key: ConnKey, msg: &ClientMessage<'_>) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        let pending = |pid: &str, kind| {
            self.pending.parse_pid(pid).is_some_and(|w| self.pending.is_pending(w, key, kind))
        };
        if msg.pid.as_deref().is_some_and(|pid| pending(pid, WaitKind::Request)) {
            return true;
        }
        msg.kind == "client_ack"
            && msg.payload_as::<ClientAck>().is_ok_and(|ack| pending(&ack.acknowledged_pid, WaitKind::Ack))
    }

    /// A client message whose pid may answer a request; true when it did.
    pub(super) fn answers_request(&mut self, key: ConnKey, pid: Option<&str>, text: &[u8]) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        let Some(wait) = pid.and_then(|pid| self.pending.parse_pid(pid)) else { return false };
        let Some(entry) = self.pending.resolve(wait, key, WaitKind::Request) else { return false };
        self.forget_wait(key, wait);
        let raw = String::from_utf8_lossy(text).into_owned();
        entry.completion.complete(Outcome::Reply(ClientReply { raw }));
        true
    }

    fn forget_wait(&mut self, key: ConnKey, wait: WaitKey) {
        if let Some(conn) = self.conn_mut(key) {
            conn.waits.retain(|w| *w != wait);
        }
    }

    /// The connection holding `waits` is gone.
    pub(super) fn fail_waits(&mut self, waits: &[WaitKey]) {
        for &wait in waits {
            if let Some(entry) = self.pending.take(wait) {
                entry.completion.complete(Outcome::Failed(WaitError::Closed));
            }
        }
    }

    /// Shutdown: nobody will answer.
    pub(super) fn fail_all_waits(&mut self) {
        for entry in self.pending.drain() {
            entry.completion.complete(Outcome::Failed(WaitError::ShuttingDown));
        }
    }
}

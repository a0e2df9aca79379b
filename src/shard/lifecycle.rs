//! Ending connections and time: the close handshake and linger, dropping a connection and
//! everything that points at it, the per-connection deadlines in the timer wheel, and
//! graceful shutdown. See `LIFECYCLE.md`.

use super::conn::Phase;
use super::{LINGER_MS, Shard, TimerKey};
use crate::core::{ConnKey, Directory};
use crate::metrics::ShardMetrics;
use crate::route::msg::DirMsg;
use crate::ws::{FrameEncoder, close};

impl Shard {
    // ----- closing -----------------------------------------------------------------------

    /// Starts the close handshake with `code` (or, before the upgrade, just the linger).
    /// What is already queued goes first (shutdown flushes it; a final notice such as the
    /// token-expiry 401 reaches the client); the queue is bounded, so this is too.
    pub(super) fn close(&mut self, key: ConnKey, code: u16, reason: &str) {
        self.close_with(key, code, reason, false);
    }

    /// Closes a connection whose queue overflowed: frames not yet started are dropped, since
    /// the client is not reading them anyway.
    pub(super) fn close_discarding(&mut self, key: ConnKey, code: u16, reason: &str) {
        self.close_with(key, code, reason, true);
    }

    pub(super) fn close_with(&mut self, key: ConnKey, code: u16, reason: &str, discard: bool) {
        let deadline = self.close_deadline();
        // Under io_uring, frames a send in flight is writing stay (the close frame waits).
        let discard = discard && !self.sink.busy.contains(&key);
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        if conn.phase != Phase::Open {
            return;
        }
        let dropped = if discard { conn.out.discard_unsent() } else { 0 };
        conn.out.push(FrameEncoder::close(code, reason));
        conn.held = 0; // a cluster hold ends here: the final bytes go out now
        conn.phase = Phase::Closing { peer_done: false };
        conn.deadline = deadline;
        let (user, peer, client) = (conn.user(), conn.peer, conn.client_ip());
        let listed = conn.session.as_deref().map(|s| (s.user, s.seq));
        ShardMetrics::add(&self.metrics().frames_dropped, dropped as u64);
        log::debug!(user, client:% = client, peer:% = peer, code, reason; "closing");
        self.mark_dirty(key);
        self.schedule_before(key, deadline);
        // A closing connection is no delivery target: nothing more is queued on it.
        if let Some((user, seq)) = listed {
            self.unlist(key, user, seq);
        }
    }

    /// Takes a connection out of the directory (and the replica when it was the user's last
    /// here) and out of its home shard's list, once: when it starts closing, or when it is
    /// dropped without a close.
    fn unlist(&mut self, key: ConnKey, user: i64, seq: u64) {
        if !self.directory.local(user).contains(&key) {
            return; // already unlisted when its close began
        }
        if self.directory.remove_local(user, key) {
            self.announce_replica(user, false);
        }
        let home = Directory::home_of(user, self.shards());
        self.send_to(home, DirMsg::HomeClosed { user, seq });
    }

    pub(super) fn close_deadline(&self) -> u64 {
        let linger = self.now + LINGER_MS;
        self.shutdown_deadline.map_or(linger, |d| d.min(linger))
    }

    pub(super) fn close_overflowed(&mut self) {
        for key in std::mem::take(&mut self.sink.overflowed) {
            let Some(conn) = self.conn_mut(key) else {
                continue;
            };
            if conn.phase != Phase::Open {
                continue;
            }
            let (user, peer, client, queued) = (conn.user(), conn.peer, conn.client_ip(), conn.out.len());
            ShardMetrics::inc(&self.metrics().slow_consumer_closes);
            log::warn!(
                user, client:% = client, peer:% = peer, queued_frames = queued;
                "slow consumer closed 1013"
            );
            self.close_discarding(key, close::TRY_AGAIN_LATER, "slow consumer");
        }
    }

    pub(super) fn mark_dirty(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(key.index as usize).filter(|c| c.generation == key.generation)
        {
            self.sink.mark_dirty(key, conn);
        }
    }

    /// Removes the connection and everything that points at it.
    pub(super) fn drop_conn(&mut self, key: ConnKey, reason: &str) {
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        let conn_peer = conn.peer;
        let phase = conn.phase;
        // A connection the server closed while shutting down ended because of the shutdown,
        // whatever the last step of its close handshake was.
        let reason = if self.shutdown_deadline.is_some() && matches!(phase, Phase::Closing { .. }) {
            "server shutdown"
        } else {
            reason
        };
        // No `deregister`: the socket is closed when `conn` goes out of scope below, and closing
        // the only descriptor of a file removes it from the epoll set (Linux); an explicit
        // EPOLL_CTL_DEL would be one more syscall per connection for nothing.
        let mut conn = self.conns.remove(key.index as usize);
        if self.io.uring {
            self.io.dropped.push(key); // its receive and send hold the socket: cancelled
        }
        self.auth_pending.remove(&key); // a client gone while its authentication ran
        self.shrink_conns();
        self.fail_waits(&conn.waits);
        self.forget_authorizations(key);
        let Some(session) = conn.session.take() else {
            log::trace!("dropped peer={conn_peer} phase={phase:?}: {reason}");
            return;
        };
        ShardMetrics::dec(&self.metrics().connections_current);
        let client_ip = session.client_ip(conn_peer.ip());
        self.shared.release(client_ip, session.user);
        let mut session = *session;
        self.leave_all_rooms(key, session.user, std::mem::take(&mut session.rooms).into_vec());
        self.notify_disconnect(session.user, key, reason, session.user_data());
        log::debug!(
            user = session.user, client:% = client_ip, peer:% = conn_peer, shard = self.id, reason;
            "disconnect"
        );
        self.unlist(key, session.user, session.seq);
    }

    /// Gives back the slab's memory after mass disconnects (it keeps its largest size
    /// otherwise: 15,000 connections leave ~2 MB per shard). Only the vacant slots after the
    /// last connection can go. Tried when under a quarter of the slots are used, then again
    /// only after the count halves (or the slab refilled to half), so a connection's close
    /// costs amortised O(1).
    fn shrink_conns(&mut self) {
        shrink_slab(&mut self.conns, &mut self.shrink_conns_below);
    }

    // ----- timers ------------------------------------------------------------------------

    /// Makes sure the wheel holds an entry no later than `deadline` for `key`.
    pub(super) fn schedule_before(&mut self, key: ConnKey, deadline: u64) {
        let now = self.now;
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        if deadline < conn.timer_at || conn.timer_at < now {
            conn.timer_at = deadline;
            self.wheel.insert(deadline, TimerKey::Conn(key));
        }
    }

    pub(super) fn expire_timers(&mut self) {
        // The buffer is kept between ticks: a busy wheel expires entries every 10 ms.
        let mut due = std::mem::take(&mut self.due);
        self.wheel.expire(self.now, &mut due);
        for key in due.drain(..) {
            let key = match key {
                TimerKey::Conn(key) => key,
                TimerKey::Wait(wait) => {
                    self.expire_wait(wait);
                    continue;
                }
            };
            let now = self.now;
            let Some(conn) = self.conn_mut(key) else {
                continue;
            };
            if conn.timer_at > now {
                continue; // superseded by an earlier or later entry
            }
            self.on_deadline(key);
            let write_wait = self.limits.write_wait_ms;
            let Some(conn) = self.conn_mut(key) else {
                continue;
            };
            let next = conn.next_deadline(write_wait);
            conn.timer_at = next;
            self.wheel.insert(next, TimerKey::Conn(key));
        }
        self.due = due;
    }

    pub(super) fn on_deadline(&mut self, key: ConnKey) {
        let now = self.now;
        let limits = self.limits;
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        match conn.phase {
            Phase::Http if now >= conn.deadline => self.drop_conn(key, "handshake timeout"),
            Phase::Closing { .. } if now >= conn.deadline => self.drop_conn(key, "close timeout"),
            Phase::Open if now >= conn.read_deadline => {
                ShardMetrics::inc(&self.metrics().pong_timeouts);
                self.drop_conn(key, "pong timeout");
            }
            Phase::Open if conn.write_blocked_at.saturating_add(limits.write_wait_ms) <= now => {
                self.drop_conn(key, "write timeout");
            }
            Phase::Open if conn.session.as_ref().is_some_and(|s| s.expires_deadline <= now) => {
                self.expire_session(key);
            }
            Phase::Open if conn.session.as_ref().is_some_and(|s| s.transient_until() <= now) => {
                self.expire_transient(key);
            }
            Phase::Open if now >= conn.next_ping() => {
                conn.deadline = now + limits.ping_period_ms; // the next ping
                let ping = FrameEncoder::frame(crate::ws::OutKind::Ping, b"");
                self.sink.push(&mut self.conns, key, ping);
            }
            _ => {}
        }
    }

    // ----- shutdown ----------------------------------------------------------------------

    /// Stops accepting and closes every connection with 1001: all at once, or — with
    /// `drain_window` — each at its own random moment within the window, so that the
    /// clients' reconnects spread out too. The close reason carries a per-client, jittered
    /// retry hint: `server restarting; retry after <n> ms`.
    pub(super) fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        let config = &self.shared.config;
        let timeout = config.shutdown_timeout.as_millis() as u64;
        let window = config.drain_window.as_millis() as u64;
        self.shutdown_deadline = Some(self.now + timeout);
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.fail_all_waits();
        let keys: Vec<ConnKey> =
            self.conns.iter().map(|(i, c)| ConnKey { index: i as u32, generation: c.generation }).collect();
        log::info!("shard {}: shutting down, closing {} connections over {window} ms", self.id, keys.len());
        let mut random = Jitter::new();
        let mut drain = Vec::with_capacity(keys.len());
        for key in keys {
            match self.conn_mut(key).map(|c| c.phase) {
                Some(Phase::Http) => self.drop_conn(key, "server shutdown"),
                Some(Phase::Open) if window > 0 => drain.push((self.now + random.below(window), key)),
                Some(Phase::Open) => self.close_for_shutdown(key, &mut random),
                _ => {}
            }
        }
        // Latest first: the loop pops the due ones off the end.
        drain.sort_unstable_by_key(|&(at, _)| std::cmp::Reverse(at));
        self.drain = drain;
        self.drain_random = Some(random);
    }

    /// Closes the connections whose drain moment has come (one batch per loop iteration).
    pub(super) fn drain_due(&mut self) {
        let Some(mut random) = self.drain_random.take() else {
            return;
        };
        while let Some(&(at, key)) = self.drain.last() {
            if at > self.now {
                break;
            }
            self.drain.pop();
            self.close_for_shutdown(key, &mut random);
        }
        self.drain_random = Some(random);
    }

    /// When the next drained connection is due.
    pub(super) fn next_drain(&self) -> Option<u64> {
        self.drain.last().map(|&(at, _)| at)
    }

    fn close_for_shutdown(&mut self, key: ConnKey, random: &mut Jitter) {
        // Reconnects spread over the window (at least a second) after the close.
        let spread = (self.shared.config.drain_window.as_millis() as u64).max(1000);
        let reason = format!("server restarting; retry after {} ms", random.below(spread));
        self.close(key, close::GOING_AWAY, &reason);
    }
}

/// A small random source for shutdown jitter (splitmix64, seeded from the OS).
#[derive(Debug)]
pub(super) struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        Jitter(u64::from_le_bytes(seed))
    }

    /// Uniform enough in `0..bound` (`bound > 0`).
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % bound
    }
}

/// [`Shard::shrink_conns`]: `below` is the count under which the next try is made.
fn shrink_slab<T>(slab: &mut slab::Slab<T>, below: &mut usize) {
    const MIN_SLOTS: usize = 1024;
    let (len, capacity) = (slab.len(), slab.capacity());
    if len >= capacity / 2 {
        *below = usize::MAX;
    }
    if capacity >= MIN_SLOTS && len < capacity / 4 && (len == 0 || len < *below) {
        slab.shrink_to_fit();
        *below = len / 2;
    }
}

#[cfg(test)]
mod tests {
    use super::shrink_slab;

    /// After mass disconnects the slab gives back its slots past the last connection, down to
    /// the 1,024 slots not worth shrinking (issue 15); tries are rare (the count must halve).
    #[test]
    fn the_slab_shrinks_after_mass_disconnects() {
        let mut slab = slab::Slab::new();
        let mut below = usize::MAX;
        let keys: Vec<usize> = (0..10_000u64).map(|v| slab.insert(v)).collect();
        let grown = slab.capacity();
        assert!(grown >= 10_000);
        // Close from the top down, leaving the first 100.
        for &key in keys[100..].iter().rev() {
            slab.remove(key);
            shrink_slab(&mut slab, &mut below);
        }
        assert!(slab.capacity() < 1_024, "{} slots for {} connections", slab.capacity(), slab.len());
        for &key in &keys[..100] {
            slab.remove(key);
            shrink_slab(&mut slab, &mut below);
        }
        assert!(slab.capacity() < 1_024);
        // A connection left at the top keeps its slots (the slab never moves one), and
        // trying again waits until the count halves.
        let keys: Vec<usize> = (0..4_096u64).map(|v| slab.insert(v)).collect();
        let mut below = usize::MAX;
        for &key in &keys[..4_000] {
            slab.remove(key);
            shrink_slab(&mut slab, &mut below);
        }
        assert!(slab.capacity() >= 4_096);
        assert!(below < slab.len(), "the next try waits for a smaller count: {below}");
    }
}

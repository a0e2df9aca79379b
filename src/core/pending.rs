//! Server-initiated waits (send-for-ack, request/response) held by the shard that owns the
//! connection: a slab of entries whose index and generation are the server pid itself, so a
//! client's `acknowledgedPid` finds its entry with no map and no lock.
//!
//! Pid format: `s{shard}.{index}.{generation}`. A client can send any string back; parsing is
//! total, and an entry only resolves for the connection it was sent on.

use slab::Slab;

use super::directory::{ConnKey, ShardId};

/// What the wait is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitKind {
    /// Resolved by a `client_ack` whose `acknowledgedPid` is the pid.
    Ack,
    /// Resolved by the next client message carrying the pid as its own `pid`.
    Request,
}

/// Key of a pending wait (also encoded in its pid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WaitKey {
    /// Slab index.
    pub index: u32,
    /// Generation of the slot.
    pub generation: u32,
}

/// One pending wait.
#[derive(Debug)]
pub struct Wait<C> {
    /// The connection the message went to.
    pub conn: ConnKey,
    /// Ack or request.
    pub kind: WaitKind,
    /// When it times out (shard milliseconds).
    pub deadline: u64,
    /// Where the outcome goes.
    pub completion: C,
}

/// The pending waits of one shard.
#[derive(Debug)]
pub struct PendingTable<C> {
    shard: ShardId,
    slots: Slab<(u32, Wait<C>)>,
    next_generation: u32,
}

impl<C> PendingTable<C> {
    /// An empty table for `shard`.
    pub fn new(shard: ShardId) -> Self {
        PendingTable { shard, slots: Slab::new(), next_generation: 0 }
    }

    /// Number of outstanding waits.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Registers a wait; returns its key.
    pub fn insert(&mut self, wait: Wait<C>) -> WaitKey {
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let index = self.slots.insert((generation, wait)) as u32;
        WaitKey { index, generation }
    }

    /// The pid sent to the client for `key`.
    pub fn pid(&self, key: WaitKey) -> String {
        format!("s{}.{}.{}", self.shard, key.index, key.generation)
    }

    /// Parses a pid of this shard; `None` for anything else.
    pub fn parse_pid(&self, pid: &str) -> Option<WaitKey> {
        let rest = pid.strip_prefix('s')?;
        let mut parts = rest.splitn(3, '.');
        let shard: ShardId = parts.next()?.parse().ok()?;
        let index = parts.next()?.parse().ok()?;
        let generation = parts.next()?.parse().ok()?;
        (shard == self.shard).then_some(WaitKey { index, generation })
    }

    /// Takes the wait `key` if it is of `kind` and was sent on `conn`.
    pub fn resolve(&mut self, key: WaitKey, conn: ConnKey, kind: WaitKind) -> Option<Wait<C>> {
        let (generation, wait) = self.slots.get(key.index as usize)?;
        if *generation != key.generation || wait.conn != conn || wait.kind != kind {
            return None;
        }
        Some(self.slots.remove(key.index as usize).1)
    }

    /// Whether the wait `key` is pending, of `kind`, and was sent on `conn`.
    pub fn is_pending(&self, key: WaitKey, conn: ConnKey, kind: WaitKind) -> bool {
        self.slots.get(key.index as usize).is_some_and(|(generation, wait)| {
            *generation == key.generation && wait.conn == conn && wait.kind == kind
        })
    }

    /// Takes the wait `key` if its deadline has passed at `now`.
    pub fn expire(&mut self, key: WaitKey, now: u64) -> Option<Wait<C>> {
        let (generation, wait) = self.slots.get(key.index as usize)?;
        if *generation != key.generation || wait.deadline > now {
            return None;
        }
        Some(self.slots.remove(key.index as usize).1)
    }

    /// Takes the wait `key` unconditionally (connection closed, shutdown).
    pub fn take(&mut self, key: WaitKey) -> Option<Wait<C>> {
        let (generation, _) = self.slots.get(key.index as usize)?;
        if *generation != key.generation {
            return None;
        }
        Some(self.slots.remove(key.index as usize).1)
    }

    /// Takes every wait (shutdown).
    pub fn drain(&mut self) -> Vec<Wait<C>> {
        self.slots.drain().map(|(_, wait)| wait).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONN: ConnKey = ConnKey { index: 3, generation: 9 };
    const OTHER: ConnKey = ConnKey { index: 4, generation: 9 };

    fn wait(kind: WaitKind, deadline: u64) -> Wait<&'static str> {
        Wait { conn: CONN, kind, deadline, completion: "c" }
    }

    #[test]
    fn pid_round_trips_and_foreign_pids_do_not_parse() {
        let mut table = PendingTable::new(2);
        let key = table.insert(wait(WaitKind::Ack, 10));
        let pid = table.pid(key);
        assert_eq!(table.parse_pid(&pid), Some(key));
        for bad in ["", "s", "s2", "s2.x.1", "s1.0.1", "x2.0.1", "s2.0.1.5", "s2.99999999999.1", "s-1.0.1"] {
            assert_eq!(table.parse_pid(bad), None, "{bad}");
        }
    }

    #[test]
    fn resolves_only_for_its_connection_and_kind_once() {
        let mut table = PendingTable::new(0);
        let key = table.insert(wait(WaitKind::Request, 10));
        assert!(table.resolve(key, OTHER, WaitKind::Request).is_none());
        assert!(table.is_pending(key, CONN, WaitKind::Request));
        assert!(!table.is_pending(key, OTHER, WaitKind::Request));
        assert!(table.resolve(key, CONN, WaitKind::Ack).is_none());
        assert!(table.resolve(key, CONN, WaitKind::Request).is_some());
        assert!(table.resolve(key, CONN, WaitKind::Request).is_none());
        assert!(table.is_empty());
    }

    #[test]
    fn expiry_respects_the_deadline_and_stale_generations() {
        let mut table = PendingTable::new(0);
        let key = table.insert(wait(WaitKind::Ack, 100));
        assert!(table.expire(key, 99).is_none());
        assert!(table.expire(key, 100).is_some());
        let reused = table.insert(wait(WaitKind::Ack, 500));
        assert_eq!(reused.index, key.index);
        assert!(table.expire(key, 1000).is_none(), "a stale timer must not fire the new occupant");
        assert!(table.take(reused).is_some());
    }
}

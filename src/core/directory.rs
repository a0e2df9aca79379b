//! Who is connected where, from one shard's point of view.
//!
//! Three tables, none shared between threads:
//! - **local**: user → this shard's connections of that user (exact).
//! - **replica**: user → bitmask of shards holding at least one connection of that user. Each
//!   shard announces its own 0↔1 transitions to every shard, so routing a message to a user
//!   needs no lock and no round trip; the replica lags by one channel hop.
//! - **homed**: for users whose *home shard* (`user mod shards`) is this one, the ordered list
//!   of all their connections on every shard. It is the single authority for online/offline
//!   transitions and for `connections_per_user` eviction.

use std::collections::HashMap;

use foldhash::fast::RandomState;

/// Index of a shard (at most 64 shards: the replica is a `u64` mask).
pub type ShardId = usize;

/// Largest number of shards the directory's bitmask supports.
pub const MAX_SHARDS: usize = 64;

/// A connection's slab index plus the generation of that slot, so a reused slot never
/// receives a delivery meant for its previous occupant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Slab index (also the mio token).
    pub index: u32,
    /// Generation of the slot when the connection was opened.
    pub generation: u32,
}

/// A connection anywhere in the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAddr {
    /// Owning shard.
    pub shard: ShardId,
    /// Key inside that shard.
    pub key: ConnKey,
}

/// One user's connections on this shard; one inline, more on the heap.
#[derive(Debug)]
enum LocalConns {
    One(ConnKey),
    Many(Vec<ConnKey>),
}

impl LocalConns {
    fn as_slice(&self) -> &[ConnKey] {
        match self {
            LocalConns::One(key) => std::slice::from_ref(key),
            LocalConns::Many(keys) => keys,
        }
    }
}

/// One user's connections as the home shard lists them (open order, address), oldest first;
/// one inline, more on the heap (most users have one connection: no allocation per user).
#[derive(Debug)]
enum HomeConns {
    One((u64, ConnAddr)),
    Many(Vec<(u64, ConnAddr)>),
}

impl HomeConns {
    fn as_slice(&self) -> &[(u64, ConnAddr)] {
        match self {
            HomeConns::One(conn) => std::slice::from_ref(conn),
            HomeConns::Many(conns) => conns,
        }
    }

    /// `conns` (not empty) stored in the smallest form.
    fn from_vec(conns: Vec<(u64, ConnAddr)>) -> Self {
        match conns.as_slice() {
            [one] => HomeConns::One(*one),
            _ => HomeConns::Many(conns),
        }
    }
}

/// What the home shard learned from a connection opening.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// This was the user's first connection anywhere.
    pub came_online: bool,
    /// Older connections to close with 4000 because of `connections_per_user`.
    pub evict: Vec<ConnAddr>,
}

/// One shard's view of the user directory.
#[derive(Debug, Default)]
pub struct Directory {
    local: HashMap<i64, LocalConns, RandomState>,
    replica: HashMap<i64, u64, RandomState>,
    homed: HashMap<i64, Homed, RandomState>,
}

/// A user homed on this shard: its connections, and when it came online (its presence, when
/// the default one, is `online` since then: the presence table keeps no entry for it).
#[derive(Debug)]
struct Homed {
    since_ms: u64,
    conns: HomeConns,
}

impl Directory {
    /// The shard that owns `user`'s presence and connection list.
    pub fn home_of(user: i64, shards: usize) -> ShardId {
        user.rem_euclid(shards.max(1) as i64) as ShardId
    }

    /// Records a local connection; true when it is the user's first on this shard.
    pub fn add_local(&mut self, user: i64, key: ConnKey) -> bool {
        match self.local.get_mut(&user) {
            None => {
                self.local.insert(user, LocalConns::One(key));
                true
            }
            Some(entry) => {
                let mut keys = entry.as_slice().to_vec();
                keys.push(key);
                *entry = LocalConns::Many(keys);
                false
            }
        }
    }

    /// Forgets a local connection; true when it was the user's last on this shard.
    pub fn remove_local(&mut self, user: i64, key: ConnKey) -> bool {
        let Some(entry) = self.local.get_mut(&user) else {
            return false;
        };
        let remaining: Vec<ConnKey> = entry.as_slice().iter().copied().filter(|k| *k != key).collect();
        match remaining.len() {
            0 => {
                self.local.remove(&user);
                true
            }
            1 => {
                *entry = LocalConns::One(remaining[0]);
                false
            }
            _ => {
                *entry = LocalConns::Many(remaining);
                false
            }
        }
    }

    /// This shard's connections of `user`.
    pub fn local(&self, user: i64) -> &[ConnKey] {
        self.local.get(&user).map_or(&[], LocalConns::as_slice)
    }

    /// Applies a shard's announcement that it now has (or no longer has) `user`.
    pub fn set_replica(&mut self, user: i64, shard: ShardId, present: bool) {
        let bit = 1u64 << shard;
        if present {
            *self.replica.entry(user).or_insert(0) |= bit;
        } else if let Some(mask) = self.replica.get_mut(&user) {
            *mask &= !bit;
            if *mask == 0 {
                self.replica.remove(&user);
            }
        }
    }

    /// Bitmask of the shards holding `user` (as far as this shard knows).
    pub fn shards_of(&self, user: i64) -> u64 {
        self.replica.get(&user).copied().unwrap_or(0)
    }

    /// Number of users with at least one connection (this shard's replica view).
    pub fn users_online(&self) -> usize {
        self.replica.len()
    }

    /// Home shard only: a connection of `user` opened at `now_ms` (Unix ms); `seq` orders
    /// connections globally.
    pub fn home_open(&mut self, user: i64, seq: u64, addr: ConnAddr, per_user: usize, now_ms: u64) -> Opened {
        use std::collections::hash_map::Entry;
        let mut conns = match self.homed.entry(user) {
            Entry::Vacant(vacant) => {
                // A first connection is within any `connections_per_user` (0 is no limit).
                vacant.insert(Homed { since_ms: now_ms, conns: HomeConns::One((seq, addr)) });
                return Opened { came_online: true, evict: Vec::new() };
            }
            Entry::Occupied(occupied) => occupied,
        };
        let mut list = conns.get().conns.as_slice().to_vec();
        let at = list.partition_point(|(s, _)| *s < seq);
        list.insert(at, (seq, addr));
        let excess = if per_user == 0 { 0 } else { list.len().saturating_sub(per_user) };
        let evict = list.drain(..excess).map(|(_, addr)| addr).collect();
        if list.is_empty() {
            conns.remove();
        } else {
            conns.get_mut().conns = HomeConns::from_vec(list);
        }
        Opened { came_online: false, evict }
    }

    /// Home shard only: a connection of `user` closed; true when the user is now offline.
    pub fn home_close(&mut self, user: i64, seq: u64) -> bool {
        let Some(Homed { conns, .. }) = self.homed.get_mut(&user) else {
            return false;
        };
        if !conns.as_slice().iter().any(|(s, _)| *s == seq) {
            return false;
        }
        let remaining: Vec<(u64, ConnAddr)> =
            conns.as_slice().iter().copied().filter(|(s, _)| *s != seq).collect();
        if remaining.is_empty() {
            self.homed.remove(&user);
            return true;
        }
        *conns = HomeConns::from_vec(remaining);
        false
    }

    /// Home shard only: `user`'s connections, oldest first, with their open order.
    pub fn home_conns(&self, user: i64) -> &[(u64, ConnAddr)] {
        self.homed.get(&user).map_or(&[], |homed| homed.conns.as_slice())
    }

    /// Home shard only: when `user` came online (its first connection opened), if it is online.
    pub fn home_since(&self, user: i64) -> Option<u64> {
        self.homed.get(&user).map(|homed| homed.since_ms)
    }

    /// Home shard only: whether `user` has any connection.
    pub fn home_online(&self, user: i64) -> bool {
        self.homed.contains_key(&user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(index: u32) -> ConnKey {
        ConnKey { index, generation: 1 }
    }

    fn addr(shard: ShardId, index: u32) -> ConnAddr {
        ConnAddr { shard, key: key(index) }
    }

    #[test]
    fn local_transitions_report_first_and_last() {
        let mut dir = Directory::default();
        assert!(dir.add_local(7, key(1)));
        assert!(!dir.add_local(7, key(2)));
        assert_eq!(dir.local(7), &[key(1), key(2)]);
        assert!(!dir.remove_local(7, key(1)));
        assert_eq!(dir.local(7), &[key(2)]);
        assert!(dir.remove_local(7, key(2)));
        assert!(dir.local(7).is_empty());
        assert!(!dir.remove_local(7, key(2)));
    }

    #[test]
    fn replica_mask_tracks_shards() {
        let mut dir = Directory::default();
        dir.set_replica(5, 0, true);
        dir.set_replica(5, 3, true);
        assert_eq!(dir.shards_of(5), 0b1001);
        dir.set_replica(5, 0, false);
        dir.set_replica(5, 3, false);
        assert_eq!(dir.shards_of(5), 0);
        assert_eq!(dir.users_online(), 0);
    }

    #[test]
    fn home_list_reports_online_offline_and_evicts_oldest() {
        let mut dir = Directory::default();
        let first = dir.home_open(9, 10, addr(0, 1), 1, 100);
        assert_eq!(first, Opened { came_online: true, evict: vec![] });
        let second = dir.home_open(9, 11, addr(1, 4), 1, 200);
        assert_eq!(second, Opened { came_online: false, evict: vec![addr(0, 1)] });
        // The evicted connection's close arrives later: not the last one, no offline.
        assert!(!dir.home_close(9, 10));
        assert!(dir.home_online(9));
        assert_eq!(dir.home_since(9), Some(100), "online since the first connection, still open or not");
        assert!(dir.home_close(9, 11));
        assert!(!dir.home_online(9));
        assert_eq!(dir.home_since(9), None);
    }

    #[test]
    fn unlimited_keeps_all_and_out_of_order_seq_sorted() {
        let mut dir = Directory::default();
        dir.home_open(1, 5, addr(0, 1), 0, 0);
        dir.home_open(1, 3, addr(1, 2), 2, 0);
        let third = dir.home_open(1, 9, addr(0, 3), 2, 0);
        assert_eq!(third.evict, vec![addr(1, 2)], "the lowest sequence is the oldest");
    }

    #[test]
    fn home_shard_is_stable_for_negative_ids() {
        assert_eq!(Directory::home_of(-3, 2), 1);
        assert_eq!(Directory::home_of(4, 2), 0);
        assert_eq!(Directory::home_of(4, 0), 0);
    }
}

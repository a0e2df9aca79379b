//! Who is connected where, from one shard's point of view.
//!
//! Per user, none of it shared between threads:
//! - **replica**: the shards holding at least one connection of the user. Each shard announces
//!   its own 0↔1 transitions to every shard, so routing a message to a user needs no lock and
//!   no round trip; the replica lags by one channel hop.
//! - **local**: this shard's connections of that user (exact).
//! - **homed**: for users whose *home shard* (`user mod shards`) is this one, the ordered list
//!   of all their connections on every shard, and when the user came online. It is the single
//!   authority for online/offline transitions and for `connections_per_user` eviction.
//!
//! The replica and the local connections are one record per user (every shard holds one for
//! every connected user: 24 bytes with its key, the common single local connection inline);
//! the home list is a second table, on the home shard only (32 bytes with its key, one
//! connection inline).

use std::collections::HashMap;
use std::ops::Deref;

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

/// `UserRecord::local` when the user has no connection on this shard (no slab index is
/// `u32::MAX`: the slab is bounded far below it).
const NO_LOCAL: ConnKey = ConnKey { index: u32::MAX, generation: 0 };
/// `UserRecord::local` when the user has two or more connections on this shard: they are in
/// `Directory::local_many`.
const MANY_LOCAL: ConnKey = ConnKey { index: u32::MAX, generation: 1 };

/// One user as this shard knows it: the replica mask and this shard's connection (16 bytes).
#[derive(Debug)]
struct UserRecord {
    /// Shards holding at least one connection of the user, as announced (0: none).
    shards: u64,
    /// This shard's one connection of the user, or [`NO_LOCAL`] / [`MANY_LOCAL`].
    local: ConnKey,
}

/// Largest `since_ms` a home-list record holds: 48 bits of Unix milliseconds reach the year
/// 10889 (a later clock is stored as this).
const SINCE_MAX: u64 = (1 << 48) - 1;

/// `Homed::key` when the user has two or more connections: they are in `Directory::homed_many`.
const MANY_HOMED: ConnKey = MANY_LOCAL;

/// One user homed on this shard: when it came online (its presence, when the default one, is
/// `online` since then: the presence table keeps no entry for it) and its one connection
/// inline (24 bytes); two or more connections go to a side table.
#[derive(Debug)]
struct Homed {
    /// When the user came online (Unix ms, low 48 bits; see [`SINCE_MAX`]) and the inline
    /// connection's shard (high 16 bits; at most [`MAX_SHARDS`]).
    since_shard: u64,
    /// The inline connection's open order.
    seq: u64,
    /// The inline connection, or [`MANY_HOMED`].
    key: ConnKey,
}

impl Homed {
    fn since_ms(&self) -> u64 {
        self.since_shard & SINCE_MAX
    }

    /// The record for one connection.
    fn one(since_ms: u64, seq: u64, addr: ConnAddr) -> Self {
        let since_shard = since_ms.min(SINCE_MAX) | (addr.shard as u64) << 48;
        Homed { since_shard, seq, key: addr.key }
    }

    /// The record for several connections (their list goes to `homed_many`).
    fn many(since_ms: u64) -> Self {
        Homed { since_shard: since_ms.min(SINCE_MAX), seq: 0, key: MANY_HOMED }
    }

    fn list<'a>(&self, many: Option<&'a [(u64, ConnAddr)]>) -> HomeList<'a> {
        if self.key == MANY_HOMED {
            return HomeList::Many(many.unwrap_or(&[]));
        }
        let shard = (self.since_shard >> 48) as ShardId;
        HomeList::One([(self.seq, ConnAddr { shard, key: self.key })])
    }
}

/// A user's connections as its home shard lists them (open order, address), oldest first; a
/// slice (the one connection a user usually has is copied out of its compact record).
#[derive(Debug, Clone)]
pub enum HomeList<'a> {
    /// The user's only connection.
    One([(u64, ConnAddr); 1]),
    /// Several connections, or none.
    Many(&'a [(u64, ConnAddr)]),
}

impl Deref for HomeList<'_> {
    type Target = [(u64, ConnAddr)];

    fn deref(&self) -> &Self::Target {
        match self {
            HomeList::One(one) => one,
            HomeList::Many(many) => many,
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
    users: HashMap<i64, UserRecord, RandomState>,
    /// This shard's connections of the users whose record says [`MANY_LOCAL`].
    local_many: HashMap<i64, Vec<ConnKey>, RandomState>,
    /// Records with a non-zero replica mask.
    online: usize,
    homed: HashMap<i64, Homed, RandomState>,
    /// The connections of the homed users whose record says [`MANY_HOMED`], oldest first.
    homed_many: HashMap<i64, Box<[(u64, ConnAddr)]>, RandomState>,
}

impl Directory {
    /// The shard that owns `user`'s presence and connection list.
    pub fn home_of(user: i64, shards: usize) -> ShardId {
        user.rem_euclid(shards.max(1) as i64) as ShardId
    }

    /// Records a local connection; true when it is the user's first on this shard.
    pub fn add_local(&mut self, user: i64, key: ConnKey) -> bool {
        let record = self.users.entry(user).or_insert(UserRecord { shards: 0, local: NO_LOCAL });
        match record.local {
            NO_LOCAL => {
                record.local = key;
                true
            }
            MANY_LOCAL => {
                self.local_many.entry(user).or_default().push(key);
                false
            }
            one => {
                record.local = MANY_LOCAL;
                self.local_many.insert(user, vec![one, key]);
                false
            }
        }
    }

    /// Forgets a local connection; true when it was the user's last on this shard.
    pub fn remove_local(&mut self, user: i64, key: ConnKey) -> bool {
        use std::collections::hash_map::Entry;
        let Entry::Occupied(mut record) = self.users.entry(user) else {
            return false;
        };
        let local = record.get().local;
        if local == MANY_LOCAL {
            let Some(keys) = self.local_many.get_mut(&user) else { return false };
            keys.retain(|k| *k != key);
            if let [one] = keys.as_slice() {
                record.get_mut().local = *one;
                self.local_many.remove(&user);
            }
            return false;
        }
        if local != key || key == NO_LOCAL {
            return false;
        }
        if record.get().shards == 0 {
            record.remove();
            shrink_if_sparse(&mut self.users);
        } else {
            record.get_mut().local = NO_LOCAL;
        }
        true
    }

    /// This shard's connections of `user`.
    pub fn local(&self, user: i64) -> &[ConnKey] {
        match self.users.get(&user) {
            None => &[],
            Some(UserRecord { local: NO_LOCAL, .. }) => &[],
            Some(UserRecord { local: MANY_LOCAL, .. }) => {
                self.local_many.get(&user).map_or(&[], Vec::as_slice)
            }
            Some(record) => std::slice::from_ref(&record.local),
        }
    }

    /// Applies a shard's announcement that it now has (or no longer has) `user`.
    pub fn set_replica(&mut self, user: i64, shard: ShardId, present: bool) {
        use std::collections::hash_map::Entry;
        let bit = 1u64 << shard;
        match self.users.entry(user) {
            Entry::Vacant(vacant) => {
                if present {
                    vacant.insert(UserRecord { shards: bit, local: NO_LOCAL });
                    self.online += 1;
                }
            }
            Entry::Occupied(mut occupied) => {
                let record = occupied.get_mut();
                let before = record.shards;
                if present {
                    record.shards |= bit;
                } else {
                    record.shards &= !bit;
                }
                match (before != 0, record.shards != 0) {
                    (false, true) => self.online += 1,
                    (true, false) => {
                        self.online -= 1;
                        if record.local == NO_LOCAL {
                            occupied.remove();
                            shrink_if_sparse(&mut self.users);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Bitmask of the shards holding `user` (as far as this shard knows).
    pub fn shards_of(&self, user: i64) -> u64 {
        self.users.get(&user).map_or(0, |record| record.shards)
    }

    /// Number of users with at least one connection (this shard's replica view).
    pub fn users_online(&self) -> usize {
        self.online
    }

    /// Home shard only: a connection of `user` opened at `now_ms` (Unix ms); `seq` orders
    /// connections globally.
    pub fn home_open(&mut self, user: i64, seq: u64, addr: ConnAddr, per_user: usize, now_ms: u64) -> Opened {
        let Some(homed) = self.homed.get(&user) else {
            // A first connection is within any `connections_per_user` (0 is no limit).
            self.homed.insert(user, Homed::one(now_ms, seq, addr));
            return Opened { came_online: true, evict: Vec::new() };
        };
        let since_ms = homed.since_ms();
        let mut list = homed.list(self.homed_many.get(&user).map(|b| &**b)).to_vec();
        let at = list.partition_point(|(s, _)| *s < seq);
        list.insert(at, (seq, addr));
        let excess = if per_user == 0 { 0 } else { list.len().saturating_sub(per_user) };
        let evict = list.drain(..excess).map(|(_, addr)| addr).collect();
        self.store_home(user, since_ms, list);
        Opened { came_online: false, evict }
    }

    /// Home shard only: a connection of `user` closed; true when the user is now offline.
    pub fn home_close(&mut self, user: i64, seq: u64) -> bool {
        let Some(homed) = self.homed.get(&user) else {
            return false;
        };
        let since_ms = homed.since_ms();
        let list = homed.list(self.homed_many.get(&user).map(|b| &**b));
        if !list.iter().any(|(s, _)| *s == seq) {
            return false;
        }
        let remaining: Vec<(u64, ConnAddr)> = list.iter().copied().filter(|(s, _)| *s != seq).collect();
        let offline = remaining.is_empty();
        self.store_home(user, since_ms, remaining);
        offline
    }

    /// Stores `user`'s home list in the smallest form (none when `list` is empty).
    fn store_home(&mut self, user: i64, since_ms: u64, list: Vec<(u64, ConnAddr)>) {
        match list.as_slice() {
            [] => {
                self.homed.remove(&user);
                self.homed_many.remove(&user);
                shrink_if_sparse(&mut self.homed);
                shrink_if_sparse(&mut self.homed_many);
            }
            [(seq, addr)] => {
                self.homed.insert(user, Homed::one(since_ms, *seq, *addr));
                if self.homed_many.remove(&user).is_some() {
                    shrink_if_sparse(&mut self.homed_many);
                }
            }
            _ => {
                self.homed.insert(user, Homed::many(since_ms));
                self.homed_many.insert(user, list.into_boxed_slice());
            }
        }
    }

    /// Home shard only: `user`'s connections, oldest first, with their open order.
    pub fn home_conns(&self, user: i64) -> HomeList<'_> {
        let many = self.homed_many.get(&user).map(|b| &**b);
        self.homed.get(&user).map_or(HomeList::Many(&[]), |homed| homed.list(many))
    }

    /// Home shard only: when `user` came online (its first connection opened), if it is online.
    pub fn home_since(&self, user: i64) -> Option<u64> {
        self.homed.get(&user).map(Homed::since_ms)
    }

    /// Home shard only: whether `user` has any connection.
    pub fn home_online(&self, user: i64) -> bool {
        self.homed.contains_key(&user)
    }
}

/// Tables under this capacity are never shrunk.
const SHRINK_MIN_CAPACITY: usize = 1024;

/// Gives back a table's memory once it is under a quarter full (a hash table keeps its
/// largest capacity otherwise: after 15,000 disconnects the user records would hold ~800 KB
/// per shard for nobody). Halving the length again is needed before the next rehash, so the
/// cost stays amortised O(1) per removal.
fn shrink_if_sparse<V>(map: &mut HashMap<i64, V, RandomState>) {
    let (len, capacity) = (map.len(), map.capacity());
    if capacity >= SHRINK_MIN_CAPACITY && len < capacity / 4 {
        map.shrink_to(len * 2);
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

    #[test]
    fn local_and_replica_share_one_record_dropped_when_both_are_empty() {
        let mut dir = Directory::default();
        assert!(dir.add_local(7, key(1)));
        assert_eq!((dir.shards_of(7), dir.users_online()), (0, 0), "the announcement has not arrived");
        dir.set_replica(7, 0, true);
        dir.set_replica(7, 1, true);
        assert_eq!((dir.shards_of(7), dir.users_online(), dir.local(7)), (0b11, 1, &[key(1)][..]));
        assert!(!dir.add_local(7, key(2)));
        assert!(!dir.add_local(7, key(3)));
        assert!(!dir.remove_local(7, key(2)));
        assert_eq!(dir.local(7), &[key(1), key(3)]);
        assert!(!dir.remove_local(7, key(1)));
        assert_eq!(dir.local(7), &[key(3)]);
        assert!(dir.local_many.is_empty(), "one connection is inline again");
        assert!(dir.remove_local(7, key(3)));
        assert!(!dir.remove_local(7, key(3)));
        assert_eq!(dir.users.len(), 1, "the replica still lists the user");
        dir.set_replica(7, 0, false);
        dir.set_replica(7, 1, false);
        assert_eq!((dir.users.len(), dir.users_online()), (0, 0));
        // Removed locally after the replica already dropped it.
        dir.set_replica(8, 0, true);
        assert!(dir.add_local(8, key(4)));
        dir.set_replica(8, 0, false);
        assert_eq!(dir.users_online(), 0);
        assert!(dir.remove_local(8, key(4)));
        assert!(dir.users.is_empty());
        dir.set_replica(9, 0, false);
        assert!(dir.users.is_empty(), "an absence announced for an unknown user keeps nothing");
    }

    #[test]
    fn home_list_keeps_since_and_order_through_its_forms() {
        let mut dir = Directory::default();
        dir.home_open(1, 5, addr(1, 1), 0, 100);
        assert!(matches!(dir.home_conns(1), HomeList::One(_)));
        dir.home_open(1, 3, addr(0, 2), 0, 200);
        dir.home_open(1, 9, addr(1, 3), 0, 300);
        assert_eq!(&*dir.home_conns(1), &[(3, addr(0, 2)), (5, addr(1, 1)), (9, addr(1, 3))]);
        assert!(!dir.home_close(1, 3));
        assert!(!dir.home_close(1, 9));
        assert_eq!(&*dir.home_conns(1), &[(5, addr(1, 1))]);
        assert!(matches!(dir.home_conns(1), HomeList::One(_)), "one connection is inline again");
        assert!(dir.homed_many.is_empty(), "the side table lets go of the user");
        assert_eq!(dir.home_since(1), Some(100));
        assert!(dir.home_close(1, 5));
        assert!(dir.home_conns(1).is_empty());
    }

    #[test]
    fn tables_shrink_after_mass_disconnects() {
        let mut dir = Directory::default();
        for user in 0..20_000 {
            dir.add_local(user, key(user as u32));
            dir.set_replica(user, 0, true);
            dir.home_open(user, user as u64, addr(0, user as u32), 0, 0);
        }
        let (users, homed) = (dir.users.capacity(), dir.homed.capacity());
        assert!(users >= 20_000 && homed >= 20_000);
        for user in 0..19_990 {
            dir.set_replica(user, 0, false);
            assert!(dir.remove_local(user, key(user as u32)));
            assert!(dir.home_close(user, user as u64));
        }
        assert!(dir.users.capacity() < SHRINK_MIN_CAPACITY, "{}", dir.users.capacity());
        assert!(dir.homed.capacity() < SHRINK_MIN_CAPACITY, "{}", dir.homed.capacity());
        assert_eq!((dir.users.len(), dir.homed.len(), dir.users_online()), (10, 10, 10));
        assert_eq!(dir.local(19_995), &[key(19_995)]);
    }

    /// Bytes per connected user in the directory's tables (`-- --nocapture` prints them). With
    /// one user per connection and hashbrown's load between 7/16 and 7/8, each entry costs its
    /// size plus one control byte, times up to 2.3.
    #[test]
    fn idle_connection_layout_per_user() {
        use std::mem::size_of;
        let record = size_of::<(i64, UserRecord)>();
        let homed = size_of::<(i64, Homed)>();
        println!("directory entry per user and shard: {record} B; home-list entry: {homed} B");
        assert!(record <= 24, "{record}");
        // Issue 15, fourth step: 40 → 32 (the shard in the since time's top 16 bits, two or
        // more connections in a side table).
        assert!(homed <= 32, "{homed}");
    }

    /// The inline record keeps the whole since time, sequence and address: the last shard,
    /// a since time in milliseconds far from now, a sequence past 32 bits.
    #[test]
    fn the_compact_home_record_loses_nothing() {
        let mut dir = Directory::default();
        let since = 4_102_444_800_123; // 2100-01-01T00:00:00.123Z
        let seq = (1 << 40) + 7;
        let last = ConnAddr { shard: MAX_SHARDS - 1, key: ConnKey { index: 1 << 30, generation: u32::MAX } };
        assert!(dir.home_open(3, seq, last, 0, since).came_online);
        assert_eq!(&*dir.home_conns(3), &[(seq, last)]);
        assert_eq!(dir.home_since(3), Some(since));
        dir.home_open(3, seq + 1, addr(0, 2), 0, since + 5);
        assert!(!dir.home_close(3, seq));
        assert_eq!((&*dir.home_conns(3), dir.home_since(3)), (&[(seq + 1, addr(0, 2))][..], Some(since)));
        assert!(dir.home_close(3, seq + 1));
        assert!(dir.homed.is_empty() && dir.homed_many.is_empty());
    }
}

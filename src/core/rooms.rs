//! Rooms, from one shard's point of view: exact local membership, and a replica of every
//! shard's member count per room (fed by each shard's announcements on join/leave), which
//! says where a publish must go and how full a room is. No lock, no round trip on publish.

use std::collections::HashMap;
use std::sync::Arc;

use foldhash::fast::RandomState;

use super::directory::{ConnKey, ShardId};

/// Longest room name.
pub const MAX_ROOM_NAME: usize = 128;

/// Why a room name is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoomNameError {
    /// Empty or longer than [`MAX_ROOM_NAME`].
    #[error("room name must be 1 to 128 characters")]
    Length,
    /// A character outside `A-Z a-z 0-9 _ - . : @ #`.
    #[error("room name may only contain letters, digits and _ - . : @ #")]
    Characters,
}

/// Checks a room name: 1–128 characters from `A-Z a-z 0-9 _ - . : @ #`.
pub fn validate_name(name: &str) -> Result<(), RoomNameError> {
    if name.is_empty() || name.len() > MAX_ROOM_NAME {
        return Err(RoomNameError::Length);
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:@#".contains(&b)) {
        return Err(RoomNameError::Characters);
    }
    Ok(())
}

/// One shard's room state.
#[derive(Debug)]
pub struct RoomTable {
    shards: usize,
    local: HashMap<Arc<str>, Vec<ConnKey>, RandomState>,
    counts: HashMap<Arc<str>, Vec<u32>, RandomState>,
    /// With a cluster: members on the other nodes, as the link last said.
    remote: HashMap<Arc<str>, u64, RandomState>,
}

impl RoomTable {
    /// An empty table in a server of `shards` shards.
    pub fn new(shards: usize) -> Self {
        RoomTable {
            shards: shards.max(1),
            local: HashMap::default(),
            counts: HashMap::default(),
            remote: HashMap::default(),
        }
    }

    /// The shared name for `room` (one allocation per room, not per member).
    pub fn intern(&self, room: &str) -> Arc<str> {
        self.local
            .get_key_value(room)
            .map(|(k, _)| Arc::clone(k))
            .or_else(|| self.counts.get_key_value(room).map(|(k, _)| Arc::clone(k)))
            .unwrap_or_else(|| Arc::from(room))
    }

    /// Adds a local member; returns this shard's new member count (unchanged if already in).
    pub fn join(&mut self, room: &Arc<str>, key: ConnKey) -> (bool, u32) {
        let members = self.local.entry(Arc::clone(room)).or_default();
        let added = !members.contains(&key);
        if added {
            members.push(key);
        }
        (added, members.len() as u32)
    }

    /// Removes a local member; returns whether it was one and this shard's new count.
    pub fn leave(&mut self, room: &str, key: ConnKey) -> (bool, u32) {
        let Some(members) = self.local.get_mut(room) else { return (false, 0) };
        let before = members.len();
        members.retain(|k| *k != key);
        let (removed, left) = (members.len() < before, members.len() as u32);
        if left == 0 {
            self.local.remove(room);
        }
        (removed, left)
    }

    /// This shard's members of `room`.
    pub fn local(&self, room: &str) -> &[ConnKey] {
        self.local.get(room).map_or(&[], Vec::as_slice)
    }

    /// Applies a shard's announced member count.
    pub fn set_count(&mut self, room: &Arc<str>, shard: ShardId, count: u32) {
        if count == 0 {
            if let Some(counts) = self.counts.get_mut(room) {
                counts[shard] = 0;
                if counts.iter().all(|&c| c == 0) {
                    self.counts.remove(room);
                }
            }
            return;
        }
        let shards = self.shards;
        self.counts.entry(Arc::clone(room)).or_insert_with(|| vec![0; shards])[shard] = count;
    }

    /// Applies the members of `room` on the other nodes of a cluster.
    pub fn set_remote(&mut self, room: &Arc<str>, count: u64) {
        if count == 0 {
            self.remote.remove(room);
        } else {
            self.remote.insert(Arc::clone(room), count);
        }
    }

    /// Members of `room` on the other nodes of a cluster.
    /// Members of `room` on the other nodes of a cluster (as their records last said).
    pub fn remote(&self, room: &str) -> usize {
        if self.remote.is_empty() { 0 } else { self.remote.get(room).map_or(0, |&n| n as usize) }
    }

    /// Members of `room` on all shards (and, with a cluster, all nodes), as announced.
    pub fn total(&self, room: &str) -> usize {
        self.counts.get(room).map_or(0, |c| c.iter().map(|&n| n as usize).sum()) + self.remote(room)
    }

    /// Bitmask of the shards with members of `room`.
    pub fn shards_of(&self, room: &str) -> u64 {
        self.counts.get(room).map_or(0, |counts| {
            counts.iter().enumerate().filter(|(_, c)| **c > 0).fold(0, |mask, (i, _)| mask | 1 << i)
        })
    }

    /// Every room with members anywhere, with its total on all shards (and nodes), as
    /// announced.
    pub fn totals(&self) -> impl Iterator<Item = (&str, usize)> {
        let here = self
            .counts
            .iter()
            .map(|(room, c)| (&**room, c.iter().map(|&n| n as usize).sum::<usize>() + self.remote(room)));
        let elsewhere = self.remote.iter().filter(|(room, _)| !self.counts.contains_key(&***room));
        here.chain(elsewhere.map(|(room, &n)| (&**room, n as usize)))
    }

    /// Number of rooms with members anywhere.
    pub fn rooms(&self) -> usize {
        self.counts.len() + self.remote.keys().filter(|room| !self.counts.contains_key(&***room)).count()
    }

    /// Local members of any of `rooms`, each connection once.
    pub fn local_union(&self, rooms: &[Arc<str>]) -> Vec<ConnKey> {
        let mut keys: Vec<ConnKey> = rooms.iter().flat_map(|r| self.local(r).iter().copied()).collect();
        keys.sort_unstable_by_key(|k| (k.index, k.generation));
        keys.dedup();
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(index: u32) -> ConnKey {
        ConnKey { index, generation: 1 }
    }

    #[test]
    fn names_are_validated() {
        assert_eq!(validate_name("room-1"), Ok(()));
        assert_eq!(validate_name("orders:42@eu#a.b_c"), Ok(()));
        assert_eq!(validate_name(""), Err(RoomNameError::Length));
        assert_eq!(validate_name(&"a".repeat(129)), Err(RoomNameError::Length));
        assert_eq!(validate_name("a b"), Err(RoomNameError::Characters));
        assert_eq!(validate_name("sala-ñ"), Err(RoomNameError::Characters));
    }

    #[test]
    fn local_membership_and_counts() {
        let mut t = RoomTable::new(2);
        let room = t.intern("r");
        assert_eq!(t.join(&room, key(1)), (true, 1));
        assert_eq!(t.join(&room, key(1)), (false, 1));
        assert_eq!(t.join(&room, key(2)), (true, 2));
        assert_eq!(t.leave("r", key(1)), (true, 1));
        assert_eq!(t.leave("r", key(1)), (false, 1));
        assert_eq!(t.leave("r", key(2)), (true, 0));
        assert!(t.local("r").is_empty());
    }

    #[test]
    fn replica_counts_give_totals_and_shards() {
        let mut t = RoomTable::new(3);
        let room = t.intern("r");
        t.set_count(&room, 0, 2);
        t.set_count(&room, 2, 5);
        assert_eq!((t.total("r"), t.shards_of("r")), (7, 0b101));
        t.set_count(&room, 0, 0);
        t.set_count(&room, 2, 0);
        assert_eq!((t.total("r"), t.shards_of("r"), t.rooms()), (0, 0, 0));
    }

    #[test]
    fn union_deduplicates_connections_in_several_rooms() {
        let mut t = RoomTable::new(1);
        let (a, b) = (t.intern("a"), t.intern("b"));
        t.join(&a, key(1));
        t.join(&a, key(2));
        t.join(&b, key(2));
        t.join(&b, key(3));
        assert_eq!(t.local_union(&[a, b]), vec![key(1), key(2), key(3)]);
    }
}

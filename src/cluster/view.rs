//! The replicated, node-level view of the cluster (sans-IO; the caller passes the time).
//!
//! Each node publishes idempotent records of its own users and rooms, plus heartbeats (see
//! [`super::wire`]). A [`View`] keeps the latest records of every *other* live node and turns
//! their changes into [`Change`]s: a user goes online when the first node holds it and offline
//! when the last one lets go, is declared dead (heartbeats missing for the TTL), or restarts
//! with a new epoch. Per-origin sequence numbers reveal lost records; the caller then asks the
//! origin for a snapshot, which is applied by difference, so only real changes come out.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::broker::BrokerError;
use super::wire::Record;

/// A change of the cluster as seen from this node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// A user now has connections on some other node (and had none on any other node before).
    Online(String),
    /// No other live node holds the user any more.
    Offline(String),
    /// The members of a room on the other nodes, summed.
    RoomCount {
        /// Room name.
        room: String,
        /// Members on other nodes.
        count: u64,
    },
    /// A node was heard for the first time (or with a new epoch).
    NodeUp(String),
    /// A node was declared dead (TTL) or restarted; its records are gone.
    NodeDown(String),
}

/// What a cross-node send amounts to, from the broker's receiver count and the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// At least one node received it: `delivered`.
    Delivered,
    /// Nobody received it and no live node holds the user: 404.
    NotFound,
    /// The broker failed, or nobody received it although the view lists a holder (a dead node
    /// not yet expired, or one still resubscribing): 503, never a false 404.
    Unavailable,
}

/// Decides delivered / 404 / 503 from the broker's answer (`Ok(receivers)` or the error) and
/// the number of live nodes the view says hold the user.
pub fn decide(receivers: Result<u32, BrokerError>, holders: u32) -> Delivery {
    match receivers {
        Ok(n) if n > 0 => Delivery::Delivered,
        Ok(_) if holders == 0 => Delivery::NotFound,
        _ => Delivery::Unavailable,
    }
}

#[derive(Debug)]
struct Node {
    epoch: u64,
    last_seen: Instant,
    /// Sequence of the last records message applied; meaningful when `synced`.
    seq: u64,
    synced: bool,
    sync_asked: Option<Instant>,
    users: HashMap<String, u32>,
    rooms: HashMap<String, u32>,
    /// Names seen in the snapshot being received (users, rooms).
    snapshot: Option<(HashSet<String>, HashSet<String>)>,
}

impl Node {
    fn new(epoch: u64, now: Instant) -> Node {
        Node {
            epoch,
            last_seen: now,
            seq: 0,
            synced: false,
            sync_asked: None,
            users: HashMap::new(),
            rooms: HashMap::new(),
            snapshot: None,
        }
    }
}

/// The other nodes' records, with liveness.
#[derive(Debug)]
pub struct View {
    ttl: Duration,
    nodes: HashMap<String, Node>,
    /// Live nodes holding each user.
    holders: HashMap<String, u32>,
    /// Members per room over the other nodes.
    rooms: HashMap<String, u64>,
}

impl View {
    /// An empty view; nodes not heard for `ttl` are dead.
    pub fn new(ttl: Duration) -> View {
        View { ttl, nodes: HashMap::new(), holders: HashMap::new(), rooms: HashMap::new() }
    }

    /// Live nodes (other than this one) holding `user`.
    pub fn holders(&self, user: &str) -> u32 {
        self.holders.get(user).copied().unwrap_or(0)
    }

    /// Connections of `user` on the other live nodes, as their records say.
    pub fn user_connections(&self, user: &str) -> u64 {
        if self.holders(user) == 0 {
            return 0;
        }
        self.nodes.values().map(|node| u64::from(node.users.get(user).copied().unwrap_or(0))).sum()
    }

    /// How many other live nodes have members of `room`.
    pub fn room_nodes(&self, room: &str) -> usize {
        if self.room_count(room) == 0 {
            return 0;
        }
        self.nodes.values().filter(|node| node.rooms.get(room).is_some_and(|&n| n > 0)).count()
    }

    /// Connections on the other live nodes, all users.
    pub fn connections(&self) -> u64 {
        self.nodes.values().flat_map(|node| node.users.values()).map(|&n| u64::from(n)).sum()
    }

    /// The live nodes (other than this one) holding `user`, sorted.
    pub fn holder_nodes(&self, user: &str) -> Vec<&str> {
        if self.holders(user) == 0 {
            return Vec::new();
        }
        let mut out: Vec<&str> = self
            .nodes
            .iter()
            .filter(|(_, node)| node.users.get(user).is_some_and(|&n| n > 0))
            .map(|(name, _)| name.as_str())
            .collect();
        out.sort_unstable();
        out
    }

    /// Members of `room` on the other nodes.
    pub fn room_count(&self, room: &str) -> u64 {
        self.rooms.get(room).copied().unwrap_or(0)
    }

    /// The live nodes known, sorted.
    pub fn nodes(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.nodes.keys().map(String::as_str).collect();
        out.sort_unstable();
        out
    }

    /// A heartbeat from `origin`. Returns whether the origin should be asked for a snapshot
    /// (unknown, or its `seq` shows a lost records message).
    pub fn heartbeat(
        &mut self,
        now: Instant,
        origin: &str,
        epoch: u64,
        seq: u64,
        out: &mut Vec<Change>,
    ) -> bool {
        let ttl = self.ttl;
        let node = self.touch(now, origin, epoch, out);
        if node.synced && node.seq != seq {
            node.synced = false;
        }
        Self::wants_sync(node, now, ttl)
    }

    /// A records message from `origin` (see [`super::wire::Header::Records`]). Returns whether
    /// the origin should be asked for a snapshot.
    #[allow(clippy::too_many_arguments)]
    pub fn records(
        &mut self,
        now: Instant,
        origin: &str,
        epoch: u64,
        seq: u64,
        full: bool,
        end: bool,
        records: Vec<Record>,
        out: &mut Vec<Change>,
    ) -> bool {
        let ttl = self.ttl;
        let node = self.touch(now, origin, epoch, out);
        if node.synced && seq != node.seq + 1 {
            node.synced = false;
        }
        node.seq = seq;
        if full && node.snapshot.is_none() {
            node.snapshot = Some((HashSet::new(), HashSet::new()));
        }
        let mut applied = Vec::with_capacity(records.len());
        for record in records {
            if let (true, Some((users, rooms))) = (full, node.snapshot.as_mut()) {
                match &record {
                    Record::User { user, .. } => users.insert(user.clone()),
                    Record::Room { room, .. } => rooms.insert(room.clone()),
                };
            }
            applied.push(record);
        }
        if full && end {
            let (users, rooms) = node.snapshot.take().unwrap_or_default();
            for user in node.users.keys().filter(|u| !users.contains(*u)) {
                applied.push(Record::User { user: user.clone(), count: 0 });
            }
            for room in node.rooms.keys().filter(|r| !rooms.contains(*r)) {
                applied.push(Record::Room { room: room.clone(), count: 0 });
            }
            node.synced = true;
            node.sync_asked = None;
        }
        let want = Self::wants_sync(node, now, ttl);
        for record in applied {
            self.apply(origin, record, out);
        }
        want
    }

    /// Declares nodes not heard for the TTL dead, removing their records.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Change>) {
        let dead: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, node)| now.saturating_duration_since(node.last_seen) > self.ttl)
            .map(|(name, _)| name.clone())
            .collect();
        for name in dead {
            self.remove(&name, out);
        }
    }

    /// Forgets every node (this node lost the broker for longer than the TTL, for example).
    pub fn clear(&mut self, out: &mut Vec<Change>) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            self.remove(&name, out);
        }
    }

    fn wants_sync(node: &mut Node, now: Instant, ttl: Duration) -> bool {
        if node.synced || node.sync_asked.is_some_and(|at| now.saturating_duration_since(at) < ttl) {
            return false;
        }
        node.sync_asked = Some(now);
        true
    }

    fn touch(&mut self, now: Instant, origin: &str, epoch: u64, out: &mut Vec<Change>) -> &mut Node {
        if self.nodes.get(origin).is_some_and(|node| node.epoch != epoch) {
            self.remove(origin, out);
        }
        if !self.nodes.contains_key(origin) {
            out.push(Change::NodeUp(origin.to_string()));
        }
        let node = self.nodes.entry(origin.to_string()).or_insert_with(|| Node::new(epoch, now));
        node.last_seen = now;
        node
    }

    fn remove(&mut self, origin: &str, out: &mut Vec<Change>) {
        let Some(node) = self.nodes.get(origin) else { return };
        let mut records: Vec<Record> =
            node.users.keys().map(|user| Record::User { user: user.clone(), count: 0 }).collect();
        records.extend(node.rooms.keys().map(|room| Record::Room { room: room.clone(), count: 0 }));
        for record in records {
            self.apply(origin, record, out);
        }
        self.nodes.remove(origin);
        out.push(Change::NodeDown(origin.to_string()));
    }

    fn apply(&mut self, origin: &str, record: Record, out: &mut Vec<Change>) {
        let Some(node) = self.nodes.get_mut(origin) else { return };
        match record {
            Record::User { user, count } => {
                let old = if count == 0 {
                    node.users.remove(&user)
                } else {
                    node.users.insert(user.clone(), count)
                };
                match (old.unwrap_or(0) > 0, count > 0) {
                    (false, true) => {
                        let n = self.holders.entry(user.clone()).or_insert(0);
                        *n += 1;
                        if *n == 1 {
                            out.push(Change::Online(user));
                        }
                    }
                    (true, false) => {
                        let n = self.holders.get_mut(&user).map_or(0, |n| {
                            *n -= 1;
                            *n
                        });
                        if n == 0 {
                            self.holders.remove(&user);
                            out.push(Change::Offline(user));
                        }
                    }
                    _ => {}
                }
            }
            Record::Room { room, count } => {
                let old = if count == 0 {
                    node.rooms.remove(&room)
                } else {
                    node.rooms.insert(room.clone(), count)
                };
                let old = u64::from(old.unwrap_or(0));
                if old == u64::from(count) {
                    return;
                }
                let total = self.rooms.entry(room.clone()).or_insert(0);
                *total = *total - old + u64::from(count);
                let count = *total;
                if count == 0 {
                    self.rooms.remove(&room);
                }
                out.push(Change::RoomCount { room, count });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, count: u32) -> Record {
        Record::User { user: name.into(), count }
    }

    fn room(name: &str, count: u32) -> Record {
        Record::Room { room: name.into(), count }
    }

    #[test]
    fn a_user_is_online_while_any_node_holds_it_and_expiry_emits_offline_once() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut view = View::new(Duration::from_millis(300));
        let mut out = Vec::new();
        assert!(!view.records(ms(0), "a", 1, 1, true, true, vec![user("1", 2), room("r", 3)], &mut out));
        assert_eq!(
            out,
            [
                Change::NodeUp("a".into()),
                Change::Online("1".into()),
                Change::RoomCount { room: "r".into(), count: 3 }
            ]
        );
        out.clear();
        view.records(ms(10), "b", 5, 1, true, true, vec![user("1", 1), room("r", 1)], &mut out);
        assert_eq!(out, [Change::NodeUp("b".into()), Change::RoomCount { room: "r".into(), count: 4 }]);
        assert_eq!(view.holders("1"), 2);
        out.clear();
        // a keeps beating, b falls silent: b expires after the TTL, the user stays online via a.
        for t in (100..=400).step_by(100) {
            assert!(!view.heartbeat(ms(t), "a", 1, 1, &mut out));
            view.expire(ms(t), &mut out);
        }
        assert_eq!(out, [Change::RoomCount { room: "r".into(), count: 3 }, Change::NodeDown("b".into())]);
        out.clear();
        // a falls silent too: offline exactly once, at the first tick past the TTL.
        view.expire(ms(700), &mut out);
        assert!(out.is_empty());
        view.expire(ms(701), &mut out);
        assert_eq!(
            out,
            [
                Change::Offline("1".into()),
                Change::RoomCount { room: "r".into(), count: 0 },
                Change::NodeDown("a".into())
            ]
        );
        out.clear();
        view.expire(ms(2000), &mut out);
        assert!(out.is_empty() && view.nodes().is_empty() && view.holders("1") == 0);
    }

    #[test]
    fn a_new_epoch_replaces_the_node() {
        let t0 = Instant::now();
        let mut view = View::new(Duration::from_secs(3));
        let mut out = Vec::new();
        view.records(t0, "a", 1, 1, true, true, vec![user("1", 1), user("2", 1)], &mut out);
        out.clear();
        // Restarted with the same id: its old users go offline, its new state comes in.
        assert!(!view.records(t0, "a", 2, 1, true, true, vec![user("2", 1)], &mut out));
        // (The old records go in hash order; the node's down and up events frame them.)
        assert_eq!(out.len(), 5);
        assert!(
            out[..2].contains(&Change::Offline("1".into()))
                && out[..2].contains(&Change::Offline("2".into()))
        );
        assert_eq!(
            out[2..],
            [Change::NodeDown("a".into()), Change::NodeUp("a".into()), Change::Online("2".into())]
        );
        assert_eq!((view.holders("1"), view.holders("2")), (0, 1));
    }

    #[test]
    fn a_gap_asks_for_a_snapshot_once_and_the_snapshot_diff_is_silent() {
        let t0 = Instant::now();
        let mut view = View::new(Duration::from_secs(3));
        let mut out = Vec::new();
        // An unknown node's heartbeat asks for a snapshot, once per TTL.
        assert!(view.heartbeat(t0, "a", 1, 4, &mut out));
        assert!(!view.heartbeat(t0, "a", 1, 4, &mut out));
        // A two-part snapshot: the names of both parts survive the end.
        view.records(t0, "a", 1, 5, true, false, vec![user("1", 1)], &mut out);
        view.records(t0, "a", 1, 6, true, true, vec![user("2", 1)], &mut out);
        assert_eq!((view.holders("1"), view.holders("2")), (1, 1));
        assert!(!view.heartbeat(t0, "a", 1, 6, &mut out));
        view.records(t0, "a", 1, 7, false, false, vec![user("3", 1)], &mut out);
        out.clear();
        // Records 8 lost (it removed user 1): the heartbeat with seq 8 reveals the gap.
        assert!(view.heartbeat(t0, "a", 1, 8, &mut out));
        // The snapshot differs only in user 1: one Offline, nothing for 2 and 3.
        assert!(!view.records(t0, "a", 1, 9, true, true, vec![user("2", 3), user("3", 1)], &mut out));
        assert_eq!(out, [Change::Offline("1".into())]);
        out.clear();
        // A records message out of sequence also asks (once the TTL since the last ask passed).
        let later = t0 + Duration::from_secs(4);
        assert!(view.records(later, "a", 1, 11, false, false, vec![], &mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn delivered_404_503_decision() {
        assert_eq!(decide(Ok(1), 0), Delivery::Delivered);
        assert_eq!(decide(Ok(2), 1), Delivery::Delivered);
        assert_eq!(decide(Ok(0), 0), Delivery::NotFound);
        assert_eq!(decide(Ok(0), 1), Delivery::Unavailable);
        assert_eq!(decide(Err(BrokerError::Down), 0), Delivery::Unavailable);
        assert_eq!(decide(Err(BrokerError::Timeout), 3), Delivery::Unavailable);
    }
}

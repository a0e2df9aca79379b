//! The sans-IO cluster node: what one node publishes and subscribes, and what it makes of what it
//! receives. The caller (the link thread, once wired) feeds it local state changes, broker
//! messages and the time, and carries out the returned [`Effects`]: broker actions, view
//! [`Change`]s for the shards, and bodies to deliver to local connections.
//!
//! State replication: local users and rooms are coalesced in dirty sets and published as
//! idempotent records on the directory subject at the next tick (never one message per
//! connection), a heartbeat follows every `heartbeat`, and a snapshot is published when any node
//! asks (on joining, after a gap, after this node's broker link came back).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::broker::BrokerError;
use super::subjects::Subjects;
use super::view::{Change, Delivery, View, decide};
use super::wire::{self, AwaitOutcome, Header, Record};

/// Settings of one node.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CoreConfig {
    /// Subject prefix (`cluster_prefix`).
    pub prefix: String,
    /// This node's id (`node_id`).
    pub node: String,
    /// Random per process start.
    pub epoch: u64,
    /// Heartbeat period (`cluster_heartbeat`).
    pub heartbeat: Duration,
    /// Silence after which a node is dead (`cluster_node_ttl`).
    pub node_ttl: Duration,
}

impl CoreConfig {
    /// Settings for `node` under `prefix` with a fresh random epoch.
    pub fn new(prefix: &str, node: &str, heartbeat: Duration, node_ttl: Duration) -> CoreConfig {
        let mut epoch = [0u8; 8];
        let _ = getrandom::fill(&mut epoch);
        CoreConfig {
            prefix: prefix.to_string(),
            node: node.to_string(),
            epoch: u64::from_le_bytes(epoch),
            heartbeat,
            node_ttl,
        }
    }
}

/// Something the caller must do on the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Publish `payload` on `subject`.
    Publish {
        /// Where.
        subject: String,
        /// What (wire-encoded).
        payload: Bytes,
    },
    /// Subscribe to these subjects.
    Subscribe(Vec<String>),
    /// Unsubscribe from these subjects.
    Unsubscribe(Vec<String>),
}

/// What one call produced.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Effects {
    /// Broker actions, in order.
    pub actions: Vec<Action>,
    /// Changes of the view, for the shards.
    pub changes: Vec<Change>,
    /// Bodies (encoded WebSocket frames) that arrived for local connections, with their subject.
    pub deliveries: Vec<(String, Bytes)>,
    /// Broadcasts with exclusions that arrived: the sorted user ids to skip, and the frame.
    pub broadcasts: Vec<(Vec<i64>, Bytes)>,
    /// Presence statuses set on other nodes.
    pub presences: Vec<RemotePresence>,
    /// Other nodes asking for this node's members of a room: (asking node, its id, room).
    pub member_requests: Vec<(String, u64, String)>,
    /// Answers to this node's room member gathers: (id, user ids).
    pub members: Vec<(u64, Vec<i64>)>,
    /// `connections_per_user` evictions asked by other nodes: (user, before_ms, count).
    pub evictions: Vec<(i64, u64, u32)>,
    /// Users whose connections on this node are to be closed (another node's API asked).
    pub disconnects: Vec<i64>,
    /// Waits another node asks this node to carry out.
    pub awaits: Vec<RemoteAwait>,
    /// Answers to waits this node asked another node to carry out: its id, the result.
    pub await_done: Vec<(u64, AwaitOutcome)>,
    /// Payloads that did not decode (dropped, counted).
    pub bad_messages: u64,
    /// A message from another live process with this node's `node_id` (another epoch).
    pub duplicate: bool,
}

/// A presence status set on another node (see [`Header::Presence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemotePresence {
    /// The user.
    pub user: i64,
    /// The status.
    pub status: String,
    /// Its context, raw JSON.
    pub context: Option<String>,
    /// When it was set, Unix milliseconds.
    pub since_ms: u64,
    /// The user's `presence_info_claim` value, raw JSON.
    pub info: Option<String>,
    /// Rooms whose members are told too.
    pub rooms: Vec<String>,
}

/// A wait (send-for-ack or request) another node asks this one to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemoteAwait {
    /// The asking node.
    pub origin: String,
    /// The asking node's id of the wait.
    pub id: u64,
    /// The receiving user.
    pub user: i64,
    /// A request rather than a send-for-ack.
    pub request: bool,
    /// The wait bound.
    pub timeout_ms: u64,
    /// The message's `type`.
    pub kind: String,
    /// The message's `fromUserId`.
    pub from: Option<i64>,
    /// The message's payload, raw JSON (empty: none).
    pub payload: Bytes,
}

/// One node's cluster state machine.
#[derive(Debug)]
pub struct Core {
    subjects: Subjects,
    node: String,
    epoch: u64,
    heartbeat: Duration,
    next_beat: Option<Instant>,
    seq: u64,
    view: View,
    users: HashMap<String, u32>,
    rooms: HashMap<String, u32>,
    dirty_users: BTreeSet<String>,
    dirty_rooms: BTreeSet<String>,
    /// User and room subjects being left: their "count 0" records are held back until the
    /// broker confirms, so that no node that has seen the user leave here gets a receiver here
    /// (a false `delivered`); meanwhile senders get 0 receivers from a listed holder (503).
    /// Snapshots meanwhile keep the record the node had before (the value here).
    unsubscribing: HashMap<String, Record>,
    /// User and room subjects asked for and not confirmed yet: their records are held back,
    /// so that no node sees a user here (and answers 404 instead of sending) before a publish
    /// on the user's subject would reach this node.
    awaiting: HashSet<String>,
    snapshot_due: bool,
}

impl Core {
    /// A node with no local users yet.
    pub fn new(config: CoreConfig) -> Core {
        Core {
            subjects: Subjects::new(&config.prefix, &config.node),
            node: config.node,
            epoch: config.epoch,
            heartbeat: config.heartbeat,
            next_beat: None,
            seq: 0,
            view: View::new(config.node_ttl),
            users: HashMap::new(),
            rooms: HashMap::new(),
            dirty_users: BTreeSet::new(),
            dirty_rooms: BTreeSet::new(),
            unsubscribing: HashMap::new(),
            awaiting: HashSet::new(),
            snapshot_due: true,
        }
    }

    /// The subjects of this node.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// The view of the other nodes.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// Start-up: subscribe the node's subjects (and those of users and rooms already held), ask
    /// every node for its state, and publish ours at the next tick.
    pub fn start(&mut self) -> Effects {
        let mut subjects = vec![self.subjects.dir(), self.subjects.all(), self.subjects.me()];
        subjects.extend(self.users.keys().map(|u| self.subjects.user(u)));
        subjects.extend(self.rooms.keys().map(|r| self.subjects.room(r)));
        let mut effects = Effects::default();
        effects.actions.push(Action::Subscribe(subjects));
        self.resync(&mut effects);
        effects
    }

    /// The broker link came back and the engine resubscribed: our records may have been missed,
    /// and we may have missed others'. Ask everyone and republish.
    pub fn on_resubscribed(&mut self) -> Effects {
        let mut effects = Effects::default();
        self.awaiting.clear();
        self.unsubscribing.clear();
        self.resync(&mut effects);
        effects
    }

    /// These subjects are in place on the broker: the records they held back go out at the
    /// next tick.
    pub fn on_subscribed(&mut self, subjects: &[String]) {
        for subject in subjects {
            self.awaiting.remove(subject);
        }
    }

    /// These subjects are gone from the broker: the "count 0" records they held back go out at
    /// the next tick.
    pub fn on_unsubscribed(&mut self, subjects: &[String]) {
        for subject in subjects {
            self.unsubscribing.remove(subject);
        }
    }

    /// The node is stopping: its whole state goes (an empty snapshot at the next tick), so
    /// the other nodes see its users leave at once instead of after `node_ttl`.
    pub fn leave(&mut self) {
        self.users.clear();
        self.rooms.clear();
        self.dirty_users.clear();
        self.dirty_rooms.clear();
        self.snapshot_due = true;
    }

    /// Whether the broker delivers messages for `user` to this node: its subject is subscribed
    /// and confirmed (a connection's `101` waits for this, so that no other node answers 404
    /// for a user it can already see connected).
    pub fn user_reachable(&self, user: &str) -> bool {
        self.users.contains_key(user) && !self.held_back(&self.subjects.user(user))
    }

    /// Whether the broker delivers messages for `room` to this node (as [`Core::user_reachable`]).
    pub fn room_reachable(&self, room: &str) -> bool {
        self.rooms.contains_key(room) && !self.held_back(&self.subjects.room(room))
    }

    /// Whether this node's own record of `user` or `room` subject waits for its subscription.
    fn held_back(&self, subject: &str) -> bool {
        (!self.awaiting.is_empty() && self.awaiting.contains(subject))
            || (!self.unsubscribing.is_empty() && self.unsubscribing.contains_key(subject))
    }

    fn resync(&mut self, effects: &mut Effects) {
        let header = Header::SyncReq { origin: self.node.clone(), epoch: self.epoch, target: String::new() };
        self.publish_dir(&header, effects);
        self.snapshot_due = true;
        self.next_beat = None;
    }

    /// This node now holds `count` connections of `user` (0 = none): subscribes or unsubscribes
    /// its subject on the 0↔1 transition; the record goes out at the next tick.
    pub fn set_user(&mut self, user: &str, count: u32) -> Effects {
        let mut effects = Effects::default();
        let old =
            if count == 0 { self.users.remove(user) } else { self.users.insert(user.to_string(), count) };
        let before = Record::User { user: user.to_string(), count: old.unwrap_or(0) };
        self.transition(self.subjects.user(user), before, count, &mut effects);
        if old.unwrap_or(0) != count {
            self.dirty_users.insert(user.to_string());
        }
        effects
    }

    /// This node now holds `count` members of `room` (0 = none); as [`Core::set_user`].
    pub fn set_room(&mut self, room: &str, count: u32) -> Effects {
        let mut effects = Effects::default();
        let old =
            if count == 0 { self.rooms.remove(room) } else { self.rooms.insert(room.to_string(), count) };
        let before = Record::Room { room: room.to_string(), count: old.unwrap_or(0) };
        self.transition(self.subjects.room(room), before, count, &mut effects);
        if old.unwrap_or(0) != count {
            self.dirty_rooms.insert(room.to_string());
        }
        effects
    }

    /// Subscribes on 0 → n, unsubscribes on n → 0, at once; the records wait for the broker's
    /// confirmation (see `awaiting`, `unsubscribing`).
    fn transition(&mut self, subject: String, before: Record, new: u32, effects: &mut Effects) {
        let old = match &before {
            Record::User { count, .. } | Record::Room { count, .. } => *count,
        };
        if old == 0 && new > 0 {
            self.unsubscribing.remove(&subject);
            self.awaiting.insert(subject.clone());
            effects.actions.push(Action::Subscribe(vec![subject]));
        } else if old > 0 && new == 0 {
            self.awaiting.remove(&subject);
            self.unsubscribing.insert(subject.clone(), before);
            effects.actions.push(Action::Unsubscribe(vec![subject]));
        }
    }

    /// A [`Header::Deliver`] message carrying `frame`, to publish on a user, room or `all` subject.
    pub fn deliver_payload(&self, frame: &[u8]) -> Bytes {
        let header = Header::Deliver { origin: self.node.clone(), epoch: self.epoch };
        wire::encode(&header, frame).unwrap_or_default()
    }

    /// Whether this node holds connections of `user` (as its shards last said).
    pub fn holds(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// A [`Header::Presence`] message, to publish on the `all` subject.
    pub fn presence_payload(&self, presence: RemotePresence) -> Bytes {
        let RemotePresence { user, status, context, since_ms, info, rooms } = presence;
        let header = Header::Presence {
            origin: self.node.clone(),
            epoch: self.epoch,
            user,
            status,
            context,
            since_ms,
            info,
            rooms,
        };
        wire::encode(&header, &[]).unwrap_or_default()
    }

    /// A [`Header::MembersReq`] message, to publish on the room's subject.
    pub fn members_request_payload(&self, id: u64, room: &str) -> Bytes {
        let header =
            Header::MembersReq { origin: self.node.clone(), epoch: self.epoch, id, room: room.to_string() };
        wire::encode(&header, &[]).unwrap_or_default()
    }

    /// A [`Header::Members`] message, to publish on the asking node's subject.
    pub fn members_payload(&self, id: u64, users: &[i64]) -> Bytes {
        let header = Header::Members { origin: self.node.clone(), epoch: self.epoch, id };
        let body: Vec<u8> = users.iter().flat_map(|u| u.to_le_bytes()).collect();
        wire::encode(&header, &body).unwrap_or_default()
    }

    /// A [`Header::Evict`] message, to publish on the user's subject.
    pub fn evict_payload(&self, user: i64, before_ms: u64, count: u32) -> Bytes {
        let header = Header::Evict { origin: self.node.clone(), epoch: self.epoch, user, before_ms, count };
        wire::encode(&header, &[]).unwrap_or_default()
    }

    /// A [`Header::Disconnect`] message for `user`, to publish on the user's subject.
    pub fn disconnect_payload(&self, user: i64) -> Bytes {
        let header = Header::Disconnect { origin: self.node.clone(), epoch: self.epoch, user };
        wire::encode(&header, &[]).unwrap_or_default()
    }

    /// A [`Header::Await`] message, to publish on the subject of a node holding `user`.
    #[allow(clippy::too_many_arguments)]
    pub fn await_payload(
        &self,
        id: u64,
        user: i64,
        request: bool,
        timeout_ms: u64,
        kind: &str,
        from: Option<i64>,
        payload: &[u8],
    ) -> Bytes {
        let header = Header::Await {
            origin: self.node.clone(),
            epoch: self.epoch,
            id,
            user,
            request,
            timeout_ms,
            kind: kind.to_string(),
            from,
        };
        wire::encode(&header, payload).unwrap_or_default()
    }

    /// A [`Header::AwaitDone`] message, to publish on the asking node's subject.
    pub fn await_done_payload(&self, id: u64, outcome: AwaitOutcome) -> Bytes {
        let header = Header::AwaitDone { origin: self.node.clone(), epoch: self.epoch, id, outcome };
        wire::encode(&header, &[]).unwrap_or_default()
    }

    /// A [`Header::DeliverExcept`] message carrying `frame`, to publish on the `all` subject.
    pub fn broadcast_payload(&self, frame: &[u8], exclude: &[i64]) -> Bytes {
        let header =
            Header::DeliverExcept { origin: self.node.clone(), epoch: self.epoch, exclude: exclude.to_vec() };
        wire::encode(&header, frame).unwrap_or_default()
    }

    /// delivered / 404 / 503 for a send to `user` whose publish was received by `receivers`
    /// nodes (or failed).
    pub fn decide(&self, user: &str, receivers: Result<u32, BrokerError>) -> Delivery {
        decide(receivers, self.view.holders(user))
    }

    /// A message from the broker.
    pub fn on_message(&mut self, now: Instant, subject: &str, payload: Bytes) -> Effects {
        let mut effects = Effects::default();
        let Ok(message) = wire::decode(payload) else {
            effects.bad_messages += 1;
            return effects;
        };
        let (origin, epoch) = message.header.origin();
        if origin == self.node {
            effects.duplicate = epoch != self.epoch;
            return effects;
        }
        let origin = origin.to_string();
        let sync = match message.header {
            Header::Heartbeat { epoch, seq, .. } => {
                self.view.heartbeat(now, &origin, epoch, seq, &mut effects.changes)
            }
            Header::Records { epoch, seq, full, end, records, .. } => {
                self.view.records(now, &origin, epoch, seq, full, end, records, &mut effects.changes)
            }
            Header::SyncReq { target, .. } => {
                if target.is_empty() || target == self.node {
                    self.snapshot_due = true;
                }
                false
            }
            Header::Deliver { .. } => {
                effects.deliveries.push((subject.to_string(), message.body));
                false
            }
            Header::DeliverExcept { exclude, .. } => {
                effects.broadcasts.push((exclude, message.body));
                false
            }
            Header::Disconnect { user, .. } => {
                effects.disconnects.push(user);
                false
            }
            Header::Evict { user, before_ms, count, .. } => {
                effects.evictions.push((user, before_ms, count));
                false
            }
            Header::MembersReq { id, room, .. } => {
                effects.member_requests.push((origin.clone(), id, room));
                false
            }
            Header::Members { id, .. } => {
                let users = message
                    .body
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                    .collect();
                effects.members.push((id, users));
                false
            }
            Header::Presence { user, status, context, since_ms, info, rooms, .. } => {
                effects.presences.push(RemotePresence { user, status, context, since_ms, info, rooms });
                false
            }
            Header::Await { id, user, request, timeout_ms, kind, from, .. } => {
                effects.awaits.push(RemoteAwait {
                    origin: origin.clone(),
                    id,
                    user,
                    request,
                    timeout_ms,
                    kind,
                    from,
                    payload: message.body,
                });
                false
            }
            Header::AwaitDone { id, outcome, .. } => {
                effects.await_done.push((id, outcome));
                false
            }
        };
        if sync {
            let header = Header::SyncReq { origin: self.node.clone(), epoch: self.epoch, target: origin };
            self.publish_dir(&header, &mut effects);
        }
        effects
    }

    /// Time passes: expire silent nodes, publish pending records (or a snapshot), heartbeat.
    pub fn tick(&mut self, now: Instant) -> Effects {
        let mut effects = Effects::default();
        self.view.expire(now, &mut effects.changes);
        let records = if self.snapshot_due {
            self.dirty_users.clear();
            self.dirty_rooms.clear();
            let mut all: Vec<Record> = Vec::with_capacity(self.users.len() + self.rooms.len());
            for (user, &count) in &self.users {
                if self.held_back(&self.subjects.user(user)) {
                    self.dirty_users.insert(user.clone());
                } else {
                    all.push(Record::User { user: user.clone(), count });
                }
            }
            for (room, &count) in &self.rooms {
                if self.held_back(&self.subjects.room(room)) {
                    self.dirty_rooms.insert(room.clone());
                } else {
                    all.push(Record::Room { room: room.clone(), count });
                }
            }
            // Being left, not confirmed yet: still reported as they were.
            for record in self.unsubscribing.values() {
                match record {
                    Record::User { user, .. } => self.dirty_users.insert(user.clone()),
                    Record::Room { room, .. } => self.dirty_rooms.insert(room.clone()),
                };
                all.push(record.clone());
            }
            Some((true, all))
        } else if !self.dirty_users.is_empty() || !self.dirty_rooms.is_empty() {
            let mut changed: Vec<Record> = Vec::new();
            let mut kept_users = BTreeSet::new();
            for user in std::mem::take(&mut self.dirty_users) {
                if self.held_back(&self.subjects.user(&user)) {
                    kept_users.insert(user);
                    continue;
                }
                let count = self.users.get(&user).copied().unwrap_or(0);
                changed.push(Record::User { user, count });
            }
            let mut kept_rooms = BTreeSet::new();
            for room in std::mem::take(&mut self.dirty_rooms) {
                if self.held_back(&self.subjects.room(&room)) {
                    kept_rooms.insert(room);
                    continue;
                }
                let count = self.rooms.get(&room).copied().unwrap_or(0);
                changed.push(Record::Room { room, count });
            }
            self.dirty_users = kept_users;
            self.dirty_rooms = kept_rooms;
            if changed.is_empty() { None } else { Some((false, changed)) }
        } else {
            None
        };
        if let Some((full, records)) = records {
            self.snapshot_due = false;
            for header in wire::records_messages(&self.node, self.epoch, &mut self.seq, full, records) {
                self.publish_dir(&header, &mut effects);
            }
        }
        if self.next_beat.is_none_or(|at| now >= at) {
            self.next_beat = Some(now + self.heartbeat);
            let header = Header::Heartbeat { origin: self.node.clone(), epoch: self.epoch, seq: self.seq };
            self.publish_dir(&header, &mut effects);
        }
        effects
    }

    fn publish_dir(&self, header: &Header, effects: &mut Effects) {
        if let Ok(payload) = wire::encode(header, &[]) {
            effects.actions.push(Action::Publish { subject: self.subjects.dir(), payload });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::broker::{Broker, Event};
    use crate::cluster::memory::{Hub, MemoryBroker};
    use crossbeam_channel::Receiver;

    struct Node {
        core: Core,
        broker: Option<MemoryBroker>,
        events: Receiver<Event>,
        changes: Vec<Change>,
        deliveries: Vec<(String, Bytes)>,
        receivers: Vec<(u64, u32)>,
    }

    impl Node {
        fn new(hub: &Hub, name: &str) -> Node {
            let (tx, events) = crossbeam_channel::unbounded();
            let config = CoreConfig::new("t", name, Duration::from_millis(100), Duration::from_millis(300));
            let mut node = Node {
                core: Core::new(config),
                broker: Some(hub.connect(tx)),
                events,
                changes: Vec::new(),
                deliveries: Vec::new(),
                receivers: Vec::new(),
            };
            let effects = node.core.start();
            node.run(effects);
            node
        }

        fn run(&mut self, effects: Effects) {
            self.changes.extend(effects.changes);
            self.deliveries.extend(effects.deliveries);
            let Some(broker) = &self.broker else { return };
            for action in effects.actions {
                match action {
                    Action::Publish { subject, payload } => {
                        let _ = broker.publish(&subject, payload, None);
                    }
                    Action::Subscribe(s) => broker.subscribe(s),
                    Action::Unsubscribe(s) => broker.unsubscribe(s),
                }
            }
        }

        fn pump(&mut self, now: Instant) {
            let effects = self.core.tick(now);
            self.run(effects);
            while let Ok(event) = self.events.try_recv() {
                let effects = match event {
                    Event::Message { subject, payload } => self.core.on_message(now, &subject, payload),
                    Event::Receivers { token, n } => {
                        self.receivers.push((token, n));
                        continue;
                    }
                    Event::Resubscribed(_) => self.core.on_resubscribed(),
                    Event::Subscribed(subjects) => {
                        self.core.on_subscribed(&subjects);
                        continue;
                    }
                    Event::Unsubscribed(subjects) => {
                        self.core.on_unsubscribed(&subjects);
                        continue;
                    }
                    _ => continue,
                };
                self.run(effects);
            }
        }
    }

    fn pump_all(nodes: &mut [&mut Node], now: Instant) {
        for _ in 0..3 {
            for node in nodes.iter_mut() {
                node.pump(now);
            }
        }
    }

    #[test]
    fn nodes_see_each_others_users_and_a_silent_node_expires() {
        let hub = Hub::new();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut a = Node::new(&hub, "a");
        let mut b = Node::new(&hub, "b");
        let effects = a.core.set_user("42", 1);
        a.run(effects);
        let effects = a.core.set_room("lobby", 2);
        a.run(effects);
        pump_all(&mut [&mut a, &mut b], ms(0));
        assert!(b.changes.contains(&Change::Online("42".into())), "{:?}", b.changes);
        assert!(b.changes.contains(&Change::RoomCount { room: "lobby".into(), count: 2 }));
        assert_eq!(b.core.view().holders("42"), 1);
        // A user subject publish reaches a, and the receiver count says so; nobody holds 7.
        let frame = b.core.deliver_payload(b"\x81\x02hi");
        let broker = b.broker.as_ref().unwrap();
        broker.publish(&b.core.subjects().user("42"), frame.clone(), Some(1)).unwrap();
        broker.publish(&b.core.subjects().user("7"), frame, Some(2)).unwrap();
        pump_all(&mut [&mut a, &mut b], ms(10));
        assert_eq!(a.deliveries, [("t.u.42".to_string(), Bytes::from_static(b"\x81\x02hi"))]);
        assert_eq!(b.receivers, [(1, 1), (2, 0)]);
        assert_eq!(b.core.decide("42", Ok(1)), Delivery::Delivered);
        assert_eq!(b.core.decide("7", Ok(0)), Delivery::NotFound);
        // a is killed: its subscriptions vanish at once (0 receivers while the view still lists
        // it → 503, not 404), and it goes offline on b after the TTL.
        a.broker = None;
        b.changes.clear();
        let mut t = 20;
        while !b.changes.contains(&Change::Offline("42".into())) {
            assert_eq!(b.core.decide("42", Ok(0)), Delivery::Unavailable);
            t += 10;
            assert!(t < 500, "offline within the TTL");
            b.pump(ms(t));
        }
        assert!(t > 300, "not before the TTL ({t} ms)");
        assert!(b.changes.contains(&Change::RoomCount { room: "lobby".into(), count: 0 }));
        assert_eq!(b.core.decide("42", Ok(0)), Delivery::NotFound);
    }

    #[test]
    fn a_late_joiner_gets_a_snapshot_and_a_leaving_user_goes_offline() {
        let hub = Hub::new();
        let t0 = Instant::now();
        let mut a = Node::new(&hub, "a");
        for user in 0..300 {
            let effects = a.core.set_user(&user.to_string(), 1);
            a.run(effects);
        }
        pump_all(&mut [&mut a], t0);
        let mut b = Node::new(&hub, "b");
        pump_all(&mut [&mut a, &mut b], t0);
        let online = b.changes.iter().filter(|c| matches!(c, Change::Online(_))).count();
        assert_eq!(online, 300);
        b.changes.clear();
        // Leaving: the unsubscribe goes out at once, the record (count 0) only once the broker
        // confirms it (no node that saw 5 leave can still reach a here); a return meanwhile
        // subscribes again.
        let effects = a.core.set_user("5", 0);
        assert_eq!(effects.actions, [Action::Unsubscribe(vec!["t.u.5".into()])]);
        let gone = Record::User { user: "5".into(), count: 0 };
        assert!(!published_users(&a.core.tick(t0 + Duration::from_millis(30))).contains(&gone));
        a.run(effects);
        let effects = a.core.set_user("6", 0);
        a.run(effects);
        let effects = a.core.set_user("6", 1);
        assert_eq!(effects.actions, [Action::Subscribe(vec!["t.u.6".into()])]);
        a.run(effects);
        pump_all(&mut [&mut a, &mut b], t0 + Duration::from_millis(50));
        assert_eq!(b.changes, [Change::Offline("5".into())]);
        // The hub restarts: both resync, and the snapshots change nothing on b.
        b.changes.clear();
        hub.set_up(false);
        hub.set_up(true);
        pump_all(&mut [&mut a, &mut b], t0 + Duration::from_millis(100));
        assert!(b.changes.is_empty(), "{:?}", b.changes);
        assert_eq!(b.core.view().holders("6"), 1);
    }

    /// The user records a tick publishes.
    fn published_users(effects: &Effects) -> Vec<Record> {
        let mut out = Vec::new();
        for action in &effects.actions {
            if let Action::Publish { payload, .. } = action
                && let Ok(message) = wire::decode(payload.clone())
                && let Header::Records { records, .. } = message.header
            {
                out.extend(records.into_iter().filter(|r| matches!(r, Record::User { .. })));
            }
        }
        out
    }

    #[test]
    fn a_users_record_waits_until_its_subscription_is_in_place() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut core =
            Core::new(CoreConfig::new("t", "a", Duration::from_millis(100), Duration::from_millis(300)));
        let _ = core.start();
        let _ = core.on_resubscribed();
        let _ = core.tick(ms(0));
        let effects = core.set_user("42", 1);
        assert_eq!(effects.actions, [Action::Subscribe(vec!["t.u.42".into()])]);
        // Not confirmed yet: no node may learn that we hold 42 (it would send and get 0
        // receivers), neither in a change nor in a snapshot asked meanwhile.
        assert!(published_users(&core.tick(ms(10))).is_empty());
        let _ = core.on_message(
            ms(15),
            "t.dir",
            wire::encode(&Header::SyncReq { origin: "b".into(), epoch: 1, target: String::new() }, b"")
                .unwrap(),
        );
        assert!(published_users(&core.tick(ms(20))).is_empty());
        core.on_subscribed(&["t.u.42".into()]);
        assert_eq!(published_users(&core.tick(ms(30))), [Record::User { user: "42".into(), count: 1 }]);
        // A resubscription (broker back) confirms everything at once.
        let _ = core.set_user("7", 2);
        let _ = core.on_resubscribed();
        assert!(published_users(&core.tick(ms(40))).contains(&Record::User { user: "7".into(), count: 2 }));
    }

    #[test]
    fn garbage_and_own_messages_are_dropped() {
        let mut core = Core::new(CoreConfig::new("t", "a", Duration::from_secs(1), Duration::from_secs(3)));
        let effects = core.on_message(Instant::now(), "t.dir", Bytes::from_static(b"\x07junk"));
        assert_eq!(effects.bad_messages, 1);
        let own = core.deliver_payload(b"x");
        let effects = core.on_message(Instant::now(), "t.all", own);
        assert!(effects.deliveries.is_empty() && effects.actions.is_empty());
    }
}

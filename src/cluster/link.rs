//! The broker link thread: one per node, the only thread that talks to the cluster's broker
//! on the node's behalf. It owns the [`Broker`] and the sans-IO [`Core`], takes what the shards
//! and the handle hand over ([`LinkMsg`], through the route layer's [`ClusterTx`](crate::route::cluster::ClusterTx)), what the
//! broker reports ([`Event`]) and the time, and delivers what other nodes sent into the shards'
//! inboxes ([`ClusterMsg`] and the ordinary delivery messages). Shards never block on it: data
//! messages go through a bounded queue that refuses (503) when full or while the broker is
//! down.
//!
//! Answers to a cross-node P2P (`delivered` / 404 / 503) come from the broker's receiver count
//! for the user's subject (Redis `PUBLISH`'s reply, NATS request / "no responders") and the
//! view: nobody received it and no live node holds the user → 404; nobody received it but the
//! view lists a holder (a node killed and not yet expired, or resubscribing) → 503; the broker
//! failed or said nothing within `cluster_timeout` → 503.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, select};

use super::broker::{Broker, BrokerConfig, BrokerError, Event};
use super::core::{Action, Core, CoreConfig, Effects};
use super::subjects::Target;
use super::view::{Change, Delivery};
use super::wire::AwaitOutcome;
use crate::config::Config;
use crate::core::Directory;
use crate::core::directory::ConnAddr;
use crate::core::pending::WaitKind;
use crate::protocol::envelope::{error_notification, server_ack};
use crate::route::cluster::{ClusterRx, LinkMsg, P2pReply, Reach};
use crate::route::msg::{ClusterMsg, DeliverMsg, OpMsg};
use crate::route::{AckReply, ClientReply, Completion, Fabric, OutMessage, Outcome, WaitError};

/// How often the link flushes state records, checks heartbeats and expires answers.
const TICK: Duration = Duration::from_millis(10);
/// Broker events that may wait for the link before the engine's IO thread blocks (and the
/// broker's own limits — Redis's pubsub output buffer, NATS's slow consumer — cut us off).
const EVENTS: usize = 65_536;
/// Data messages that may wait in the link's queue (besides the byte bound).
pub const DATA_SLOTS: usize = 65_536;

/// A running link thread.
#[derive(Debug)]
pub struct LinkThread {
    thread: Option<JoinHandle<()>>,
}

impl LinkThread {
    /// Waits for the thread to end (after [`LinkMsg::Shutdown`]).
    pub fn join(&mut self) {
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the cluster link thread panicked");
        }
    }
}

/// Connects to the broker (in the background) and starts the link thread for node `node`.
pub fn start(
    config: &Config,
    node: &str,
    fabric: Arc<Fabric>,
    rx: ClusterRx,
) -> Result<LinkThread, BrokerError> {
    let broker_config = BrokerConfig::from_config(config, node)
        .ok_or_else(|| BrokerError::Config("cluster is not set".to_string()))?;
    let (events_tx, events) = crossbeam_channel::bounded(EVENTS);
    let broker = super::connect(&broker_config, events_tx)?;
    let core = Core::new(CoreConfig::new(
        &config.cluster_prefix,
        node,
        config.cluster_heartbeat,
        config.cluster_node_ttl,
    ));
    let (outcomes_tx, outcomes) = crossbeam_channel::unbounded();
    let mut link = Link {
        ready: Vec::new(),
        gathers: HashMap::new(),
        gather_deadlines: VecDeque::new(),
        collecting: HashMap::new(),
        outcomes_tx,
        outcomes,
        serving: HashMap::new(),
        next_serving: 0,
        waiting: HashMap::new(),
        wait_deadlines: VecDeque::new(),
        next_wait: 0,
        core,
        broker,
        events,
        rx,
        fabric,
        pending: HashMap::new(),
        deadlines: VecDeque::new(),
        next_token: 0,
        room_counts: HashMap::new(),
        timeout: config.cluster_timeout,
        inbox_max: config.inbox_max_bytes as u64,
        per_user: config.connections_per_user,
        max_pending: config.cluster_max_pending.max(1),
    };
    let thread = std::thread::Builder::new()
        .name("customws-cluster".to_string())
        .spawn(move || link.run())
        .map_err(|e| BrokerError::Config(format!("cannot start the cluster link thread: {e}")))?;
    Ok(LinkThread { thread: Some(thread) })
}

/// A P2P waiting for the broker's receiver count.
#[derive(Debug)]
struct Pending {
    user: i64,
    reply: P2pReply,
}

/// A room member gather this node started: what arrived so far, and how many nodes are
/// still to answer.
struct Gather {
    done: GatherReply,
    users: Vec<i64>,
    left: usize,
}

/// Who gets a gather's members.
enum GatherReply {
    /// The handle (or the API): `Members` with every id that arrived.
    Handle(Completion),
    /// A shard's `room_presence` roster: ids above `after`, at most `limit`, sorted.
    Roster { shard: crate::core::directory::ShardId, roster: u32, after: i64, limit: u32 },
}

/// Another node's member gather, collected here from every shard.
struct Collect {
    origin: String,
    id: u64,
    users: Vec<i64>,
    left: usize,
}

/// A wait this node asked another node to carry out.
struct Waiting {
    done: Completion,
    node: String,
}

struct Link {
    /// Connections whose `101` waits until the broker reaches their user here, with the
    /// instant they stop waiting regardless (`cluster_timeout`).
    ready: Vec<(Reach, ConnAddr, Instant)>,
    /// Member gathers started here, by id (ids shared with `waiting`).
    gathers: HashMap<u64, Gather>,
    gather_deadlines: VecDeque<(Instant, u64)>,
    /// Member gathers collected here for other nodes, by tag (tags shared with `serving`).
    collecting: HashMap<u64, Collect>,
    /// Completions of waits this node carries out for other nodes report here.
    outcomes_tx: Sender<(u64, Outcome)>,
    outcomes: Receiver<(u64, Outcome)>,
    /// Waits carried out here for another node: tag → (asking node, its id).
    serving: HashMap<u64, (String, u64)>,
    next_serving: u64,
    /// Waits carried out by another node for a caller here, by id.
    waiting: HashMap<u64, Waiting>,
    wait_deadlines: VecDeque<(Instant, u64)>,
    next_wait: u64,
    core: Core,
    broker: Box<dyn Broker>,
    events: Receiver<Event>,
    rx: ClusterRx,
    fabric: Arc<Fabric>,
    pending: HashMap<u64, Pending>,
    /// Tokens in the order they were sent, with their deadline.
    deadlines: VecDeque<(Instant, u64)>,
    next_token: u64,
    /// Members of each room on each shard of this node.
    room_counts: HashMap<Arc<str>, Vec<u32>>,
    timeout: Duration,
    /// `inbox_max_bytes`: deliveries from other nodes beyond it are shed.
    inbox_max: u64,
    /// `connections_per_user` (0: no limit).
    per_user: usize,
    max_pending: usize,
}

impl Link {
    fn run(&mut self) {
        let effects = self.core.start();
        self.apply(effects);
        let mut next_tick = Instant::now() + TICK;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            select! {
                recv(self.rx.state_rx) -> msg => match msg {
                    Ok(LinkMsg::Shutdown) | Err(_) => break,
                    Ok(msg) => self.on_link_msg(msg),
                },
                recv(self.rx.data_rx) -> msg => if let Ok(msg) = msg {
                    self.rx.taken(&msg);
                    self.on_link_msg(msg);
                },
                recv(self.events) -> event => if let Ok(event) = event {
                    self.on_event(event);
                },
                recv(self.outcomes) -> outcome => if let Ok((tag, outcome)) = outcome {
                    self.served(tag, outcome);
                },
                default(wait) => {}
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                let effects = self.core.tick(now);
                self.apply(effects);
                self.expire_answers(now);
                self.release_ready(now);
            }
        }
        self.goodbye();
    }

    /// Publishes an empty snapshot, so the other nodes see this node's users leave at once,
    /// and gives the engine a bounded moment to write it.
    fn goodbye(&mut self) {
        self.core.leave();
        let effects = self.core.tick(Instant::now());
        self.apply(effects);
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.broker.is_up() && self.broker.stats().backlog_bytes > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for (_, pending) in std::mem::take(&mut self.pending) {
            self.answer(&pending.reply, Delivery::Unavailable, pending.user);
        }
        self.fail_waits(|_| true, WaitError::ShuttingDown);
        self.finish_gathers();
    }

    /// Completes every member gather with what arrived (the broker went away, or we stop).
    fn finish_gathers(&mut self) {
        for (_, gather) in std::mem::take(&mut self.gathers) {
            self.finish_gather(gather);
        }
        self.gather_deadlines.clear();
    }

    /// Fails the waits on other nodes that `which` selects.
    fn fail_waits(&mut self, which: impl Fn(&Waiting) -> bool, error: WaitError) {
        let ids: Vec<u64> = self.waiting.iter().filter(|(_, w)| which(w)).map(|(id, _)| *id).collect();
        for id in ids {
            if let Some(waiting) = self.waiting.remove(&id) {
                waiting.done.complete(Outcome::Failed(error));
            }
        }
    }

    /// A caller here waits for `user`'s client, whose connection is on another node: the
    /// message goes to one node holding the user, which runs the wait and answers.
    fn await_elsewhere(
        &mut self,
        user: i64,
        msg: &OutMessage,
        kind: WaitKind,
        timeout_ms: u64,
        done: Completion,
    ) {
        if done.same_channel(&self.outcomes_tx) {
            // A wait another node asked us for, and the user has just left this node.
            done.complete(Outcome::Failed(WaitError::Offline));
            return;
        }
        let name = user.to_string();
        let Some(node) = self.core.view().holder_nodes(&name).first().map(|n| n.to_string()) else {
            done.complete(Outcome::Failed(WaitError::Offline));
            return;
        };
        if self.waiting.len() >= self.max_pending {
            done.complete(Outcome::Failed(WaitError::Unavailable));
            return;
        }
        self.next_wait += 1;
        let id = self.next_wait;
        let payload = msg.payload.as_ref().map_or(&b""[..], |p| p.get().as_bytes());
        let request = kind == WaitKind::Request;
        let body =
            self.core.await_payload(id, user, request, timeout_ms, &msg.kind, msg.from_user_id, payload);
        let subject = self.core.subjects().node(&node);
        if self.broker.publish(&subject, body, None).is_err() {
            done.complete(Outcome::Failed(WaitError::Unavailable));
            return;
        }
        self.state().published_total.fetch_add(1, Ordering::Relaxed);
        self.waiting.insert(id, Waiting { done, node });
        let deadline = Instant::now() + Duration::from_millis(timeout_ms) + self.timeout;
        self.wait_deadlines.push_back((deadline, id));
    }

    /// Another node asks us to run a wait on `user`'s connection here.
    fn serve_await(&mut self, ask: super::core::RemoteAwait) {
        let reply = |link: &Self, outcome: AwaitOutcome| {
            let body = link.core.await_done_payload(ask.id, outcome);
            link.publish(&link.core.subjects().node(&ask.origin), body);
        };
        if !self.core.holds(&ask.user.to_string()) {
            return reply(self, AwaitOutcome::Offline);
        }
        if self.serving.len() >= self.max_pending {
            return reply(self, AwaitOutcome::Unavailable);
        }
        let payload = if ask.payload.is_empty() {
            None
        } else {
            match std::str::from_utf8(&ask.payload)
                .ok()
                .and_then(|p| serde_json::value::RawValue::from_string(p.to_string()).ok())
            {
                Some(raw) => Some(raw),
                None => return reply(self, AwaitOutcome::Closed),
            }
        };
        let msg = OutMessage { kind: ask.kind.clone(), payload, from_user_id: ask.from };
        self.next_serving += 1;
        let tag = self.next_serving;
        self.serving.insert(tag, (ask.origin.clone(), ask.id));
        let done = Completion::new(self.outcomes_tx.clone(), tag, None);
        let kind = if ask.request { WaitKind::Request } else { WaitKind::Ack };
        let home = Directory::home_of(ask.user, self.fabric.links.len());
        let msg = OpMsg::Await { user: ask.user, msg: Arc::new(msg), kind, timeout_ms: ask.timeout_ms, done };
        self.fabric.links[home].send_now(msg);
    }

    /// The handle (or a shard's roster) asks for `room`'s members on the other nodes.
    fn gather_members(&mut self, room: &str, done: GatherReply) {
        let nodes = self.core.view().room_nodes(room);
        if nodes == 0 || self.gathers.len() >= self.max_pending {
            self.finish_gather(Gather { done, users: Vec::new(), left: 0 });
            return;
        }
        self.next_wait += 1;
        let id = self.next_wait;
        let payload = self.core.members_request_payload(id, room);
        let subject = self.core.subjects().room(room);
        if self.broker.publish(&subject, payload, None).is_err() {
            self.finish_gather(Gather { done, users: Vec::new(), left: 0 });
            return;
        }
        self.state().published_total.fetch_add(1, Ordering::Relaxed);
        self.gathers.insert(id, Gather { done, users: Vec::new(), left: nodes });
        self.gather_deadlines.push_back((Instant::now() + self.timeout, id));
    }

    /// Hands a gather's members to whoever asked.
    fn finish_gather(&self, gather: Gather) {
        match gather.done {
            GatherReply::Handle(done) => done.complete(Outcome::Members(gather.users)),
            GatherReply::Roster { shard, roster, after, limit } => {
                let mut users = gather.users;
                users.retain(|&user| user > after);
                users.sort_unstable();
                users.dedup();
                users.truncate(limit as usize);
                if let Some(link) = self.fabric.links.get(shard) {
                    link.send_now(crate::route::msg::RoomMsg::RosterPart { roster, users });
                }
            }
        }
    }

    /// One node's members for gather `id`.
    fn members_arrived(&mut self, id: u64, users: Vec<i64>) {
        let Some(gather) = self.gathers.get_mut(&id) else { return };
        gather.users.extend(users);
        gather.left = gather.left.saturating_sub(1);
        if gather.left == 0
            && let Some(gather) = self.gathers.remove(&id)
        {
            self.finish_gather(gather);
        }
    }

    /// Another node asks for this node's members of `room`: every shard lists its own.
    fn collect_members(&mut self, origin: String, id: u64, room: &str) {
        if self.collecting.len() >= self.max_pending {
            let body = self.core.members_payload(id, &[]);
            return self.publish(&self.core.subjects().node(&origin), body);
        }
        self.next_serving += 1;
        let tag = self.next_serving;
        let shards = self.fabric.links.len();
        self.collecting.insert(tag, Collect { origin, id, users: Vec::new(), left: shards });
        let room: Arc<str> = Arc::from(room);
        for link in &self.fabric.links {
            let done = Completion::new(self.outcomes_tx.clone(), tag, None);
            link.send_now(crate::route::msg::RoomMsg::RoomMembers { room: Arc::clone(&room), done });
        }
    }

    /// A wait run here for another node ended: tell that node.
    fn served(&mut self, tag: u64, outcome: Outcome) {
        if let Some(collect) = self.collecting.get_mut(&tag) {
            if let Outcome::Members(users) = outcome {
                collect.users.extend(users);
            }
            collect.left = collect.left.saturating_sub(1);
            if collect.left == 0
                && let Some(collect) = self.collecting.remove(&tag)
            {
                let body = self.core.members_payload(collect.id, &collect.users);
                self.publish(&self.core.subjects().node(&collect.origin), body);
            }
            return;
        }
        let Some((origin, id)) = self.serving.remove(&tag) else { return };
        let outcome = match outcome {
            Outcome::Ack(AckReply { status, error }) => {
                AwaitOutcome::Ack { status, error: error.map(|e| e.to_string()) }
            }
            Outcome::Reply(ClientReply { raw }) => AwaitOutcome::Reply(raw),
            Outcome::Failed(WaitError::TimedOut) => AwaitOutcome::TimedOut,
            Outcome::Failed(WaitError::Offline) => AwaitOutcome::Offline,
            Outcome::Failed(WaitError::ShuttingDown) => AwaitOutcome::ShuttingDown,
            Outcome::Failed(WaitError::Unavailable) => AwaitOutcome::Unavailable,
            _ => AwaitOutcome::Closed,
        };
        let body = self.core.await_done_payload(id, outcome);
        self.publish(&self.core.subjects().node(&origin), body);
    }

    /// Another node answers a wait asked from here.
    fn await_done(&mut self, id: u64, outcome: AwaitOutcome) {
        let Some(waiting) = self.waiting.remove(&id) else { return };
        let outcome = match outcome {
            AwaitOutcome::Ack { status, error } => {
                Outcome::Ack(AckReply { status, error: error.and_then(|e| serde_json::from_str(&e).ok()) })
            }
            AwaitOutcome::Reply(raw) => Outcome::Reply(ClientReply { raw }),
            AwaitOutcome::TimedOut => Outcome::Failed(WaitError::TimedOut),
            AwaitOutcome::Offline => Outcome::Failed(WaitError::Offline),
            AwaitOutcome::Closed => Outcome::Failed(WaitError::Closed),
            AwaitOutcome::ShuttingDown => Outcome::Failed(WaitError::ShuttingDown),
            AwaitOutcome::Unavailable => Outcome::Failed(WaitError::Unavailable),
        };
        waiting.done.complete(outcome);
    }

    /// Hands a delivery from another node to a shard, unless its inbox is over its bound
    /// (then it is dropped and counted, as a shard sheds client work).
    fn offer(&self, shard: usize, msg: impl Into<crate::route::ShardMsg>) {
        let link = &self.fabric.links[shard];
        if link.try_send(msg.into(), self.inbox_max).is_ok() {
            link.wake();
        } else {
            self.state().shed_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn state(&self) -> &crate::route::cluster::ClusterState {
        &self.rx.state
    }

    fn on_link_msg(&mut self, msg: LinkMsg) {
        match msg {
            LinkMsg::User { user, count } => {
                let effects = self.core.set_user(&user.to_string(), count);
                self.apply(effects);
            }
            LinkMsg::Ready { on, conn } => {
                // Only this one is checked now; the others wait for a confirmation (or the
                // broker's loss, or their deadline), so a reconnect storm costs no rescans.
                if !self.state().is_up() || reachable(&self.core, &on) {
                    self.ready_now(conn);
                } else {
                    self.ready.push((on, conn, Instant::now() + self.timeout));
                }
            }
            LinkMsg::RoomCount { room, shard, count } => {
                let shards = self.fabric.links.len();
                let counts = self.room_counts.entry(Arc::clone(&room)).or_insert_with(|| vec![0; shards]);
                if let Some(slot) = counts.get_mut(shard) {
                    *slot = count;
                }
                let total: u32 = counts.iter().sum();
                if total == 0 {
                    self.room_counts.remove(&room);
                }
                let effects = self.core.set_room(&room, total);
                self.apply(effects);
            }
            LinkMsg::ToUser { user, frame, reply } => self.send_to_user(user, &frame, reply),
            LinkMsg::Broadcast { frame, exclude } => {
                let payload = if exclude.is_empty() {
                    self.core.deliver_payload(&frame)
                } else {
                    self.core.broadcast_payload(&frame, &exclude)
                };
                let subject = self.core.subjects().all();
                self.publish(&subject, payload);
            }
            LinkMsg::Counted { room, frame, exclude, done } => {
                let view = self.core.view();
                let (subject, payload, reached) = match &room {
                    Some(room) => {
                        let reached = view.room_count(room);
                        (self.core.subjects().room(room), self.core.deliver_payload(&frame), reached)
                    }
                    None => {
                        let skipped: u64 =
                            exclude.iter().map(|u| view.user_connections(&u.to_string())).sum();
                        let reached = view.connections().saturating_sub(skipped);
                        let payload = if exclude.is_empty() {
                            self.core.deliver_payload(&frame)
                        } else {
                            self.core.broadcast_payload(&frame, &exclude)
                        };
                        (self.core.subjects().all(), payload, reached)
                    }
                };
                let reached = match self.broker.publish(&subject, payload, None) {
                    Ok(()) => {
                        self.state().published_total.fetch_add(1, Ordering::Relaxed);
                        reached as usize
                    }
                    Err(_) => {
                        self.state().count_unavailable();
                        0
                    }
                };
                done.complete(Outcome::Delivered(reached));
            }
            LinkMsg::Room { room, frame } => {
                let payload = self.core.deliver_payload(&frame);
                let subject = self.core.subjects().room(&room);
                self.publish(&subject, payload);
            }
            LinkMsg::Presence { user, presence, rooms } => {
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                let payload = self.core.presence_payload(super::core::RemotePresence {
                    user,
                    status: presence.status.to_string(),
                    context: presence.context.as_deref().map(text),
                    since_ms: presence.since_ms,
                    info: presence.info.as_deref().map(str::to_string),
                    rooms: rooms.iter().map(|r| r.to_string()).collect(),
                });
                let subject = self.core.subjects().all();
                self.publish(&subject, payload);
            }
            LinkMsg::Opened { user, at_ms, local } => {
                let name = user.to_string();
                let remote = self.core.view().user_connections(&name);
                let limit = self.per_user as u64;
                let excess = (u64::from(local) + remote).saturating_sub(limit).min(remote);
                if limit > 0 && excess > 0 {
                    let payload = self.core.evict_payload(user, at_ms, excess as u32);
                    let subject = self.core.subjects().user(&name);
                    self.publish(&subject, payload);
                }
            }
            LinkMsg::Disconnect { user, done } => {
                let name = user.to_string();
                let remote = self.core.view().user_connections(&name) as usize;
                if self.core.view().holders(&name) > 0 {
                    let payload = self.core.disconnect_payload(user);
                    let subject = self.core.subjects().user(&name);
                    self.publish(&subject, payload);
                }
                done.complete(Outcome::Delivered(remote));
            }
            LinkMsg::Await { user, msg, kind, timeout_ms, done } => {
                self.await_elsewhere(user, &msg, kind, timeout_ms, done)
            }
            LinkMsg::QueryUser { user, mut local, done } => {
                let remote = self.core.view().user_connections(&user.to_string());
                local.extend((0..remote).map(|_| crate::route::ConnInfo { shard: usize::MAX, seq: 0 }));
                done.complete(Outcome::User(local));
            }
            LinkMsg::RoomMembers { room, done } => self.gather_members(&room, GatherReply::Handle(done)),
            LinkMsg::RosterMembers { room, after, limit, reply_shard, roster } => {
                let done = GatherReply::Roster { shard: reply_shard, roster, after, limit };
                self.gather_members(&room, done);
            }
            LinkMsg::SendUser { user, frame, local, done } => {
                let name = user.to_string();
                let remote = self.core.view().user_connections(&name) as usize;
                let outcome = if remote == 0 {
                    Outcome::Delivered(local)
                } else {
                    let payload = self.core.deliver_payload(&frame);
                    let subject = self.core.subjects().user(&name);
                    match self.broker.publish(&subject, payload, None) {
                        Ok(()) => {
                            self.state().published_total.fetch_add(1, Ordering::Relaxed);
                            Outcome::Delivered(local + remote)
                        }
                        Err(_) if local > 0 => Outcome::Delivered(local),
                        Err(_) => {
                            self.state().count_unavailable();
                            Outcome::Failed(WaitError::Unavailable)
                        }
                    }
                };
                if let Some(done) = done {
                    done.complete(outcome);
                }
            }
            LinkMsg::Shutdown => {}
        }
    }

    fn publish(&self, subject: &str, payload: Bytes) {
        match self.broker.publish(subject, payload, None) {
            Ok(()) => {
                self.state().published_total.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => self.state().count_unavailable(),
        }
    }

    /// A message to `user` on the other nodes: one publish on the user's subject.
    fn send_to_user(&mut self, user: i64, frame: &[u8], reply: Option<P2pReply>) {
        let name = user.to_string();
        let subject = self.core.subjects().user(&name);
        let payload = self.core.deliver_payload(frame);
        let Some(reply) = reply else {
            // Delivered on this node already (or nobody asked for an answer): other nodes get
            // it only when the view says one of them holds the user.
            if self.core.view().holders(&name) > 0 {
                self.publish(&subject, payload);
            }
            return;
        };
        if self.pending.len() >= self.max_pending {
            self.answer(&reply, Delivery::Unavailable, user);
            return;
        }
        self.next_token += 1;
        let token = self.next_token;
        match self.broker.request(&subject, payload, token) {
            Ok(()) => {
                self.state().published_total.fetch_add(1, Ordering::Relaxed);
                self.pending.insert(token, Pending { user, reply });
                self.deadlines.push_back((Instant::now() + self.timeout, token));
            }
            Err(_) => self.answer(&reply, Delivery::Unavailable, user),
        }
    }

    /// Answers still waiting for the broker after `cluster_timeout`: 503.
    fn expire_answers(&mut self, now: Instant) {
        while let Some(&(at, token)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(pending) = self.pending.remove(&token) {
                self.answer(&pending.reply, Delivery::Unavailable, pending.user);
            }
        }
        if self.pending.is_empty() {
            self.deadlines.clear();
        }
        while let Some(&(at, id)) = self.wait_deadlines.front() {
            if at > now {
                break;
            }
            self.wait_deadlines.pop_front();
            if let Some(waiting) = self.waiting.remove(&id) {
                waiting.done.complete(Outcome::Failed(WaitError::TimedOut));
            }
        }
        if self.waiting.is_empty() {
            self.wait_deadlines.clear();
        }
        // A gather completes with what arrived (a node may have gone).
        while let Some(&(at, id)) = self.gather_deadlines.front() {
            if at > now {
                break;
            }
            self.gather_deadlines.pop_front();
            if let Some(gather) = self.gathers.remove(&id) {
                self.finish_gather(gather);
            }
        }
        if self.gathers.is_empty() {
            self.gather_deadlines.clear();
        }
    }

    fn settle(&mut self, token: u64, receivers: Result<u32, BrokerError>) {
        if let Some(pending) = self.pending.remove(&token) {
            let delivery = self.core.decide(&pending.user.to_string(), receivers);
            self.answer(&pending.reply, delivery, pending.user);
        }
    }

    /// Tells the sender of a cross-node P2P how it went.
    fn answer(&self, reply: &P2pReply, delivery: Delivery, user: i64) {
        let frame = match delivery {
            Delivery::Delivered => server_ack(&reply.pid, "delivered"),
            Delivery::NotFound => {
                error_notification(Some(&reply.pid), 404, &format!("user {user} is not connected"))
            }
            _ => {
                self.state().count_unavailable();
                error_notification(Some(&reply.pid), 503, "cluster unavailable: retry later")
            }
        };
        let link = &self.fabric.links[reply.addr.shard];
        link.send_now(DeliverMsg::DeliverConn { key: reply.addr.key, frame });
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Message { subject, payload } => {
                self.state().received_total.fetch_add(1, Ordering::Relaxed);
                let effects = self.core.on_message(Instant::now(), &subject, payload);
                self.apply(effects);
            }
            Event::Receivers { token, n } => self.settle(token, Ok(n)),
            Event::Failed { token, error } => self.settle(token, Err(error)),
            Event::Up => log::info!("cluster broker reachable; resubscribing"),
            Event::Resubscribed(n) => {
                let effects = self.core.on_resubscribed();
                self.apply(effects);
                self.state().up.store(true, Ordering::Release);
                self.release_ready(Instant::now());
                log::info!(subjects = n; "cluster broker subscriptions in place; node {} is up", self.state().node);
            }
            Event::Subscribed(subjects) => {
                self.core.on_subscribed(&subjects);
                self.release_ready(Instant::now());
            }
            Event::Unsubscribed(subjects) => self.core.on_unsubscribed(&subjects),
            Event::Down(reason) => {
                self.state().up.store(false, Ordering::Release);
                self.state().down_total.fetch_add(1, Ordering::Relaxed);
                log::warn!("cluster broker unreachable ({reason}): serving local traffic only");
                for (_, pending) in std::mem::take(&mut self.pending) {
                    self.answer(&pending.reply, Delivery::Unavailable, pending.user);
                }
                self.deadlines.clear();
                self.fail_waits(|_| true, WaitError::Unavailable);
                self.finish_gathers();
                self.release_ready(Instant::now());
            }
        }
    }

    /// Lets what each waiting connection was sent go once the broker reaches its user (room)
    /// here, when the broker is down (nothing better will come), or at its deadline. Called on
    /// confirmations, on the broker's loss and return, and every tick.
    fn release_ready(&mut self, now: Instant) {
        if self.ready.is_empty() {
            return;
        }
        let up = self.state().is_up();
        let (core, fabric) = (&self.core, &self.fabric);
        self.ready.retain(|(on, conn, deadline)| {
            let go = !up || now >= *deadline || reachable(core, on);
            if go {
                tell_ready(fabric, *conn);
            }
            !go
        });
    }

    fn ready_now(&self, conn: ConnAddr) {
        tell_ready(&self.fabric, conn);
    }

    /// Carries out what the core decided.
    fn apply(&mut self, effects: Effects) {
        let Effects {
            actions,
            changes,
            deliveries,
            broadcasts,
            bad_messages,
            disconnects,
            awaits,
            await_done,
            presences,
            member_requests,
            members,
            evictions,
            duplicate: effects_duplicate,
            ..
        } = effects;
        if effects_duplicate && !self.state().duplicate.swap(true, Ordering::Relaxed) {
            log::error!(
                "cluster: another live process uses node_id {}: give every node its own node_id \
                 (its messages are ignored here; /health reports it)",
                self.state().node
            );
        }
        if bad_messages > 0 {
            self.state().bad_messages_total.fetch_add(bad_messages, Ordering::Relaxed);
        }
        for action in actions {
            match action {
                Action::Publish { subject, payload } => self.publish(&subject, payload),
                Action::Subscribe(subjects) => self.broker.subscribe(subjects),
                Action::Unsubscribe(subjects) => self.broker.unsubscribe(subjects),
            }
        }
        let shards = self.fabric.links.len();
        for change in changes {
            match change {
                Change::Online(user) | Change::Offline(user) if user.parse::<i64>().is_err() => {
                    log::debug!("cluster: ignoring a record for user {user:?} (not an integer id)");
                }
                Change::Online(user) => {
                    let user: i64 = user.parse().unwrap_or_default();
                    let home = Directory::home_of(user, shards);
                    self.fabric.links[home].send_now(ClusterMsg::RemoteUser { user, present: true });
                }
                Change::Offline(user) => {
                    let user: i64 = user.parse().unwrap_or_default();
                    let home = Directory::home_of(user, shards);
                    self.fabric.links[home].send_now(ClusterMsg::RemoteUser { user, present: false });
                }
                Change::RoomCount { room, count } => {
                    let room: Arc<str> = Arc::from(room);
                    for link in &self.fabric.links {
                        link.send_now(ClusterMsg::RemoteRoomCount { room: Arc::clone(&room), count });
                    }
                }
                Change::NodeUp(node) => {
                    self.state().nodes.store(self.core.view().nodes().len() as u64, Ordering::Relaxed);
                    log::info!("cluster: node {node} joined");
                }
                Change::NodeDown(node) => {
                    self.state().nodes.store(self.core.view().nodes().len() as u64, Ordering::Relaxed);
                    self.state().node_down_total.fetch_add(1, Ordering::Relaxed);
                    log::warn!("cluster: node {node} left or went silent");
                    self.fail_waits(|w| w.node == node, WaitError::Closed);
                }
            }
        }
        for (subject, frame) in deliveries {
            match self.core.subjects().target(&subject) {
                Target::User(user) => {
                    if let Ok(user) = user.parse::<i64>() {
                        self.offer(Directory::home_of(user, shards), ClusterMsg::ToUser { user, frame });
                    }
                }
                Target::Room(room) => {
                    // Any shard knows which shards have members (replicated counts).
                    let room: Arc<str> = Arc::from(room);
                    let shard =
                        room.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into())) % shards;
                    self.offer(shard, ClusterMsg::ToRoom { room, frame });
                }
                Target::All => {
                    for shard in 0..shards {
                        self.offer(shard, DeliverMsg::Broadcast { frame: frame.clone(), except: None });
                    }
                }
                Target::Other => log::debug!("cluster: delivery on {subject} ignored"),
            }
        }
        for p in presences {
            let presence = crate::core::presence::Presence {
                status: p.status.into(),
                context: p.context.map(|c| c.into_bytes().into_boxed_slice()),
                since_ms: p.since_ms,
                info: p.info.map(Arc::from),
            };
            let rooms = p.rooms.into_iter().map(Arc::from).collect();
            let home = Directory::home_of(p.user, shards);
            self.fabric.links[home].send_now(ClusterMsg::Presence { user: p.user, presence, rooms });
        }
        for (origin, id, room) in member_requests {
            self.collect_members(origin, id, &room);
        }
        for (id, users) in members {
            self.members_arrived(id, users);
        }
        for (user, before_ms, count) in evictions {
            let home = Directory::home_of(user, shards);
            self.fabric.links[home].send_now(ClusterMsg::Evict { user, before_ms, count });
        }
        for user in disconnects {
            let home = Directory::home_of(user, shards);
            self.fabric.links[home].send_now(OpMsg::DisconnectUser { user, done: None });
        }
        for ask in awaits {
            self.serve_await(ask);
        }
        for (id, outcome) in await_done {
            self.await_done(id, outcome);
        }
        for (exclude, frame) in broadcasts {
            let exclude: Arc<[i64]> = exclude.into();
            for shard in 0..shards {
                self.offer(
                    shard,
                    OpMsg::BroadcastExcept {
                        frame: frame.clone(),
                        exclude: Arc::clone(&exclude),
                        done: None,
                    },
                );
            }
        }
    }
}

/// Whether the broker delivers `on`'s messages to this node.
fn reachable(core: &Core, on: &Reach) -> bool {
    match on {
        Reach::User(user) => core.user_reachable(&user.to_string()),
        Reach::Room(room) => core.room_reachable(room),
    }
}

/// Tells `conn`'s shard that what it holds for the cluster may go.
fn tell_ready(fabric: &Fabric, conn: ConnAddr) {
    if let Some(link) = fabric.links.get(conn.shard) {
        link.send_now(ClusterMsg::Ready { key: conn.key });
    }
}

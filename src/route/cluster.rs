//! The node's side of the cluster link, as the shards and the [`Handle`](super::Handle) see it:
//! what they hand to the broker link thread ([`LinkMsg`]), the channels that carry it
//! ([`ClusterTx`]), and the state the link publishes for them to read without blocking
//! ([`ClusterState`]). The link thread itself lives in `cluster` (above this layer); this
//! module names no broker.
//!
//! Two channels: state changes (a user's or a room's node-level transitions) go on an
//! unbounded channel, since losing one would leave another node's view wrong and their number
//! is bounded by the node's own connections and joins; data (P2P, broadcasts, room publishes)
//! goes on a bounded channel, and a full channel refuses at once (503), so a slow broker
//! never grows memory and never blocks a shard.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::core::directory::{ConnAddr, ShardId};

/// Where a cross-node P2P answer goes: the sender's connection and its message's `pid`.
#[derive(Debug, Clone)]
pub struct P2pReply {
    /// The sender's connection.
    pub addr: ConnAddr,
    /// The sender's `pid`.
    pub pid: Box<str>,
}

/// What shards and the handle hand to the broker link thread.
#[derive(Debug)]
pub enum LinkMsg {
    /// From the user's home shard: this node now holds `count` connections of `user` (sent on
    /// every open and close; records are coalesced per tick).
    User {
        /// The user.
        user: i64,
        /// The user's connections on this node.
        count: u32,
    },
    /// Shard `shard` now has `count` members of `room`.
    RoomCount {
        /// The room.
        room: Arc<str>,
        /// The announcing shard.
        shard: ShardId,
        /// Its member count.
        count: u32,
    },
    /// Deliver `frame` to `user`'s connections on the other nodes. With `reply`, the sender
    /// is answered `delivered` / 404 / 503 from the broker's receiver count and the view;
    /// without, it is published only when the view lists another node holding the user.
    ToUser {
        /// The receiving user.
        user: i64,
        /// The encoded frame.
        frame: Bytes,
        /// Whom to answer (a message with a `pid` to a user not connected on this node).
        reply: Option<P2pReply>,
    },
    /// The handle's broadcast (or room publish, with `room`): as [`LinkMsg::Broadcast`] /
    /// [`LinkMsg::Room`], and `done` gets `Delivered(n)` with the connections it reaches on
    /// the other nodes, as the view counts them.
    Counted {
        /// The room, or `None` for everyone.
        room: Option<Arc<str>>,
        /// The encoded frame.
        frame: Bytes,
        /// Sorted user ids to skip (broadcast only).
        exclude: Arc<[i64]>,
        /// Gets `Delivered(n)`.
        done: crate::route::Completion,
    },
    /// From the user's home shard (the handle's `send`), for a user another node holds too:
    /// deliver `frame` there and complete `done` with `local` plus the user's connections on
    /// the other nodes (from the view).
    SendUser {
        /// The receiving user.
        user: i64,
        /// The encoded frame.
        frame: Bytes,
        /// Connections it was queued on at this node.
        local: usize,
        /// Gets `Delivered(n)`.
        done: Option<crate::route::Completion>,
    },
    /// Deliver `frame` to every connection on the other nodes whose user is not in `exclude`
    /// (sorted).
    Broadcast {
        /// The encoded frame.
        frame: Bytes,
        /// Sorted user ids to skip.
        exclude: Arc<[i64]>,
    },
    /// Deliver `frame` to the members of `room` on the other nodes.
    Room {
        /// The room.
        room: Arc<str>,
        /// The encoded frame.
        frame: Bytes,
    },
    /// From the user's home shard: its presence status changed here; the other nodes store it
    /// and tell their watchers and the members of `rooms`.
    Presence {
        /// The user.
        user: i64,
        /// The new presence.
        presence: crate::core::presence::Presence,
        /// Rooms whose members are told too.
        rooms: Vec<Arc<str>>,
    },
    /// From the user's home shard, with `connections_per_user`: a connection of `user` opened
    /// at `at_ms`; the node holds `local` of them. When the user's connections on every node
    /// exceed the limit, the other nodes are asked to close the excess, oldest first.
    Opened {
        /// The user.
        user: i64,
        /// When the connection opened, Unix milliseconds.
        at_ms: u64,
        /// The user's connections on this node.
        local: u32,
    },
    /// Close `user`'s connections on the other nodes (published only when the view lists
    /// another node holding the user); `done` gets `Delivered(n)` with the connections the
    /// view counts there.
    Disconnect {
        /// The user.
        user: i64,
        /// Gets `Delivered(n)`.
        done: crate::route::Completion,
    },
    /// From the user's home shard, which holds none of its connections: send `msg` to the
    /// user's connection on another node and wait there for the client's ack or reply.
    Await {
        /// The receiving user.
        user: i64,
        /// What to send (the pid is added by the shard that owns the connection).
        msg: Arc<crate::route::OutMessage>,
        /// Ack or request.
        kind: crate::core::pending::WaitKind,
        /// Wait bound in milliseconds.
        timeout_ms: u64,
        /// Gets `Ack`, `Reply` or `Failed`.
        done: crate::route::Completion,
    },
    /// From the user's home shard, for a user another node holds too: add the user's
    /// connections on the other nodes (from the view: one entry each, `shard` = `usize::MAX`)
    /// to `local` and complete `done` with `User`.
    QueryUser {
        /// The user.
        user: i64,
        /// This node's connections of the user.
        local: Vec<crate::route::ConnInfo>,
        /// Gets `User`.
        done: crate::route::Completion,
    },
    /// From the handle: the members of `room` on the other nodes (one request on the room's
    /// subject, an answer from each node with members, or what arrived by `cluster_timeout`);
    /// completes `done` with `Members`.
    RoomMembers {
        /// The room.
        room: Arc<str>,
        /// Gets `Members`.
        done: crate::route::Completion,
    },
    /// A client's `room_presence` on shard `reply_shard`: gather `room`'s members on the other
    /// nodes (as [`LinkMsg::RoomMembers`]) and hand the user ids above `after`, at most `limit`
    /// of them, sorted, to that shard's roster `roster` as a `RosterPart` (none when the broker
    /// is down or nothing arrives by `cluster_timeout`: the page then lists this node's members).
    RosterMembers {
        /// The room.
        room: Arc<str>,
        /// Only user ids greater than this (the page's cursor).
        after: i64,
        /// At most this many ids.
        limit: u32,
        /// The asking shard.
        reply_shard: ShardId,
        /// The asking shard's roster entry.
        roster: u32,
    },
    /// A connection was admitted for a user (or joined a room) on this node: answer
    /// `ClusterMsg::Ready` to it once the broker delivers that user's (room's) messages here
    /// (the subject subscribed and confirmed), at once when the broker is down, at the latest
    /// after `cluster_timeout`. What the connection is sent meanwhile (its `101`, the join's
    /// ack) waits for it.
    Ready {
        /// What must be reachable.
        on: Reach,
        /// The waiting connection.
        conn: ConnAddr,
    },
    /// The server is stopping: say goodbye and end the thread.
    Shutdown,
}

impl LinkMsg {
    /// Bytes this message holds while queued (for `cluster_queue_bytes`).
    pub fn cost(&self) -> usize {
        std::mem::size_of::<LinkMsg>()
            + match self {
                LinkMsg::ToUser { frame, .. }
                | LinkMsg::Room { frame, .. }
                | LinkMsg::Counted { frame, .. }
                | LinkMsg::SendUser { frame, .. } => frame.len(),
                LinkMsg::Broadcast { frame, exclude } => frame.len() + exclude.len() * 8,
                LinkMsg::Presence { presence, rooms, .. } => {
                    presence.status.len()
                        + presence.context.as_ref().map_or(0, |c| c.len())
                        + rooms.iter().map(|r| 16 + r.len()).sum::<usize>()
                }
                LinkMsg::QueryUser { local, .. } => local.len() * 16,
                LinkMsg::Await { msg, .. } => {
                    msg.kind.len() + msg.payload.as_ref().map_or(0, |p| p.get().len())
                }
                LinkMsg::User { .. }
                | LinkMsg::RoomCount { .. }
                | LinkMsg::Disconnect { .. }
                | LinkMsg::Opened { .. }
                | LinkMsg::RoomMembers { .. }
                | LinkMsg::RosterMembers { .. }
                | LinkMsg::Ready { .. }
                | LinkMsg::Shutdown => 0,
            }
    }
}

/// What a waiting connection needs the broker to reach on this node.
#[derive(Debug, Clone)]
pub enum Reach {
    /// A user's subject.
    User(i64),
    /// A room's subject.
    Room(Arc<str>),
}

/// What the link thread publishes for everyone else to read: whether the broker is usable,
/// and counters for `/metrics` and `/health`.
#[derive(Debug)]
pub struct ClusterState {
    /// This node's id.
    pub node: String,
    /// The broker is reachable and this node's subscriptions are in place.
    pub up: AtomicBool,
    /// Bytes of data messages queued for the link thread.
    pub queued_bytes: AtomicU64,
    /// Bound on `queued_bytes` (`cluster_queue_bytes`).
    pub queue_limit: u64,
    /// Other live nodes in the view.
    pub nodes: AtomicU64,
    /// Times the broker became unreachable.
    pub down_total: AtomicU64,
    /// Cross-node operations refused or failed with 503 (broker down, queue full, no answer).
    pub unavailable_total: AtomicU64,
    /// Messages published on the broker.
    pub published_total: AtomicU64,
    /// Messages received from the broker.
    pub received_total: AtomicU64,
    /// Received messages that did not decode.
    pub bad_messages_total: AtomicU64,
    /// Nodes declared dead (heartbeats missing for `cluster_node_ttl`).
    pub node_down_total: AtomicU64,
    /// Another live process uses this node's `node_id` (heard on the broker).
    pub duplicate: AtomicBool,
    /// Messages from other nodes dropped because the receiving shard's inbox was over
    /// `inbox_max_bytes`.
    pub shed_total: AtomicU64,
}

impl ClusterState {
    /// A state for `node`, down until the link reports otherwise.
    pub fn new(node: &str, queue_limit: u64) -> ClusterState {
        ClusterState {
            node: node.to_string(),
            up: AtomicBool::new(false),
            queued_bytes: AtomicU64::new(0),
            queue_limit,
            nodes: AtomicU64::new(0),
            down_total: AtomicU64::new(0),
            unavailable_total: AtomicU64::new(0),
            published_total: AtomicU64::new(0),
            received_total: AtomicU64::new(0),
            bad_messages_total: AtomicU64::new(0),
            node_down_total: AtomicU64::new(0),
            shed_total: AtomicU64::new(0),
            duplicate: AtomicBool::new(false),
        }
    }

    /// Whether cross-node operations can be attempted now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Counts a cross-node operation answered 503.
    pub fn count_unavailable(&self) {
        self.unavailable_total.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as `(name, help, value)` for `/metrics`.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("customws_cluster_down", "Times the cluster broker became unreachable.", get(&self.down_total)),
            (
                "customws_cluster_unavailable",
                "Cross-node operations answered 503 (broker down, link queue full, no answer).",
                get(&self.unavailable_total),
            ),
            (
                "customws_cluster_published",
                "Messages published on the cluster broker.",
                get(&self.published_total),
            ),
            (
                "customws_cluster_received",
                "Messages received from the cluster broker.",
                get(&self.received_total),
            ),
            (
                "customws_cluster_bad_messages",
                "Messages from the cluster broker that did not decode.",
                get(&self.bad_messages_total),
            ),
            (
                "customws_cluster_shed",
                "Messages from other nodes dropped: the receiving shard's inbox was full.",
                get(&self.shed_total),
            ),
            (
                "customws_cluster_node_down",
                "Other nodes declared dead (heartbeats missing for cluster_node_ttl).",
                get(&self.node_down_total),
            ),
        ]
    }
}

/// Why a data message was not handed to the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefusal {
    /// The broker is unreachable.
    Down,
    /// The link's queue is over `cluster_queue_bytes`.
    Full,
}

/// The sending side of the link: held by the [`Fabric`](super::Fabric) when `cluster` is set.
#[derive(Debug)]
pub struct ClusterTx {
    state_tx: Sender<LinkMsg>,
    data_tx: Sender<LinkMsg>,
    /// What the link publishes.
    pub state: Arc<ClusterState>,
}

/// The receiving side, for the link thread.
#[derive(Debug)]
pub struct ClusterRx {
    /// State changes and shutdown (unbounded).
    pub state_rx: Receiver<LinkMsg>,
    /// Data messages (bounded).
    pub data_rx: Receiver<LinkMsg>,
    /// Shared with the senders.
    pub state: Arc<ClusterState>,
}

impl ClusterRx {
    /// The link thread took `msg` out of the data channel: its cost leaves the queue.
    pub fn taken(&self, msg: &LinkMsg) {
        self.state.queued_bytes.fetch_sub(msg.cost() as u64, Ordering::Relaxed);
    }
}

/// A link's two channels: `data_slots` bounds the data channel's messages, `queue_bytes` its
/// bytes.
pub fn cluster_channel(node: &str, data_slots: usize, queue_bytes: u64) -> (ClusterTx, ClusterRx) {
    let state = Arc::new(ClusterState::new(node, queue_bytes));
    let (state_tx, state_rx) = crossbeam_channel::unbounded();
    let (data_tx, data_rx) = crossbeam_channel::bounded(data_slots.max(1));
    (ClusterTx { state_tx, data_tx, state: Arc::clone(&state) }, ClusterRx { state_rx, data_rx, state })
}

impl ClusterTx {
    /// Hands over a state change (never refused; dropped only when the link has stopped).
    pub fn send_state(&self, msg: LinkMsg) {
        let _ = self.state_tx.send(msg);
    }

    /// Hands over a data message without blocking, or refuses it: broker down, or the queue
    /// over its bound (counted as unavailable either way).
    pub fn try_send(&self, msg: LinkMsg) -> Result<(), LinkRefusal> {
        if !self.state.is_up() {
            self.state.count_unavailable();
            return Err(LinkRefusal::Down);
        }
        self.try_send_or_return(msg).map_err(|_| LinkRefusal::Full)
    }

    /// As [`ClusterTx::try_send`], giving the message back when it is refused (so that what it
    /// carries, a completion, can be answered).
    pub fn try_send_or_return(&self, msg: LinkMsg) -> Result<(), LinkMsg> {
        if !self.state.is_up() {
            self.state.count_unavailable();
            return Err(msg);
        }
        let cost = msg.cost() as u64;
        let before = self.state.queued_bytes.fetch_add(cost, Ordering::Relaxed);
        if before > 0 && before + cost > self.state.queue_limit {
            self.state.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
            self.state.count_unavailable();
            return Err(msg);
        }
        match self.data_tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => {
                self.state.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
                self.state.count_unavailable();
                Err(msg)
            }
        }
    }
}

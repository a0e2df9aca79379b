//! Presence: statuses stored at each user's home shard, their fan-out to watchers and rooms,
//! and watch lists.

use std::sync::Arc;

use bytes::Bytes;

use super::{ROOM_REF, ShardMsg, ids, presence_cost};
use crate::core::directory::ConnAddr;
use crate::core::presence::Presence;
use crate::route::{Completion, ShedKind};

/// Presence: statuses stored at users' home shards, their fan-out, and watch lists.
#[derive(Debug)]
pub enum PresenceMsg {
    /// To the user's home shard: store a presence and, unless it repeats the current one, tell
    /// the watchers and `rooms` (everyone, with `presence_scope = "all"`).
    PresenceSet {
        /// The user.
        user: i64,
        /// The new presence.
        presence: Presence,
        /// The sending connection's rooms, whose members are told too.
        rooms: Vec<Arc<str>>,
        /// The sending connection, which is not told.
        except: Option<ConnAddr>,
    },
    /// To the user's home shard: a transient status of one connection expired; tell its
    /// audience the user's lasting status.
    PresenceRevert {
        /// The user.
        user: i64,
        /// The transient status's target (`None`: watchers and `rooms`, and it was stored).
        target: Option<i64>,
        /// The connection's rooms, whose members are told too.
        rooms: Vec<Arc<str>>,
        /// The connection, which is not told.
        except: Option<ConnAddr>,
    },
    /// Queue `frame` on the local members of `rooms` and local connections of `users`, each
    /// connection once, except `except`.
    PresenceFanout {
        /// The encoded presence event.
        frame: Bytes,
        /// Rooms whose members receive it.
        rooms: Arc<[Arc<str>]>,
        /// Watchers with connections on the receiving shard.
        users: Vec<i64>,
        /// The connection not to tell.
        except: Option<ConnAddr>,
    },
    /// To the watcher's home shard: admit a subscription request.
    AdmitWatch {
        /// The subscribing user.
        watcher: i64,
        /// Users to watch.
        targets: Vec<i64>,
        /// The connection that asked (gets the ack and the current presences).
        reply: ConnAddr,
        /// The request pid, for the ack.
        pid: Option<Box<str>>,
    },
    /// To the watcher's home shard: drop targets from the watch list.
    DropWatch {
        /// The watcher.
        watcher: i64,
        /// Users to stop watching.
        targets: Vec<i64>,
        /// The connection that asked (gets the ack).
        reply: ConnAddr,
        /// The request pid, for the ack.
        pid: Option<Box<str>>,
    },
    /// To each target's home shard: add `watcher`; send the current presences to `reply`.
    Watch {
        /// The watcher.
        watcher: i64,
        /// Targets homed on the receiving shard.
        targets: Vec<i64>,
        /// Where to send the current presences.
        reply: ConnAddr,
    },
    /// To each target's home shard: remove `watcher`.
    Unwatch {
        /// The watcher.
        watcher: i64,
        /// Targets homed on the receiving shard.
        targets: Vec<i64>,
    },
    /// To the watcher's home shard: the application's `watch_presence`: add `targets` to the
    /// watch list, as a client `presence_subscribe` would, with the snapshot to every
    /// connection of the watcher: `Delivered(n)` (its connections; 0 when offline, nothing
    /// kept) or `Failed(Limit)`.
    ServerWatch {
        /// The watcher.
        watcher: i64,
        /// Users to watch.
        targets: Vec<i64>,
        /// Gets the outcome.
        done: Completion,
    },
    /// To the watcher's home shard: the application's `unwatch_presence`: `Delivered(n)`.
    ServerUnwatch {
        /// The watcher.
        watcher: i64,
        /// Users to stop watching.
        targets: Vec<i64>,
        /// Gets `Delivered(n)`.
        done: Completion,
    },
    /// To each target's home shard: add `watcher`; send the current presences to each of
    /// `replies` (the watcher's connections).
    WatchFor {
        /// The watcher.
        watcher: i64,
        /// Targets homed on the receiving shard.
        targets: Vec<i64>,
        /// Where to send the current presences.
        replies: Arc<[ConnAddr]>,
    },
    /// The application's `set_presence`. First at the user's home shard (`collect: None`),
    /// which sends it through each shard holding one of the user's connections (`collect`:
    /// the shards still to visit) to gather their rooms, and back home, which stores and
    /// announces it as for a client's `presence_update`: `Delivered(n)`, the user's
    /// connections (0 when offline: nothing stored).
    ServerSet {
        /// The user.
        user: i64,
        /// The new presence (boxed: keeps every `ShardMsg` small).
        presence: Box<Presence>,
        /// Rooms of the user's connections gathered so far.
        rooms: Vec<Arc<str>>,
        /// Shards still to visit (bit mask); `None` before the home shard started the tour.
        collect: Option<u64>,
        /// Gets `Delivered(n)`.
        done: Completion,
    },
    /// To the home shard of all of `users`: report their presences: `Presences`.
    QueryPresenceMany {
        /// Users homed on the receiving shard.
        users: Vec<i64>,
        /// Gets `Presences`.
        done: Completion,
    },
    /// To `user`'s home shard: report its presence: `Presence`.
    QueryPresence {
        /// The user.
        user: i64,
        /// Gets `Presence`.
        done: Completion,
    },
}

impl PresenceMsg {
    /// Bytes held beyond the message's own size (see [`ShardMsg::cost`]).
    pub(super) fn held(&self) -> usize {
        match self {
            PresenceMsg::PresenceSet { presence: p, rooms, .. } => presence_cost(p) + rooms.len() * ROOM_REF,
            PresenceMsg::PresenceFanout { frame, rooms, users, .. } => {
                frame.len() + rooms.len() * ROOM_REF + ids(users)
            }
            PresenceMsg::AdmitWatch { targets, .. }
            | PresenceMsg::DropWatch { targets, .. }
            | PresenceMsg::Watch { targets, .. }
            | PresenceMsg::Unwatch { targets, .. }
            | PresenceMsg::ServerWatch { targets, .. }
            | PresenceMsg::ServerUnwatch { targets, .. } => ids(targets),
            PresenceMsg::WatchFor { targets, replies, .. } => ids(targets) + replies.len() * 16,
            PresenceMsg::ServerSet { presence, rooms, .. } => {
                presence_cost(presence) + rooms.len() * ROOM_REF
            }
            PresenceMsg::QueryPresenceMany { users, .. } => ids(users),
            PresenceMsg::PresenceRevert { .. } | PresenceMsg::QueryPresence { .. } => 0,
        }
    }

    /// See [`ShardMsg::shed_kind`].
    pub(super) fn shed_kind(&self) -> Option<ShedKind> {
        match self {
            PresenceMsg::PresenceSet { .. } | PresenceMsg::PresenceFanout { .. } => Some(ShedKind::Presence),
            PresenceMsg::AdmitWatch { .. } | PresenceMsg::DropWatch { .. } => Some(ShedKind::Watch),
            PresenceMsg::PresenceRevert { .. }
            | PresenceMsg::Watch { .. }
            | PresenceMsg::Unwatch { .. }
            | PresenceMsg::QueryPresence { .. }
            | PresenceMsg::ServerWatch { .. }
            | PresenceMsg::ServerUnwatch { .. }
            | PresenceMsg::WatchFor { .. }
            | PresenceMsg::ServerSet { .. }
            | PresenceMsg::QueryPresenceMany { .. } => None,
        }
    }
}

impl From<PresenceMsg> for ShardMsg {
    fn from(msg: PresenceMsg) -> Self {
        ShardMsg::Presence(msg)
    }
}

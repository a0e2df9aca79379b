//! From the broker link thread: what other nodes said that concerns this node's connections.

use std::sync::Arc;

use bytes::Bytes;

use super::{ROOM_REF, ShardMsg};
use crate::route::ShedKind;

/// What the cluster's link thread tells a shard.
#[derive(Debug)]
pub enum ClusterMsg {
    /// To the user's home shard: a frame for `user` from another node; queue it on the user's
    /// connections on every shard of this node.
    ToUser {
        /// The receiving user.
        user: i64,
        /// The encoded frame (a slice of the broker message: encoded once, on the sender).
        frame: Bytes,
    },
    /// To any shard: a frame for the members of `room` from another node; queue it on the
    /// room's members on every shard of this node.
    ToRoom {
        /// The room.
        room: Arc<str>,
        /// The encoded frame.
        frame: Bytes,
    },
    /// To the user's home shard: some other node holds (or no longer any other node holds)
    /// connections of `user`. Presence is the union of this node's and the others'.
    RemoteUser {
        /// The user.
        user: i64,
        /// Whether another live node holds the user.
        present: bool,
    },
    /// To the user's home shard: the user's presence status changed on another node: store it
    /// and tell this node's watchers and members of `rooms`.
    Presence {
        /// The user.
        user: i64,
        /// The new presence.
        presence: crate::core::presence::Presence,
        /// Rooms whose members are told too.
        rooms: Vec<Arc<str>>,
    },
    /// To the user's home shard: close up to `count` of the user's connections here opened
    /// before `before_ms`, oldest first (`connections_per_user` across nodes).
    Evict {
        /// The user.
        user: i64,
        /// Only connections opened before this, Unix milliseconds.
        before_ms: u64,
        /// At most this many.
        count: u32,
    },
    /// To a connection's shard: the broker now reaches its user on this node; its `101` (held
    /// since admission) may go.
    Ready {
        /// The connection.
        key: crate::core::ConnKey,
    },
    /// To every shard: members of `room` on the other nodes, summed.
    RemoteRoomCount {
        /// The room.
        room: Arc<str>,
        /// Members on the other nodes.
        count: u64,
    },
}

impl ClusterMsg {
    /// Bytes held beyond the message's own size (see [`ShardMsg::cost`]).
    pub(super) fn held(&self) -> usize {
        match self {
            ClusterMsg::ToUser { frame, .. } => frame.len(),
            ClusterMsg::ToRoom { frame, .. } => ROOM_REF + frame.len(),
            ClusterMsg::RemoteUser { .. } | ClusterMsg::Evict { .. } | ClusterMsg::Ready { .. } => 0,
            ClusterMsg::Presence { presence, rooms, .. } => {
                super::presence_cost(presence) + rooms.len() * ROOM_REF
            }
            ClusterMsg::RemoteRoomCount { .. } => ROOM_REF,
        }
    }

    /// See [`ShardMsg::shed_kind`]: the link sends with [`Link::send`](crate::route::Link::send),
    /// never shed (the broker already accepted it).
    pub(super) fn shed_kind(&self) -> Option<ShedKind> {
        match self {
            ClusterMsg::ToUser { .. }
            | ClusterMsg::ToRoom { .. }
            | ClusterMsg::RemoteUser { .. }
            | ClusterMsg::Evict { .. }
            | ClusterMsg::Presence { .. }
            | ClusterMsg::RemoteRoomCount { .. }
            | ClusterMsg::Ready { .. } => None,
        }
    }
}

impl From<ClusterMsg> for ShardMsg {
    fn from(msg: ClusterMsg) -> Self {
        ShardMsg::Cluster(msg)
    }
}

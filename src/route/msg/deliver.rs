//! Frames to queue on a shard's connections: to users, to one connection, to everyone.

use bytes::Bytes;

use super::{ShardMsg, ids};
use crate::core::directory::{ConnAddr, ConnKey};
use crate::route::ShedKind;

/// Frames to queue on the receiving shard's connections.
#[derive(Debug)]
pub enum DeliverMsg {
    /// Queue `frame` on every local connection of each user.
    Deliver {
        /// Receiving users.
        users: Vec<i64>,
        /// The encoded frame.
        frame: Bytes,
    },
    /// Queue `frame` on one connection.
    DeliverConn {
        /// The connection on the receiving shard.
        key: ConnKey,
        /// The encoded frame.
        frame: Bytes,
    },
    /// Queue `frames` on one connection, in order (a subscription's current presences).
    DeliverFrames {
        /// The connection on the receiving shard.
        key: ConnKey,
        /// The encoded frames.
        frames: Vec<Bytes>,
    },
    /// Queue `frame` on every open local connection except `except`.
    Broadcast {
        /// The encoded frame.
        frame: Bytes,
        /// A connection to skip (the sender's).
        except: Option<ConnAddr>,
    },
}

impl DeliverMsg {
    /// Bytes held beyond the message's own size (see [`ShardMsg::cost`]).
    pub(super) fn held(&self) -> usize {
        match self {
            DeliverMsg::Deliver { users, frame } => ids(users) + frame.len(),
            DeliverMsg::DeliverConn { frame, .. } | DeliverMsg::Broadcast { frame, .. } => frame.len(),
            DeliverMsg::DeliverFrames { frames, .. } => frames.iter().map(|f| 32 + f.len()).sum(),
        }
    }

    /// See [`ShardMsg::shed_kind`].
    pub(super) fn shed_kind(&self) -> Option<ShedKind> {
        match self {
            DeliverMsg::Deliver { .. } => Some(ShedKind::Deliver),
            DeliverMsg::Broadcast { .. } => Some(ShedKind::Broadcast),
            DeliverMsg::DeliverConn { .. } | DeliverMsg::DeliverFrames { .. } => None,
        }
    }
}

impl From<DeliverMsg> for ShardMsg {
    fn from(msg: DeliverMsg) -> Self {
        ShardMsg::Deliver(msg)
    }
}

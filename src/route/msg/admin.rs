//! The admin page's listings, asked of the shards by the backend API.

use super::ShardMsg;
use crate::route::{Completion, ShedKind};

/// The admin page's listings.
#[derive(Debug)]
pub enum AdminMsg {
    /// Admin listing: this shard's open connections with `seq > after` (of `user` when
    /// given), at most `limit`, lowest `seq` first: `Connections`.
    Connections {
        /// Cursor: the last `seq` already listed (0 from the start).
        after: u64,
        /// Only this user's connections.
        user: Option<i64>,
        /// Page size.
        limit: usize,
        /// Gets `Connections`.
        done: Completion,
    },
    /// Admin listing: every room's total member count, the `limit` largest: `Rooms`.
    Rooms {
        /// Most rooms listed.
        limit: usize,
        /// Gets `Rooms`.
        done: Completion,
    },
}

impl AdminMsg {
    /// Bytes held beyond the message's own size (see [`ShardMsg::cost`]).
    pub(super) fn held(&self) -> usize {
        match self {
            AdminMsg::Connections { .. } | AdminMsg::Rooms { .. } => 0,
        }
    }

    /// See [`ShardMsg::shed_kind`]: never shed.
    pub(super) fn shed_kind(&self) -> Option<ShedKind> {
        match self {
            AdminMsg::Connections { .. } | AdminMsg::Rooms { .. } => None,
        }
    }
}

impl From<AdminMsg> for ShardMsg {
    fn from(msg: AdminMsg) -> Self {
        ShardMsg::Admin(msg)
    }
}

//! The application handle's operations on users, each answered through a [`Completion`].

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;

use super::{ShardMsg, ids};
use crate::core::directory::ConnKey;
use crate::core::pending::WaitKind;
use crate::route::{Completion, OutMessage, ShedKind};

/// The application handle's operations on users: sends, broadcasts with exclusions, waits
/// for a client's ack or reply, user queries and disconnects.
#[derive(Debug)]
pub enum OpMsg {
    /// To the user's home shard: queue `frame` on every connection of `user`; completes with
    /// the number of connections.
    SendUser {
        /// The receiving user.
        user: i64,
        /// The encoded frame.
        frame: Bytes,
        /// Gets `Delivered(n)`.
        done: Option<Completion>,
    },
    /// Queue `frame` on every open local connection whose user is not in `exclude` (sorted);
    /// completes with this shard's count.
    BroadcastExcept {
        /// The encoded frame.
        frame: Bytes,
        /// Sorted user ids to skip.
        exclude: Arc<[i64]>,
        /// Gets `Delivered(n)`.
        done: Option<Completion>,
    },
    /// To the user's home shard: send `msg` to the user's newest connection and wait.
    Await {
        /// The receiving user.
        user: i64,
        /// What to send (the pid is added by the owning shard).
        msg: Arc<OutMessage>,
        /// Ack or request.
        kind: WaitKind,
        /// Wait bound in milliseconds.
        timeout_ms: u64,
        /// Gets `Ack`, `Reply` or `Failed`.
        done: Completion,
    },
    /// To the connection's shard: register the wait, send `msg` with its pid.
    AwaitOn {
        /// The connection.
        key: ConnKey,
        /// What to send.
        msg: Arc<OutMessage>,
        /// Ack or request.
        kind: WaitKind,
        /// Wait bound in milliseconds.
        timeout_ms: u64,
        /// Gets `Ack`, `Reply` or `Failed`.
        done: Completion,
    },
    /// To the user's home shard: report the user's connections.
    QueryUser {
        /// The user.
        user: i64,
        /// Gets `User(list)`.
        done: Completion,
    },
    /// To the user's home shard: close every connection of the user (1000).
    DisconnectUser {
        /// The user.
        user: i64,
        /// Gets `Delivered(n)`: connections closed.
        done: Option<Completion>,
    },
    /// To the connection's shard: the answer to a deferred authorization of one of the
    /// connection's built-in operations (the application's `Decision`, or the authorization
    /// backend's).
    Decided {
        /// The connection.
        key: ConnKey,
        /// The decision's number, unique on its shard.
        seq: u64,
        /// `None`: allowed; else refused with this code and message.
        refusal: Option<(u16, Cow<'static, str>)>,
    },
}

impl OpMsg {
    /// Bytes held beyond the message's own size (see [`ShardMsg::cost`]).
    pub(super) fn held(&self) -> usize {
        match self {
            OpMsg::SendUser { frame, .. } => frame.len(),
            OpMsg::BroadcastExcept { frame, exclude, .. } => frame.len() + ids(exclude),
            OpMsg::Await { .. }
            | OpMsg::AwaitOn { .. }
            | OpMsg::QueryUser { .. }
            | OpMsg::DisconnectUser { .. } => 0,
            OpMsg::Decided { refusal, .. } => refusal.as_ref().map_or(0, |(_, m)| m.len()),
        }
    }

    /// See [`ShardMsg::shed_kind`]: the application's operations are never shed.
    pub(super) fn shed_kind(&self) -> Option<ShedKind> {
        match self {
            OpMsg::SendUser { .. }
            | OpMsg::BroadcastExcept { .. }
            | OpMsg::Await { .. }
            | OpMsg::AwaitOn { .. }
            | OpMsg::QueryUser { .. }
            | OpMsg::DisconnectUser { .. }
            | OpMsg::Decided { .. } => None,
        }
    }
}

impl From<OpMsg> for ShardMsg {
    fn from(msg: OpMsg) -> Self {
        ShardMsg::Op(msg)
    }
}

//! Who is connected where: replicas of every shard's users, the home shard's list of a user's
//! connections, and closing a connection the directory chose.

use std::sync::Arc;

use super::ShardMsg;
use crate::core::directory::{ConnAddr, ConnKey, ShardId};
use crate::http::auth::Identity;
use crate::route::ShedKind;

/// The answer of an authentication the application completed later (its `Admission` /
/// `Rejection` in this layer's terms): the identity and the application's data for the
/// connection, or the HTTP status and message of the refusal.
pub type AuthAnswer = Result<(Identity, Option<Box<dyn std::any::Any + Send + Sync>>), (u16, String)>;

/// Who is connected where: the directory's replicas and home lists, and closing a connection
/// the directory chose (eviction, a disconnect).
#[derive(Debug)]
pub enum DirMsg {
    /// Shard `shard` now has (or no longer has) connections of `user`.
    Replica {
        /// The user.
        user: i64,
        /// The announcing shard.
        shard: ShardId,
        /// Whether it has any.
        present: bool,
    },
    /// To the user's home shard: a connection opened.
    HomeOpened {
        /// The user.
        user: i64,
        /// Global open order.
        seq: u64,
        /// Where it lives.
        addr: ConnAddr,
        /// The connection's `presence_info_claim` value (raw JSON), kept with the presence.
        info: Option<Arc<str>>,
    },
    /// To the user's home shard: a connection closed.
    HomeClosed {
        /// The user.
        user: i64,
        /// The connection's open order.
        seq: u64,
    },
    /// To the connection's shard: the application completed the connection's deferred
    /// authentication (a connection no longer waiting ignores it).
    Authenticated {
        /// The connection, still in its handshake.
        key: ConnKey,
        /// Admitted or refused.
        answer: AuthAnswer,
    },
    /// Close one connection with a code (eviction by `connections_per_user`).
    Close {
        /// The connection on the receiving shard.
        key: ConnKey,
        /// Close code.
        code: u16,
        /// Close reason.
        reason: &'static str,
    },
}

impl DirMsg {
    /// Bytes held beyond the message's own size (see [`ShardMsg::cost`]).
    pub(super) fn held(&self) -> usize {
        match self {
            DirMsg::HomeOpened { info, .. } => info.as_ref().map_or(0, |i| i.len()),
            DirMsg::Authenticated { answer, .. } => match answer {
                Ok((identity, _)) => identity.claims.len(),
                Err((_, message)) => message.len(),
            },
            DirMsg::Replica { .. } | DirMsg::HomeClosed { .. } | DirMsg::Close { .. } => 0,
        }
    }

    /// See [`ShardMsg::shed_kind`]: directory state is never shed.
    pub(super) fn shed_kind(&self) -> Option<ShedKind> {
        match self {
            DirMsg::Replica { .. }
            | DirMsg::HomeOpened { .. }
            | DirMsg::HomeClosed { .. }
            | DirMsg::Authenticated { .. }
            | DirMsg::Close { .. } => None,
        }
    }
}

impl From<DirMsg> for ShardMsg {
    fn from(msg: DirMsg) -> Self {
        ShardMsg::Dir(msg)
    }
}

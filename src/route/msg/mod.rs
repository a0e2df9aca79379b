//! Messages to a shard's inbox, from other shards, the application's handle and the backend
//! API: one enum per concern, wrapped by [`ShardMsg`].
//!
//! Every message is addressed to one shard's inbox (a crossbeam channel) and wakes that shard
//! only when it is asleep in `epoll_wait`. Frames travel as `Bytes`: encoded once, shared.
//! The shard handles each with one `match` on [`ShardMsg`] and one per concern, all without
//! a catch-all arm, so a new message nobody handles does not compile.

mod admin;
mod cluster;
mod deliver;
mod dir;
mod op;
mod presence;
mod room;

pub use admin::AdminMsg;
pub use cluster::ClusterMsg;
pub use deliver::DeliverMsg;
pub use dir::{AuthAnswer, DirMsg};
pub use op::OpMsg;
pub use presence::PresenceMsg;
pub use room::RoomMsg;

use super::ShedKind;
use crate::core::presence::Presence;

/// One message to a shard.
#[derive(Debug)]
pub enum ShardMsg {
    /// Who is connected where.
    Dir(DirMsg),
    /// Frames to queue on connections.
    Deliver(DeliverMsg),
    /// Presence and watch lists.
    Presence(PresenceMsg),
    /// Rooms.
    Room(RoomMsg),
    /// The application handle's operations on users.
    Op(OpMsg),
    /// The admin page's listings.
    Admin(AdminMsg),
    /// From the cluster's broker link: other nodes' messages and state.
    Cluster(ClusterMsg),
    /// Begin graceful shutdown.
    Shutdown,
}

/// Bytes a room name is reckoned at in [`ShardMsg::cost`] (the name is shared, not copied).
const ROOM_REF: usize = 16;

/// Bytes a list of user ids holds.
fn ids(list: &[i64]) -> usize {
    list.len() * 8
}

/// Bytes a presence holds.
fn presence_cost(p: &Presence) -> usize {
    32 + p.status.len() + p.context.as_ref().map_or(0, |c| c.len()) + p.info.as_ref().map_or(0, |i| i.len())
}

impl ShardMsg {
    /// Estimated bytes this message holds while queued: its own size plus what it owns or
    /// shares (frames, id lists). Charged to the receiving inbox's depth.
    pub fn cost(&self) -> usize {
        std::mem::size_of::<ShardMsg>()
            + match self {
                ShardMsg::Dir(msg) => msg.held(),
                ShardMsg::Deliver(msg) => msg.held(),
                ShardMsg::Presence(msg) => msg.held(),
                ShardMsg::Room(msg) => msg.held(),
                ShardMsg::Op(msg) => msg.held(),
                ShardMsg::Admin(msg) => msg.held(),
                ShardMsg::Cluster(msg) => msg.held(),
                ShardMsg::Shutdown => 0,
            }
    }

    /// Whether this message starts work a client asked for, and may therefore be shed when
    /// the receiving inbox is full (`None`: it keeps state consistent or answers an admitted
    /// request, and is never shed).
    pub fn shed_kind(&self) -> Option<ShedKind> {
        match self {
            ShardMsg::Dir(msg) => msg.shed_kind(),
            ShardMsg::Deliver(msg) => msg.shed_kind(),
            ShardMsg::Presence(msg) => msg.shed_kind(),
            ShardMsg::Room(msg) => msg.shed_kind(),
            ShardMsg::Op(msg) => msg.shed_kind(),
            ShardMsg::Admin(msg) => msg.shed_kind(),
            ShardMsg::Cluster(msg) => msg.shed_kind(),
            ShardMsg::Shutdown => None,
        }
    }
}

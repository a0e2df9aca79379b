//! Routing: how work reaches a shard from another shard, the application's handle or the
//! backend API. Links (inboxes, wakers, depth), the messages they carry, how an operation's
//! outcome comes back (completions), and the [`Handle`] that issues operations from any thread.
//!
//! This layer sits below `shard`, `app`, `api` and `server`: it imports `core`, `protocol`
//! and `ws` only (`tests/layers.rs` checks it), so that both the shards and whatever else
//! sends to them build on it without importing each other.

pub mod cluster;
pub mod completion;
pub mod handle;
pub mod link;
pub mod msg;
pub mod out;

pub use completion::{
    AckReply, ClientReply, Completion, ConnInfo, ConnSummary, Joined, Outcome, RoomCount, UserPresence,
    WaitError,
};
pub use handle::{ConnId, Handle, Op, Waiter};
pub use link::{InboxDepth, Link, ShedKind};
pub use msg::ShardMsg;
pub use out::OutMessage;

/// What every sender to the shards shares: one link per shard, and the few settings the
/// [`Handle`] reads. The shards' `Shared` holds it; a `Handle` holds only this.
pub struct Fabric {
    /// One link per shard, index = shard id.
    pub links: Vec<Link>,
    /// Default wait for a client's `client_ack`.
    pub ack_timeout: std::time::Duration,
    /// Default wait for a client's reply to a request.
    pub request_timeout: std::time::Duration,
    /// The cluster's broker link, when `cluster` is set (`None`: one node).
    pub cluster: Option<cluster::ClusterTx>,
}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fabric").field("shards", &self.links.len()).finish()
    }
}

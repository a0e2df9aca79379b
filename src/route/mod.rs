//! Routing: how work reaches a shard from another shard, the application's handle or the
//! backend API. Links (inboxes, wakers, depth), the messages they carry, and how an
//! operation's outcome comes back (completions).
//!
//! This layer sits below `shard`, `app`, `api` and `server`: it imports `core`, `protocol`
//! and `ws` only (`tests/layers.rs` checks it), so that both the shards and whatever else
//! sends to them build on it without importing each other.

pub mod completion;
pub mod link;
pub mod msg;
pub mod out;

pub use completion::{
    AckReply, ClientReply, Completion, ConnInfo, ConnSummary, Outcome, RoomCount, UserPresence, WaitError,
};
pub use link::{InboxDepth, Link, ShedKind};
pub use msg::ShardMsg;
pub use out::OutMessage;

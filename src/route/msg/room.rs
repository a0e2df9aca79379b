//! Rooms: every shard's member counts, publishes, and the two steps of a `room_presence`
//! roster (member ids from every shard with members, then their presences from their home
//! shards).

use std::sync::Arc;

use bytes::Bytes;

use super::{ROOM_REF, ShardMsg, ids, presence_cost};
use crate::core::directory::{ConnAddr, ShardId};
use crate::core::presence::Presence;
use crate::route::{Completion, ShedKind};

/// Rooms: member counts, publishes, and the steps of a `room_presence` roster.
#[derive(Debug)]
pub enum RoomMsg {
    /// Shard `shard` now has `count` members of `room`.
    RoomCount {
        /// The room.
        room: Arc<str>,
        /// The announcing shard.
        shard: ShardId,
        /// Its member count.
        count: u32,
    },
    /// Queue `frame` on the local members of each of `rooms` (each connection once), except
    /// `except`; completes with the count when `done` is given.
    RoomDeliver {
        /// The rooms.
        rooms: Arc<[Arc<str>]>,
        /// The encoded frame.
        frame: Bytes,
        /// A connection to skip (the sender's).
        except: Option<ConnAddr>,
        /// Gets `Delivered(n)`.
        done: Option<Completion>,
    },
    /// Report the local members' user ids of `room` above `after` (the smallest `limit` of
    /// them) to `reply_shard`'s roster `roster`.
    RoomRoster {
        /// The room.
        room: Arc<str>,
        /// Only user ids greater than this (the page's cursor).
        after: i64,
        /// At most this many ids.
        limit: u32,
        /// The asking shard.
        reply_shard: ShardId,
        /// The asking shard's gather entry.
        roster: u32,
    },
    /// One shard's part of a roster: local members' user ids, sorted.
    RosterPart {
        /// The gather entry.
        roster: u32,
        /// User ids.
        users: Vec<i64>,
    },
    /// To the home shard of each of `users`: report their presences to `reply_shard`'s roster.
    PresenceBatch {
        /// Users homed on the receiving shard.
        users: Vec<i64>,
        /// The asking shard.
        reply_shard: ShardId,
        /// The asking shard's gather entry.
        roster: u32,
    },
    /// One home shard's presences for a roster.
    PresencePart {
        /// The gather entry.
        roster: u32,
        /// Each user's presence.
        entries: Vec<(i64, Presence)>,
    },
    /// The application's `join_room`: put the user's local connections into `room`, as a
    /// client `join` would (limits, `joined` events): `Joined`.
    JoinUser {
        /// The user.
        user: i64,
        /// The room (a valid name).
        room: Arc<str>,
        /// Gets `Joined`.
        done: Completion,
    },
    /// The application's `leave_room`: take the user's local connections out of `room`, as a
    /// client `leave` would (`left` events): `Delivered(n)`, the connections that left.
    LeaveUser {
        /// The user.
        user: i64,
        /// The room.
        room: Arc<str>,
        /// Gets `Delivered(n)`.
        done: Completion,
    },
    /// Report the local members' user ids of `room`: `Members(list)`.
    RoomMembers {
        /// The room.
        room: Arc<str>,
        /// Gets `Members`.
        done: Completion,
    },
}

impl RoomMsg {
    /// Bytes held beyond the message's own size (see [`ShardMsg::cost`]).
    pub(super) fn held(&self) -> usize {
        match self {
            RoomMsg::RoomDeliver { rooms, frame, .. } => frame.len() + rooms.len() * ROOM_REF,
            RoomMsg::RosterPart { users, .. } | RoomMsg::PresenceBatch { users, .. } => ids(users),
            RoomMsg::PresencePart { entries, .. } => entries.iter().map(|(_, p)| 8 + presence_cost(p)).sum(),
            RoomMsg::RoomCount { .. }
            | RoomMsg::RoomRoster { .. }
            | RoomMsg::RoomMembers { .. }
            | RoomMsg::JoinUser { .. }
            | RoomMsg::LeaveUser { .. } => 0,
        }
    }

    /// See [`ShardMsg::shed_kind`].
    pub(super) fn shed_kind(&self) -> Option<ShedKind> {
        match self {
            RoomMsg::RoomDeliver { .. } => Some(ShedKind::Room),
            RoomMsg::RoomRoster { .. } => Some(ShedKind::Roster),
            RoomMsg::RoomCount { .. }
            | RoomMsg::RosterPart { .. }
            | RoomMsg::PresenceBatch { .. }
            | RoomMsg::PresencePart { .. }
            | RoomMsg::RoomMembers { .. }
            | RoomMsg::JoinUser { .. }
            | RoomMsg::LeaveUser { .. } => None,
        }
    }
}

impl From<RoomMsg> for ShardMsg {
    fn from(msg: RoomMsg) -> Self {
        ShardMsg::Room(msg)
    }
}

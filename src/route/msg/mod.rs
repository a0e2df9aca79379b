//! Messages between shards (and from the server handle to shards).
//!
//! Every message is addressed to one shard's inbox (a crossbeam channel) and wakes that shard
//! only when it is asleep in `epoll_wait`. Frames travel as `Bytes`: encoded once, shared.

use bytes::Bytes;

use std::sync::Arc;

use super::{Completion, OutMessage, ShedKind};
use crate::core::directory::{ConnAddr, ConnKey, ShardId};
use crate::core::pending::WaitKind;
use crate::core::presence::Presence;

/// One message to a shard.
#[derive(Debug)]
pub enum ShardMsg {
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
    },
    /// To the user's home shard: a connection closed.
    HomeClosed {
        /// The user.
        user: i64,
        /// The connection's open order.
        seq: u64,
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
    /// Queue `frame` on every open local connection except `except`.
    Broadcast {
        /// The encoded frame.
        frame: Bytes,
        /// A connection to skip (the sender's).
        except: Option<ConnAddr>,
    },
    /// To the user's home shard: store a presence and, if `fan_out`, tell the watchers.
    PresenceSet {
        /// The user.
        user: i64,
        /// The new presence.
        presence: Presence,
        /// Notify watchers and `rooms` (false when the sender already broadcast it:
        /// `presence_scope = "all"`).
        fan_out: bool,
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
    /// Queue `frames` on one connection, in order (a subscription's current presences).
    DeliverFrames {
        /// The connection on the receiving shard.
        key: ConnKey,
        /// The encoded frames.
        frames: Vec<Bytes>,
    },
    /// To `user`'s home shard: report its presence: `Presence`.
    QueryPresence {
        /// The user.
        user: i64,
        /// Gets `Presence`.
        done: Completion,
    },
    /// Report the local members' user ids of `room`: `Members(list)`.
    RoomMembers {
        /// The room.
        room: Arc<str>,
        /// Gets `Members`.
        done: Completion,
    },
    /// Admin listing: this shard's open connections with `seq > after` (of `user` when
    /// given), at most `limit`, lowest `seq` first: `Connections`.
    AdminConnections {
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
    AdminRooms {
        /// Most rooms listed.
        limit: usize,
        /// Gets `Rooms`.
        done: Completion,
    },
    /// Begin graceful shutdown.
    Shutdown,
}

/// Bytes a room name is reckoned at in [`ShardMsg::cost`] (the name is shared, not copied).
const ROOM_REF: usize = 16;

impl ShardMsg {
    /// Estimated bytes this message holds while queued: its own size plus what it owns or
    /// shares (frames, id lists). Charged to the receiving inbox's depth.
    pub fn cost(&self) -> usize {
        let ids = |list: &[i64]| list.len() * 8;
        let presence = |p: &Presence| 32 + p.status.len() + p.context.as_ref().map_or(0, |c| c.len());
        std::mem::size_of::<ShardMsg>()
            + match self {
                ShardMsg::Deliver { users, frame } => ids(users) + frame.len(),
                ShardMsg::DeliverConn { frame, .. }
                | ShardMsg::Broadcast { frame, .. }
                | ShardMsg::SendUser { frame, .. } => frame.len(),
                ShardMsg::DeliverFrames { frames, .. } => frames.iter().map(|f| 32 + f.len()).sum(),
                ShardMsg::PresenceSet { presence: p, rooms, .. } => presence(p) + rooms.len() * ROOM_REF,
                ShardMsg::PresenceFanout { frame, rooms, users, .. } => {
                    frame.len() + rooms.len() * ROOM_REF + ids(users)
                }
                ShardMsg::AdmitWatch { targets, .. }
                | ShardMsg::DropWatch { targets, .. }
                | ShardMsg::Watch { targets, .. }
                | ShardMsg::Unwatch { targets, .. } => ids(targets),
                ShardMsg::BroadcastExcept { frame, exclude, .. } => frame.len() + ids(exclude),
                ShardMsg::RoomDeliver { rooms, frame, .. } => frame.len() + rooms.len() * ROOM_REF,
                ShardMsg::RosterPart { users, .. } | ShardMsg::PresenceBatch { users, .. } => ids(users),
                ShardMsg::PresencePart { entries, .. } => entries.iter().map(|(_, p)| 8 + presence(p)).sum(),
                _ => 0,
            }
    }

    /// Whether this message starts work a client asked for, and may therefore be shed when
    /// the receiving inbox is full (`None`: it keeps state consistent or answers an admitted
    /// request, and is never shed).
    pub fn shed_kind(&self) -> Option<ShedKind> {
        match self {
            ShardMsg::Deliver { .. } => Some(ShedKind::Deliver),
            ShardMsg::Broadcast { .. } => Some(ShedKind::Broadcast),
            ShardMsg::RoomDeliver { .. } => Some(ShedKind::Room),
            ShardMsg::PresenceSet { .. } | ShardMsg::PresenceFanout { .. } => Some(ShedKind::Presence),
            ShardMsg::AdmitWatch { .. } | ShardMsg::DropWatch { .. } => Some(ShedKind::Watch),
            ShardMsg::RoomRoster { .. } => Some(ShedKind::Roster),
            _ => None,
        }
    }
}

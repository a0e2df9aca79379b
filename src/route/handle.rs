//! The application's handle: every server-initiated operation, callable from any thread.
//!
//! An operation becomes one or more [`ShardMsg`]s to the shards that own the answer (a user's
//! home shard, the shard of the connection asked to acknowledge, every shard for a broadcast).
//! Results come back on a channel as [`Outcome`]s: [`Waiter`] blocks on it, while an event loop
//! (the HTTP API) uses [`Handle::submit`] with its own channel, tag and waker, so thousands of
//! waits cost no thread each.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use serde_json::value::RawValue;

use super::Fabric;
use super::cluster::LinkMsg;
use super::completion::TaskSlot;
use super::msg::{AdminMsg, DeliverMsg, OpMsg, PresenceMsg, RoomMsg, ShardMsg};
use super::{
    AckReply, ClientReply, Completion, ConnInfo, Joined, OutMessage, Outcome, UserPresence, WaitError,
};
use crate::core::Directory;
use crate::core::directory::ConnAddr;
use crate::core::pending::WaitKind;
use crate::core::presence::Presence;
use crate::protocol::envelope::{Envelope, error_notification, room_message, server_ack};

/// Most users in one [`Handle::presence_many`] call.
pub const MAX_PRESENCE_MANY: usize = 1_000;

/// Most users in one [`Handle::watch_presence`] / [`Handle::unwatch_presence`] call: the
/// bound of a client's `presence_subscribe` list.
pub const MAX_WATCH_TARGETS: usize = crate::protocol::router::MAX_WATCH_LIST;

/// Longest status [`Handle::set_presence`] accepts, in bytes.
pub const MAX_STATUS_BYTES: usize = 256;

thread_local! {
    /// Set on the shards' event-loop threads: [`Waiter::wait`] refuses to block there.
    static ON_SHARD: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as a shard's event loop (see [`WaitError::OnShardThread`]).
pub(crate) fn mark_shard_thread() {
    ON_SHARD.with(|on| on.set(true));
}

/// An operation for [`Handle::submit`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Op<'a> {
    /// Queue `msg` on every connection of each user; one `Delivered(n)` per user.
    Send {
        /// Receiving users.
        users: &'a [i64],
        /// The message.
        msg: &'a OutMessage,
    },
    /// Every connection of every user not in `exclude`; one `Delivered(n)` per shard.
    Broadcast {
        /// The message.
        msg: &'a OutMessage,
        /// Users to skip.
        exclude: &'a [i64],
    },
    /// Send to the user's newest connection and wait for its `client_ack`: `Ack` or `Failed`.
    Ack {
        /// Receiving user.
        user: i64,
        /// The message (the tier adds the pid).
        msg: &'a OutMessage,
        /// Wait bound; `ack_timeout` when `None`.
        timeout: Option<Duration>,
    },
    /// Send to the user's newest connection and wait for its message with the same pid:
    /// `Reply` or `Failed`.
    Request {
        /// Receiving user.
        user: i64,
        /// The message (the tier adds the pid).
        msg: &'a OutMessage,
        /// Wait bound; `request_timeout` when `None`.
        timeout: Option<Duration>,
    },
    /// Publish `body` (raw JSON) to a room as a `room_message`; one `Delivered(n)` per shard.
    RoomPublish {
        /// The room.
        room: &'a str,
        /// The message body.
        body: &'a RawValue,
        /// Optional metadata.
        meta: Option<&'a RawValue>,
        /// `from` in the envelope (`null` when `None`: the server).
        from: Option<i64>,
    },
    /// A room's members: one `Members(list)` per shard.
    RoomMembers {
        /// The room.
        room: &'a str,
    },
    /// The user's presence: `Presence`.
    Presence {
        /// The user.
        user: i64,
    },
    /// The user's connections: `User(list)`.
    Query {
        /// The user.
        user: i64,
    },
    /// Close every connection of the user with 1000: `Delivered(n)`.
    Disconnect {
        /// The user.
        user: i64,
    },
    /// Admin listing: open connections with an open order above `after` (of `user` when
    /// given), at most `limit` per shard: one `Connections` per shard.
    AdminConnections {
        /// Cursor: the last open order already listed (0 from the start).
        after: u64,
        /// Only this user's connections.
        user: Option<i64>,
        /// Page size.
        limit: usize,
    },
    /// Admin listing: rooms and their member counts, the `limit` largest: `Rooms`.
    AdminRooms {
        /// Most rooms listed.
        limit: usize,
    },
    /// Put every connection of `user` into `room`, as a client `join`: one `Joined` per shard.
    JoinRoom {
        /// The user.
        user: i64,
        /// The room.
        room: &'a str,
    },
    /// Take every connection of `user` out of `room`, as a client `leave`: one
    /// `Delivered(n)` per shard.
    LeaveRoom {
        /// The user.
        user: i64,
        /// The room.
        room: &'a str,
    },
    /// Add `targets` to the user's watch list, as a client `presence_subscribe`:
    /// `Delivered(n)` (the watcher's connections) or `Failed(Limit)`.
    Watch {
        /// The watching user.
        watcher: i64,
        /// Users to watch.
        targets: &'a [i64],
    },
    /// Remove `targets` from the user's watch list: `Delivered(n)`.
    Unwatch {
        /// The watching user.
        watcher: i64,
        /// Users to stop watching.
        targets: &'a [i64],
    },
    /// Set the user's presence, as a client `presence_update` without a target:
    /// `Delivered(n)` (the user's connections; 0 when offline, nothing stored).
    SetPresence {
        /// The user.
        user: i64,
        /// The status.
        status: &'a str,
        /// The status's context (raw JSON).
        context: Option<&'a RawValue>,
    },
    /// Presences of many users: one `Presences` per home shard asked.
    PresenceMany {
        /// The users (at most [`MAX_PRESENCE_MANY`]).
        users: &'a [i64],
    },
}

/// A connection anywhere in the server; `Copy` and `Send`, so a worker can answer it later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId(pub(crate) ConnAddr);

/// Issues server-initiated operations. Cheap to clone; usable from any thread.
#[derive(Debug, Clone)]
pub struct Handle {
    fabric: Arc<Fabric>,
}

impl Handle {
    pub(crate) fn new(fabric: Arc<Fabric>) -> Self {
        Handle { fabric }
    }

    /// Starts `op`; its outcomes arrive through `done` (cloned per part). Returns how many
    /// outcomes will arrive.
    pub fn submit(&self, op: Op<'_>, done: &Completion) -> usize {
        match op {
            Op::Send { users, msg } => {
                let frame = msg.frame(None);
                for &user in users {
                    let send = OpMsg::SendUser { user, frame: frame.clone(), done: Some(done.clone()) };
                    self.to_home(user, send);
                }
                users.len()
            }
            Op::Broadcast { msg, exclude } => {
                let frame = msg.frame(None);
                let mut sorted = exclude.to_vec();
                sorted.sort_unstable();
                let exclude: Arc<[i64]> = sorted.into();
                let elsewhere = self.counted_elsewhere(None, &frame, &exclude, done);
                for link in &self.fabric.links {
                    let exclude = Arc::clone(&exclude);
                    link.send_now(OpMsg::BroadcastExcept {
                        frame: frame.clone(),
                        exclude,
                        done: Some(done.clone()),
                    });
                }
                self.fabric.links.len() + elsewhere
            }
            Op::Ack { user, msg, timeout } => {
                self.await_reply(user, msg, WaitKind::Ack, timeout.unwrap_or(self.fabric.ack_timeout), done)
            }
            Op::Request { user, msg, timeout } => {
                let timeout = timeout.unwrap_or(self.fabric.request_timeout);
                self.await_reply(user, msg, WaitKind::Request, timeout, done)
            }
            Op::RoomPublish { room, body, meta, from } => {
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                let frame = room_message(
                    from,
                    room,
                    ts as u64,
                    body.get().as_bytes(),
                    meta.map(|m| m.get().as_bytes()),
                );
                let rooms: Arc<[Arc<str>]> = Arc::from(vec![Arc::from(room)]);
                let elsewhere = self.counted_elsewhere(Some(&rooms[0]), &frame, &[], done);
                for link in &self.fabric.links {
                    let msg = RoomMsg::RoomDeliver {
                        rooms: Arc::clone(&rooms),
                        frame: frame.clone(),
                        except: None,
                        done: Some(done.clone()),
                    };
                    link.send_now(msg);
                }
                self.fabric.links.len() + elsewhere
            }
            Op::RoomMembers { room } => {
                let room: Arc<str> = Arc::from(room);
                for link in &self.fabric.links {
                    link.send_now(RoomMsg::RoomMembers { room: Arc::clone(&room), done: done.clone() });
                }
                self.fabric.links.len() + self.members_elsewhere(room, done)
            }
            Op::Presence { user } => {
                self.to_home(user, PresenceMsg::QueryPresence { user, done: done.clone() });
                1
            }
            Op::Query { user } => {
                self.to_home(user, OpMsg::QueryUser { user, done: done.clone() });
                1
            }
            Op::Disconnect { user } => {
                self.to_home(user, OpMsg::DisconnectUser { user, done: Some(done.clone()) });
                1 + self.disconnect_elsewhere(user, done)
            }
            Op::AdminConnections { after, user, limit } => {
                // One user's connections are all on the shards its directory names; asking
                // every shard keeps this simple and is one message per shard either way.
                for link in &self.fabric.links {
                    link.send_now(AdminMsg::Connections { after, user, limit, done: done.clone() });
                }
                self.fabric.links.len()
            }
            Op::AdminRooms { limit } => {
                // Every shard keeps every room's count (replicas): one shard answers for all.
                self.fabric.links[0].send_now(AdminMsg::Rooms { limit, done: done.clone() });
                1
            }
            Op::JoinRoom { user, room } | Op::LeaveRoom { user, room } => {
                if crate::core::rooms::validate_name(room).is_err() {
                    return refuse(done, "room name: 1 to 128 bytes of A-Z a-z 0-9 _ - . : @ #");
                }
                // Each shard knows its own connections of the user exactly: asking every shard
                // is one message per shard, and races with no directory replica.
                let join = matches!(op, Op::JoinRoom { .. });
                let room: Arc<str> = Arc::from(room);
                for link in &self.fabric.links {
                    let (room, done) = (Arc::clone(&room), done.clone());
                    if join {
                        link.send_now(RoomMsg::JoinUser { user, room, done });
                    } else {
                        link.send_now(RoomMsg::LeaveUser { user, room, done });
                    }
                }
                self.fabric.links.len()
            }
            Op::Watch { watcher, targets } | Op::Unwatch { watcher, targets } => {
                if targets.len() > MAX_WATCH_TARGETS {
                    return refuse(done, "too many users in one watch call (at most 1024)");
                }
                let (targets, done) = (targets.to_vec(), done.clone());
                if matches!(op, Op::Watch { .. }) {
                    self.to_home(watcher, PresenceMsg::ServerWatch { watcher, targets, done });
                } else {
                    self.to_home(watcher, PresenceMsg::ServerUnwatch { watcher, targets, done });
                }
                1
            }
            Op::SetPresence { user, status, context } => {
                if status.is_empty() || status.len() > MAX_STATUS_BYTES {
                    return refuse(done, "status must be 1 to 256 bytes");
                }
                let presence = Box::new(Presence {
                    status: status.into(),
                    context: context.map(|c| c.get().as_bytes().into()),
                    since_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    info: None, // the home shard's
                });
                let msg = PresenceMsg::ServerSet {
                    user,
                    presence,
                    rooms: Vec::new(),
                    collect: None,
                    done: done.clone(),
                };
                self.to_home(user, msg);
                1
            }
            Op::PresenceMany { users } => {
                if users.len() > MAX_PRESENCE_MANY {
                    return refuse(done, "too many users in one presence call (at most 1000)");
                }
                let shards = self.fabric.links.len();
                let mut groups: Vec<Vec<i64>> = vec![Vec::new(); shards];
                for &user in users {
                    groups[Directory::home_of(user, shards)].push(user);
                }
                let mut parts = 0;
                for (home, mut users) in groups.into_iter().enumerate().filter(|(_, g)| !g.is_empty()) {
                    users.sort_unstable();
                    users.dedup();
                    self.fabric.links[home]
                        .send_now(PresenceMsg::QueryPresenceMany { users, done: done.clone() });
                    parts += 1;
                }
                parts
            }
        }
    }

    fn await_reply(
        &self,
        user: i64,
        msg: &OutMessage,
        kind: WaitKind,
        timeout: Duration,
        done: &Completion,
    ) -> usize {
        let msg = Arc::new(msg.clone());
        let timeout_ms = timeout.as_millis().min(u128::from(u64::MAX / 2)) as u64;
        self.to_home(user, OpMsg::Await { user, msg, kind, timeout_ms, done: done.clone() });
        1
    }

    /// With a cluster, hands `msg` to the broker link for the other nodes (the counts the
    /// caller gets are this node's; a refusal — broker down, queue full — is counted in
    /// `customws_cluster_unavailable_total`).
    /// With a cluster, closes `user`'s connections on the other nodes: one more part,
    /// `Delivered(n)` with the connections the view counts there (0 when the link refuses).
    fn disconnect_elsewhere(&self, user: i64, done: &Completion) -> usize {
        let Some(cluster) = &self.fabric.cluster else { return 0 };
        if let Err(LinkMsg::Disconnect { done, .. }) =
            cluster.try_send_or_return(LinkMsg::Disconnect { user, done: done.clone() })
        {
            done.complete(Outcome::Delivered(0));
        }
        1
    }

    /// With a cluster, hands a broadcast or room publish to the link for the other nodes: one
    /// more part, `Delivered(n)` with what it reaches there (0 when the link refuses: broker
    /// down, queue full).
    fn counted_elsewhere(
        &self,
        room: Option<&Arc<str>>,
        frame: &bytes::Bytes,
        exclude: &[i64],
        done: &Completion,
    ) -> usize {
        let Some(cluster) = &self.fabric.cluster else { return 0 };
        let msg = LinkMsg::Counted {
            room: room.cloned(),
            frame: frame.clone(),
            exclude: Arc::from(exclude),
            done: done.clone(),
        };
        if let Err(LinkMsg::Counted { done, .. }) = cluster.try_send_or_return(msg) {
            done.complete(Outcome::Delivered(0));
        }
        1
    }

    /// With a cluster, asks the link for `room`'s members on the other nodes: one more part
    /// (all of them this node's when the link refuses: broker down, queue full).
    fn members_elsewhere(&self, room: Arc<str>, done: &Completion) -> usize {
        let Some(cluster) = &self.fabric.cluster else { return 0 };
        if let Err(LinkMsg::RoomMembers { done, .. }) =
            cluster.try_send_or_return(LinkMsg::RoomMembers { room, done: done.clone() })
        {
            done.complete(Outcome::Members(Vec::new()));
        }
        1
    }

    fn to_home(&self, user: i64, msg: impl Into<ShardMsg>) {
        let home = Directory::home_of(user, self.fabric.links.len());
        self.fabric.links[home].send_now(msg);
    }

    fn start<T>(&self, op: Op<'_>, finish: fn(Vec<Outcome>) -> Result<T, WaitError>) -> Waiter<T> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let task = Arc::new(TaskSlot::default());
        let parts = self.submit(op, &Completion::for_waiter(tx, Arc::clone(&task)));
        Waiter { rx, parts, finish, task, got: Vec::new() }
    }

    /// Queues `msg` on every connection of `user`; yields the number of connections.
    pub fn send_to_user(&self, user: i64, msg: &OutMessage) -> Waiter<usize> {
        self.start(Op::Send { users: &[user], msg }, sum_delivered)
    }

    /// Queues `msg` on every connection of each user; yields the number of connections.
    pub fn send_to_users(&self, users: &[i64], msg: &OutMessage) -> Waiter<usize> {
        self.start(Op::Send { users, msg }, sum_delivered)
    }

    /// Queues `msg` on every connection except those of `exclude`; yields the count.
    pub fn broadcast(&self, msg: &OutMessage, exclude: &[i64]) -> Waiter<usize> {
        self.start(Op::Broadcast { msg, exclude }, sum_delivered)
    }

    /// Sends `msg` with a server pid to the user's newest connection and waits for the
    /// client's `client_ack` (`timeout` or `ack_timeout`).
    pub fn send_for_ack(&self, user: i64, msg: &OutMessage, timeout: Option<Duration>) -> Waiter<AckReply> {
        self.start(Op::Ack { user, msg, timeout }, |outcomes| match outcomes.into_iter().next() {
            Some(Outcome::Ack(reply)) => Ok(reply),
            other => Err(failure(other)),
        })
    }

    /// Sends `msg` with a server pid to the user's newest connection and waits for the
    /// client's next message carrying that pid (`timeout` or `request_timeout`).
    pub fn request(&self, user: i64, msg: &OutMessage, timeout: Option<Duration>) -> Waiter<ClientReply> {
        self.start(Op::Request { user, msg, timeout }, |outcomes| match outcomes.into_iter().next() {
            Some(Outcome::Reply(reply)) => Ok(reply),
            other => Err(failure(other)),
        })
    }

    /// The user's connections (empty when offline).
    pub fn user_connections(&self, user: i64) -> Waiter<Vec<ConnInfo>> {
        self.start(Op::Query { user }, |outcomes| match outcomes.into_iter().next() {
            Some(Outcome::User(list)) => Ok(list),
            other => Err(failure(other)),
        })
    }

    /// Whether the user has any connection.
    pub fn is_online(&self, user: i64) -> Waiter<bool> {
        self.start(Op::Query { user }, |outcomes| match outcomes.into_iter().next() {
            Some(Outcome::User(list)) => Ok(!list.is_empty()),
            other => Err(failure(other)),
        })
    }

    /// Publishes `body` (and `meta`) to `room` as a `room_message` from the server
    /// (`from: null`); yields the number of connections it was queued on. Taking `RawValue`
    /// keeps anything but valid JSON off the wire (`serde_json::value::to_raw_value`,
    /// `RawValue::from_string`).
    pub fn publish_to_room(&self, room: &str, body: &RawValue, meta: Option<&RawValue>) -> Waiter<usize> {
        self.start(Op::RoomPublish { room, body, meta, from: None }, sum_delivered)
    }

    /// The user ids of a room's members, sorted, each once.
    pub fn room_members(&self, room: &str) -> Waiter<Vec<i64>> {
        self.start(Op::RoomMembers { room }, |outcomes| {
            let mut users = Vec::new();
            for outcome in outcomes {
                match outcome {
                    Outcome::Members(list) => users.extend(list),
                    other => return Err(failure(Some(other))),
                }
            }
            users.sort_unstable();
            users.dedup();
            Ok(users)
        })
    }

    /// The user's current presence (`offline` when not connected).
    pub fn presence(&self, user: i64) -> Waiter<UserPresence> {
        self.start(Op::Presence { user }, |outcomes| match outcomes.into_iter().next() {
            Some(Outcome::Presence(p)) => Ok(p),
            other => Err(failure(other)),
        })
    }

    /// The presence of every member of `room`, by user id: the member list first, then one
    /// [`Handle::presence_many`] per 1,000 members; each step bounded by `limit`.
    pub fn room_presence(&self, room: &str, limit: Duration) -> Result<Vec<UserPresence>, WaitError> {
        let members = self.room_members(room).wait_timeout(limit)?;
        let waiters: Vec<_> =
            members.chunks(MAX_PRESENCE_MANY).map(|chunk| self.presence_many(chunk)).collect();
        let mut all = Vec::with_capacity(members.len());
        for waiter in waiters {
            all.extend(waiter.wait_timeout(limit)?);
        }
        Ok(all)
    }

    /// Closes every connection of the user with 1000; yields how many.
    pub fn disconnect_user(&self, user: i64) -> Waiter<usize> {
        self.start(Op::Disconnect { user }, sum_delivered)
    }

    /// Queues `msg` on one connection (e.g. a worker answering the connection whose callback
    /// started it). Fire-and-forget: a connection gone meanwhile drops it.
    pub fn send_to_conn(&self, conn: ConnId, msg: &OutMessage) {
        self.send_frame_to_conn(conn, msg.frame(None));
    }

    /// Queues an already-encoded frame on one connection.
    pub fn send_frame_to_conn(&self, conn: ConnId, frame: bytes::Bytes) {
        let addr = conn.0;
        if let Some(link) = self.fabric.links.get(addr.shard) {
            link.send_now(DeliverMsg::DeliverConn { key: addr.key, frame });
        }
    }

    /// Hands a deferred authentication's answer to the shard of the waiting connection.
    pub(crate) fn complete_auth(&self, conn: ConnId, answer: super::msg::AuthAnswer) {
        let addr = conn.0;
        if let Some(link) = self.fabric.links.get(addr.shard) {
            link.send_now(super::msg::DirMsg::Authenticated { key: addr.key, answer });
        }
    }

    /// Sends `server_ack` `{acknowledgedPid, status}` to `conn`: a worker's counterpart of
    /// `Conn::ack`. Fire-and-forget like [`Handle::send_frame_to_conn`]: a connection gone
    /// meanwhile drops it.
    pub fn ack(&self, conn: ConnId, pid: &str, status: &str) {
        self.send_frame_to_conn(conn, server_ack(pid, status));
    }

    /// Sends `error_notification` `{originalPid?, code, message}` to `conn` (fire-and-forget,
    /// like [`Handle::ack`]).
    pub fn error(&self, conn: ConnId, pid: Option<&str>, code: u16, message: &str) {
        self.send_frame_to_conn(conn, error_notification(pid, code, message));
    }

    /// Sends `{"pid": pid, "type": kind, "payload": payload}` to `conn` (fire-and-forget, like
    /// [`Handle::ack`]). `payload_json` must be JSON text (use [`OutMessage::new`] with
    /// [`Handle::send_to_conn`] to have it checked).
    pub fn respond(&self, conn: ConnId, pid: &str, kind: &str, payload_json: &str) {
        let frame = Envelope::new(kind).pid(Some(pid)).raw_payload(Some(payload_json.as_bytes())).frame();
        self.send_frame_to_conn(conn, frame);
    }

    /// Puts every connection of `user`, on every shard, into `room`, exactly as if each had
    /// sent `join` (the room's members get `joined` events; `max_rooms_per_connection` and
    /// `max_room_members` apply per connection). Yields how many of the user's connections
    /// are members now and how many the limits refused; `{0, 0}` when the user has no
    /// connection (nothing is remembered for a later one). An invalid room name fails with
    /// [`WaitError::Invalid`].
    pub fn join_room(&self, user: i64, room: &str) -> Waiter<Joined> {
        self.start(Op::JoinRoom { user, room }, |outcomes| {
            outcomes.into_iter().try_fold(Joined::default(), |sum, outcome| match outcome {
                Outcome::Joined(j) => {
                    Ok(Joined { joined: sum.joined + j.joined, refused: sum.refused + j.refused })
                }
                other => Err(failure(Some(other))),
            })
        })
    }

    /// Takes every connection of `user` out of `room`, as if each had sent `leave` (members
    /// get `left` events); yields how many connections left (0: none was a member, or the
    /// user has no connection).
    pub fn leave_room(&self, user: i64, room: &str) -> Waiter<usize> {
        self.start(Op::LeaveRoom { user, room }, sum_delivered)
    }

    /// Adds `targets` to `watcher`'s watch list, as if the user had sent `presence_subscribe`:
    /// every connection of the watcher gets the current `presence_event` of each target not
    /// watched yet, then every change. The list is the user's and lasts while the user has a
    /// connection: it is dropped at the last disconnect, like a client's subscriptions, and
    /// not kept for a later connection. Yields the watcher's connections (0 when offline:
    /// nothing is stored). At most [`MAX_WATCH_TARGETS`] per call ([`WaitError::Invalid`]);
    /// a list over 10,000 users fails with [`WaitError::Limit`], adding none.
    pub fn watch_presence(&self, watcher: i64, targets: &[i64]) -> Waiter<usize> {
        self.start(Op::Watch { watcher, targets }, sum_delivered)
    }

    /// Removes `targets` from `watcher`'s watch list, as if the user had sent
    /// `presence_unsubscribe`; yields the watcher's connections (0 when offline).
    pub fn unwatch_presence(&self, watcher: i64, targets: &[i64]) -> Waiter<usize> {
        self.start(Op::Unwatch { watcher, targets }, sum_delivered)
    }

    /// Sets `user`'s presence as a client `presence_update` without a target would: stored at
    /// the user's home shard and told to the user's watchers and to the members of the rooms
    /// of all of the user's connections (everyone with `presence_scope = "all"`); a repeat of
    /// the current status and context tells nobody. The status stays until changed (a status
    /// in `transient_statuses` does not expire when set this way). Yields the user's
    /// connections; 0 when the user is offline, and nothing is stored (an offline user's
    /// presence is `offline`). A status that is empty or over [`MAX_STATUS_BYTES`] fails with
    /// [`WaitError::Invalid`].
    pub fn set_presence(&self, user: i64, status: &str, context: Option<&RawValue>) -> Waiter<usize> {
        self.start(Op::SetPresence { user, status, context }, sum_delivered)
    }

    /// The presence of each of `users` (each once, by user id), in the shape of
    /// [`Handle::presence`]: one message to each home shard involved, not one per user, so a
    /// contact list of hundreds is one round trip. At most [`MAX_PRESENCE_MANY`] users
    /// ([`WaitError::Invalid`]).
    pub fn presence_many(&self, users: &[i64]) -> Waiter<Vec<UserPresence>> {
        self.start(Op::PresenceMany { users }, |outcomes| {
            let mut all = Vec::new();
            for outcome in outcomes {
                match outcome {
                    Outcome::Presences(list) => all.extend(list),
                    other => return Err(failure(Some(other))),
                }
            }
            all.sort_unstable_by_key(|p| p.user_id);
            Ok(all)
        })
    }

    /// Answers a deferred authorization of one of `conn`'s operations (see
    /// the application layer's `Decision`); `refusal` `None` allows it.
    pub(crate) fn decide(
        &self,
        conn: ConnId,
        seq: u64,
        refusal: Option<(u16, std::borrow::Cow<'static, str>)>,
    ) {
        let addr = conn.0;
        if let Some(link) = self.fabric.links.get(addr.shard) {
            link.send_now(OpMsg::Decided { key: addr.key, seq, refusal });
        }
    }

    /// Begins graceful shutdown (close 1001 everywhere, pending waits fail `ShuttingDown`).
    pub fn shutdown(&self) {
        for link in &self.fabric.links {
            link.send_now(ShardMsg::Shutdown);
        }
    }
}

fn sum_delivered(outcomes: Vec<Outcome>) -> Result<usize, WaitError> {
    outcomes.into_iter().try_fold(0, |sum, outcome| match outcome {
        Outcome::Delivered(n) => Ok(sum + n),
        other => Err(failure(Some(other))),
    })
}

/// Completes `done` at once with [`WaitError::Invalid`]: one outcome.
fn refuse(done: &Completion, why: &'static str) -> usize {
    done.clone().complete(Outcome::Failed(WaitError::Invalid(why)));
    1
}

fn failure(outcome: Option<Outcome>) -> WaitError {
    match outcome {
        Some(Outcome::Failed(e)) => e,
        _ => WaitError::ShuttingDown,
    }
}

/// The pending result of an operation started through [`Handle`].
///
/// Block on it with [`Waiter::wait`] from any thread but a shard's (application callbacks run
/// on the shards: there it fails with [`WaitError::OnShardThread`]), or `.await` it from async
/// code: `Waiter` is a [`Future`] woken by the shard that completes it, so an async
/// application needs no thread per wait and the tier needs no async runtime. A future has
/// no timeout of its own beyond the operation's (a client wait's `timeout`); wrap it in the
/// runtime's timeout when you need a shorter one.
#[derive(Debug)]
#[must_use = "a Waiter does nothing unless waited on; dropping it is fine for fire-and-forget"]
pub struct Waiter<T> {
    rx: Receiver<(u64, Outcome)>,
    parts: usize,
    finish: fn(Vec<Outcome>) -> Result<T, WaitError>,
    task: Arc<TaskSlot>,
    /// Outcomes received so far by `poll`.
    got: Vec<Outcome>,
}

impl<T> Waiter<T> {
    /// Blocks until the result is known. Waits on clients are bounded by their timeout, so
    /// this returns; if the server stops first, the result is `ShuttingDown`.
    ///
    /// On a shard's thread (in an `Application` callback) it returns
    /// [`WaitError::OnShardThread`] at once instead of blocking: the answer may have to come
    /// from that shard, which cannot run while it waits (a deadlock, or every connection of
    /// the shard stalled until the timeout). Wait in a `Workers` job instead.
    pub fn wait(self) -> Result<T, WaitError> {
        if ON_SHARD.with(Cell::get) {
            return Err(WaitError::OnShardThread);
        }
        self.collect(|rx| rx.recv().map_err(|_| WaitError::ShuttingDown))
    }

    /// Like [`Waiter::wait`], giving up with `TimedOut` after `limit` (and refused the same
    /// way on a shard's thread).
    pub fn wait_timeout(self, limit: Duration) -> Result<T, WaitError> {
        if ON_SHARD.with(Cell::get) {
            return Err(WaitError::OnShardThread);
        }
        let deadline = std::time::Instant::now() + limit;
        self.collect(|rx| {
            rx.recv_deadline(deadline).map_err(|e| match e {
                RecvTimeoutError::Timeout => WaitError::TimedOut,
                RecvTimeoutError::Disconnected => WaitError::ShuttingDown,
            })
        })
    }

    fn collect(
        mut self,
        mut next: impl FnMut(&Receiver<(u64, Outcome)>) -> Result<(u64, Outcome), WaitError>,
    ) -> Result<T, WaitError> {
        let mut outcomes = std::mem::take(&mut self.got);
        outcomes.reserve(self.parts.saturating_sub(outcomes.len()));
        while outcomes.len() < self.parts {
            outcomes.push(next(&self.rx)?.1);
        }
        (self.finish)(outcomes)
    }
}

impl<T> Future for Waiter<T> {
    type Output = Result<T, WaitError>;

    /// Registers the task's waker, then takes whatever outcomes are in: registering first
    /// means an outcome sent after the check still wakes the task.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.got.len() < this.parts {
            this.task.register(cx.waker());
        }
        while this.got.len() < this.parts {
            match this.rx.try_recv() {
                Ok((_, outcome)) => this.got.push(outcome),
                Err(TryRecvError::Empty) => return Poll::Pending,
                Err(TryRecvError::Disconnected) => return Poll::Ready(Err(WaitError::ShuttingDown)),
            }
        }
        Poll::Ready((this.finish)(std::mem::take(&mut this.got)))
    }
}

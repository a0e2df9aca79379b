//! The application's handle: every server-initiated operation, callable from any thread.
//!
//! An operation becomes one or more [`ShardMsg`]s to the shards that own the answer (a user's
//! home shard, the shard of the connection asked to acknowledge, every shard for a broadcast).
//! Results come back on a channel as [`Outcome`]s: [`Waiter`] blocks on it, while an event loop
//! (the HTTP API) uses [`Handle::submit`] with its own channel, tag and waker, so thousands of
//! waits cost no thread each.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde_json::value::RawValue;

use super::Fabric;
use super::cluster::LinkMsg;
use super::msg::{AdminMsg, DeliverMsg, OpMsg, PresenceMsg, RoomMsg, ShardMsg};
use super::{AckReply, ClientReply, Completion, ConnInfo, OutMessage, Outcome, UserPresence, WaitError};
use crate::core::Directory;
use crate::core::directory::ConnAddr;
use crate::core::pending::WaitKind;
use crate::protocol::envelope::room_message;

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
                self.to_other_nodes(|| LinkMsg::Disconnect { user });
                self.to_home(user, OpMsg::DisconnectUser { user, done: Some(done.clone()) });
                1
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
    fn to_other_nodes(&self, msg: impl FnOnce() -> LinkMsg) {
        if let Some(cluster) = &self.fabric.cluster {
            let _ = cluster.try_send(msg());
        }
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
        let parts = self.submit(op, &Completion::new(tx, 0, None));
        Waiter { rx, parts, finish }
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

    /// The presence of every member of `room`: the member list first, then each member's
    /// home shard; each step bounded by `limit`.
    pub fn room_presence(&self, room: &str, limit: Duration) -> Result<Vec<UserPresence>, WaitError> {
        let members = self.room_members(room).wait_timeout(limit)?;
        let waiters: Vec<_> = members.iter().map(|&user| self.presence(user)).collect();
        waiters.into_iter().map(|w| w.wait_timeout(limit)).collect()
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

fn failure(outcome: Option<Outcome>) -> WaitError {
    match outcome {
        Some(Outcome::Failed(e)) => e,
        _ => WaitError::ShuttingDown,
    }
}

/// The pending result of an operation started through [`Handle`].
#[derive(Debug)]
#[must_use = "a Waiter does nothing unless waited on; dropping it is fine for fire-and-forget"]
pub struct Waiter<T> {
    rx: Receiver<(u64, Outcome)>,
    parts: usize,
    finish: fn(Vec<Outcome>) -> Result<T, WaitError>,
}

impl<T> Waiter<T> {
    /// Blocks until the result is known. Waits on clients are bounded by their timeout, so
    /// this returns; if the server stops first, the result is `ShuttingDown`.
    pub fn wait(self) -> Result<T, WaitError> {
        self.collect(|rx| rx.recv().map_err(|_| WaitError::ShuttingDown))
    }

    /// Like [`Waiter::wait`], giving up with `TimedOut` after `limit`.
    pub fn wait_timeout(self, limit: Duration) -> Result<T, WaitError> {
        let deadline = std::time::Instant::now() + limit;
        self.collect(|rx| {
            rx.recv_deadline(deadline).map_err(|e| match e {
                RecvTimeoutError::Timeout => WaitError::TimedOut,
                RecvTimeoutError::Disconnected => WaitError::ShuttingDown,
            })
        })
    }

    fn collect(
        self,
        mut next: impl FnMut(&Receiver<(u64, Outcome)>) -> Result<(u64, Outcome), WaitError>,
    ) -> Result<T, WaitError> {
        let mut outcomes = Vec::with_capacity(self.parts);
        for _ in 0..self.parts {
            outcomes.push(next(&self.rx)?.1);
        }
        (self.finish)(outcomes)
    }
}

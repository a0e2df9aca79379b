//! The shard's side of the cluster: what the broker link thread delivers (other nodes'
//! messages and presence), and handing cross-node work to the link. Nothing here runs when
//! `cluster` is unset (the fabric has no cluster link, and no other node sends anything).

use std::sync::Arc;

use bytes::Bytes;

use super::Shard;
use crate::core::ConnKey;
use crate::core::presence::Presence;
use crate::protocol::envelope::{error_notification, server_ack};
use crate::route::cluster::{LinkMsg, P2pReply};
use crate::route::msg::ClusterMsg;

/// What a client is told when a cross-node part of its request could not be attempted.
pub(super) const CLUSTER_UNAVAILABLE: &str = "cluster unavailable: delivered on this node only; retry later";

impl Shard {
    /// Handles what the cluster link delivers.
    pub(super) fn on_cluster(&mut self, msg: ClusterMsg) {
        match msg {
            ClusterMsg::ToUser { user, frame } => {
                self.deliver_to_users(&[user], frame);
            }
            ClusterMsg::ToRoom { room, frame } => {
                self.publish_to_rooms(Arc::from(vec![room]), frame, None, None);
            }
            ClusterMsg::RemoteUser { user, present } => self.remote_user(user, present),
            ClusterMsg::RemoteRoomCount { room, count } => self.rooms.set_remote(&room, count),
            ClusterMsg::Presence { user, presence, rooms } => self.remote_presence(user, presence, rooms),
            ClusterMsg::Evict { user, before_ms, count } => self.evict_for_other_node(user, before_ms, count),
            ClusterMsg::Ready { key } => {
                if let Some(conn) = self.conn_mut(key).filter(|c| c.held > 0) {
                    conn.held -= 1;
                    if conn.held == 0 {
                        self.mark_dirty(key);
                    }
                }
            }
        }
    }

    /// Home shard: the user's status changed on another node (where the update was made, and
    /// stored; this node keeps a copy for its queries and snapshots and tells its own
    /// watchers and room members).
    fn remote_presence(&mut self, user: i64, presence: Presence, rooms: Vec<Arc<str>>) {
        let rooms: Vec<Arc<str>> = rooms.iter().map(|r| self.rooms.intern(r)).collect();
        self.announce_presence(user, &presence, rooms, None);
        if self.transient.is_transient(&presence.status) {
            let online = self.online_since(user);
            self.presence.update_transient(user, presence, online);
        } else {
            self.presence.update(user, presence);
        }
    }

    /// Home shard: `user`'s status changed here: the other nodes store it and tell theirs.
    pub(super) fn presence_to_other_nodes(&self, user: i64, presence: &Presence, rooms: &[Arc<str>]) {
        let _ = self.to_other_nodes(|| LinkMsg::Presence {
            user,
            presence: presence.clone(),
            rooms: rooms.to_vec(),
        });
    }

    /// Home shard: whether another live node holds `user` changed. The user is online while
    /// this node or any other holds it; only a change of that union is announced, and only to
    /// this node's watchers (every node tells its own).
    fn remote_user(&mut self, user: i64, present: bool) {
        let now = Self::wall_ms();
        let changed = if present {
            self.remote_users.insert(user, now).is_none()
        } else {
            self.remote_users.remove(&user).is_some()
        };
        if !changed || self.directory.home_online(user) {
            return;
        }
        let presence = if present {
            self.presence.online(user);
            self.presence_of(user, now)
        } else {
            let info = self.presence.info(user);
            self.presence.offline(user, now);
            Presence { info, ..Presence::offline(now) }
        };
        self.announce_presence(user, &presence, Vec::new(), None);
    }

    /// Home shard: another node opened a connection of `user` beyond `connections_per_user`:
    /// close up to `count` of ours opened before it, oldest first, with 4000.
    fn evict_for_other_node(&mut self, user: i64, before_ms: u64, count: u32) {
        let victims: Vec<_> = self
            .directory
            .home_conns(user)
            .iter()
            .filter(|(seq, _)| self.opened_ms.get(seq).is_some_and(|&at| at < before_ms))
            .take(count as usize)
            .map(|(_, addr)| *addr)
            .collect();
        for addr in victims {
            let msg = crate::route::msg::DirMsg::Close {
                key: addr.key,
                code: crate::ws::close::REPLACED,
                reason: "replaced by a newer connection",
            };
            self.send_to(addr.shard, msg);
        }
    }

    /// Home shard, with a cluster: a connection of `user` opened (its open time is kept for
    /// evictions asked by other nodes; with `connections_per_user`, the link checks the
    /// user's connections on every node).
    pub(super) fn cluster_opened(&mut self, user: i64, seq: u64) {
        let Some(cluster) = self.shared.fabric.cluster.as_ref() else { return };
        let now = Self::wall_ms();
        if self.limits.per_user > 0 {
            self.opened_ms.insert(seq, now);
            if self.held_elsewhere(user) {
                let local = self.directory.home_conns(user).len() as u32;
                let _ = cluster.try_send(LinkMsg::Opened { user, at_ms: now, local });
            }
        }
    }

    /// With a cluster: what `key` is sent from now on (a join's ack, room messages) waits
    /// until the broker reaches `on` on this node (the link answers `ClusterMsg::Ready`).
    pub(super) fn hold_until_reachable(&mut self, key: ConnKey, on: crate::route::cluster::Reach) {
        if self.shared.fabric.cluster.is_none() {
            return;
        }
        let conn = self.addr(key);
        // At most 255 waits at once (a connection joining rooms faster than the broker
        // confirms them): beyond, its output simply does not wait.
        let Some(c) = self.conn_mut(key).filter(|c| c.held < u8::MAX) else { return };
        c.held += 1;
        if let Some(cluster) = &self.shared.fabric.cluster {
            cluster.send_state(LinkMsg::Ready { on, conn });
        }
    }

    /// Home shard: whether `user` is held by another live node (as the link last said).
    pub(super) fn held_elsewhere(&self, user: i64) -> bool {
        !self.remote_users.is_empty() && self.remote_users.contains_key(&user)
    }

    /// Home shard: since when another live node holds `user` (as the link last said).
    pub(super) fn remote_since(&self, user: i64) -> Option<u64> {
        if self.remote_users.is_empty() { None } else { self.remote_users.get(&user).copied() }
    }

    /// Home shard: a connection of `user` opened or closed: the link publishes the node's
    /// count (coalesced per tick) and holds the user's subject while it is above 0.
    pub(super) fn tell_link_user(&self, user: i64) {
        if let Some(cluster) = &self.shared.fabric.cluster {
            let count = self.directory.home_conns(user).len() as u32;
            cluster.send_state(LinkMsg::User { user, count });
        }
    }

    /// A shard's member count of `room` changed: the link sums them into the node's record.
    pub(super) fn tell_link_room(&self, room: &Arc<str>, count: u32) {
        if let Some(cluster) = &self.shared.fabric.cluster {
            cluster.send_state(LinkMsg::RoomCount { room: Arc::clone(room), shard: self.id, count });
        }
    }

    /// Hands a data message for the other nodes to the link; true when there is no cluster or
    /// the link took it, false when it was refused (broker down, queue full).
    pub(super) fn to_other_nodes(&self, msg: impl FnOnce() -> LinkMsg) -> bool {
        match &self.shared.fabric.cluster {
            Some(cluster) => cluster.try_send(msg()).is_ok(),
            None => true,
        }
    }

    /// `data_request` to one user with a cluster: delivered here if the user has connections
    /// on this node (and published to the user's subject only when another node holds it too);
    /// otherwise the link publishes once on the user's subject and answers the sender
    /// `delivered` / 404 / 503 from the broker's receiver count and its view.
    pub(super) fn p2p_across_nodes(&mut self, key: ConnKey, target: i64, frame: Bytes, pid: Option<&str>) {
        let Some(cluster) = self.shared.fabric.cluster.as_ref() else { return };
        let local = self.directory.shards_of(target) != 0;
        if local {
            let up = cluster.state.is_up();
            if up {
                let _ = cluster.try_send(LinkMsg::ToUser { user: target, frame: frame.clone(), reply: None });
            }
            self.deliver_to_users(&[target], frame);
            if let Some(pid) = pid {
                let answer = if self.shed {
                    error_notification(Some(pid), 503, "server busy: message shed; retry later")
                } else {
                    server_ack(pid, "delivered")
                };
                self.reply_frame(key, answer);
            }
            return;
        }
        let reply = pid.map(|pid| P2pReply { addr: self.addr(key), pid: pid.into() });
        if cluster.try_send(LinkMsg::ToUser { user: target, frame, reply }).is_err()
            && let Some(pid) = pid
        {
            self.reply_frame(key, error_notification(Some(pid), 503, "cluster unavailable; retry later"));
        }
    }

    /// Home shard: a send-for-ack or request to a user with no connection on this node goes
    /// to the link, which hands it to a node holding the user; the answer comes back to `done`.
    pub(super) fn await_on_other_node(
        &mut self,
        user: i64,
        msg: Arc<crate::route::OutMessage>,
        kind: crate::core::pending::WaitKind,
        timeout_ms: u64,
        done: crate::route::Completion,
    ) {
        let Some(cluster) = self.shared.fabric.cluster.as_ref() else { return };
        if !self.held_elsewhere(user) {
            done.complete(crate::route::Outcome::Failed(crate::route::WaitError::Offline));
            return;
        }
        match cluster.try_send_or_return(LinkMsg::Await { user, msg, kind, timeout_ms, done }) {
            Ok(()) => {}
            Err(LinkMsg::Await { done, .. }) => {
                done.complete(crate::route::Outcome::Failed(crate::route::WaitError::Unavailable))
            }
            Err(_) => {}
        }
    }

    /// `frame` to every connection of `user` on this node and, with a cluster, on the others
    /// (published only when the view lists another node holding the user).
    pub(super) fn deliver_to_user_anywhere(&mut self, user: i64, frame: Bytes) {
        if self.shared.fabric.cluster.is_some() {
            let _ = self.to_other_nodes(|| LinkMsg::ToUser { user, frame: frame.clone(), reply: None });
        }
        self.deliver_to_users(&[user], frame);
    }

    /// Home shard: the user's connections; those on other nodes are added by the link (from
    /// its view) when another node holds the user.
    pub(super) fn query_user_across_nodes(
        &self,
        user: i64,
        local: Vec<crate::route::ConnInfo>,
        done: crate::route::Completion,
    ) {
        let Some(cluster) = self.shared.fabric.cluster.as_ref().filter(|_| self.held_elsewhere(user)) else {
            done.complete(crate::route::Outcome::User(local));
            return;
        };
        if let Err(LinkMsg::QueryUser { local, done, .. }) =
            cluster.try_send_or_return(LinkMsg::QueryUser { user, local, done })
        {
            done.complete(crate::route::Outcome::User(local));
        }
    }

    /// Home shard: the handle's `send` to a user another node holds too: the link publishes it
    /// and completes with this node's count plus the others'. Refused (broker down): this
    /// node's count, or 503 when the user has no connection here.
    pub(super) fn send_user_elsewhere(
        &self,
        user: i64,
        frame: Bytes,
        local: usize,
        done: Option<crate::route::Completion>,
    ) {
        let Some(cluster) = self.shared.fabric.cluster.as_ref() else { return };
        if let Err(LinkMsg::SendUser { done: Some(done), .. }) =
            cluster.try_send_or_return(LinkMsg::SendUser { user, frame, local, done })
        {
            done.complete(if local > 0 {
                crate::route::Outcome::Delivered(local)
            } else {
                crate::route::Outcome::Failed(crate::route::WaitError::Unavailable)
            });
        }
    }

    fn reply_frame(&mut self, key: ConnKey, frame: Bytes) {
        self.sink.push(&mut self.conns, key, frame);
    }
}

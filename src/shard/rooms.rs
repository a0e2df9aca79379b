//! Rooms on the shard: join/leave with limits, publishing (encoded once, one message per shard
//! with members), membership cleanup on disconnect, and presence to room members.

use std::sync::Arc;

use bytes::Bytes;

use super::Shard;
use super::msg::ShardMsg;
use crate::app::ops::{Completion, Outcome, UserPresence};
use crate::core::ConnKey;
use crate::core::directory::{ConnAddr, ShardId};
use crate::core::presence::Presence;
use crate::metrics::ShardMetrics;
use crate::protocol::envelope::{RoomPublish, error_notification, presence_event, room_message, server_ack};

/// A `room_presence` request gathering member lists from the shards.
#[derive(Debug)]
pub(super) struct Roster {
    reply: ConnKey,
    remaining: u32,
    users: Vec<i64>,
}

/// Result of a join or leave, for the client's answer.
enum Membership {
    Done(&'static str),
    Refused(u16, String),
}

impl Shard {
    /// `join` `{room}`.
    pub(super) fn join_room(&mut self, key: ConnKey, user: i64, room: &str, pid: Option<&str>) {
        let outcome = self.try_join(key, user, room);
        self.answer_membership(key, pid, outcome);
    }

    fn try_join(&mut self, key: ConnKey, user: i64, room: &str) -> Membership {
        let config = &self.shared.config;
        let (max_rooms, max_members) = (config.max_rooms_per_connection, config.max_room_members);
        let room = self.rooms.intern(room);
        let room_full = self.rooms.total(&room) >= max_members;
        let Some(session) = self.conn_mut(key).and_then(|c| c.session.as_deref_mut()) else {
            return Membership::Refused(410, "connection closing".into());
        };
        if session.rooms.contains(&room) {
            return Membership::Done("joined");
        }
        if session.rooms.len() >= max_rooms {
            return Membership::Refused(429, format!("at most {max_rooms} rooms per connection"));
        }
        if room_full {
            return Membership::Refused(429, format!("room {room} is full ({max_members} members)"));
        }
        session.rooms.push(Arc::clone(&room));
        let (_, count) = self.rooms.join(&room, key);
        self.announce_room_count(&room, count);
        self.room_presence_change(&room, key, user, "joined");
        Membership::Done("joined")
    }

    /// `leave` `{room}`.
    pub(super) fn leave_room(&mut self, key: ConnKey, user: i64, room: &str, pid: Option<&str>) {
        let member = self
            .conn_mut(key)
            .and_then(|c| c.session.as_deref_mut())
            .and_then(|s| s.rooms.iter().position(|r| &**r == room).map(|i| s.rooms.swap_remove(i)));
        let outcome = match member {
            Some(room) => {
                self.room_presence_change(&room, key, user, "left");
                self.forget_member(&room, key);
                Membership::Done("left")
            }
            None => Membership::Refused(404, format!("not a member of room {room}")),
        };
        self.answer_membership(key, pid, outcome);
    }

    fn answer_membership(&mut self, key: ConnKey, pid: Option<&str>, outcome: Membership) {
        let frame = match (outcome, pid) {
            (Membership::Done(status), Some(pid)) => server_ack(pid, status),
            (Membership::Done(_), None) => return,
            (Membership::Refused(code, message), pid) => {
                ShardMetrics::inc(&self.metrics().errors);
                error_notification(pid, code, &message)
            }
        };
        self.sink.push(&mut self.conns, key, frame);
    }

    fn forget_member(&mut self, room: &Arc<str>, key: ConnKey) {
        let (removed, count) = self.rooms.leave(room, key);
        if removed {
            self.announce_room_count(room, count);
        }
    }

    /// A closing connection leaves all its rooms.
    pub(super) fn leave_all_rooms(&mut self, key: ConnKey, user: i64, rooms: Vec<Arc<str>>) {
        for room in rooms {
            self.room_presence_change(&room, key, user, "left");
            self.forget_member(&room, key);
        }
    }

    fn announce_room_count(&mut self, room: &Arc<str>, count: u32) {
        for shard in 0..self.shards() {
            self.send_to(shard, ShardMsg::RoomCount { room: Arc::clone(room), shard: self.id, count });
        }
    }

    /// `broadcast` `{room, body, meta?}`: the sender must be a member.
    pub(super) fn publish_from_client(
        &mut self,
        key: ConnKey,
        user: i64,
        publish: &RoomPublish<'_>,
        pid: Option<&str>,
    ) {
        let member = self
            .conn_mut(key)
            .and_then(|c| c.session.as_deref())
            .and_then(|s| s.rooms.iter().find(|r| ***r == *publish.room).cloned());
        let Some(room) = member else {
            ShardMetrics::inc(&self.metrics().errors);
            let message = format!("not a member of room {}", publish.room);
            self.sink.push(&mut self.conns, key, error_notification(pid, 403, &message));
            return;
        };
        let body = publish.body.get().as_bytes();
        let meta = publish.meta.map(|m| m.get().as_bytes());
        let frame = room_message(Some(user), &room, Self::wall_ms(), body, meta);
        self.publish_to_rooms(Arc::from(vec![room]), frame, Some(self.addr(key)), None);
        if let Some(pid) = pid {
            self.sink.push(&mut self.conns, key, server_ack(pid, "published"));
        }
    }

    /// Sends `frame` to the members of `rooms` on every shard that has some, each connection
    /// once. Returns the number of shards asked (for completions).
    pub(super) fn publish_to_rooms(
        &mut self,
        rooms: Arc<[Arc<str>]>,
        frame: Bytes,
        except: Option<ConnAddr>,
        done: Option<&Completion>,
    ) -> usize {
        let mask = rooms.iter().fold(0u64, |mask, room| mask | self.rooms.shards_of(room));
        let mut asked = 0;
        let mut rest = mask;
        while rest != 0 {
            let shard = rest.trailing_zeros() as ShardId;
            rest &= rest - 1;
            asked += 1;
            let msg = ShardMsg::RoomDeliver {
                rooms: Arc::clone(&rooms),
                frame: frame.clone(),
                except,
                done: done.cloned(),
            };
            self.send_to(shard, msg);
        }
        asked
    }

    /// Local part of a room delivery.
    pub(super) fn deliver_to_rooms(
        &mut self,
        rooms: &[Arc<str>],
        frame: &Bytes,
        except: Option<ConnAddr>,
    ) -> usize {
        let skip = except.filter(|a| a.shard == self.id).map(|a| a.key);
        let keys = self.rooms.local_union(rooms);
        let mut count = 0;
        for key in keys.into_iter().filter(|k| Some(*k) != skip) {
            self.sink.push(&mut self.conns, key, frame.clone());
            count += 1;
        }
        count
    }

    /// Joined/left events to a room small enough for them.
    fn room_presence_change(&mut self, room: &Arc<str>, key: ConnKey, user: i64, status: &str) {
        let limit = self.shared.config.room_presence_max_members;
        if self.rooms.total(room) > limit {
            return;
        }
        let mut context = Vec::with_capacity(16 + room.len());
        context.extend_from_slice(b"{\"room\":");
        crate::protocol::envelope::write_str(&mut context, room);
        context.push(b'}');
        let frame = presence_event(user, status, Some(&context), &super::handshake::rfc3339(Self::wall_ms()));
        let except = Some(self.addr(key));
        self.publish_to_rooms(Arc::from(vec![Arc::clone(room)]), frame, except, None);
    }

    /// `room_presence` `{room}`: gathers the member list from every shard with members, then
    /// each member's home shard sends its presence to the asker (each user once).
    pub(super) fn room_roster(&mut self, key: ConnKey, room: &str, pid: Option<&str>) {
        let room = self.rooms.intern(room);
        if let Some(pid) = pid {
            self.sink.push(&mut self.conns, key, server_ack(pid, "ok"));
        }
        let mut rest = self.rooms.shards_of(&room);
        if rest == 0 {
            return;
        }
        let roster = Roster { reply: key, remaining: rest.count_ones(), users: Vec::new() };
        let roster = self.rosters.insert(roster) as u32;
        while rest != 0 {
            let shard = rest.trailing_zeros() as ShardId;
            rest &= rest - 1;
            self.send_to(
                shard,
                ShardMsg::RoomRoster { room: Arc::clone(&room), reply_shard: self.id, roster },
            );
        }
    }

    fn roster_part(&mut self, roster: u32, users: Vec<i64>) {
        let Some(entry) = self.rosters.get_mut(roster as usize) else { return };
        entry.users.extend(users);
        entry.remaining -= 1;
        if entry.remaining > 0 {
            return;
        }
        let Roster { reply, mut users, .. } = self.rosters.remove(roster as usize);
        users.sort_unstable();
        users.dedup();
        let reply = self.addr(reply);
        for user in users {
            self.send_to(self.home_shard(user), ShardMsg::PresenceQuery { user, reply });
        }
    }

    /// Local members' users of `room`, each once.
    pub(super) fn local_room_users(&self, room: &str) -> Vec<i64> {
        let mut users: Vec<i64> = self
            .rooms
            .local(room)
            .iter()
            .filter_map(|k| self.conns.get(k.index as usize).filter(|c| c.generation == k.generation))
            .filter_map(|c| c.user())
            .collect();
        users.sort_unstable();
        users.dedup();
        users
    }

    /// Handles the room messages of [`ShardMsg`].
    pub(super) fn handle_room(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::RoomCount { room, shard, count } => self.rooms.set_count(&room, shard, count),
            ShardMsg::RoomDeliver { rooms, frame, except, done } => {
                let count = self.deliver_to_rooms(&rooms, &frame, except);
                if let Some(done) = done {
                    done.complete(Outcome::Delivered(count));
                }
            }
            ShardMsg::RoomRoster { room, reply_shard, roster } => {
                let users = self.local_room_users(&room);
                self.send_to(reply_shard, ShardMsg::RosterPart { roster, users });
            }
            ShardMsg::RosterPart { roster, users } => self.roster_part(roster, users),
            ShardMsg::PresenceQuery { user, reply } => {
                let presence: Presence = self.presence.get(user, Self::wall_ms());
                let frame = super::deliver::encode_presence(user, &presence);
                self.send_to(reply.shard, ShardMsg::DeliverConn { key: reply.key, frame });
            }
            ShardMsg::RoomMembers { room, done } => {
                done.complete(Outcome::Members(self.local_room_users(&room)))
            }
            ShardMsg::QueryPresence { user, done } => {
                let p = self.presence.get(user, Self::wall_ms());
                let context = p.context.map(|c| String::from_utf8_lossy(&c).into_owned());
                let status = p.status.into_string();
                done.complete(Outcome::Presence(UserPresence {
                    user_id: user,
                    status,
                    context,
                    since_ms: p.since_ms,
                }));
            }
            other => self.handle_op(other),
        }
    }

    fn home_shard(&self, user: i64) -> ShardId {
        crate::core::Directory::home_of(user, self.shards())
    }
}

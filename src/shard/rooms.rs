//! Rooms on the shard: join/leave with limits, publishing (encoded once, one message per shard
//! with members), membership cleanup on disconnect, and presence to room members.

use std::sync::Arc;

use bytes::Bytes;

use super::Shard;
use crate::core::ConnKey;
use crate::core::directory::{ConnAddr, ShardId};
use crate::core::presence::Presence;
use crate::core::ratelimit::Rate;
use crate::metrics::ShardMetrics;
use crate::protocol::envelope::{
    Envelope, RoomPublish, error_notification, presence_event, room_message, server_ack,
};
use crate::route::cluster::{LinkMsg, Reach};
use crate::route::msg::{RoomMsg, ShardMsg};
use crate::route::{Completion, Outcome};

/// A `room_presence` answer bigger than this many bytes ends its page early (at least one
/// member per page), whatever `room_presence_page` says: members' contexts may be large.
const PAGE_BYTES: usize = 256 * 1024;

/// A `room_presence` request gathering one page: first the member ids from every shard with
/// members, then their presences from their home shards.
#[derive(Debug)]
pub(super) struct Roster {
    reply: ConnKey,
    room: Arc<str>,
    pid: Option<Box<str>>,
    /// Most members in the page.
    limit: usize,
    /// Parts still expected in the current step.
    remaining: u32,
    /// A part was shed: the answer is 503.
    failed: bool,
    /// Step 1: member ids gathered so far.
    users: Vec<i64>,
    /// Step 2: presences gathered so far (empty during step 1).
    entries: Vec<(i64, Presence)>,
    /// Whether step 2 has begun.
    presences: bool,
    /// The cursor of the next page, when more members follow.
    next: Option<i64>,
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
        self.hold_until_reachable(key, Reach::Room(Arc::clone(&room)));
        self.room_presence_change(&room, key, user, "joined");
        Membership::Done("joined")
    }

    /// `leave` `{room}`.
    pub(super) fn leave_room(&mut self, key: ConnKey, user: i64, room: &str, pid: Option<&str>) {
        let outcome = self.try_leave(key, user, room);
        self.answer_membership(key, pid, outcome);
    }

    fn try_leave(&mut self, key: ConnKey, user: i64, room: &str) -> Membership {
        let member = self
            .conn_mut(key)
            .and_then(|c| c.session.as_deref_mut())
            .and_then(|s| s.rooms.iter().position(|r| &**r == room).map(|i| s.rooms.swap_remove(i)));
        match member {
            Some(room) => {
                self.room_presence_change(&room, key, user, "left");
                self.forget_member(&room, key);
                Membership::Done("left")
            }
            None => Membership::Refused(404, format!("not a member of room {room}")),
        }
    }

    /// The application's `join_room` / `leave_room`: each of the user's connections on this
    /// shard joins (leaves) as if it had sent `join` (`leave`); the answer counts them.
    fn user_membership(&mut self, user: i64, room: &str, join: bool) -> Outcome {
        let keys = self.directory.local(user).to_vec();
        let mut counts = crate::route::Joined::default();
        for key in keys {
            let outcome = if join { self.try_join(key, user, room) } else { self.try_leave(key, user, room) };
            match outcome {
                Membership::Done(_) => counts.joined += 1,
                Membership::Refused(..) if join => counts.refused += 1,
                Membership::Refused(..) => {}
            }
        }
        if join { Outcome::Joined(counts) } else { Outcome::Delivered(counts.joined) }
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
        self.tell_link_room(room, count);
        for shard in 0..self.shards() {
            self.send_to(shard, RoomMsg::RoomCount { room: Arc::clone(room), shard: self.id, count });
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
        let elsewhere = self.to_other_nodes(|| crate::route::cluster::LinkMsg::Room {
            room: Arc::clone(&room),
            frame: frame.clone(),
        });
        self.publish_to_rooms(Arc::from(vec![room]), frame, Some(self.addr(key)), None);
        self.shed |= !elsewhere; // members on other nodes did not get it: 503
        if let Some(pid) = pid {
            let answer = if self.shed {
                // Some shards' members did not get it: their inboxes were full.
                error_notification(Some(pid), 503, "server busy: not delivered to every member; retry later")
            } else {
                server_ack(pid, "published")
            };
            self.sink.push(&mut self.conns, key, answer);
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
            let msg = RoomMsg::RoomDeliver {
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
        let info = self.conn_info(key);
        let stamp = super::handshake::rfc3339(Self::wall_ms());
        let frame = presence_event(user, status, Some(&context), &stamp, info.as_deref());
        let except = Some(self.addr(key));
        let _ = self.to_other_nodes(|| crate::route::cluster::LinkMsg::Room {
            room: Arc::clone(room),
            frame: frame.clone(),
        });
        self.publish_to_rooms(Arc::from(vec![Arc::clone(room)]), frame, except, None);
    }

    /// `room_presence` `{room, cursor?}` from a member: one `room_presence` answer with the
    /// presences of at most `room_presence_page` members whose user id is above `cursor`, in
    /// user-id order, and `next` (the cursor of the following page, or null). Refused 403 to
    /// non-members, 429 while the connection's previous one is in flight or when its presence
    /// budget is spent, 503 when an inbox on the way is full.
    pub(super) fn room_roster(&mut self, key: ConnKey, room: &str, cursor: Option<i64>, pid: Option<&str>) {
        let room = self.rooms.intern(room);
        let limit = self.shared.config.room_presence_page.max(1);
        let cost = limit.min(self.rooms.total(&room)).max(1) as u64;
        let (now, rate, inbox_full) = (self.now, self.presence_rate(), self.own_inbox_full());
        let Some(session) = self.conn_mut(key).and_then(|c| c.session.as_deref_mut()) else { return };
        let refusal = if !session.rooms.contains(&room) {
            Some((403, format!("not a member of room {room}")))
        } else if session.roster_in_flight() {
            Some((429, "a room_presence request is already in flight on this connection".into()))
        } else if !session.take_presence_budget(rate, cost, now) {
            Some((429, format!("presence budget exceeded ({} members per second)", rate.per_second)))
        } else if inbox_full {
            Some((503, "server busy; retry later".into()))
        } else {
            session.set_roster_in_flight(true);
            None
        };
        if let Some((code, message)) = refusal {
            self.refuse_presence(key, pid, code, &message);
            return;
        }
        let mut rest = self.rooms.shards_of(&room) | 1 << self.id;
        // With a cluster, the members on other nodes are one more part, gathered by the link.
        let elsewhere = self.rooms.remote(&room) > 0 && self.shared.fabric.cluster.is_some();
        let roster = Roster {
            reply: key,
            room: Arc::clone(&room),
            pid: pid.map(Into::into),
            limit,
            remaining: rest.count_ones() + u32::from(elsewhere),
            failed: false,
            users: Vec::new(),
            entries: Vec::new(),
            presences: false,
            next: None,
        };
        let roster = self.rosters.insert(roster) as u32;
        let (after, ask) = (cursor.unwrap_or(i64::MIN), (limit + 1) as u32);
        while rest != 0 {
            let shard = rest.trailing_zeros() as ShardId;
            rest &= rest - 1;
            let msg = RoomMsg::RoomRoster {
                room: Arc::clone(&room),
                after,
                limit: ask,
                reply_shard: self.id,
                roster,
            };
            if !self.try_send_to(shard, msg) {
                self.roster_part(roster, Vec::new(), true);
            }
        }
        if elsewhere {
            let msg = LinkMsg::RosterMembers { room, after, limit: ask, reply_shard: self.id, roster };
            if !self.to_other_nodes(|| msg) {
                // The broker is down or the link is full: the page lists this node's members.
                self.roster_part(roster, Vec::new(), false);
            }
        }
    }

    /// Answers a refused `room_presence` / `presence_subscribe`.
    pub(super) fn refuse_presence(&mut self, key: ConnKey, pid: Option<&str>, code: u16, message: &str) {
        let metrics = self.metrics();
        ShardMetrics::inc(&metrics.errors);
        if code == 429 {
            ShardMetrics::inc(&metrics.presence_refused);
        }
        self.sink.push(&mut self.conns, key, error_notification(pid, code, message));
    }

    /// The per-connection presence budget (`presence_budget` members per second, one second's
    /// worth saved up).
    pub(super) fn presence_rate(&self) -> Rate {
        let per_second = self.shared.config.presence_budget as u64;
        Rate { per_second, burst: per_second }
    }

    /// Sends, as [`Shard::send_to`]; false when the message was shed.
    pub(super) fn try_send_to(&mut self, shard: ShardId, msg: impl Into<ShardMsg>) -> bool {
        let before = std::mem::replace(&mut self.shed, false);
        self.send_to(shard, msg);
        let sent = !self.shed;
        self.shed |= before;
        sent
    }

    /// Step 1: one shard's member ids (`failed` when the request to it was shed).
    fn roster_part(&mut self, roster: u32, users: Vec<i64>, failed: bool) {
        let shards = self.shards();
        let Some(entry) = self.rosters.get_mut(roster as usize) else { return };
        entry.users.extend(users);
        entry.failed |= failed;
        entry.remaining -= 1;
        if entry.remaining > 0 {
            return;
        }
        let mut users = std::mem::take(&mut entry.users);
        users.sort_unstable();
        users.dedup();
        if users.len() > entry.limit {
            users.truncate(entry.limit);
            entry.next = users.last().copied();
        }
        let mut groups: Vec<Vec<i64>> = vec![Vec::new(); shards];
        for user in users {
            groups[crate::core::Directory::home_of(user, shards)].push(user);
        }
        entry.presences = true;
        entry.remaining = groups.iter().filter(|g| !g.is_empty()).count() as u32;
        if entry.failed || entry.remaining == 0 {
            self.finish_roster(roster);
            return;
        }
        for (shard, users) in groups.into_iter().enumerate().filter(|(_, g)| !g.is_empty()) {
            // Never shed: bounded by the page size of a request already admitted.
            self.send_to(shard, RoomMsg::PresenceBatch { users, reply_shard: self.id, roster });
        }
    }

    /// Step 2: one home shard's presences.
    fn presence_part(&mut self, roster: u32, entries: Vec<(i64, Presence)>) {
        let Some(entry) = self.rosters.get_mut(roster as usize).filter(|e| e.presences) else { return };
        entry.entries.extend(entries);
        entry.remaining -= 1;
        if entry.remaining == 0 {
            self.finish_roster(roster);
        }
    }

    /// Sends the page (or 503) and lets the connection ask again.
    fn finish_roster(&mut self, roster: u32) {
        let Roster { reply, room, pid, failed, mut entries, mut next, .. } =
            self.rosters.remove(roster as usize);
        let Some(session) = self.conn_mut(reply).and_then(|c| c.session.as_deref_mut()) else { return };
        session.set_roster_in_flight(false);
        if failed {
            let message = "server busy: room_presence shed; retry later";
            self.refuse_presence(reply, pid.as_deref(), 503, message);
            return;
        }
        entries.sort_unstable_by_key(|(user, _)| *user);
        let mut payload = Vec::with_capacity(64 + room.len() + entries.len() * 96);
        payload.extend_from_slice(b"{\"room\":");
        crate::protocol::envelope::write_str(&mut payload, &room);
        payload.extend_from_slice(b",\"members\":[");
        for (i, (user, presence)) in entries.iter().enumerate() {
            if i > 0 {
                if payload.len() > PAGE_BYTES {
                    next = Some(entries[i - 1].0);
                    break;
                }
                payload.push(b',');
            }
            write_member(&mut payload, *user, presence);
        }
        payload.extend_from_slice(b"],\"next\":");
        match next {
            Some(cursor) => payload.extend_from_slice(cursor.to_string().as_bytes()),
            None => payload.extend_from_slice(b"null"),
        }
        payload.push(b'}');
        let frame = Envelope::new("room_presence").pid(pid.as_deref()).raw_payload(Some(&payload)).frame();
        self.sink.push(&mut self.conns, reply, frame);
    }

    /// Local members' users of `room`, each once.
    pub(super) fn local_room_users(&self, room: &str) -> Vec<i64> {
        self.local_room_page(room, i64::MIN, usize::MAX)
    }

    /// Up to `limit` local members' user ids above `after`, sorted, each once.
    fn local_room_page(&self, room: &str, after: i64, limit: usize) -> Vec<i64> {
        let mut users: Vec<i64> = self
            .rooms
            .local(room)
            .iter()
            .filter_map(|k| self.conns.get(k.index as usize).filter(|c| c.generation == k.generation))
            .filter_map(|c| c.user())
            .filter(|&user| user > after)
            .collect();
        users.sort_unstable();
        users.dedup();
        users.truncate(limit);
        users
    }

    /// Handles the room messages.
    pub(super) fn on_room(&mut self, msg: RoomMsg) {
        match msg {
            RoomMsg::RoomCount { room, shard, count } => self.rooms.set_count(&room, shard, count),
            RoomMsg::RoomDeliver { rooms, frame, except, done } => {
                let count = self.deliver_to_rooms(&rooms, &frame, except);
                if let Some(done) = done {
                    done.complete(Outcome::Delivered(count));
                }
            }
            RoomMsg::RoomRoster { room, after, limit, reply_shard, roster } => {
                let users = self.local_room_page(&room, after, limit as usize);
                self.send_to(reply_shard, RoomMsg::RosterPart { roster, users });
            }
            RoomMsg::RosterPart { roster, users } => self.roster_part(roster, users, false),
            RoomMsg::PresenceBatch { users, reply_shard, roster } => {
                let now = Self::wall_ms();
                let entries = users.into_iter().map(|user| (user, self.presence_of(user, now))).collect();
                self.send_to(reply_shard, RoomMsg::PresencePart { roster, entries });
            }
            RoomMsg::PresencePart { roster, entries } => self.presence_part(roster, entries),
            RoomMsg::RoomMembers { room, done } => {
                done.complete(Outcome::Members(self.local_room_users(&room)))
            }
            RoomMsg::JoinUser { user, room, done } => done.complete(self.user_membership(user, &room, true)),
            RoomMsg::LeaveUser { user, room, done } => {
                done.complete(self.user_membership(user, &room, false))
            }
        }
    }
}

/// One member of a `room_presence` answer: `{"userId","status","context","timestamp"}`, as in
/// `presence_event`.
fn write_member(out: &mut Vec<u8>, user: i64, presence: &Presence) {
    use std::io::Write;
    let _ = write!(out, "{{\"userId\":{user},\"status\":");
    crate::protocol::envelope::write_str(out, &presence.status);
    out.extend_from_slice(b",\"context\":");
    out.extend_from_slice(presence.context.as_deref().unwrap_or(b"null"));
    out.extend_from_slice(b",\"timestamp\":");
    crate::protocol::envelope::write_str(out, &super::handshake::rfc3339(presence.since_ms));
    if let Some(info) = &presence.info {
        out.extend_from_slice(b",\"info\":");
        out.extend_from_slice(info.as_bytes());
    }
    out.push(b'}');
}

//! Carrying out routing decisions: deliveries to users and connections, broadcasts, presence,
//! and the messages other shards send us.

use std::sync::Arc;

use bytes::Bytes;

use super::Shard;
use super::conn::Phase;
use super::handshake::rfc3339;
use crate::app::application::Handled;
use crate::config::PresenceScope;
use crate::core::directory::{ConnAddr, ShardId};
use crate::core::presence::{Admit, Presence, WatchAdmission, claim_info};
use crate::core::{ConnKey, Directory};
use crate::metrics::ShardMetrics;
use crate::protocol::ClientMessage;
use crate::protocol::envelope::{
    Envelope, data_event, error_notification, presence_event, server_ack, write_str,
};
use crate::protocol::router::Route;
use crate::route::cluster::LinkMsg;
use crate::route::msg::{DeliverMsg, DirMsg, PresenceMsg, ShardMsg};
use crate::route::{Outcome, UserPresence};
use crate::ws::close;

impl Shard {
    /// Carries out what the router decided for a message of `user` on `key`.
    pub(super) fn execute(
        &mut self,
        key: ConnKey,
        user: i64,
        msg: &ClientMessage<'_>,
        text: &[u8],
        decision: Route<'_>,
    ) {
        let pid = msg.pid.as_deref();
        match decision {
            Route::P2p { target, payload } if self.shared.fabric.cluster.is_some() => {
                self.p2p_across_nodes(key, target, data_event(user, payload), pid);
            }
            Route::P2p { target, payload } => {
                let delivered = self.deliver_to_users(&[target], data_event(user, payload));
                match (pid, delivered) {
                    (Some(pid), true) if self.shed => self.reply(key, shed_notice(pid)),
                    (Some(pid), true) => self.reply(key, server_ack(pid, "delivered")),
                    (Some(pid), false) => self.reply(
                        key,
                        error_notification(Some(pid), 404, &format!("user {target} is not connected")),
                    ),
                    (None, _) => {}
                }
            }
            Route::Broadcast { payload } => {
                let frame = data_event(user, payload);
                let elsewhere = self.to_other_nodes(|| LinkMsg::Broadcast {
                    frame: frame.clone(),
                    exclude: Arc::from(Vec::new()),
                });
                self.broadcast(frame, Some(self.addr(key)));
                match pid {
                    Some(pid) if !elsewhere => self
                        .reply(key, error_notification(Some(pid), 503, super::cluster::CLUSTER_UNAVAILABLE)),
                    _ => self.ack(key, pid, "broadcast"),
                }
            }
            Route::GenericEcho { payload } => {
                if !self.offer_to_app(key, msg, text) {
                    let frame = Envelope::new("generic_response").pid(pid).raw_payload(payload).frame();
                    self.reply(key, frame);
                }
            }
            Route::Unhandled => {
                if !self.offer_to_app(key, msg, text) {
                    ShardMetrics::inc(&self.metrics().errors);
                    let message = format!("unknown message type {:?}", msg.kind);
                    self.reply(key, error_notification(pid, 400, &message));
                }
            }
            Route::Presence(update) => {
                let target = update.target_user_id.filter(|&t| t != 0);
                let context = update.context.map(|raw| raw.get().as_bytes());
                if self.debounce(key, &update.status, context, target) == Admit::Coalesced {
                    self.ack(key, pid, "coalesced");
                    return;
                }
                let presence = Presence {
                    status: update.status.as_ref().into(),
                    context: context.map(Into::into),
                    since_ms: Self::wall_ms(),
                    info: None, // the home shard's; a targeted update's: `conn_info`
                };
                self.presence_update(key, user, presence, target);
                self.ack(key, pid, "ok");
            }
            Route::Subscribe(targets) => {
                if !self.admit_subscribe(key, &targets, pid) {
                    return;
                }
                let msg = PresenceMsg::AdmitWatch {
                    watcher: user,
                    targets,
                    reply: self.addr(key),
                    pid: pid.map(Into::into),
                };
                self.send_to(Directory::home_of(user, self.shards()), msg);
                if self.shed {
                    self.ack(key, pid, "ok"); // 503
                }
            }
            Route::Unsubscribe(targets) => {
                let msg = PresenceMsg::DropWatch {
                    watcher: user,
                    targets,
                    reply: self.addr(key),
                    pid: pid.map(Into::into),
                };
                self.send_to(Directory::home_of(user, self.shards()), msg);
                if self.shed {
                    self.ack(key, pid, "ok"); // 503
                }
            }
            Route::Ack(ack) => self.on_client_ack(key, &ack),
            Route::Join(room) => self.join_room(key, user, &room, pid),
            Route::Leave(room) => self.leave_room(key, user, &room, pid),
            Route::RoomPublish(publish) => self.publish_from_client(key, user, &publish, pid),
            Route::RoomPresence(room) => match msg.payload_as::<RosterCursor>() {
                Ok(page) => self.room_roster(key, &room, page.cursor, pid),
                Err(e) => {
                    ShardMetrics::inc(&self.metrics().errors);
                    let message = format!("invalid room_presence cursor (want a user id): {e}");
                    self.reply(key, error_notification(pid, 400, &message));
                }
            },
            Route::AuthRefresh(token) => self.refresh_token(key, user, &token, pid),
            Route::Heartbeat => self.reply(key, heartbeat_ack(Self::wall_ms())),
            Route::Disconnect => self.close(key, close::NORMAL, "client requested disconnect"),
            Route::Reject { code, message } => {
                ShardMetrics::inc(&self.metrics().errors);
                self.reply(key, error_notification(pid, code, &message));
            }
        }
    }

    /// Gives the message to the application; true when it handled it.
    fn offer_to_app(&mut self, key: ConnKey, msg: &ClientMessage<'_>, text: &[u8]) -> bool {
        self.call_app(key, |app, conn| app.on_message(conn, msg, text)) == Some(Handled::Yes)
    }

    fn reply(&mut self, key: ConnKey, frame: Bytes) {
        self.sink.push(&mut self.conns, key, frame);
    }

    /// Acknowledges with `status`, or answers 503 when part of the work was shed.
    fn ack(&mut self, key: ConnKey, pid: Option<&str>, status: &str) {
        if let Some(pid) = pid {
            let frame = if self.shed { shed_notice(pid) } else { server_ack(pid, status) };
            self.reply(key, frame);
        }
    }

    /// `presence_subscribe`: charges the distinct ids to the connection's presence budget
    /// (429 when spent) and refuses 503 while our inbox, where the answers come back, is full.
    fn admit_subscribe(&mut self, key: ConnKey, targets: &[i64], pid: Option<&str>) -> bool {
        let mut distinct = targets.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let (now, rate, inbox_full) = (self.now, self.presence_rate(), self.own_inbox_full());
        let Some(session) = self.conn_mut(key).and_then(|c| c.session.as_deref_mut()) else { return false };
        let refusal = if !session.take_presence_budget(rate, distinct.len() as u64, now) {
            Some((429, format!("presence budget exceeded ({} users per second)", rate.per_second)))
        } else if inbox_full {
            Some((503, "server busy; retry later".to_string()))
        } else {
            None
        };
        match refusal {
            Some((code, message)) => {
                self.refuse_presence(key, pid, code, &message);
                false
            }
            None => true,
        }
    }

    /// Queues `frame` on every connection of every user in `users`, wherever they are.
    /// Returns whether any of them is connected (as far as this shard's replica knows).
    pub(super) fn deliver_to_users(&mut self, users: &[i64], frame: Bytes) -> bool {
        let mut remote: Vec<Vec<i64>> = Vec::new();
        let mut found = false;
        for &user in users {
            let mut mask = self.directory.shards_of(user);
            found |= mask != 0;
            while mask != 0 {
                let shard = mask.trailing_zeros() as ShardId;
                mask &= mask - 1;
                if shard == self.id {
                    self.deliver_local(user, &frame);
                } else {
                    if remote.is_empty() {
                        remote.resize(self.shards(), Vec::new());
                    }
                    remote[shard].push(user);
                }
            }
        }
        for (shard, users) in remote.into_iter().enumerate().filter(|(_, u)| !u.is_empty()) {
            self.send_to(shard, DeliverMsg::Deliver { users, frame: frame.clone() });
        }
        found
    }

    fn deliver_local(&mut self, user: i64, frame: &Bytes) {
        let Shard { directory, conns, sink, .. } = self;
        for &key in directory.local(user) {
            sink.push(conns, key, frame.clone());
        }
    }

    /// Every open connection of a user on every shard, except `except`. Echo-endpoint
    /// connections (no user) are outside every audience.
    pub(super) fn broadcast(&mut self, frame: Bytes, except: Option<ConnAddr>) {
        let me = self.id;
        for shard in (0..self.shards()).filter(|&s| s != me) {
            self.send_to(shard, DeliverMsg::Broadcast { frame: frame.clone(), except });
        }
        self.broadcast_local(&frame, except);
    }

    fn broadcast_local(&mut self, frame: &Bytes, except: Option<ConnAddr>) {
        let skip = except.filter(|a| a.shard == self.id).map(|a| a.key);
        let Shard { conns, sink, .. } = self;
        for (index, conn) in conns.iter_mut() {
            let key = ConnKey { index: index as u32, generation: conn.generation };
            if conn.phase == Phase::Open && conn.session.is_some() && Some(key) != skip {
                sink.offer(key, conn, frame.clone());
            }
        }
    }

    /// Coalescing and transient expiry for one connection's presence updates.
    fn debounce(&mut self, key: ConnKey, status: &str, context: Option<&[u8]>, target: Option<i64>) -> Admit {
        let now = self.now;
        let Shard { conns, transient, .. } = self;
        let Some(session) = conns
            .get_mut(key.index as usize)
            .filter(|c| c.generation == key.generation)
            .and_then(|c| c.session.as_deref_mut())
        else {
            return Admit::Coalesced;
        };
        let debounce = session.debounce();
        let admit = debounce.admit(status, context, target, now, transient);
        let until = debounce.transient_until;
        if until != u64::MAX {
            self.schedule_before(key, until);
        }
        admit
    }

    /// A transient status (typing) expired: its audience is told the user's lasting status
    /// again, which the home shard holds (another connection may have set it meanwhile).
    pub(super) fn expire_transient(&mut self, key: ConnKey) {
        let now = self.now;
        let Some(session) = self.conn_mut(key).and_then(|c| c.session.as_deref_mut()) else { return };
        let user = session.user;
        if let Some(expired) = session.expire_transient(now) {
            let target = expired.target;
            let rooms = if target.is_none() { self.rooms_of(key) } else { Vec::new() };
            let msg = PresenceMsg::PresenceRevert { user, target, rooms, except: Some(self.addr(key)) };
            self.send_to(Directory::home_of(user, self.shards()), msg);
        }
    }

    /// Home shard: a connection's transient status expired. A targeted one is followed, at its
    /// target, by the user's lasting status; an untargeted one is replaced by it, unless a
    /// lasting status was set since (already announced).
    fn revert_presence(
        &mut self,
        user: i64,
        target: Option<i64>,
        rooms: Vec<Arc<str>>,
        except: Option<ConnAddr>,
    ) {
        if !self.directory.home_online(user) {
            return;
        }
        let now = Self::wall_ms();
        match target {
            Some(target) => {
                let online = self.online_since(user);
                let presence = Presence { since_ms: now, ..self.presence.lasting(user, now, online) };
                self.deliver_to_user_anywhere(target, encode_presence(user, &presence));
            }
            None => {
                if let Some(presence) = self.presence.revert(user, now) {
                    self.presence_to_other_nodes(user, &presence, &rooms);
                    self.announce_presence(user, &presence, rooms, except);
                }
            }
        }
    }

    fn presence_update(&mut self, key: ConnKey, user: i64, presence: Presence, target: Option<i64>) {
        let home = Directory::home_of(user, self.shards());
        let with_rooms = match (target, self.shared.config.presence_scope) {
            (Some(target), _) => {
                // Delivered, not stored: the status is for this one user, not the user's
                // public presence.
                let presence = Presence { info: self.conn_info(key), ..presence };
                self.deliver_to_user_anywhere(target, encode_presence(user, &presence));
                return;
            }
            // Announced by the home shard, which knows whether it changes anything (with
            // `presence_scope = "all"` it broadcasts: the rooms add nobody).
            (None, PresenceScope::All) => false,
            (None, _) => true,
        };
        let rooms = if with_rooms { self.rooms_of(key) } else { Vec::new() };
        let except = Some(self.addr(key));
        self.send_to(home, PresenceMsg::PresenceSet { user, presence, rooms, except });
    }

    /// Home shard: tells `user`'s watchers and the members of `rooms` — each receiving
    /// connection once, even when it is reached through several of them — or everyone, with
    /// `presence_scope = "all"`.
    pub(super) fn announce_presence(
        &mut self,
        user: i64,
        presence: &Presence,
        rooms: Vec<Arc<str>>,
        except: Option<ConnAddr>,
    ) {
        if self.shared.config.presence_scope == PresenceScope::All {
            self.broadcast(encode_presence(user, presence), except);
            return;
        }
        let shards = self.shards();
        let mut users_by_shard: Vec<Vec<i64>> = vec![Vec::new(); shards];
        let mut mask = rooms.iter().fold(0u64, |mask, room| mask | self.rooms.shards_of(room));
        for watcher in self.presence.watchers_of(user) {
            let mut held = self.directory.shards_of(watcher);
            mask |= held;
            while held != 0 {
                users_by_shard[held.trailing_zeros() as usize].push(watcher);
                held &= held - 1;
            }
        }
        if mask == 0 {
            return; // nobody to tell (a user without watchers or rooms): not even encoded
        }
        let frame = encode_presence(user, presence);
        let rooms: Arc<[Arc<str>]> = rooms.into();
        while mask != 0 {
            let shard = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let users = std::mem::take(&mut users_by_shard[shard]);
            let msg = PresenceMsg::PresenceFanout {
                frame: frame.clone(),
                rooms: Arc::clone(&rooms),
                users,
                except,
            };
            self.send_to(shard, msg);
        }
    }

    /// Local part of a presence fan-out: room members and watchers' connections, each once.
    fn presence_fanout(
        &mut self,
        frame: &Bytes,
        rooms: &[Arc<str>],
        users: &[i64],
        except: Option<ConnAddr>,
    ) {
        let skip = except.filter(|a| a.shard == self.id).map(|a| a.key);
        let mut keys = self.rooms.local_union(rooms);
        for &user in users {
            keys.extend_from_slice(self.directory.local(user));
        }
        keys.sort_unstable_by_key(|k| (k.index, k.generation));
        keys.dedup();
        for key in keys.into_iter().filter(|k| Some(*k) != skip) {
            self.sink.push(&mut self.conns, key, frame.clone());
        }
    }

    /// The connection's `presence_info_claim` value (`None` when the key is unset).
    pub(super) fn conn_info(&self, key: ConnKey) -> Option<Arc<str>> {
        let name = self.shared.config.presence_info_claim.as_deref()?;
        let conn = self.conns.get(key.index as usize).filter(|c| c.generation == key.generation)?;
        claim_info(conn.session.as_deref()?.claims(), name)
    }

    fn rooms_of(&mut self, key: ConnKey) -> Vec<Arc<str>> {
        self.conn_mut(key).and_then(|c| c.session.as_deref()).map(|s| s.rooms.to_vec()).unwrap_or_default()
    }

    /// Handles the directory's messages.
    pub(super) fn on_dir(&mut self, msg: DirMsg) {
        match msg {
            DirMsg::Replica { user, shard, present } => self.directory.set_replica(user, shard, present),
            DirMsg::HomeOpened { user, seq, addr, info } => self.home_opened(user, seq, addr, info),
            DirMsg::HomeClosed { user, seq } => self.home_closed(user, seq),
            DirMsg::Authenticated { key, answer } => self.authenticated(key, answer),
            DirMsg::Close { key, code, reason } => self.close(key, code, reason),
        }
    }

    /// Handles the messages that queue frames on connections.
    pub(super) fn on_deliver(&mut self, msg: DeliverMsg) {
        match msg {
            DeliverMsg::Deliver { users, frame } => {
                for user in users {
                    self.deliver_local(user, &frame);
                }
            }
            DeliverMsg::DeliverConn { key, frame } => self.reply(key, frame),
            DeliverMsg::DeliverFrames { key, frames } => {
                for frame in frames {
                    self.reply(key, frame);
                }
            }
            DeliverMsg::Broadcast { frame, except } => self.broadcast_local(&frame, except),
        }
    }

    /// Handles the presence messages.
    pub(super) fn on_presence(&mut self, msg: PresenceMsg) {
        match msg {
            PresenceMsg::PresenceSet { user, mut presence, rooms, except } => {
                let transient = self.transient.is_transient(&presence.status);
                let online = self.online_since(user);
                let (status, context) = (&presence.status, presence.context.as_deref());
                if !transient && self.presence.is_current(user, status, context, online.is_some()) {
                    // A repeat of the current status and context (a client's heartbeat
                    // re-sending `online`): nothing changed, nobody is told, `since` stays.
                    return;
                }
                // A client's update: its fan-out may be shed, counted but not reported: the
                // update itself is stored (and, from another shard, acknowledged already).
                presence.info = self.presence.info(user);
                self.presence_to_other_nodes(user, &presence, &rooms);
                let shed = self.shed;
                self.as_client_work(|s| s.announce_presence(user, &presence, rooms, except));
                self.shed = shed;
                if transient {
                    self.presence.update_transient(user, presence, online);
                } else {
                    self.presence.update(user, presence);
                }
            }
            PresenceMsg::PresenceRevert { user, target, rooms, except } => {
                self.revert_presence(user, target, rooms, except)
            }
            PresenceMsg::PresenceFanout { frame, rooms, users, except } => {
                self.presence_fanout(&frame, &rooms, &users, except);
            }
            PresenceMsg::AdmitWatch { watcher, targets, reply, pid } => {
                self.admit_watch(watcher, targets, reply, pid)
            }
            PresenceMsg::DropWatch { watcher, targets, reply, pid } => {
                self.presence.drop_watch(watcher, &targets);
                self.for_each_home(targets, |targets| PresenceMsg::Unwatch { watcher, targets });
                // Acknowledged after the Unwatch messages are queued: an update that follows
                // the ack reaches the target's home shard after them, so no event slips through.
                if let Some(pid) = pid {
                    self.send_to(
                        reply.shard,
                        DeliverMsg::DeliverConn { key: reply.key, frame: server_ack(&pid, "ok") },
                    );
                }
            }
            PresenceMsg::Watch { watcher, targets, reply } => self.watch(watcher, targets, &[reply]),
            PresenceMsg::WatchFor { watcher, targets, replies } => self.watch(watcher, targets, &replies),
            PresenceMsg::ServerWatch { watcher, targets, done } => self.server_watch(watcher, targets, done),
            PresenceMsg::ServerUnwatch { watcher, targets, done } => {
                let conns = self.directory.home_conns(watcher).len();
                self.presence.drop_watch(watcher, &targets);
                self.for_each_home(targets, |targets| PresenceMsg::Unwatch { watcher, targets });
                done.complete(Outcome::Delivered(conns));
            }
            PresenceMsg::ServerSet { user, presence, rooms, collect, done } => {
                self.server_presence(user, presence, rooms, collect, done)
            }
            PresenceMsg::QueryPresenceMany { users, done } => {
                let now = Self::wall_ms();
                let list =
                    users.into_iter().map(|user| user_presence(user, self.presence_of(user, now))).collect();
                done.complete(Outcome::Presences(list));
            }
            PresenceMsg::Unwatch { watcher, targets } => {
                for target in targets {
                    self.presence.remove_watcher(target, watcher);
                }
            }
            PresenceMsg::QueryPresence { user, done } => {
                let p = self.presence_of(user, Self::wall_ms());
                done.complete(Outcome::Presence(user_presence(user, p)));
            }
        }
    }

    fn home_opened(&mut self, user: i64, seq: u64, addr: ConnAddr, info: Option<Arc<str>>) {
        let now = Self::wall_ms();
        let opened = self.directory.home_open(user, seq, addr, self.limits.per_user, now);
        for old in opened.evict {
            let msg = DirMsg::Close {
                key: old.key,
                code: close::REPLACED,
                reason: "replaced by a newer connection",
            };
            self.send_to(old.shard, msg);
        }
        if opened.came_online && self.held_elsewhere(user) {
            // Online already, through another node: nothing to announce.
            ShardMetrics::inc(&self.metrics().users_current);
            self.presence.set_info(user, info);
        } else if opened.came_online {
            ShardMetrics::inc(&self.metrics().users_current);
            self.presence.online(user);
            self.presence.set_info(user, info);
            let presence = self.presence_of(user, now);
            self.announce_presence(user, &presence, Vec::new(), None);
            self.notify_user_transition(user, true, now);
        } else {
            self.presence.set_info(user, info); // the newest connection's
        }
        self.tell_link_user(user);
        self.cluster_opened(user, seq);
    }

    fn home_closed(&mut self, user: i64, seq: u64) {
        let last = self.directory.home_close(user, seq);
        self.tell_link_user(user);
        if !self.opened_ms.is_empty() {
            self.opened_ms.remove(&seq);
        }
        if !last {
            return;
        }
        ShardMetrics::dec(&self.metrics().users_current);
        let now = Self::wall_ms();
        if !self.held_elsewhere(user) {
            let info = self.presence.info(user);
            self.presence.offline(user, now);
            let presence = Presence { info, ..Presence::offline(now) };
            self.announce_presence(user, &presence, Vec::new(), None);
        }
        let watched = self.presence.take_watching(user);
        self.for_each_home(watched, |targets| PresenceMsg::Unwatch { watcher: user, targets });
        self.notify_user_transition(user, false, now);
    }

    fn admit_watch(&mut self, watcher: i64, targets: Vec<i64>, reply: ConnAddr, pid: Option<Box<str>>) {
        if !self.directory.home_online(watcher) {
            return; // the watcher left before its request got here
        }
        let answer = match self.presence.admit_watch(watcher, &targets) {
            WatchAdmission::TooMany => error_notification(pid.as_deref(), 429, "watch list limit reached"),
            // Only the users not watched yet: re-subscribing sends no second snapshot.
            WatchAdmission::Accepted(fresh) => {
                self.for_each_home(fresh, |targets| PresenceMsg::Watch { watcher, targets, reply });
                match pid.as_deref() {
                    Some(pid) => server_ack(pid, "ok"),
                    None => return,
                }
            }
        };
        self.send_to(reply.shard, DeliverMsg::DeliverConn { key: reply.key, frame: answer });
    }

    fn watch(&mut self, watcher: i64, targets: Vec<i64>, replies: &[ConnAddr]) {
        let now = Self::wall_ms();
        let mut frames = Vec::with_capacity(targets.len());
        for target in targets {
            self.presence.add_watcher(target, watcher);
            frames.push(encode_presence(target, &self.presence_of(target, now)));
        }
        // One message per connection for the whole snapshot, never shed: the request was
        // admitted.
        for reply in replies {
            self.send_to(reply.shard, DeliverMsg::DeliverFrames { key: reply.key, frames: frames.clone() });
        }
    }

    /// Watcher's home shard: the application's `watch_presence`, admitted like a client's
    /// `presence_subscribe` (the watch-list bound), with the snapshot to each of the watcher's
    /// connections. An offline watcher keeps nothing.
    fn server_watch(&mut self, watcher: i64, targets: Vec<i64>, done: crate::route::Completion) {
        let replies: Arc<[ConnAddr]> = self.directory.home_conns(watcher).iter().map(|(_, a)| *a).collect();
        if replies.is_empty() {
            done.complete(Outcome::Delivered(0));
            return;
        }
        match self.presence.admit_watch(watcher, &targets) {
            WatchAdmission::TooMany => {
                done.complete(Outcome::Failed(crate::route::WaitError::Limit("watch list limit reached")))
            }
            WatchAdmission::Accepted(fresh) => {
                let count = replies.len();
                self.for_each_home(fresh, |targets| PresenceMsg::WatchFor {
                    watcher,
                    targets,
                    replies: Arc::clone(&replies),
                });
                done.complete(Outcome::Delivered(count));
            }
        }
    }

    /// The application's `set_presence`: the home shard sends it round the shards holding the
    /// user's connections, each adding its connections' rooms, and back; then stores and
    /// announces it as a client's untargeted `presence_update` (watchers and those rooms).
    fn server_presence(
        &mut self,
        user: i64,
        presence: Box<Presence>,
        mut rooms: Vec<Arc<str>>,
        collect: Option<u64>,
        done: crate::route::Completion,
    ) {
        let home = Directory::home_of(user, self.shards());
        let mut rest = match collect {
            Some(rest) => rest,
            None => {
                // At home, first: where the user's connections are (none: offline, nothing set).
                let conns = self.directory.home_conns(user);
                if conns.is_empty() {
                    done.complete(Outcome::Delivered(0));
                    return;
                }
                match self.shared.config.presence_scope {
                    PresenceScope::All => 0, // broadcast: the rooms add nobody
                    _ => conns.iter().fold(0u64, |mask, (_, a)| mask | 1 << a.shard),
                }
            }
        };
        if rest & 1 << self.id != 0 {
            rest &= !(1 << self.id);
            for &key in self.directory.local(user) {
                if let Some(session) = self
                    .conns
                    .get(key.index as usize)
                    .filter(|c| c.generation == key.generation)
                    .and_then(|c| c.session.as_deref())
                {
                    rooms.extend(session.rooms.iter().cloned());
                }
            }
        }
        let next = if rest != 0 { rest.trailing_zeros() as ShardId } else { home };
        if next != self.id || rest != 0 {
            let msg = PresenceMsg::ServerSet { user, presence, rooms, collect: Some(rest), done };
            self.send_to(next, msg);
            return;
        }
        // Home, every room gathered.
        let count = self.directory.home_conns(user).len();
        if count == 0 {
            done.complete(Outcome::Delivered(0)); // went offline meanwhile
            return;
        }
        if !self.presence.is_current(user, &presence.status, presence.context.as_deref(), true) {
            rooms.sort_unstable();
            rooms.dedup();
            let presence = Presence { info: self.presence.info(user), ..*presence };
            self.announce_presence(user, &presence, rooms, None);
            self.presence.update(user, presence);
        }
        done.complete(Outcome::Delivered(count));
    }

    /// Home shard: `user`'s presence (the default `online` one when the presence table keeps
    /// none and the directory lists the user).
    pub(super) fn presence_of(&self, user: i64, now: u64) -> Presence {
        self.presence.get(user, now, self.online_since(user))
    }

    /// Home shard: since when `user` is online, through a connection on this node or (with a
    /// cluster) on another node; `None` when it is offline.
    pub(super) fn online_since(&self, user: i64) -> Option<u64> {
        self.directory.home_since(user).or_else(|| self.remote_since(user))
    }

    /// Splits `users` by home shard and sends each group the message `make` builds.
    fn for_each_home<M: Into<ShardMsg>>(&mut self, users: Vec<i64>, make: impl Fn(Vec<i64>) -> M) {
        let shards = self.shards();
        let mut groups: Vec<Vec<i64>> = vec![Vec::new(); shards];
        for user in users {
            groups[Directory::home_of(user, shards)].push(user);
        }
        for (shard, group) in groups.into_iter().enumerate().filter(|(_, g)| !g.is_empty()) {
            self.send_to(shard, make(group));
        }
    }
}

/// A stored presence as the application sees it.
fn user_presence(user: i64, p: Presence) -> UserPresence {
    UserPresence {
        user_id: user,
        status: p.status.into_string(),
        context: p.context.map(|c| String::from_utf8_lossy(&c).into_owned()),
        since_ms: p.since_ms,
        info: p.info.as_deref().map(Into::into),
    }
}

/// `room_presence`'s optional `cursor`: the `next` of the previous page.
#[derive(Debug, serde::Deserialize)]
struct RosterCursor {
    #[serde(default)]
    cursor: Option<i64>,
}

/// The 503 a client gets when part of what it asked for was shed (an inbox was full).
fn shed_notice(pid: &str) -> Bytes {
    error_notification(Some(pid), 503, "server busy: message shed; retry later")
}

pub(super) fn encode_presence(user: i64, presence: &Presence) -> Bytes {
    let stamp = rfc3339(presence.since_ms);
    presence_event(user, &presence.status, presence.context.as_deref(), &stamp, presence.info.as_deref())
}

/// Seed 004's `{"type":"HEARTBEAT_ACK","timestamp":…}`.
fn heartbeat_ack(unix_ms: u64) -> Bytes {
    let mut frame = crate::ws::FrameEncoder::start(64);
    frame.extend_from_slice(b"{\"type\":\"HEARTBEAT_ACK\",\"timestamp\":");
    let mut stamp = Vec::with_capacity(32);
    write_str(&mut stamp, &rfc3339(unix_ms));
    frame.extend_from_slice(&stamp);
    frame.extend_from_slice(b"}");
    crate::ws::FrameEncoder::finish(frame, crate::ws::OutKind::Text)
}

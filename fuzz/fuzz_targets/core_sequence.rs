//! Operation sequences against the sans-IO core, as the shards drive it, with a virtual clock:
//! connections open and close (admission counts, the user directory on every shard, the home
//! shard's connection list and eviction, online/offline presence), join and leave rooms
//! (member-count announcements), watch and unwatch users, update presence (coalescing and
//! transient statuses on timers), receive server-initiated waits that clients answer with any
//! pid, send messages through token buckets, and time advances by arbitrary steps.
//!
//! Everything is checked against a plain model after every step:
//! - timers fire never before their deadline, at most one tick after it (a deadline already
//!   past when scheduled: at the end of the current tick), and once; the wheel's length and
//!   next timeout agree with what is pending, and the next timeout is never 0;
//! - a wait resolves only for its own connection, kind and pid, and at most once — an answered,
//!   expired or failed wait never completes again, and a stale pid never reaches a reused slot;
//! - online/offline transitions, local and replica directory views, home-shard eviction order,
//!   admission counts, room counts, watcher lists and stored presence match the model;
//! - token buckets never grant more than burst + rate × time, and always grant a message that
//!   respects the rate.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use arbitrary::Arbitrary;
use customws::core::directory::{ConnAddr, ConnKey};
use customws::core::occupancy::{Caps, Occupancy};
use customws::core::pending::{PendingTable, Wait, WaitKey, WaitKind};
use customws::core::presence::{
    Admit, Debounce, MAX_WATCHED_PER_USER, Presence, PresenceTable, TransientPolicy, WatchAdmission,
};
use customws::core::ratelimit::{Rate, Strikes, TokenBucket};
use customws::core::rooms::RoomTable;
use customws::core::{Directory, TimerWheel};
use libfuzzer_sys::fuzz_target;

const STATUSES: [&str; 4] = ["online", "away", "busy", "typing"];

#[derive(Debug, Arbitrary)]
struct Script {
    shards: u8,
    per_user: u8,
    caps: [u8; 3],
    tick_ms: u8,
    slots: u8,
    rate: u8,
    burst: u8,
    coalesce_ms: u16,
    ttl_ms: u16,
    start: u32,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Open { user: u8, shard: u8, ip: u8 },
    Close { conn: u8 },
    Join { conn: u8, room: u8 },
    Leave { conn: u8, room: u8 },
    Watch { conn: u8, targets: Vec<u8> },
    Unwatch { conn: u8, targets: Vec<u8> },
    Presence { conn: u8, status: u8, context: Option<u8>, target: Option<u8> },
    Wait { conn: u8, request: bool, timeout_ms: i16 },
    Answer { wait: u8, from: u8, request: bool, pid: PidForm },
    Message { conn: u8, cost: u8 },
    Advance { ms: u16 },
}

#[derive(Debug, Arbitrary)]
enum PidForm {
    Exact,
    OtherShard,
    NextGeneration,
    Text(String),
}

/// A wheel entry: what it is for is in [`World::timers`].
type TimerId = u32;

#[derive(Debug, Clone, Copy)]
enum TimerFor {
    Wait(usize),
    Transient(u32),
}

#[derive(Debug)]
struct Timer {
    shard: usize,
    deadline: u64,
    /// The tick it is due in: its deadline's, or — for a deadline already past when it was
    /// scheduled — the shard's current tick ("fires at the next expiry").
    due_tick: u64,
    what: TimerFor,
    fired: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitState {
    Outstanding,
    Done,
}

#[derive(Debug)]
struct WaitModel {
    shard: usize,
    key: WaitKey,
    conn: ConnKey,
    conn_id: u32,
    kind: WaitKind,
    deadline: u64,
    state: WaitState,
}

/// The coalescing and transient-expiry model of one connection.
#[derive(Debug)]
struct DebounceModel {
    last: Option<(String, Option<u8>, Option<i64>)>,
    last_at: Option<u64>,
    transient_until: u64,
    transient_target: Option<i64>,
}

#[derive(Debug)]
struct BucketModel {
    bucket: TokenBucket,
    created: u64,
    granted: u64,
    last_grant: Option<u64>,
}

#[derive(Debug)]
struct ConnModel {
    id: u32,
    user: i64,
    ip: IpAddr,
    shard: usize,
    key: ConnKey,
    seq: u64,
    rooms: BTreeSet<u8>,
    debounce: Debounce,
    model: DebounceModel,
    bucket: BucketModel,
    strikes: Strikes,
}

struct ShardState {
    dir: Directory,
    rooms: RoomTable,
    pending: PendingTable<usize>,
    wheel: TimerWheel<TimerId>,
    presence: PresenceTable,
    slots: slab::Slab<()>,
    next_generation: u32,
    expired_at: u64,
}

struct World {
    now: u64,
    shards: Vec<ShardState>,
    tick_ms: u64,
    per_user: usize,
    caps: Caps,
    rate: Rate,
    policy: TransientPolicy,
    occupancy: Occupancy,
    conns: Vec<ConnModel>,
    ever: Vec<ConnKey>,
    next_conn: u32,
    next_seq: u64,
    homed: BTreeMap<i64, Vec<(u64, u32)>>,
    status: BTreeMap<i64, String>,
    /// While a transient status is a user's stored one: the lasting status it replaced.
    lasting: BTreeMap<i64, String>,
    watchers: BTreeMap<i64, BTreeSet<i64>>,
    watching: BTreeMap<i64, BTreeSet<i64>>,
    room_counts: BTreeMap<(usize, u8), u32>,
    waits: Vec<WaitModel>,
    timers: Vec<Timer>,
}

fuzz_target!(|script: Script| {
    let mut world = World::new(&script);
    for op in script.ops.iter().take(512) {
        world.apply(op);
        world.check_directory();
    }
    // Whatever happened, closing everything leaves nothing behind.
    while !world.conns.is_empty() {
        world.close(0);
    }
    world.check_directory();
    assert_eq!(world.occupancy.total(), 0);
    assert!(world.homed.is_empty() && world.watching.is_empty() && world.watchers.is_empty());
    for shard in &world.shards {
        assert!(shard.pending.is_empty(), "waits outlived every connection");
        assert_eq!(shard.rooms.rooms(), 0, "room counts outlived every member");
    }
});

impl World {
    fn new(script: &Script) -> Self {
        let shards = usize::from(script.shards % 4) + 1;
        let tick_ms = u64::from(script.tick_ms % 50) + 1;
        let slots = usize::from(script.slots % 64) + 1;
        let now = u64::from(script.start);
        let cap = |c: u8| usize::from(c % 8);
        World {
            now,
            shards: (0..shards)
                .map(|id| ShardState {
                    dir: Directory::default(),
                    rooms: RoomTable::new(shards),
                    pending: PendingTable::new(id),
                    wheel: TimerWheel::new(tick_ms, slots, now),
                    presence: PresenceTable::default(),
                    slots: slab::Slab::new(),
                    next_generation: 0,
                    expired_at: now,
                })
                .collect(),
            tick_ms,
            per_user: usize::from(script.per_user % 4),
            caps: Caps {
                total: cap(script.caps[0]),
                per_ip: cap(script.caps[1]),
                per_user: cap(script.caps[2]),
            },
            rate: Rate { per_second: u64::from(script.rate % 64), burst: u64::from(script.burst % 16) + 1 },
            policy: TransientPolicy {
                statuses: vec!["typing".into()],
                ttl_ms: u64::from(script.ttl_ms),
                coalesce_ms: u64::from(script.coalesce_ms),
            },
            occupancy: Occupancy::default(),
            conns: Vec::new(),
            ever: Vec::new(),
            next_conn: 0,
            next_seq: 0,
            homed: BTreeMap::new(),
            status: BTreeMap::new(),
            lasting: BTreeMap::new(),
            watchers: BTreeMap::new(),
            watching: BTreeMap::new(),
            room_counts: BTreeMap::new(),
            waits: Vec::new(),
            timers: Vec::new(),
        }
    }

    fn apply(&mut self, op: &Op) {
        let pick = |n: u8, len: usize| (len > 0).then(|| usize::from(n) % len);
        match *op {
            Op::Open { user, shard, ip } => self.open(i64::from(user % 12) - 3, shard, ip),
            Op::Close { conn } => {
                if let Some(i) = pick(conn, self.conns.len()) {
                    self.close(i);
                }
            }
            Op::Join { conn, room } => {
                if let Some(i) = pick(conn, self.conns.len()) {
                    self.join(i, room % 6);
                }
            }
            Op::Leave { conn, room } => {
                if let Some(i) = pick(conn, self.conns.len()) {
                    self.leave(i, room % 6);
                }
            }
            Op::Watch { conn, ref targets } => {
                if let Some(i) = pick(conn, self.conns.len()) {
                    self.watch(i, targets);
                }
            }
            Op::Unwatch { conn, ref targets } => {
                if let Some(i) = pick(conn, self.conns.len()) {
                    self.unwatch(i, targets);
                }
            }
            Op::Presence { conn, status, context, target } => {
                if let Some(i) = pick(conn, self.conns.len()) {
                    let target = target.map(|t| i64::from(t % 12) - 3);
                    self.presence(i, STATUSES[usize::from(status) % STATUSES.len()], context, target);
                }
            }
            Op::Wait { conn, request, timeout_ms } => {
                if let Some(i) = pick(conn, self.conns.len()) {
                    self.wait(i, request, timeout_ms);
                }
            }
            Op::Answer { wait, from, request, ref pid } => {
                if let Some(w) = pick(wait, self.waits.len()) {
                    let from = self.ever[usize::from(from) % self.ever.len()];
                    self.answer(w, from, request, pid);
                }
            }
            Op::Message { conn, cost } => {
                if let Some(i) = pick(conn, self.conns.len()) {
                    self.message(i, u64::from(cost % 24));
                }
            }
            Op::Advance { ms } => self.advance(u64::from(ms)),
        }
    }

    // ----- connections ---------------------------------------------------------------------

    fn open(&mut self, user: i64, shard: u8, ip: u8) {
        let ip = IpAddr::from([10, 0, 0, ip % 4]);
        let expected = self.expected_admission(ip, user);
        let admitted = self.occupancy.admit(ip, user, self.caps, self.rate, self.now).map(|_bucket| ());
        assert_eq!(admitted.clone().map_err(|r| r.status), expected, "admission of user {user} from {ip}");
        if admitted.is_err() {
            return;
        }
        let shard = usize::from(shard) % self.shards.len();
        let s = &mut self.shards[shard];
        s.next_generation = s.next_generation.wrapping_add(1);
        let key = ConnKey { index: s.slots.insert(()) as u32, generation: s.next_generation };
        let first_here = !self.conns.iter().any(|c| c.user == user && c.shard == shard);
        assert_eq!(s.dir.add_local(user, key), first_here, "add_local first-on-shard for user {user}");
        if first_here {
            self.announce(user, shard, true);
        }
        let (id, seq) = (self.next_conn, self.next_seq);
        self.next_conn += 1;
        self.next_seq += 1;
        let bucket = BucketModel {
            bucket: TokenBucket::full(self.rate, self.now),
            created: self.now,
            granted: 0,
            last_grant: None,
        };
        self.conns.push(ConnModel {
            id,
            user,
            ip,
            shard,
            key,
            seq,
            rooms: BTreeSet::new(),
            debounce: Debounce::default(),
            model: DebounceModel {
                last: None,
                last_at: None,
                transient_until: u64::MAX,
                transient_target: None,
            },
            bucket,
            strikes: Strikes::default(),
        });
        self.ever.push(key);
        self.home_opened(user, seq, ConnAddr { shard, key }, id);
    }

    fn expected_admission(&self, ip: IpAddr, user: i64) -> Result<(), u16> {
        let full = |cap: usize, n: usize| cap > 0 && n >= cap;
        if full(self.caps.total, self.conns.len()) {
            return Err(503);
        }
        if full(self.caps.per_ip, self.conns.iter().filter(|c| c.ip == ip).count())
            || full(self.caps.per_user, self.conns.iter().filter(|c| c.user == user).count())
        {
            return Err(429);
        }
        Ok(())
    }

    fn home_opened(&mut self, user: i64, seq: u64, addr: ConnAddr, id: u32) {
        let home = Directory::home_of(user, self.shards.len());
        let list = self.homed.entry(user).or_default();
        let came_online = list.is_empty();
        list.push((seq, id));
        let excess = if self.per_user == 0 { 0 } else { list.len().saturating_sub(self.per_user) };
        let evicted: Vec<(u64, u32)> = list.drain(..excess).collect();
        let opened = self.shards[home].dir.home_open(user, seq, addr, self.per_user, self.now);
        assert_eq!(opened.came_online, came_online, "came_online for user {user}");
        let expected: Vec<ConnKey> =
            evicted.iter().map(|(_, id)| self.conns.iter().find(|c| c.id == *id).unwrap().key).collect();
        let got: Vec<ConnKey> = opened.evict.iter().map(|a| a.key).collect();
        assert_eq!(got, expected, "eviction must take the oldest connections of user {user}");
        if came_online {
            self.shards[home].presence.online(user);
            self.status.insert(user, "online".into());
            self.lasting.remove(&user);
            self.assert_watchers(user);
        }
        // The evicted connections are closed (4000) by their shards.
        for (_, id) in evicted {
            let i = self.conns.iter().position(|c| c.id == id).unwrap();
            self.close(i);
        }
    }

    fn close(&mut self, i: usize) {
        let conn = self.conns.remove(i);
        let s = &mut self.shards[conn.shard];
        s.slots.remove(conn.key.index as usize);
        let last_here = !self.conns.iter().any(|c| c.user == conn.user && c.shard == conn.shard);
        assert_eq!(s.dir.remove_local(conn.user, conn.key), last_here, "remove_local last-on-shard");
        assert!(!s.dir.remove_local(conn.user, conn.key), "a connection was removed twice");
        for room in conn.rooms.clone() {
            self.leave_room(&conn, room);
        }
        self.fail_waits(&conn);
        self.occupancy.release(conn.ip, conn.user, self.rate, self.now);
        if last_here {
            self.announce(conn.user, conn.shard, false);
        }
        self.home_closed(conn.user, conn.seq);
    }

    fn home_closed(&mut self, user: i64, seq: u64) {
        let home = Directory::home_of(user, self.shards.len());
        let offline = match self.homed.get_mut(&user) {
            Some(list) if list.iter().any(|(s, _)| *s == seq) => {
                list.retain(|(s, _)| *s != seq);
                list.is_empty()
            }
            _ => false, // evicted earlier: no longer listed
        };
        if offline {
            self.homed.remove(&user);
        }
        assert_eq!(self.shards[home].dir.home_close(user, seq), offline, "offline for user {user}");
        if !offline {
            return;
        }
        self.shards[home].presence.offline(user, self.now);
        self.status.remove(&user);
        self.lasting.remove(&user);
        self.assert_watchers(user);
        let watched = self.shards[home].presence.take_watching(user);
        let expected: Vec<i64> = self.watching.remove(&user).unwrap_or_default().into_iter().collect();
        assert_eq!(sorted(watched.clone()), expected, "what offline user {user} watched");
        for target in watched {
            let target_home = Directory::home_of(target, self.shards.len());
            self.shards[target_home].presence.remove_watcher(target, user);
            remove_from(&mut self.watchers, target, user);
        }
    }

    fn announce(&mut self, user: i64, shard: usize, present: bool) {
        for s in &mut self.shards {
            s.dir.set_replica(user, shard, present);
        }
    }

    fn check_directory(&self) {
        let users: BTreeSet<i64> = self.conns.iter().map(|c| c.user).collect();
        for (id, s) in self.shards.iter().enumerate() {
            assert_eq!(s.dir.users_online(), users.len(), "users online seen by shard {id}");
            for &user in &users {
                let mask = self.conns.iter().filter(|c| c.user == user).fold(0u64, |m, c| m | 1 << c.shard);
                assert_eq!(s.dir.shards_of(user), mask, "replica of user {user} on shard {id}");
                let mut local: Vec<ConnKey> =
                    self.conns.iter().filter(|c| c.user == user && c.shard == id).map(|c| c.key).collect();
                let mut got = s.dir.local(user).to_vec();
                local.sort_by_key(|k| (k.index, k.generation));
                got.sort_by_key(|k| (k.index, k.generation));
                assert_eq!(got, local, "local connections of user {user} on shard {id}");
            }
        }
        for (&user, list) in &self.homed {
            let home = &self.shards[Directory::home_of(user, self.shards.len())];
            let seqs: Vec<u64> = home.dir.home_conns(user).iter().map(|(s, _)| *s).collect();
            assert_eq!(seqs, list.iter().map(|(s, _)| *s).collect::<Vec<_>>(), "home list of user {user}");
            assert!(self.per_user == 0 || seqs.len() <= self.per_user, "more than connections_per_user");
        }
        assert_eq!(self.occupancy.total(), self.conns.len(), "admission total");
    }

    // ----- rooms ---------------------------------------------------------------------------

    fn join(&mut self, i: usize, room: u8) {
        let (shard, key) = (self.conns[i].shard, self.conns[i].key);
        let name = self.shards[shard].rooms.intern(&room_name(room));
        let added = self.conns[i].rooms.insert(room);
        let count = self.room_counts.entry((shard, room)).or_default();
        *count += u32::from(added);
        let expected = (added, *count);
        assert_eq!(self.shards[shard].rooms.join(&name, key), expected, "join {name}");
        self.announce_count(room, shard);
    }

    fn leave(&mut self, i: usize, room: u8) {
        let (shard, key) = (self.conns[i].shard, self.conns[i].key);
        if self.conns[i].rooms.remove(&room) {
            return self.leave_counted(shard, key, room);
        }
        let count = self.room_counts.get(&(shard, room)).copied().unwrap_or(0);
        let got = self.shards[shard].rooms.leave(&room_name(room), key);
        assert_eq!(got, (false, count), "leaving a room one is not in");
    }

    fn leave_room(&mut self, conn: &ConnModel, room: u8) {
        self.leave_counted(conn.shard, conn.key, room);
    }

    fn leave_counted(&mut self, shard: usize, key: ConnKey, room: u8) {
        let count = self.room_counts.entry((shard, room)).or_default();
        *count -= 1;
        let expected = (true, *count);
        if *count == 0 {
            self.room_counts.remove(&(shard, room));
        }
        assert_eq!(self.shards[shard].rooms.leave(&room_name(room), key), expected, "leave");
        self.announce_count(room, shard);
    }

    fn announce_count(&mut self, room: u8, from: usize) {
        let count = self.room_counts.get(&(from, room)).copied().unwrap_or(0);
        for s in &mut self.shards {
            let name = s.rooms.intern(&room_name(room));
            s.rooms.set_count(&name, from, count);
        }
        let total: u32 = self.room_counts.iter().filter(|((_, r), _)| *r == room).map(|(_, c)| *c).sum();
        let mask = self
            .room_counts
            .iter()
            .filter(|((_, r), c)| *r == room && **c > 0)
            .fold(0u64, |m, ((s, _), _)| m | 1 << s);
        for (id, s) in self.shards.iter().enumerate() {
            let name = room_name(room);
            assert_eq!(s.rooms.total(&name), total as usize, "members of {name} seen by shard {id}");
            assert_eq!(s.rooms.shards_of(&name), mask, "shards of {name} seen by shard {id}");
        }
        // Members reached through several rooms are reached once.
        for conn in self.conns.iter().filter(|c| c.shard == from && c.rooms.len() > 1) {
            let rooms: Vec<_> =
                conn.rooms.iter().map(|r| self.shards[from].rooms.intern(&room_name(*r))).collect();
            let union = self.shards[from].rooms.local_union(&rooms);
            assert_eq!(union.iter().filter(|k| **k == conn.key).count(), 1, "a member listed twice");
        }
    }

    // ----- presence ------------------------------------------------------------------------

    fn watch(&mut self, i: usize, targets: &[u8]) {
        let watcher = self.conns[i].user;
        let targets: Vec<i64> = targets.iter().take(64).map(|t| i64::from(t % 12) - 3).collect();
        let home = Directory::home_of(watcher, self.shards.len());
        let current = self.watching.entry(watcher).or_default();
        let fresh: BTreeSet<i64> = targets.iter().copied().filter(|t| !current.contains(t)).collect();
        let expect_too_many = current.len() + fresh.len() > MAX_WATCHED_PER_USER;
        match self.shards[home].presence.admit_watch(watcher, &targets) {
            WatchAdmission::TooMany => {
                assert!(expect_too_many, "a watch list of {} users refused below the limit", current.len())
            }
            WatchAdmission::Accepted(new) => {
                assert!(!expect_too_many, "a watch list over the limit accepted");
                // Repeated ids in one request are one user (regression: they were each stored
                // and counted against the limit).
                assert_eq!(
                    sorted(new.clone()),
                    fresh.iter().copied().collect::<Vec<_>>(),
                    "watcher {watcher} subscribing to {targets:?} with {current:?} already watched"
                );
                current.extend(fresh);
                for target in targets {
                    let target_home = Directory::home_of(target, self.shards.len());
                    self.shards[target_home].presence.add_watcher(target, watcher);
                    self.watchers.entry(target).or_default().insert(watcher);
                }
            }
        }
    }

    fn unwatch(&mut self, i: usize, targets: &[u8]) {
        let watcher = self.conns[i].user;
        let targets: Vec<i64> = targets.iter().take(64).map(|t| i64::from(t % 12) - 3).collect();
        let home = Directory::home_of(watcher, self.shards.len());
        self.shards[home].presence.drop_watch(watcher, &targets);
        for &target in &targets {
            remove_from(&mut self.watching, watcher, target);
            let target_home = Directory::home_of(target, self.shards.len());
            self.shards[target_home].presence.remove_watcher(target, watcher);
            remove_from(&mut self.watchers, target, watcher);
        }
    }

    fn presence(&mut self, i: usize, status: &str, context: Option<u8>, target: Option<i64>) {
        let now = self.now;
        let context_bytes = context.map(|c| format!("{{\"c\":{c}}}"));
        let conn = &mut self.conns[i];
        let got = conn.debounce.admit(
            status,
            context_bytes.as_deref().map(str::as_bytes),
            target,
            now,
            &self.policy,
        );
        let expected = conn.model.admit(status, context, target, now, &self.policy);
        assert_eq!(got, expected, "coalescing of {status:?} at {now}");
        assert_eq!(conn.debounce.transient_until, conn.model.transient_until, "transient expiry");
        let (user, shard, id, until) = (conn.user, conn.shard, conn.id, conn.model.transient_until);
        if until != u64::MAX {
            self.schedule(shard, until, TimerFor::Transient(id));
        }
        // A targeted update is delivered to its target, never stored.
        if got == Admit::Send && target.is_none() {
            self.store_presence(user, status, context_bytes.map(String::into_bytes));
        }
        self.assert_watchers(user);
    }

    fn store_presence(&mut self, user: i64, status: &str, context: Option<Vec<u8>>) {
        let home = Directory::home_of(user, self.shards.len());
        let presence =
            Presence { status: status.into(), context: context.map(Into::into), since_ms: self.now, info: None };
        if self.policy.is_transient(status) {
            let online = self.shards[home].dir.home_since(user);
            self.shards[home].presence.update_transient(user, presence, online);
            if let Some(current) = self.status.get(&user).cloned() {
                self.lasting.entry(user).or_insert(current);
                self.status.insert(user, status.into());
            }
        } else {
            self.shards[home].presence.update(user, presence);
            self.status.insert(user, status.into());
            self.lasting.remove(&user);
        }
        self.assert_watchers(user);
        let stored = self.shards[home].presence.get(user, self.now, self.shards[home].dir.home_since(user));
        assert_eq!(&*stored.status, self.status.get(&user).map_or("offline", String::as_str));
    }

    /// The users a change of `user`'s presence notifies, and its stored status.
    fn assert_watchers(&self, user: i64) {
        let expected: Vec<i64> =
            self.watchers.get(&user).map(|s| s.iter().copied().collect()).unwrap_or_default();
        let home = &self.shards[Directory::home_of(user, self.shards.len())];
        let got: Vec<i64> = home.presence.watchers_of(user).collect();
        assert_eq!(sorted(got), expected, "watchers of user {user}");
        let status = home.presence.get(user, self.now, home.dir.home_since(user)).status;
        assert_eq!(&*status, self.status.get(&user).map_or("offline", String::as_str), "presence of {user}");
    }

    // ----- waits and timers ----------------------------------------------------------------

    fn wait(&mut self, i: usize, request: bool, timeout_ms: i16) {
        let conn = &self.conns[i];
        let deadline = self.now.saturating_add_signed(i64::from(timeout_ms));
        let kind = if request { WaitKind::Request } else { WaitKind::Ack };
        let index = self.waits.len();
        let key = self.shards[conn.shard].pending.insert(Wait {
            conn: conn.key,
            kind,
            deadline,
            completion: index,
        });
        let shard = conn.shard;
        let pid = self.shards[shard].pending.pid(key);
        assert_eq!(self.shards[shard].pending.parse_pid(&pid), Some(key), "pid {pid} does not parse back");
        self.waits.push(WaitModel {
            shard,
            key,
            conn: conn.key,
            conn_id: conn.id,
            kind,
            deadline,
            state: WaitState::Outstanding,
        });
        self.schedule(shard, deadline, TimerFor::Wait(index));
        self.check_pending_len(shard);
    }

    fn answer(&mut self, w: usize, from: ConnKey, request: bool, pid: &PidForm) {
        let wait = &self.waits[w];
        let shard = wait.shard;
        let pid = match pid {
            PidForm::Exact => self.shards[shard].pending.pid(wait.key),
            PidForm::OtherShard => format!("s{}.{}.{}", shard + 1, wait.key.index, wait.key.generation),
            PidForm::NextGeneration => {
                format!("s{shard}.{}.{}", wait.key.index, wait.key.generation.wrapping_add(1))
            }
            PidForm::Text(text) => text.clone(),
        };
        let kind = if request { WaitKind::Request } else { WaitKind::Ack };
        let pending = &mut self.shards[shard].pending;
        let Some(key) = pending.parse_pid(&pid) else { return };
        let target = self.waits.iter().position(|m| {
            m.shard == shard
                && m.key == key
                && m.state == WaitState::Outstanding
                && m.conn == from
                && m.kind == kind
        });
        let got = pending.resolve(key, from, kind).map(|wait| wait.completion);
        assert_eq!(got, target, "client answer {pid:?} from {from:?} ({kind:?})");
        if let Some(t) = target {
            self.waits[t].state = WaitState::Done;
        }
        self.check_pending_len(shard);
    }

    fn fail_waits(&mut self, conn: &ConnModel) {
        for (index, wait) in self.waits.iter_mut().enumerate().filter(|(_, w)| w.conn_id == conn.id) {
            let taken = self.shards[wait.shard].pending.take(wait.key).map(|w| w.completion);
            let expected = (wait.state == WaitState::Outstanding).then_some(index);
            assert_eq!(taken, expected, "closing a connection completes each of its waits once");
            wait.state = WaitState::Done;
        }
    }

    fn check_pending_len(&self, shard: usize) {
        let outstanding = self.waits.iter().filter(|w| w.shard == shard && w.state == WaitState::Outstanding);
        assert_eq!(self.shards[shard].pending.len(), outstanding.count(), "pending waits on shard {shard}");
    }

    fn schedule(&mut self, shard: usize, deadline: u64, what: TimerFor) {
        let id = self.timers.len() as TimerId;
        let due_tick = (deadline / self.tick_ms).max(self.shards[shard].expired_at / self.tick_ms);
        self.timers.push(Timer { shard, deadline, due_tick, what, fired: false });
        self.shards[shard].wheel.insert(deadline, id);
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
        for shard in 0..self.shards.len() {
            let mut due = Vec::new();
            self.shards[shard].wheel.expire(self.now, &mut due);
            self.shards[shard].expired_at = self.now;
            for id in due {
                self.fire(shard, id);
            }
            self.check_wheel(shard);
        }
    }

    fn fire(&mut self, shard: usize, id: TimerId) {
        let now = self.now;
        let timer = &mut self.timers[id as usize];
        assert_eq!(timer.shard, shard);
        assert!(!timer.fired, "timer {id} fired twice");
        assert!(timer.deadline <= now, "timer {id} due at {} fired at {now}", timer.deadline);
        timer.fired = true;
        match timer.what {
            TimerFor::Wait(index) => {
                let wait = &mut self.waits[index];
                let expired = self.shards[shard].pending.expire(wait.key, now).map(|w| w.completion);
                let expected =
                    (wait.state == WaitState::Outstanding && wait.deadline <= now).then_some(index);
                assert_eq!(expired, expected, "expiry of wait {index}");
                if expired.is_some() {
                    wait.state = WaitState::Done;
                }
                self.check_pending_len(shard);
            }
            TimerFor::Transient(conn_id) => self.expire_transient(conn_id),
        }
    }

    fn expire_transient(&mut self, conn_id: u32) {
        let now = self.now;
        let Some(conn) = self.conns.iter_mut().find(|c| c.id == conn_id) else { return };
        let got = conn.debounce.expire(now);
        let expected = conn.model.expire(now);
        assert_eq!(got.map(|e| e.target), expected, "transient expiry at {now}");
        let Some(target) = expected else { return };
        // The home shard answers with the user's lasting status, whichever connection set it.
        let user = conn.user;
        let home = Directory::home_of(user, self.shards.len());
        let online = self.shards[home].dir.home_since(user);
        let home = &mut self.shards[home].presence;
        let lasting = self.lasting.get(&user).or(self.status.get(&user)).map_or("offline", String::as_str);
        assert_eq!(&*home.lasting(user, now, online).status, lasting, "lasting status of {user}");
        if target.is_none() {
            // Stored and announced again, unless a lasting status replaced the transient one.
            let reverted = home.revert(user, now).map(|p| p.status.into_string());
            let expected = self.lasting.remove(&user);
            assert_eq!(reverted, expected, "revert of {user}'s transient status");
            if let Some(status) = expected {
                self.status.insert(user, status);
            }
            self.assert_watchers(user);
        }
    }

    fn check_wheel(&self, shard: usize) {
        let tick = self.tick_ms;
        let s = &self.shards[shard];
        let pending: Vec<&Timer> = self.timers.iter().filter(|t| t.shard == shard && !t.fired).collect();
        for t in &pending {
            assert!(
                t.due_tick >= self.now / tick,
                "a timer due at {} (tick {}) had not fired at {} (tick {tick} ms)",
                t.deadline,
                t.due_tick,
                self.now
            );
        }
        assert_eq!(s.wheel.len(), pending.len(), "wheel length");
        let next_tick = s.expired_at / tick;
        let earliest = pending.iter().map(|t| (t.due_tick.max(next_tick) + 1) * tick).min();
        match (s.wheel.next_timeout(self.now), earliest) {
            (None, None) => {}
            (Some(wait), Some(earliest)) => {
                assert!(wait > 0, "next_timeout 0 right after expiry: the loop would spin");
                assert!(self.now + wait <= earliest, "next_timeout {wait} sleeps past a deadline");
            }
            (got, expected) => panic!("next_timeout {got:?} with earliest firing at {expected:?}"),
        }
    }

    // ----- rate limits ---------------------------------------------------------------------

    fn message(&mut self, i: usize, cost: u64) {
        let (now, rate) = (self.now, self.rate);
        let b = &mut self.conns[i].bucket;
        let granted = b.bucket.take(rate, cost, now);
        if rate.per_second == 0 {
            assert!(granted, "a disabled limit refused a message");
            return;
        }
        let due = match b.last_grant {
            None => cost <= rate.burst,
            Some(at) => cost <= rate.burst && (now - at) * rate.per_second >= cost * 1000,
        };
        assert!(granted || !due, "refused {cost} tokens that the rate {rate:?} allows at {now}");
        if granted {
            b.granted += cost;
            b.last_grant = Some(now);
        }
        let budget = rate.burst * 1000 + rate.per_second * (now - b.created);
        assert!(b.granted * 1000 <= budget, "granted {} tokens, over burst + rate x time", b.granted);
        let strikes = &mut self.conns[i].strikes;
        assert!(!strikes.strike(now, 10_000, 0), "limit 0 must never close");
    }
}

impl DebounceModel {
    fn admit(
        &mut self,
        status: &str,
        context: Option<u8>,
        target: Option<i64>,
        now: u64,
        policy: &TransientPolicy,
    ) -> Admit {
        let mark = (status.to_string(), context, target);
        let transient = policy.statuses.iter().any(|s| s == status);
        let repeat = self.last.as_ref() == Some(&mark)
            && self.last_at.is_some_and(|at| now.saturating_sub(at) < policy.coalesce_ms);
        if repeat {
            if transient {
                self.transient_until = now + policy.ttl_ms;
            }
            return Admit::Coalesced;
        }
        self.last = Some(mark);
        self.last_at = Some(now);
        if transient {
            self.transient_until = now + policy.ttl_ms;
            self.transient_target = target;
            return Admit::Send;
        }
        // A lasting status to the transient status's audience ends it: no revert follows.
        if target == self.transient_target {
            self.transient_until = u64::MAX;
            self.transient_target = None;
        }
        Admit::Send
    }

    /// Whom the expired transient status was addressed to.
    fn expire(&mut self, now: u64) -> Option<Option<i64>> {
        if now < self.transient_until {
            return None;
        }
        self.transient_until = u64::MAX;
        self.last_at = None;
        Some(self.transient_target.take())
    }
}

fn room_name(room: u8) -> String {
    format!("room-{room}")
}

fn sorted(mut v: Vec<i64>) -> Vec<i64> {
    v.sort_unstable();
    v
}

fn remove_from(map: &mut BTreeMap<i64, BTreeSet<i64>>, key: i64, value: i64) {
    if let Some(set) = map.get_mut(&key) {
        set.remove(&value);
        if set.is_empty() {
            map.remove(&key);
        }
    }
}

//! Presence state and watch lists, held by each user's home shard.
//!
//! Fan-out is to *watchers* (users who sent `presence_subscribe` for the user), never to every
//! user: a status change costs one event per interested user, not O(N).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use foldhash::fast::RandomState;

/// Most users one watcher may follow at once.
pub const MAX_WATCHED_PER_USER: usize = 10_000;

/// Most last-seen times one home shard keeps (about 40 bytes each, ~10 MiB at the bound).
/// Past it the oldest is forgotten: that user's offline `since` becomes the time of the query
/// again, as for a user never seen since the start.
pub const MAX_LAST_SEEN_PER_SHARD: usize = 262_144;

/// Largest `presence_info_claim` value kept, serialized; a bigger one is ignored.
pub const MAX_INFO_BYTES: usize = 1024;

/// The raw JSON of claim `name` in a token's `claims` (a JSON object), if present and at most
/// [`MAX_INFO_BYTES`]; a bigger one is ignored with a debug log.
pub fn claim_info(claims: &str, name: &str) -> Option<Arc<str>> {
    let map: HashMap<std::borrow::Cow<'_, str>, &serde_json::value::RawValue> =
        serde_json::from_str(claims).ok()?;
    let raw = map.get(name)?.get();
    if raw.len() > MAX_INFO_BYTES {
        log::debug!(claim = name, bytes = raw.len(); "presence info claim too large, ignored");
        return None;
    }
    Some(Arc::from(raw))
}

/// A user's current presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// Status string (`online`, `away`, `typing`, …).
    pub status: Box<str>,
    /// Raw JSON context, if any.
    pub context: Option<Box<[u8]>>,
    /// When it was set, milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// Who the user is: the raw JSON of the `presence_info_claim` claim of the user's token
    /// (`None` when the key is unset or the claim absent). Filled by the home shard.
    pub info: Option<Arc<str>>,
}

/// The default status of a connected user.
const ONLINE: &str = "online";

impl Presence {
    /// The presence reported for a user with no connection.
    pub fn offline(now_ms: u64) -> Self {
        Presence { status: "offline".into(), context: None, since_ms: now_ms, info: None }
    }

    /// The default presence of a connected user, online since `since_ms`.
    pub fn online(since_ms: u64) -> Self {
        Presence { status: ONLINE.into(), context: None, since_ms, info: None }
    }
}

/// Outcome of a subscription request at the watcher's home shard.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchAdmission {
    /// Accepted; these targets are new for this watcher.
    Accepted(Vec<i64>),
    /// The watcher would exceed [`MAX_WATCHED_PER_USER`].
    TooMany,
}

/// Presence of the users homed on one shard, who watches them, and what the users homed here
/// watch (for cleanup when they go offline). Sets, so a celebrity's 100k watchers or a
/// 10k-user watch list cost O(1) per change, not a scan.
#[derive(Debug, Default)]
pub struct PresenceTable {
    /// Users whose status is not the default one: a user online in status `online` with no
    /// context, since its first connection opened, has no entry (the directory's home list
    /// knows it is online and since when: see the `online` argument of the methods).
    current: HashMap<i64, Presence, RandomState>,
    /// While a transient status is current: the lasting one it replaced, which returns when
    /// the transient one expires.
    lasting: HashMap<i64, Presence, RandomState>,
    watchers: HashMap<i64, HashSet<i64, RandomState>, RandomState>,
    watching: HashMap<i64, HashSet<i64, RandomState>, RandomState>,
    /// Online users' `presence_info_claim` values (empty when the key is unset).
    info: HashMap<i64, Arc<str>, RandomState>,
    /// Offline users' last disconnect (Unix ms), at most [`MAX_LAST_SEEN_PER_SHARD`].
    last_seen: HashMap<i64, u64, RandomState>,
    /// `last_seen` insertions, oldest first, for forgetting the oldest past the bound; an
    /// entry whose time no longer matches the map (the user came back) is stale.
    last_seen_order: VecDeque<(i64, u64)>,
}

impl PresenceTable {
    /// Keeps `info` with `user`'s presence (from its newest connection) until it goes offline.
    pub fn set_info(&mut self, user: i64, info: Option<Arc<str>>) {
        if let Some(info) = info {
            self.info.insert(user, info);
        }
    }

    /// `user`'s info, if any.
    pub fn info(&self, user: i64) -> Option<Arc<str>> {
        if self.info.is_empty() {
            return None; // `presence_info_claim` unset: no hashing
        }
        self.info.get(&user).cloned()
    }

    /// Stores a lasting status (one that does not expire by itself).
    pub fn update(&mut self, user: i64, presence: Presence) {
        self.lasting.remove(&user);
        self.current.insert(user, presence);
    }

    /// Stores a transient status (typing): the lasting one it replaces is kept for
    /// [`PresenceTable::revert`]. Ignored for an offline user (`online` is `None` and no status
    /// is stored). `online`: when the user came online, if it is (the directory knows).
    pub fn update_transient(&mut self, user: i64, presence: Presence, online: Option<u64>) {
        let previous = match self.current.get_mut(&user) {
            Some(current) => std::mem::replace(current, presence),
            None => {
                let Some(since_ms) = online else { return };
                self.current.insert(user, presence);
                Presence::online(since_ms)
            }
        };
        self.lasting.entry(user).or_insert(previous);
    }

    /// A transient status expired: if one is still current, the user's last lasting status
    /// becomes current again (stamped `now_ms`) and is returned; `None` when a lasting status
    /// was set since (nothing to announce) or the user is offline.
    pub fn revert(&mut self, user: i64, now_ms: u64) -> Option<Presence> {
        let mut lasting = self.lasting.remove(&user)?;
        lasting.since_ms = now_ms;
        self.current.insert(user, lasting.clone());
        Some(Presence { info: self.info(user), ..lasting })
    }

    /// The user's last lasting status (offline when unknown), whatever transient status is
    /// current. `online`: when the user came online, if it is.
    pub fn lasting(&self, user: i64, now_ms: u64, online: Option<u64>) -> Presence {
        match self.lasting.get(&user) {
            Some(lasting) => Presence { info: self.info(user), ..lasting.clone() },
            None => self.get(user, now_ms, online),
        }
    }

    /// The user's first connection opened: its status is the default one (`online` since the
    /// time the directory keeps), which takes no entry here.
    pub fn online(&mut self, user: i64) {
        self.last_seen.remove(&user);
        self.lasting.remove(&user);
        self.current.remove(&user);
    }

    /// The user's last connection closed at `now_ms`: the stored status is dropped and
    /// `now_ms` kept as the user's last seen (the oldest one is forgotten past
    /// [`MAX_LAST_SEEN_PER_SHARD`]).
    pub fn offline(&mut self, user: i64, now_ms: u64) {
        self.current.remove(&user);
        self.lasting.remove(&user);
        self.info.remove(&user);
        self.last_seen.insert(user, now_ms);
        self.last_seen_order.push_back((user, now_ms));
        while self.last_seen.len() > MAX_LAST_SEEN_PER_SHARD {
            let Some((old, at)) = self.last_seen_order.pop_front() else { break };
            if self.last_seen.get(&old) == Some(&at) {
                self.last_seen.remove(&old);
            }
        }
        // Users who came back leave stale entries behind: drop them before they outnumber
        // the live ones (amortised O(1) per call).
        if self.last_seen_order.len() > 2 * self.last_seen.len() + 1024 {
            let seen = &self.last_seen;
            self.last_seen_order.retain(|(user, at)| seen.get(user) == Some(at));
        }
    }

    /// When `user`'s last connection closed, if the user is offline and that is remembered.
    pub fn last_seen(&self, user: i64) -> Option<u64> {
        self.last_seen.get(&user).copied()
    }

    /// Current presence of `user`: `online` since `online` (the time the user came online, as
    /// the directory knows it) when no other status is stored; offline since the last
    /// disconnect (the time of the query when not remembered) when the user has no connection.
    pub fn get(&self, user: i64, now_ms: u64, online: Option<u64>) -> Presence {
        match (self.current.get(&user), online) {
            (Some(current), _) => Presence { info: self.info(user), ..current.clone() },
            (None, Some(since_ms)) => Presence { info: self.info(user), ..Presence::online(since_ms) },
            (None, None) => Presence::offline(self.last_seen(user).unwrap_or(now_ms)),
        }
    }

    /// Whether `user`'s current status and context are `status` and `context` (an update
    /// repeating them announces nothing). `online`: whether the user is online.
    pub fn is_current(&self, user: i64, status: &str, context: Option<&[u8]>, online: bool) -> bool {
        match self.current.get(&user) {
            Some(p) => &*p.status == status && p.context.as_deref() == context,
            None => online && status == ONLINE && context.is_none(),
        }
    }

    /// Number of users with a stored status other than the default (for tests and layout
    /// measurements).
    pub fn stored(&self) -> usize {
        self.current.len()
    }

    /// Users watching `user`, in no particular order.
    pub fn watchers_of(&self, user: i64) -> impl Iterator<Item = i64> + '_ {
        self.watchers.get(&user).into_iter().flatten().copied()
    }

    /// Target side: `watcher` now follows `target`.
    pub fn add_watcher(&mut self, target: i64, watcher: i64) {
        self.watchers.entry(target).or_default().insert(watcher);
    }

    /// Target side: `watcher` stops following `target`.
    pub fn remove_watcher(&mut self, target: i64, watcher: i64) {
        if let Some(set) = self.watchers.get_mut(&target) {
            set.remove(&watcher);
            if set.is_empty() {
                self.watchers.remove(&target);
            }
        }
    }

    /// Watcher side: records `targets` for `watcher`, bounded by [`MAX_WATCHED_PER_USER`]
    /// distinct users.
    pub fn admit_watch(&mut self, watcher: i64, targets: &[i64]) -> WatchAdmission {
        let set = self.watching.entry(watcher).or_default();
        let mut fresh: Vec<i64> = targets.iter().copied().filter(|t| !set.contains(t)).collect();
        fresh.sort_unstable();
        fresh.dedup();
        if set.len() + fresh.len() > MAX_WATCHED_PER_USER {
            return WatchAdmission::TooMany;
        }
        set.extend(&fresh);
        WatchAdmission::Accepted(fresh)
    }

    /// Watcher side: forgets `targets`.
    pub fn drop_watch(&mut self, watcher: i64, targets: &[i64]) {
        if let Some(set) = self.watching.get_mut(&watcher) {
            for target in targets {
                set.remove(target);
            }
            if set.is_empty() {
                self.watching.remove(&watcher);
            }
        }
    }

    /// Watcher side: the watcher went offline; returns what it watched.
    pub fn take_watching(&mut self, watcher: i64) -> Vec<i64> {
        self.watching.remove(&watcher).map(|set| set.into_iter().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watchers(table: &PresenceTable, user: i64) -> Vec<i64> {
        let mut list: Vec<i64> = table.watchers_of(user).collect();
        list.sort_unstable();
        list
    }

    #[test]
    fn online_update_offline_notify_watchers() {
        let mut table = PresenceTable::default();
        table.add_watcher(1, 10);
        table.add_watcher(1, 11);
        table.add_watcher(1, 10);
        table.online(1);
        assert_eq!(watchers(&table, 1), [10, 11]);
        assert_eq!(table.get(1, 6, Some(5)), Presence::online(5), "online since the first connection");
        assert_eq!(table.stored(), 0, "the default status takes no entry");
        assert!(table.is_current(1, "online", None, true));
        assert!(!table.is_current(1, "online", None, false), "not for an offline user");
        let busy =
            Presence { status: "busy".into(), context: Some(b"{}".to_vec().into()), since_ms: 7, info: None };
        table.update(1, busy.clone());
        assert_eq!(table.get(1, 8, Some(5)), busy);
        assert!(table.is_current(1, "busy", Some(b"{}"), true));
        assert!(!table.is_current(1, "busy", None, true), "the context counts");
        table.offline(1, 9);
        assert!(!table.is_current(1, "offline", None, false));
        assert_eq!(watchers(&table, 1), [10, 11], "watchers stay for the user's return");
        assert_eq!(table.get(1, 20, None), Presence::offline(9), "since the last disconnect");
        assert_eq!(table.get(2, 20, None), Presence::offline(20), "never seen: since the query");
        table.online(1);
        assert_eq!(table.last_seen(1), None);
    }

    #[test]
    fn info_is_kept_while_online_and_bounded() {
        let mut table = PresenceTable::default();
        let info = claim_info(r#"{"user_id":1,"name":"Ana \"A\"","roles":[]}"#, "name");
        assert_eq!(info.as_deref(), Some(r#""Ana \"A\"""#));
        assert_eq!(claim_info(r#"{"user_id":1}"#, "name"), None);
        let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(MAX_INFO_BYTES));
        assert_eq!(claim_info(&big, "name"), None, "over {MAX_INFO_BYTES} bytes: ignored");
        table.online(1);
        table.set_info(1, info.clone());
        assert_eq!(table.get(1, 1, Some(0)).info, info);
        table.update_transient(
            1,
            Presence { status: "typing".into(), context: None, since_ms: 2, info: None },
            Some(0),
        );
        assert_eq!(table.lasting(1, 3, Some(0)).info, info);
        assert_eq!(table.revert(1, 4).and_then(|p| p.info), info);
        table.offline(1, 5);
        assert_eq!(table.info(1), None);
    }

    #[test]
    fn unwatched_user_has_no_fan_out() {
        let mut table = PresenceTable::default();
        table.online(3);
        assert!(watchers(&table, 3).is_empty());
        table.add_watcher(3, 4);
        table.remove_watcher(3, 4);
        assert!(watchers(&table, 3).is_empty());
    }

    #[test]
    fn watch_lists_are_bounded_and_deduplicated() {
        let mut table = PresenceTable::default();
        assert_eq!(table.admit_watch(1, &[2, 3]), WatchAdmission::Accepted(vec![2, 3]));
        assert_eq!(table.admit_watch(1, &[3, 4]), WatchAdmission::Accepted(vec![4]));
        assert_eq!(table.admit_watch(1, &[5; 100]), WatchAdmission::Accepted(vec![5]), "repeats count once");
        let many: Vec<i64> = (100..100 + MAX_WATCHED_PER_USER as i64).collect();
        assert_eq!(table.admit_watch(1, &many), WatchAdmission::TooMany);
        table.drop_watch(1, &[2]);
        let mut left = table.take_watching(1);
        left.sort_unstable();
        assert_eq!(left, vec![3, 4, 5]);
        assert!(table.take_watching(1).is_empty());
    }
}

/// How short-lived statuses behave (SPEC seed 001 §10: typing and friends).
#[derive(Debug, Clone)]
pub struct TransientPolicy {
    /// Statuses that expire by themselves (e.g. `typing`).
    pub statuses: Vec<String>,
    /// How long a transient status lasts without being repeated.
    pub ttl_ms: u64,
    /// Identical updates within this window are dropped.
    pub coalesce_ms: u64,
}

impl TransientPolicy {
    /// Whether `status` expires by itself.
    pub fn is_transient(&self, status: &str) -> bool {
        self.statuses.iter().any(|s| s == status)
    }
}

/// Per connection: the last update (for coalescing) and a transient status's expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Debounce {
    last: u64,
    /// When `last` was sent; [`NEVER`] when nothing is to be coalesced (a plain `u64`, not an
    /// `Option`: 8 bytes less in every session).
    last_at: u64,
    /// When the current transient status expires (`u64::MAX`: none).
    pub transient_until: u64,
    /// Who the transient status was addressed to (`None`: watchers and rooms).
    transient_target: Option<i64>,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce { last: 0, last_at: NEVER, transient_until: u64::MAX, transient_target: None }
    }
}

/// `Debounce::last_at` when there is no last update.
const NEVER: u64 = u64::MAX;

/// A transient status of this connection expired: its audience is told the user's lasting
/// status again (the home shard knows it: another connection of the user may have set it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Who the transient status was addressed to (`None`: watchers and rooms).
    pub target: Option<i64>,
}

/// What to do with a presence update.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Identical to one sent within the coalescing window: drop it.
    Coalesced,
    /// Send it.
    Send,
}

impl Debounce {
    /// Decides on an update of `status` (with `context` and `target`) at `now`.
    pub fn admit(
        &mut self,
        status: &str,
        context: Option<&[u8]>,
        target: Option<i64>,
        now: u64,
        policy: &TransientPolicy,
    ) -> Admit {
        let mark = fingerprint(status, context, target);
        let transient = policy.is_transient(status);
        if mark == self.last && self.last_at != NEVER && now.saturating_sub(self.last_at) < policy.coalesce_ms
        {
            if transient {
                self.transient_until = now + policy.ttl_ms; // still typing: keep it alive
            }
            return Admit::Coalesced;
        }
        self.last = mark;
        self.last_at = now;
        if transient {
            self.transient_until = now + policy.ttl_ms;
            self.transient_target = target;
            return Admit::Send;
        }
        // A lasting status to the audience of a pending transient one ends it (an explicit
        // "stop typing"): no automatic revert follows.
        if target == self.transient_target {
            self.transient_until = u64::MAX;
            self.transient_target = None;
        }
        Admit::Send
    }

    /// At `now`, if a transient status has expired: who it was addressed to (the revert to
    /// the user's lasting status goes to the same audience).
    pub fn expire(&mut self, now: u64) -> Option<Expired> {
        if now < self.transient_until {
            return None;
        }
        self.transient_until = u64::MAX;
        self.last_at = NEVER;
        Some(Expired { target: self.transient_target.take() })
    }
}

fn fingerprint(status: &str, context: Option<&[u8]>, target: Option<i64>) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut hasher = foldhash::fast::FixedState::with_seed(0x5eed).build_hasher();
    status.hash(&mut hasher);
    context.hash(&mut hasher);
    target.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod debounce_tests {
    use super::*;

    fn policy() -> TransientPolicy {
        TransientPolicy { statuses: vec!["typing".into()], ttl_ms: 3000, coalesce_ms: 1000 }
    }

    #[test]
    fn a_keystroke_storm_costs_one_event_per_window() {
        let (mut d, p) = (Debounce::default(), policy());
        let sent = (0..50u64).filter(|i| d.admit("typing", None, None, i * 100, &p) == Admit::Send).count();
        assert_eq!(sent, 5, "one per 1 s window over 5 s");
    }

    #[test]
    fn different_updates_are_not_coalesced() {
        let (mut d, p) = (Debounce::default(), policy());
        assert_eq!(d.admit("typing", None, None, 0, &p), Admit::Send);
        assert_eq!(d.admit("away", None, None, 10, &p), Admit::Send);
        assert_eq!(d.admit("away", Some(b"{}"), None, 20, &p), Admit::Send);
    }

    #[test]
    fn typing_expires_once_after_its_last_repeat() {
        let (mut d, p) = (Debounce::default(), policy());
        d.admit("busy", None, None, 0, &p);
        d.admit("typing", None, None, 5000, &p);
        assert_eq!(d.expire(7999), None);
        d.admit("typing", None, None, 5500, &p); // coalesced, but extends the expiry
        assert_eq!(d.expire(8000), None);
        assert_eq!(d.expire(8500), Some(Expired { target: None }));
        assert_eq!(d.expire(9000), None, "expires once");
        assert_eq!(d.admit("typing", None, None, 9001, &p), Admit::Send, "a new burst is not coalesced");
    }

    #[test]
    fn an_explicit_stop_cancels_the_revert_for_that_audience_only() {
        let (mut d, p) = (Debounce::default(), policy());
        d.admit("typing", None, Some(7), 0, &p);
        d.admit("online", None, Some(8), 10, &p);
        assert_ne!(d.transient_until, u64::MAX, "a status to someone else does not stop typing to 7");
        d.admit("online", None, Some(7), 20, &p);
        assert_eq!(d.expire(5000), None);
    }

    #[test]
    fn targeted_typing_reverts_at_its_target() {
        let (mut d, p) = (Debounce::default(), policy());
        d.admit("typing", None, Some(7), 0, &p);
        assert_eq!(d.expire(3000), Some(Expired { target: Some(7) }));
    }
}

#[cfg(test)]
mod lasting_tests {
    use super::*;

    fn p(status: &str, since_ms: u64) -> Presence {
        Presence { status: status.into(), context: None, since_ms, info: None }
    }

    #[test]
    fn a_transient_status_reverts_to_the_users_lasting_one() {
        let mut table = PresenceTable::default();
        table.online(1);
        // One connection sets do-not-disturb, another types: the typing ends in do-not-disturb.
        let dnd =
            Presence { context: Some(b"{\"until\":\"5pm\"}".to_vec().into()), ..p("do-not-disturb", 1) };
        table.update(1, dnd.clone());
        table.update_transient(1, p("typing", 2), Some(0));
        assert_eq!(&*table.get(1, 3, Some(0)).status, "typing");
        assert_eq!(table.lasting(1, 3, Some(0)), dnd);
        table.update_transient(1, p("typing", 4), Some(0)); // still the same lasting status underneath
        assert_eq!(table.revert(1, 9), Some(Presence { since_ms: 9, ..dnd.clone() }));
        assert_eq!(table.get(1, 10, Some(0)), Presence { since_ms: 9, ..dnd });
        assert_eq!(table.revert(1, 11), None, "reverts once");
    }

    #[test]
    fn the_default_status_takes_no_entry_and_reverts_like_a_stored_one() {
        let mut table = PresenceTable::default();
        table.online(1);
        assert_eq!(table.stored(), 0);
        table.update_transient(1, p("typing", 6), Some(5));
        assert_eq!(table.get(1, 7, Some(5)), p("typing", 6));
        assert_eq!(table.lasting(1, 7, Some(5)), Presence::online(5), "online since it came online");
        assert_eq!(table.revert(1, 9), Some(Presence::online(9)));
        assert_eq!(table.get(1, 10, Some(5)), Presence::online(9), "re-stamped by the revert");
        assert!(table.is_current(1, "online", None, true));
        table.offline(1, 11);
        table.online(1);
        assert_eq!(table.stored(), 0, "coming back resets to the default");
        assert_eq!(table.get(1, 12, Some(12)), Presence::online(12));
    }

    #[test]
    fn a_lasting_status_set_meanwhile_wins_over_the_revert() {
        let mut table = PresenceTable::default();
        table.online(1);
        table.update_transient(1, p("typing", 1), Some(0));
        table.update(1, p("away", 2));
        assert_eq!(table.revert(1, 3), None);
        assert_eq!(&*table.get(1, 4, Some(0)).status, "away");
    }

    #[test]
    fn offline_users_keep_nothing() {
        let mut table = PresenceTable::default();
        table.update_transient(2, p("typing", 1), None);
        assert_eq!(table.get(2, 2, None), Presence::offline(2), "no transient status for an offline user");
        table.online(2);
        table.update_transient(2, p("typing", 4), Some(3));
        table.offline(2, 5);
        assert_eq!(table.revert(2, 5), None);
        assert_eq!(table.lasting(2, 6, None), Presence::offline(5));
    }

    #[test]
    fn last_seen_is_bounded_and_forgets_the_oldest() {
        let mut table = PresenceTable::default();
        let n = MAX_LAST_SEEN_PER_SHARD as i64;
        for user in 0..n + 10 {
            table.online(user);
            table.offline(user, user as u64 + 1);
        }
        assert_eq!(table.last_seen.len(), MAX_LAST_SEEN_PER_SHARD);
        assert_eq!(table.last_seen(0), None, "the oldest is forgotten past the bound");
        assert_eq!(table.get(0, 7, None), Presence::offline(7), "then `since` is the query's time");
        assert_eq!(table.last_seen(n + 9), Some(n as u64 + 10));
        // A user coming and going again and again leaves no growing queue behind.
        let mut table = PresenceTable::default();
        for at in 0..10_000u64 {
            table.online(-1);
            table.offline(-1, at);
        }
        assert!(table.last_seen_order.len() <= 1026, "{}", table.last_seen_order.len());
        assert_eq!(table.last_seen(-1), Some(9_999));
    }
}

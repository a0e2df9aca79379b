//! Admission limits: connections in the process, per client IP and per user. Checked once per
//! handshake (never per message) under one small lock shared by the shards, so the limits are
//! exact across shards.
//!
//! The same table hands out each user's message-rate bucket: one [`SharedBucket`] per user,
//! shared by all of the user's connections on every shard (charged without a lock). When the
//! user's last connection closes the bucket is kept in a bounded table of recently departed
//! users until it would have refilled, so reconnecting does not reset the user's budget.
//!
//! What is not limited is not kept: with no per-IP cap there is no per-IP table, and with
//! neither a per-user cap nor a message rate a user has no entry (nor bucket) at all, so an
//! idle connection costs this table nothing (BENCHMARKS.md, issue 15). Tables that fall far
//! below their capacity after mass disconnects are shrunk (hash tables never shrink by
//! themselves).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use foldhash::fast::RandomState;

use super::ratelimit::{Rate, SharedBucket};

/// Most departed users whose buckets are kept; beyond it the oldest departure is forgotten.
pub const DEPARTED_MAX: usize = 65_536;

/// Tables with fewer slots than this are never shrunk (not worth the rehash).
const SHRINK_MIN_CAPACITY: usize = 1024;

/// The configured limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    /// `max_connections`.
    pub total: usize,
    /// `max_connections_per_ip`.
    pub per_ip: usize,
    /// `max_connections_per_user`.
    pub per_user: usize,
}

/// Why a handshake is refused: HTTP status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 503 (server full) or 429 (per IP / per user).
    pub status: u16,
    /// For the body and the log.
    pub message: &'static str,
}

/// Open WebSocket connections, counted three ways, and the users' rate buckets.
#[derive(Debug, Default)]
pub struct Occupancy {
    total: usize,
    /// Connections per client address; only kept with a per-IP cap.
    per_ip: HashMap<IpAddr, u32, RandomState>,
    /// One record per user with a connection; only kept with a per-user cap or a message rate.
    users: HashMap<i64, User, RandomState>,
    departed: Departed,
}

/// A user with connections: how many, and the bucket they share (`None` with rates off).
#[derive(Debug)]
struct User {
    connections: u32,
    bucket: Option<Arc<SharedBucket>>,
}

/// Buckets of users without a connection, kept until they would have refilled.
#[derive(Debug, Default)]
struct Departed {
    /// User → (departure number, bucket).
    buckets: HashMap<i64, (u64, Arc<SharedBucket>), RandomState>,
    /// (when, departure number, user), oldest first; entries whose number no longer matches
    /// `buckets` are stale (the user came back) and skipped.
    order: VecDeque<(u64, u64, i64)>,
    next: u64,
}

impl Departed {
    fn keep(&mut self, user: i64, bucket: Arc<SharedBucket>, now_ms: u64) {
        self.next += 1;
        self.buckets.insert(user, (self.next, bucket));
        self.order.push_back((now_ms, self.next, user));
    }

    fn take(&mut self, user: i64) -> Option<Arc<SharedBucket>> {
        let bucket = self.buckets.remove(&user).map(|(_, bucket)| bucket);
        shrink_if_sparse(&mut self.buckets);
        bucket
    }

    /// Forgets departures older than `retain_ms`, and the oldest beyond [`DEPARTED_MAX`].
    fn prune(&mut self, now_ms: u64, retain_ms: u64) {
        let before = self.order.len();
        while let Some(&(at, number, user)) = self.order.front() {
            if self.order.len() <= DEPARTED_MAX && now_ms.saturating_sub(at) < retain_ms {
                break;
            }
            self.order.pop_front();
            if self.buckets.get(&user).is_some_and(|(n, _)| *n == number) {
                self.buckets.remove(&user);
            }
        }
        if self.order.len() < before {
            shrink_if_sparse(&mut self.buckets);
            let (len, capacity) = (self.order.len(), self.order.capacity());
            if capacity >= SHRINK_MIN_CAPACITY && len < capacity / 4 {
                self.order.shrink_to(len * 2);
            }
        }
    }
}

impl Occupancy {
    /// Counts a new connection of `user` from `ip`, or refuses it without counting. On
    /// success, the user's message bucket for `rate` at `now_ms` (milliseconds on the clock
    /// the buckets are charged with): the one its other connections share, or the one it left
    /// with if it departed less than a refill ago, or a full one; `None` when `rate` is off.
    ///
    /// `caps` and `rate` are the configuration's, the same on every call.
    pub fn admit(
        &mut self,
        ip: IpAddr,
        user: i64,
        caps: Caps,
        rate: Rate,
        now_ms: u64,
    ) -> Result<Option<Arc<SharedBucket>>, Refusal> {
        let full = |cap: usize, now: usize| cap > 0 && now >= cap;
        if full(caps.total, self.total) {
            return Err(Refusal { status: 503, message: "server at max_connections" });
        }
        if full(caps.per_ip, self.per_ip.get(&ip).map_or(0, |n| *n as usize)) {
            return Err(Refusal { status: 429, message: "too many connections from this address" });
        }
        if full(caps.per_user, self.users.get(&user).map_or(0, |u| u.connections as usize)) {
            return Err(Refusal { status: 429, message: "too many connections for this user" });
        }
        self.total += 1;
        if caps.per_ip > 0 {
            *self.per_ip.entry(ip).or_default() += 1;
        }
        let rated = rate.per_second > 0;
        if caps.per_user == 0 && !rated {
            return Ok(None);
        }
        self.departed.prune(now_ms, SharedBucket::refill_ms(rate));
        let departed = &mut self.departed;
        let record = self.users.entry(user).or_insert_with(|| User {
            connections: 0,
            bucket: rated.then(|| departed.take(user).unwrap_or_else(|| Arc::new(SharedBucket::new(rate)))),
        });
        record.connections += 1;
        Ok(record.bucket.clone())
    }

    /// Forgets a connection counted by [`Occupancy::admit`] at `now_ms`; after the user's
    /// last one, its bucket is kept for a refill's time of `rate`.
    pub fn release(&mut self, ip: IpAddr, user: i64, rate: Rate, now_ms: u64) {
        self.total = self.total.saturating_sub(1);
        if let Some(count) = self.per_ip.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                self.per_ip.remove(&ip);
                shrink_if_sparse(&mut self.per_ip);
            }
        }
        let Some(record) = self.users.get_mut(&user) else {
            return;
        };
        record.connections -= 1;
        if record.connections == 0 {
            if let Some(bucket) = self.users.remove(&user).and_then(|u| u.bucket) {
                self.departed.keep(user, bucket, now_ms);
            }
            shrink_if_sparse(&mut self.users);
        }
        self.departed.prune(now_ms, SharedBucket::refill_ms(rate));
    }

    /// Connections counted.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// Gives back a table's memory once it is under a quarter full (a hash table keeps its
/// largest capacity otherwise): after 15,000 disconnects the user table would hold ~400 KB
/// for nobody. Halving the length again is needed before the next rehash, so the cost stays
/// amortised O(1) per removal.
fn shrink_if_sparse<K: Hash + Eq, V>(map: &mut HashMap<K, V, RandomState>) {
    let (len, capacity) = (map.len(), map.capacity());
    if capacity >= SHRINK_MIN_CAPACITY && len < capacity / 4 {
        map.shrink_to(len * 2);
    }
}

/// The client's address: the peer, or — when the peer is a trusted proxy — the rightmost
/// `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    forwarded_for
        .into_iter()
        .flat_map(|v| v.rsplit(','))
        .filter_map(|entry| entry.trim().parse::<IpAddr>().ok())
        .find(|ip| !trusted.contains(ip))
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    /// 10 messages per second, burst 5: an empty bucket refills in 500 ms.
    const RATE: Rate = Rate { per_second: 10, burst: 5 };

    #[test]
    fn each_cap_refuses_and_release_frees() {
        let mut occ = Occupancy::default();
        let caps = Caps { total: 3, per_ip: 2, per_user: 1 };
        assert!(occ.admit(ip(1), 1, caps, RATE, 0).is_ok());
        assert_eq!(occ.admit(ip(1), 1, caps, RATE, 0).unwrap_err().status, 429, "per user");
        assert!(occ.admit(ip(1), 2, caps, RATE, 0).is_ok());
        assert_eq!(
            occ.admit(ip(1), 3, caps, RATE, 0).unwrap_err().message,
            "too many connections from this address"
        );
        assert!(occ.admit(ip(2), 3, caps, RATE, 0).is_ok());
        assert_eq!(occ.admit(ip(3), 4, caps, RATE, 0).unwrap_err().status, 503, "total");
        occ.release(ip(1), 1, RATE, 0);
        assert!(occ.admit(ip(1), 1, caps, RATE, 0).is_ok());
        assert_eq!(occ.total(), 3);
    }

    #[test]
    fn zero_caps_are_unlimited() {
        let mut occ = Occupancy::default();
        for user in 0..100 {
            assert!(occ.admit(ip(1), user % 3, Caps::default(), RATE, 0).is_ok());
        }
    }

    #[test]
    fn a_users_connections_share_one_bucket_which_survives_a_reconnect() {
        let mut occ = Occupancy::default();
        let caps = Caps::default();
        let a = occ.admit(ip(1), 7, caps, RATE, 0).unwrap().unwrap();
        let b = occ.admit(ip(2), 7, caps, RATE, 0).unwrap().unwrap();
        assert!(Arc::ptr_eq(&a, &b), "every connection of the user shares the bucket");
        assert!(
            !Arc::ptr_eq(&a, &occ.admit(ip(1), 8, caps, RATE, 0).unwrap().unwrap()),
            "other users do not"
        );
        occ.release(ip(1), 7, RATE, 100);
        occ.release(ip(2), 7, RATE, 100);
        let back = occ.admit(ip(1), 7, caps, RATE, 599).unwrap().unwrap();
        assert!(Arc::ptr_eq(&a, &back), "a reconnect within a refill gets the same bucket");
        occ.release(ip(1), 7, RATE, 600);
        let later = occ.admit(ip(1), 7, caps, RATE, 1100).unwrap().unwrap();
        assert!(!Arc::ptr_eq(&a, &later), "after a full refill a new bucket is as good");
    }

    #[test]
    fn departed_buckets_are_bounded() {
        let mut occ = Occupancy::default();
        let slow = Rate { per_second: 1, burst: 1_000_000 }; // kept for 11 days
        let first = occ.admit(ip(1), 0, Caps::default(), slow, 0).unwrap().unwrap();
        occ.release(ip(1), 0, slow, 0);
        for user in 1..=DEPARTED_MAX as i64 + 10 {
            occ.admit(ip(1), user, Caps::default(), slow, 0).unwrap();
            occ.release(ip(1), user, slow, 0);
        }
        assert!(occ.departed.buckets.len() <= DEPARTED_MAX);
        assert!(occ.departed.order.len() <= DEPARTED_MAX);
        let again = occ.admit(ip(1), 0, Caps::default(), slow, 0).unwrap().unwrap();
        assert!(!Arc::ptr_eq(&first, &again), "the oldest departure was forgotten");
        // Reconnect loops of one user leave stale order entries, also bounded.
        for _ in 0..DEPARTED_MAX + 10 {
            occ.release(ip(1), 0, slow, 0);
            occ.admit(ip(1), 0, Caps::default(), slow, 0).unwrap();
        }
        assert!(occ.departed.order.len() <= DEPARTED_MAX);
    }

    /// Rate limits off (`--rate-limit 0`), no per-user or per-IP cap: a connection costs this
    /// table nothing (issue 15; before, every user had a count, a bucket and its `Arc`).
    #[test]
    fn nothing_is_kept_for_what_is_not_limited() {
        const OFF: Rate = Rate { per_second: 0, burst: 1 };
        let mut occ = Occupancy::default();
        for user in 0..1000 {
            assert!(occ.admit(ip(1), user, Caps::default(), OFF, 0).unwrap().is_none(), "no bucket");
        }
        assert_eq!(occ.total(), 1000);
        assert_eq!((occ.users.capacity(), occ.per_ip.capacity()), (0, 0), "no per-user or per-IP table");
        for user in 0..1000 {
            occ.release(ip(1), user, OFF, 0);
        }
        assert_eq!(occ.total(), 0);
        // A per-user cap alone keeps counts, still without buckets.
        let caps = Caps { per_user: 1, ..Caps::default() };
        assert!(occ.admit(ip(1), 5, caps, OFF, 0).unwrap().is_none());
        assert_eq!(occ.admit(ip(1), 5, caps, OFF, 0).unwrap_err().status, 429);
        occ.release(ip(1), 5, OFF, 0);
        assert!(occ.admit(ip(1), 5, caps, OFF, 0).is_ok());
        assert!(occ.departed.buckets.is_empty());
    }

    /// After mass disconnects the tables give their memory back (hash tables never shrink
    /// by themselves).
    #[test]
    fn tables_shrink_after_mass_disconnects() {
        let caps = Caps { per_ip: 100_000, ..Caps::default() };
        let mut occ = Occupancy::default();
        let addr = |user: i64| IpAddr::from((user as u32).to_be_bytes());
        for user in 0..15_000 {
            occ.admit(addr(user), user, caps, RATE, 0).unwrap();
        }
        let grown = (occ.users.capacity(), occ.per_ip.capacity());
        assert!(grown.0 >= 15_000 && grown.1 >= 15_000);
        for user in 0..14_990 {
            occ.release(addr(user), user, RATE, 0);
        }
        // Past a refill the departed buckets are forgotten too.
        occ.release(addr(14_990), 14_990, RATE, 1_000);
        assert!(
            occ.users.capacity() < SHRINK_MIN_CAPACITY,
            "users: {} of {}",
            occ.users.len(),
            occ.users.capacity()
        );
        assert!(occ.per_ip.capacity() < SHRINK_MIN_CAPACITY, "per IP");
        assert!(occ.departed.buckets.capacity() < SHRINK_MIN_CAPACITY, "departed");
        assert!(occ.departed.order.capacity() < SHRINK_MIN_CAPACITY, "departure order");
        assert_eq!(occ.total(), 9);
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let proxy = ip(9);
        let header = Some("203.0.113.7, 10.0.0.9");
        assert_eq!(client_ip(ip(5), header, &[proxy]), ip(5), "an untrusted peer cannot claim an address");
        assert_eq!(client_ip(proxy, header, &[proxy]), "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(proxy, Some("garbage"), &[proxy]), proxy);
        assert_eq!(client_ip(proxy, None, &[proxy]), proxy);
    }
}

//! Admission limits: connections in the process, per client IP and per user. Checked once per
//! handshake (never per message) under one small lock shared by the shards, so the limits are
//! exact across shards.
//!
//! The same table hands out each user's message-rate bucket: one [`SharedBucket`] per user,
//! shared by all of the user's connections on every shard (charged without a lock). When the
//! user's last connection closes the bucket is kept in a bounded table of recently departed
//! users until it would have refilled, so reconnecting does not reset the user's budget.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use foldhash::fast::RandomState;

use super::ratelimit::{Rate, SharedBucket};

/// Most departed users whose buckets are kept; beyond it the oldest departure is forgotten.
pub const DEPARTED_MAX: usize = 65_536;

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
    per_ip: HashMap<IpAddr, u32, RandomState>,
    per_user: HashMap<i64, u32, RandomState>,
    /// The bucket of every user with a connection.
    buckets: HashMap<i64, Arc<SharedBucket>, RandomState>,
    departed: Departed,
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
        self.buckets.remove(&user).map(|(_, bucket)| bucket)
    }

    /// Forgets departures older than `retain_ms`, and the oldest beyond [`DEPARTED_MAX`].
    fn prune(&mut self, now_ms: u64, retain_ms: u64) {
        while let Some(&(at, number, user)) = self.order.front() {
            if self.order.len() <= DEPARTED_MAX && now_ms.saturating_sub(at) < retain_ms {
                return;
            }
            self.order.pop_front();
            if self.buckets.get(&user).is_some_and(|(n, _)| *n == number) {
                self.buckets.remove(&user);
            }
        }
    }
}

impl Occupancy {
    /// Counts a new connection of `user` from `ip`, or refuses it without counting. On
    /// success, the user's message bucket for `rate` at `now_ms` (milliseconds on the clock
    /// the buckets are charged with): the one its other connections share, or the one it left
    /// with if it departed less than a refill ago, or a full one.
    pub fn admit(
        &mut self,
        ip: IpAddr,
        user: i64,
        caps: Caps,
        rate: Rate,
        now_ms: u64,
    ) -> Result<Arc<SharedBucket>, Refusal> {
        let full = |cap: usize, now: usize| cap > 0 && now >= cap;
        if full(caps.total, self.total) {
            return Err(Refusal { status: 503, message: "server at max_connections" });
        }
        if full(caps.per_ip, self.per_ip.get(&ip).copied().unwrap_or(0) as usize) {
            return Err(Refusal { status: 429, message: "too many connections from this address" });
        }
        if full(caps.per_user, self.per_user.get(&user).copied().unwrap_or(0) as usize) {
            return Err(Refusal { status: 429, message: "too many connections for this user" });
        }
        self.total += 1;
        *self.per_ip.entry(ip).or_default() += 1;
        *self.per_user.entry(user).or_default() += 1;
        self.departed.prune(now_ms, SharedBucket::refill_ms(rate));
        let departed = &mut self.departed;
        let bucket = self
            .buckets
            .entry(user)
            .or_insert_with(|| departed.take(user).unwrap_or_else(|| Arc::new(SharedBucket::new(rate))));
        Ok(Arc::clone(bucket))
    }

    /// Forgets a connection counted by [`Occupancy::admit`] at `now_ms`; after the user's
    /// last one, its bucket is kept for a refill's time of `rate`.
    pub fn release(&mut self, ip: IpAddr, user: i64, rate: Rate, now_ms: u64) {
        self.total = self.total.saturating_sub(1);
        decrement(&mut self.per_ip, &ip);
        decrement(&mut self.per_user, &user);
        if !self.per_user.contains_key(&user)
            && let Some(bucket) = self.buckets.remove(&user)
        {
            self.departed.keep(user, bucket, now_ms);
        }
        self.departed.prune(now_ms, SharedBucket::refill_ms(rate));
    }

    /// Connections counted.
    pub fn total(&self) -> usize {
        self.total
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32, RandomState>, key: &K) {
    if let Some(count) = map.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            map.remove(key);
        }
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
        let a = occ.admit(ip(1), 7, caps, RATE, 0).unwrap();
        let b = occ.admit(ip(2), 7, caps, RATE, 0).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "every connection of the user shares the bucket");
        assert!(!Arc::ptr_eq(&a, &occ.admit(ip(1), 8, caps, RATE, 0).unwrap()), "other users do not");
        occ.release(ip(1), 7, RATE, 100);
        occ.release(ip(2), 7, RATE, 100);
        let back = occ.admit(ip(1), 7, caps, RATE, 599).unwrap();
        assert!(Arc::ptr_eq(&a, &back), "a reconnect within a refill gets the same bucket");
        occ.release(ip(1), 7, RATE, 600);
        let later = occ.admit(ip(1), 7, caps, RATE, 1100).unwrap();
        assert!(!Arc::ptr_eq(&a, &later), "after a full refill a new bucket is as good");
    }

    #[test]
    fn departed_buckets_are_bounded() {
        let mut occ = Occupancy::default();
        let slow = Rate { per_second: 1, burst: 1_000_000 }; // kept for 11 days
        let first = occ.admit(ip(1), 0, Caps::default(), slow, 0).unwrap();
        occ.release(ip(1), 0, slow, 0);
        for user in 1..=DEPARTED_MAX as i64 + 10 {
            occ.admit(ip(1), user, Caps::default(), slow, 0).unwrap();
            occ.release(ip(1), user, slow, 0);
        }
        assert!(occ.departed.buckets.len() <= DEPARTED_MAX);
        assert!(occ.departed.order.len() <= DEPARTED_MAX);
        let again = occ.admit(ip(1), 0, Caps::default(), slow, 0).unwrap();
        assert!(!Arc::ptr_eq(&first, &again), "the oldest departure was forgotten");
        // Reconnect loops of one user leave stale order entries, also bounded.
        for _ in 0..DEPARTED_MAX + 10 {
            occ.release(ip(1), 0, slow, 0);
            occ.admit(ip(1), 0, Caps::default(), slow, 0).unwrap();
        }
        assert!(occ.departed.order.len() <= DEPARTED_MAX);
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

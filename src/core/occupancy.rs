//! Admission limits: connections in the process, per client IP and per user. Checked once per
//! handshake (never per message) under one small lock shared by the shards, so the limits are
//! exact across shards.

use std::collections::HashMap;
use std::net::IpAddr;

use foldhash::fast::RandomState;

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

/// Open WebSocket connections, counted three ways.
#[derive(Debug, Default)]
pub struct Occupancy {
    total: usize,
    per_ip: HashMap<IpAddr, u32, RandomState>,
    per_user: HashMap<i64, u32, RandomState>,
}

impl Occupancy {
    /// Counts a new connection of `user` from `ip`, or refuses it without counting.
    pub fn admit(&mut self, ip: IpAddr, user: i64, caps: Caps) -> Result<(), Refusal> {
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
        Ok(())
    }

    /// Forgets a connection counted by [`Occupancy::admit`].
    pub fn release(&mut self, ip: IpAddr, user: i64) {
        self.total = self.total.saturating_sub(1);
        decrement(&mut self.per_ip, &ip);
        decrement(&mut self.per_user, &user);
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

    #[test]
    fn each_cap_refuses_and_release_frees() {
        let mut occ = Occupancy::default();
        let caps = Caps { total: 3, per_ip: 2, per_user: 1 };
        assert!(occ.admit(ip(1), 1, caps).is_ok());
        assert_eq!(occ.admit(ip(1), 1, caps).unwrap_err().status, 429, "per user");
        assert!(occ.admit(ip(1), 2, caps).is_ok());
        assert_eq!(occ.admit(ip(1), 3, caps).unwrap_err().message, "too many connections from this address");
        assert!(occ.admit(ip(2), 3, caps).is_ok());
        assert_eq!(occ.admit(ip(3), 4, caps).unwrap_err().status, 503, "total");
        occ.release(ip(1), 1);
        assert!(occ.admit(ip(1), 1, caps).is_ok());
        assert_eq!(occ.total(), 3);
    }

    #[test]
    fn zero_caps_are_unlimited() {
        let mut occ = Occupancy::default();
        for user in 0..100 {
            assert!(occ.admit(ip(1), user % 3, Caps::default()).is_ok());
        }
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

//! Token buckets for client messages and bytes, with time passed in.

/// A token bucket: `rate` tokens per second, at most `burst` saved up. Tokens are kept in
/// thousandths so slow rates refill smoothly without floating point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    milli_tokens: u64,
    last_ms: u64,
}

/// The limits a bucket enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens per second; 0 disables the limit.
    pub per_second: u64,
    /// Largest saved-up amount.
    pub burst: u64,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn full(rate: Rate, now: u64) -> Self {
        TokenBucket { milli_tokens: rate.burst.saturating_mul(1000), last_ms: now }
    }

    /// Takes `cost` tokens at `now` if available; a disabled rate always allows.
    pub fn take(&mut self, rate: Rate, cost: u64, now: u64) -> bool {
        if rate.per_second == 0 {
            return true;
        }
        let elapsed = now.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now);
        let cap = rate.burst.max(cost).saturating_mul(1000);
        self.milli_tokens =
            self.milli_tokens.saturating_add(elapsed.saturating_mul(rate.per_second)).min(cap);
        let need = cost.saturating_mul(1000);
        if self.milli_tokens < need {
            return false;
        }
        self.milli_tokens -= need;
        true
    }
}

/// Counts refusals in fixed windows: sustained abuse (too many refusals in one window) ends
/// the connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Strikes {
    window_start: u64,
    count: u32,
}

impl Strikes {
    /// Records a refusal at `now`; true when `limit` refusals fell in the current window.
    pub fn strike(&mut self, now: u64, window_ms: u64, limit: u32) -> bool {
        if now.saturating_sub(self.window_start) >= window_ms {
            self.window_start = now;
            self.count = 0;
        }
        self.count += 1;
        limit > 0 && self.count >= limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate { per_second: 10, burst: 5 };

    #[test]
    fn burst_then_refill_at_the_rate() {
        let mut bucket = TokenBucket::full(RATE, 0);
        assert_eq!((0..8).filter(|_| bucket.take(RATE, 1, 0)).count(), 5);
        assert!(!bucket.take(RATE, 1, 50), "half a token after 50 ms");
        assert!(bucket.take(RATE, 1, 100), "one token after 100 ms");
        assert_eq!((0..20).filter(|_| bucket.take(RATE, 1, 10_000)).count(), 5, "never more than the burst");
    }

    #[test]
    fn byte_costs_and_disabled_limits() {
        let bytes = Rate { per_second: 1000, burst: 1000 };
        let mut bucket = TokenBucket::full(bytes, 0);
        assert!(bucket.take(bytes, 600, 0));
        assert!(!bucket.take(bytes, 600, 0));
        assert!(bucket.take(bytes, 600, 200));
        let mut big = TokenBucket::full(bytes, 0);
        assert!(!big.take(bytes, 5000, 0));
        assert!(big.take(bytes, 5000, 5000), "a message larger than the burst passes once refilled");
        let off = Rate { per_second: 0, burst: 0 };
        assert!(TokenBucket::full(off, 0).take(off, u64::MAX, 0));
    }

    #[test]
    fn strikes_count_per_window() {
        let mut strikes = Strikes::default();
        assert!(!strikes.strike(0, 1000, 3));
        assert!(!strikes.strike(10, 1000, 3));
        assert!(!strikes.strike(1500, 1000, 3), "a new window starts over");
        assert!(!strikes.strike(1600, 1000, 3));
        assert!(strikes.strike(1700, 1000, 3));
    }
}

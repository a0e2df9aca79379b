//! Token buckets for client messages and bytes, with time passed in.

use std::sync::atomic::{AtomicU64, Ordering};

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

/// A token bucket several threads charge without a lock: the generic cell rate algorithm,
/// whose whole state is one number — the theoretical arrival time (TAT) of the next message —
/// updated with compare-and-swap. Equivalent to a [`TokenBucket`] charged one token at a time:
/// the bucket holds `burst - (TAT - now) / interval` tokens and is full once `TAT <= now`.
/// Times are nanoseconds on a clock every caller shares (the process's start).
#[derive(Debug)]
pub struct SharedBucket {
    tat_ns: AtomicU64,
    interval_ns: u64,
    tolerance_ns: u64,
}

impl SharedBucket {
    /// A full bucket for `rate`; a disabled rate (0 per second) always allows.
    pub fn new(rate: Rate) -> Self {
        let interval_ns = 1_000_000_000u64.checked_div(rate.per_second).map_or(0, |ns| ns.max(1));
        SharedBucket {
            tat_ns: AtomicU64::new(0),
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(rate.burst),
        }
    }

    /// Takes one token at `now_ns` if available.
    pub fn take(&self, now_ns: u64) -> bool {
        if self.interval_ns == 0 {
            return true;
        }
        self.tat_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                let next = tat.max(now_ns).saturating_add(self.interval_ns);
                (next - now_ns <= self.tolerance_ns).then_some(next)
            })
            .is_ok()
    }

    /// Milliseconds in which an empty bucket for `rate` fills up again: after that long
    /// unused, any bucket is as good as a new one.
    pub fn refill_ms(rate: Rate) -> u64 {
        if rate.per_second == 0 {
            return 0;
        }
        rate.burst.saturating_mul(1000).div_ceil(rate.per_second)
    }
}

/// Counts refusals in fixed windows: sustained abuse (too many refusals in one window) ends
/// the connection. Windows start on whole seconds (8 bytes in every session rather than 16),
/// so a window is up to a second shorter than asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Strikes {
    /// Seconds (of the `now` clock) when the current window started.
    window_start_s: u32,
    count: u32,
}

impl Strikes {
    /// Records a refusal at `now` (milliseconds); true when `limit` refusals fell in the
    /// current window of `window_ms`.
    pub fn strike(&mut self, now: u64, window_ms: u64, limit: u32) -> bool {
        let now_s = u32::try_from(now / 1000).unwrap_or(u32::MAX);
        if u64::from(now_s.saturating_sub(self.window_start_s)) * 1000 >= window_ms {
            self.window_start_s = now_s;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
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

    const MS: u64 = 1_000_000;

    #[test]
    fn shared_bucket_matches_the_token_bucket() {
        let bucket = SharedBucket::new(RATE);
        assert_eq!((0..8).filter(|_| bucket.take(0)).count(), 5, "the burst");
        assert!(!bucket.take(50 * MS), "half a token after 50 ms");
        assert!(bucket.take(100 * MS), "one token after 100 ms");
        assert!(!bucket.take(100 * MS));
        assert_eq!((0..20).filter(|_| bucket.take(10_000 * MS)).count(), 5, "never more than the burst");
        assert_eq!(SharedBucket::refill_ms(RATE), 500);
        let off = Rate { per_second: 0, burst: 0 };
        assert!((0..1000).all(|_| SharedBucket::new(off).take(0)));
        assert_eq!(SharedBucket::refill_ms(off), 0);
    }

    #[test]
    fn shared_bucket_holds_across_threads() {
        let rate = Rate { per_second: 1, burst: 1000 };
        let bucket = std::sync::Arc::new(SharedBucket::new(rate));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let bucket = std::sync::Arc::clone(&bucket);
                std::thread::spawn(move || (0..1000).filter(|_| bucket.take(0)).count())
            })
            .collect();
        let taken: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(taken, 1000, "exactly the burst, however the threads interleave");
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

//! A hashed timing wheel, one per shard. Time is an argument (milliseconds since the shard's
//! epoch); nothing here reads a clock.
//!
//! Entries are never cancelled: the owner stores the deadline it expects and ignores a firing
//! whose key is stale (connection gone, generation changed, or deadline moved). That keeps
//! insert O(1) and the per-connection cost at one entry: the key and a 32-bit rotation
//! number (16 bytes with a connection's key, where the whole deadline took 24).

/// Default tick: deadlines fire at most this late.
pub const DEFAULT_TICK_MS: u64 = 10;
/// Default slot count: one rotation covers 40.96 s at the default tick.
pub const DEFAULT_SLOTS: usize = 4096;

/// The timing wheel.
#[derive(Debug)]
pub struct TimerWheel<K> {
    /// Per slot, the entries and the rotation they fire in: an entry of tick `t` (its deadline's
    /// tick, or the first unprocessed one for a deadline already past) sits in slot
    /// `t % slots` with rotation `t / slots`, so it fires when the slot is visited at a tick of
    /// that rotation or a later one. The rotation saturates at `u32::MAX` (at the default tick
    /// and slots, 5,500 years away).
    slots: Vec<Vec<(u32, K)>>,
    tick_ms: u64,
    /// First tick not yet processed.
    next_tick: u64,
    len: usize,
}

impl<K: Copy> TimerWheel<K> {
    /// A wheel whose first tick is the one containing `now`.
    pub fn new(tick_ms: u64, slots: usize, now: u64) -> Self {
        let tick_ms = tick_ms.max(1);
        TimerWheel {
            slots: (0..slots.max(1)).map(|_| Vec::new()).collect(),
            tick_ms,
            next_tick: now / tick_ms,
            len: 0,
        }
    }

    /// Number of entries, stale ones included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `key` at `deadline`. A deadline in the past fires at the next expiry.
    pub fn insert(&mut self, deadline: u64, key: K) {
        let tick = (deadline / self.tick_ms).max(self.next_tick);
        let slots = self.slots.len() as u64;
        let rotation = u32::try_from(tick / slots).unwrap_or(u32::MAX);
        self.slots[(tick % slots) as usize].push((rotation, key));
        self.len += 1;
    }

    /// Moves every entry whose tick has fully elapsed at `now` into `due`.
    pub fn expire(&mut self, now: u64, due: &mut Vec<K>) {
        let end = now / self.tick_ms; // ticks strictly before `end` have elapsed
        let slots = self.slots.len() as u64;
        // After a long pause one full rotation visits every slot.
        let start = self.next_tick.max(end.saturating_sub(slots));
        for tick in start..end {
            let slot = &mut self.slots[(tick % slots) as usize];
            let before = slot.len();
            // Same slot, so same tick modulo `slots`: the entry's tick is at most this one
            // exactly when its rotation is at most this one's.
            let rotation = tick / slots;
            slot.retain(|&(entry_rotation, key)| {
                let fire = u64::from(entry_rotation) <= rotation;
                if fire {
                    due.push(key);
                }
                !fire
            });
            self.len -= before - slot.len();
            // Give back what a burst of deadlines (a mass connect) left in the slot.
            if slot.len() < slot.capacity() / 4 {
                slot.shrink_to(slot.len() * 2);
            }
        }
        self.next_tick = self.next_tick.max(end);
    }

    /// Milliseconds from `now` until the next expiry could fire anything; `None` when empty.
    pub fn next_timeout(&self, now: u64) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let slots = self.slots.len() as u64;
        let first = (0..slots)
            .map(|i| self.next_tick + i)
            .find(|tick| !self.slots[(tick % slots) as usize].is_empty())
            .unwrap_or(self.next_tick);
        Some(((first + 1) * self.tick_ms).saturating_sub(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expire(wheel: &mut TimerWheel<u32>, now: u64) -> Vec<u32> {
        let mut due = Vec::new();
        wheel.expire(now, &mut due);
        due.sort_unstable();
        due
    }

    #[test]
    fn fires_at_most_one_tick_late_never_early() {
        let mut wheel = TimerWheel::new(10, 8, 0);
        wheel.insert(25, 1);
        wheel.insert(30, 2);
        assert!(expire(&mut wheel, 24).is_empty());
        assert!(expire(&mut wheel, 29).is_empty());
        assert_eq!(expire(&mut wheel, 30), vec![1]);
        assert_eq!(expire(&mut wheel, 40), vec![2]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn entries_beyond_one_rotation_wait_their_turn() {
        let mut wheel = TimerWheel::new(10, 4, 0); // rotation = 40 ms
        wheel.insert(105, 7);
        for now in (10..=100).step_by(10) {
            assert!(expire(&mut wheel, now).is_empty(), "fired early at {now}");
        }
        assert_eq!(expire(&mut wheel, 110), vec![7]);
    }

    /// A burst of deadlines in one slot (a mass connect) does not keep its memory once they
    /// fired (issue 15).
    #[test]
    fn a_slot_gives_back_what_a_burst_left() {
        let mut wheel = TimerWheel::new(10, 4, 0);
        for key in 0..10_000 {
            wheel.insert(15, key);
        }
        wheel.insert(55, 10_000); // the same slot, one rotation later
        assert!(wheel.slots[1].capacity() >= 10_000);
        assert_eq!(expire(&mut wheel, 20).len(), 10_000);
        assert!(wheel.slots[1].capacity() <= 2, "capacity {}", wheel.slots[1].capacity());
        assert_eq!(expire(&mut wheel, 60), vec![10_000]);
    }

    #[test]
    fn past_deadlines_fire_next() {
        let mut wheel = TimerWheel::new(10, 4, 1000);
        let _ = expire(&mut wheel, 1050);
        wheel.insert(3, 9);
        assert_eq!(expire(&mut wheel, 1060), vec![9]);
    }

    #[test]
    fn long_pause_visits_every_slot_once() {
        let mut wheel = TimerWheel::new(10, 4, 0);
        for k in 0..20u32 {
            wheel.insert(u64::from(k) * 7, k);
        }
        assert_eq!(expire(&mut wheel, 10_000), (0..20).collect::<Vec<_>>());
        assert_eq!(wheel.len(), 0);
    }

    /// Entries fire exactly when the whole deadline said they would: at the first expiry after
    /// their tick (the deadline's, or for one already past the first unprocessed tick) fully
    /// elapsed — over many rotations, past deadlines and pauses, in a shard running for years.
    #[test]
    fn the_rotation_number_fires_what_the_deadline_did() {
        let (tick_ms, slots) = (10, 16); // a rotation is 160 ms
        let start = 3 * 365 * 24 * 3_600_000; // three years of shard time
        let mut wheel = TimerWheel::new(tick_ms, slots, start);
        let mut pending: Vec<(u64, u32)> = Vec::new(); // (the tick it fires after, key)
        let mut now = start;
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut fired_total = 0;
        for key in 0..5_000u32 {
            // Deadlines from 50 ms in the past to 40 rotations ahead; pauses of up to 3 rotations.
            let deadline = (now + next() % 6_400).saturating_sub(50);
            pending.push(((deadline / tick_ms).max(wheel.next_tick), key));
            wheel.insert(deadline, key);
            if key % 7 == 0 {
                now += next() % 500;
                let fired = expire(&mut wheel, now);
                let mut due: Vec<u32> =
                    pending.iter().filter(|(tick, _)| (tick + 1) * tick_ms <= now).map(|(_, k)| *k).collect();
                due.sort_unstable();
                assert_eq!(fired, due, "at {now}");
                pending.retain(|(_, k)| !fired.contains(k));
                fired_total += fired.len();
            }
        }
        assert_eq!(wheel.len(), pending.len());
        assert!(fired_total > 1_000 && !pending.is_empty());
    }

    /// A deadline more than `u32::MAX` rotations away waits for rotation `u32::MAX` (with a
    /// one-slot, 1 ms wheel that is 49 days; at the shard's 10 ms × 4096 slots, 5,500 years).
    #[test]
    fn far_deadlines_saturate_and_wait() {
        let mut wheel = TimerWheel::new(1, 1, 0);
        wheel.insert(u64::MAX, 1);
        wheel.insert(1 << 40, 2);
        wheel.insert(1 << 20, 3);
        assert_eq!(
            expire(&mut wheel, u64::from(u32::MAX)),
            vec![3],
            "nothing else fires before its rotation"
        );
        assert_eq!(expire(&mut wheel, 1 << 33), vec![1, 2]);
    }

    #[test]
    fn next_timeout_points_at_the_first_busy_tick() {
        let mut wheel: TimerWheel<u32> = TimerWheel::new(10, 16, 0);
        assert_eq!(wheel.next_timeout(0), None);
        wheel.insert(55, 1);
        assert_eq!(wheel.next_timeout(3), Some(57));
        let _ = expire(&mut wheel, 60);
        assert_eq!(wheel.next_timeout(60), None);
    }
}

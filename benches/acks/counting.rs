//! A counting global allocator: live heap bytes of the whole process, kept in per-thread
//! cache-line-padded counters so that counting adds no cross-core traffic to the shards'
//! allocations (the figures of the CPU phase would otherwise include it).
//!
//! Slot 0 is reserved for the thread that calls [`mark_client_thread`] (the WebSocket client),
//! so its own buffers can be told apart from the server's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, AtomicU64, AtomicUsize, Ordering};

const SLOTS: usize = 16;

#[repr(align(128))]
struct Slot {
    live: AtomicIsize,
    allocs: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot { live: AtomicIsize::new(0), allocs: AtomicU64::new(0) };

static COUNTERS: [Slot; SLOTS] = [EMPTY; SLOTS];
/// Next slot to hand out (1..SLOTS; 0 is the client thread's).
static NEXT: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static MY_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn slot() -> &'static Slot {
    let index = MY_SLOT
        .try_with(|s| {
            let mut v = s.get();
            if v == usize::MAX {
                v = 1 + NEXT.fetch_add(1, Ordering::Relaxed) % (SLOTS - 1);
                s.set(v);
            }
            v
        })
        // During thread teardown: any shared slot is still correct, only less precise.
        .unwrap_or(SLOTS - 1);
    &COUNTERS[index]
}

fn add(bytes: usize) {
    let s = slot();
    s.live.fetch_add(bytes as isize, Ordering::Relaxed);
    s.allocs.fetch_add(1, Ordering::Relaxed);
}

fn sub(bytes: usize) {
    slot().live.fetch_sub(bytes as isize, Ordering::Relaxed);
}

/// The counting allocator (wraps [`System`]).
pub(crate) struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// counters are plain atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) };
        sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Counted as a free of the old block plus an allocation of the new one.
            sub(layout.size());
            add(new_size);
        }
        p
    }
}

/// Attributes this thread's future allocations to slot 0 (call first thing in the thread).
pub(crate) fn mark_client_thread() {
    let _ = MY_SLOT.try_with(|s| s.set(0));
}

/// Live bytes: (whole process, client thread's slot).
pub(crate) fn live() -> (i64, i64) {
    let total: isize = COUNTERS.iter().map(|s| s.live.load(Ordering::Relaxed)).sum();
    (total as i64, COUNTERS[0].live.load(Ordering::Relaxed) as i64)
}

/// Allocations made so far (whole process).
pub(crate) fn allocations() -> u64 {
    COUNTERS.iter().map(|s| s.allocs.load(Ordering::Relaxed)).sum()
}

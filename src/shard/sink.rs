//! Queuing frames on connections: the per-recipient step of every delivery.
//!
//! Kept apart from the shard so a delivery can borrow the slab mutably while the directory is
//! borrowed for the recipient list. A push is a refcount increment and a `VecDeque` append;
//! the syscall happens once per connection per loop iteration, in the flush.

use std::sync::Arc;

use bytes::Bytes;
use slab::Slab;

use super::conn::{Conn, Refused};
use crate::core::ConnKey;
use crate::metrics::{Metrics, ShardMetrics};

/// Where queued frames and overflows are recorded until the end of the loop iteration.
#[derive(Debug)]
pub struct Sink {
    /// Connections with unflushed frames.
    pub dirty: Vec<ConnKey>,
    /// Connections whose queue overflowed: the slow-consumer policy closes them.
    pub overflowed: Vec<ConnKey>,
    /// Connections whose front frames an io_uring send is writing: not written here meanwhile.
    pub busy: std::collections::HashSet<ConnKey, foldhash::fast::RandomState>,
    max_frames: usize,
    max_bytes: usize,
    metrics: Arc<Metrics>,
    shard: usize,
}

impl Sink {
    /// A sink with the per-connection queue bounds.
    pub fn new(max_frames: usize, max_bytes: usize, metrics: Arc<Metrics>, shard: usize) -> Self {
        Sink {
            dirty: Vec::new(),
            overflowed: Vec::new(),
            busy: Default::default(),
            max_frames,
            max_bytes,
            metrics,
            shard,
        }
    }

    /// Queues `frame` on the connection `key`, if it still exists.
    pub fn push(&mut self, conns: &mut Slab<Conn>, key: ConnKey, frame: Bytes) {
        if let Some(conn) = conns.get_mut(key.index as usize).filter(|c| c.generation == key.generation) {
            self.offer(key, conn, frame);
        }
    }

    /// Queues `frame` on `conn`. A full queue is first written to the socket: the
    /// slow-consumer policy applies only when both our queue and the kernel's buffer are full,
    /// not merely because a burst outran the end-of-iteration flush.
    pub fn offer(&mut self, key: ConnKey, conn: &mut Conn, frame: Bytes) {
        let outcome = match conn.queue(frame, self.max_frames, self.max_bytes) {
            Err(Refused::Overflow(frame))
                if !self.busy.contains(&key) && conn.out.flush(&mut conn.stream).is_ok() =>
            {
                conn.queue(frame, self.max_frames, self.max_bytes)
            }
            other => other,
        };
        let metrics = &self.metrics.shards[self.shard];
        match outcome {
            Ok(()) => {
                ShardMetrics::inc(&metrics.messages_out);
                conn.messages_out = conn.messages_out.wrapping_add(1);
                self.mark_dirty(key, conn);
            }
            Err(Refused::Closing) => ShardMetrics::inc(&metrics.frames_dropped),
            Err(Refused::Overflow(_)) => {
                ShardMetrics::inc(&metrics.frames_dropped);
                self.overflowed.push(key);
            }
        }
    }

    /// Puts `conn` on the flush list once.
    pub fn mark_dirty(&mut self, key: ConnKey, conn: &mut Conn) {
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key);
        }
    }
}

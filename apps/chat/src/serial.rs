//! Per-user ordering on top of the tier's shared [`Workers`] pool.
//!
//! `Workers` runs jobs in any order on any thread; a chat needs one user's requests in the
//! order they were sent (two messages, typing on then off, online then offline). Jobs are
//! queued per key (the user id); a key with no job running gets one worker, which then runs
//! that key's queued jobs one after another. Different users run in parallel, so one user's
//! slow query holds one worker, never another user's requests.

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use customws::app::application::{Busy, Workers};

type Job = Box<dyn FnOnce() + Send>;

/// Runs jobs in order per key, in parallel across keys.
pub struct Serial {
    workers: Workers,
    queues: Mutex<HashMap<i64, VecDeque<Job>>>,
    per_key: usize,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").field("per_key", &self.per_key).finish()
    }
}

impl Serial {
    /// `threads` workers, at most `queue` keys waiting for a worker, at most `per_key` jobs
    /// waiting behind each key's running job.
    pub fn new(threads: usize, queue: usize, per_key: usize) -> Arc<Self> {
        Arc::new(Serial {
            workers: Workers::new(threads, queue),
            queues: Mutex::new(HashMap::new()),
            per_key,
        })
    }

    /// Queues a client's job: refused with `Busy` when that key already has `per_key` waiting
    /// or the pool's queue is full.
    pub fn submit(self: &Arc<Self>, key: i64, job: impl FnOnce() + Send + 'static) -> Result<(), Busy> {
        self.enqueue(key, Box::new(job), self.per_key)
    }

    /// Queues the server's own follow-up work (an ack's outcome, a presence change): not
    /// bounded per key, since its amount is bounded by what clients were allowed to start.
    pub fn submit_internal(
        self: &Arc<Self>,
        key: i64,
        job: impl FnOnce() + Send + 'static,
    ) -> Result<(), Busy> {
        self.enqueue(key, Box::new(job), usize::MAX)
    }

    fn enqueue(self: &Arc<Self>, key: i64, job: Job, bound: usize) -> Result<(), Busy> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = queues.get_mut(&key) {
            if waiting.len() >= bound {
                return Err(Busy);
            }
            waiting.push_back(job);
            return Ok(());
        }
        queues.insert(key, VecDeque::new());
        drop(queues);
        let this = Arc::clone(self);
        let started = self.workers.spawn(move || this.run(key, job));
        if started.is_err() {
            self.queues.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        }
        started
    }

    /// Runs `job`, then the key's queued jobs, until its queue is empty.
    fn run(&self, key: i64, mut job: Job) {
        loop {
            if catch_unwind(AssertUnwindSafe(job)).is_err() {
                log::error!("chat job for user {key} panicked");
            }
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            match queues.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(next) => job = next,
                None => {
                    queues.remove(&key);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_keys_jobs_run_in_order() {
        let serial = Serial::new(4, 64, 1000);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        for i in 0..200 {
            let seen = Arc::clone(&seen);
            let done = done_tx.clone();
            serial
                .submit(7, move || {
                    seen.lock().unwrap().push(i);
                    if i == 199 {
                        done.send(()).unwrap();
                    }
                })
                .unwrap();
        }
        done_rx.recv_timeout(Duration::from_secs(5)).expect("all jobs ran");
        assert_eq!(*seen.lock().unwrap(), (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn a_blocked_key_does_not_hold_another() {
        let serial = Serial::new(2, 64, 8);
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
        let (ran_tx, ran_rx) = crossbeam_channel::bounded(1);
        serial
            .submit(1, move || {
                let _ = release_rx.recv_timeout(Duration::from_secs(5));
            })
            .unwrap();
        serial.submit(2, move || ran_tx.send(()).unwrap()).unwrap();
        ran_rx.recv_timeout(Duration::from_secs(5)).expect("key 2 ran while key 1 was blocked");
        drop(release_tx);
    }

    #[test]
    fn a_keys_queue_is_bounded_and_a_panic_does_not_stall_it() {
        let serial = Serial::new(1, 64, 2);
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
        serial
            .submit(1, move || {
                let _ = release_rx.recv_timeout(Duration::from_secs(5));
            })
            .unwrap();
        serial.submit(1, || panic!("job failed")).unwrap();
        let (ran_tx, ran_rx) = crossbeam_channel::bounded(1);
        serial.submit(1, move || ran_tx.send(()).unwrap()).unwrap();
        assert_eq!(serial.submit(1, || {}), Err(Busy), "third waiting job is refused");
        assert!(serial.submit_internal(1, || {}).is_ok(), "the server's own follow-ups are not");
        drop(release_tx);
        ran_rx.recv_timeout(Duration::from_secs(5)).expect("the job after the panic ran");
    }
}

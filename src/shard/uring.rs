//! The io_uring shard driver: the same shard logic as the epoll loop in `mod.rs`, fed by
//! completions instead of readiness.
//!
//! - Accepting: one multishot `ACCEPT` on the shard's listener; each completion is a socket,
//!   admitted as under epoll (minus the epoll registration).
//! - Reading: one multishot `RECV` per connection, selecting buffers from a provided-buffer
//!   ring shared by the shard's connections, so an idle connection holds no buffer. A buffer
//!   goes back to the ring right after its bytes are ingested (frames are unmasked in place).
//!   A receive that ends (no `IORING_CQE_F_MORE`: `ENOBUFS`, overflow) is re-armed; EOF and
//!   errors end the connection as under epoll.
//! - Writing: at the end of a loop turn, one `WRITEV` of the queue's front frames per dirty
//!   connection, all submitted with the wait of the next turn (one `io_uring_enter`). The
//!   frames are held (`Bytes` handles) in a side table until the completion; at most one send
//!   per connection is in flight (`Sink::busy`), and the queue advances by what the kernel
//!   wrote.
//! - Waking: the shard's `mio::Waker` stays; the `Poll` holding it (and nothing else) is
//!   watched by a multishot `POLL_ADD` on its epoll descriptor, which completes once per wake.
//! - Timers: the wait carries the timer wheel's timeout.
//! - Closing: a dropped connection's receive (and send in flight) still hold the socket, so
//!   they are cancelled; the socket closes (FIN) when the last reference goes.
//!
//! `user_data` carries the operation's kind, the connection's slab index and its generation,
//! so a late completion for a reused slot is recognised and ignored.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::conn::Phase;
use super::{Shard, ShardParts};
use crate::config::IoDriver;
use crate::core::ConnKey;

/// Submission queue entries (the completion queue has 16 times as many: a broadcast completes
/// one send per receiver in a turn; completions beyond
/// it are kept by the kernel, `IORING_FEAT_NODROP`).
const RING_ENTRIES: u32 = 1024;
/// Receive buffers in the provided-buffer ring (a power of two).
const BUFFERS: u16 = 256;
/// Size of one receive buffer: 4 MiB of address space per shard, resident only once used.
const BUFFER_SIZE: usize = 16 * 1024;
/// The buffer group id of the ring.
const GROUP: u16 = 0;
/// Most frames handed to one `WRITEV` (the kernel takes up to 1,024).
const MAX_IOV: usize = 256;
/// How long shutdown waits for the kernel to give back everything it holds.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

// Operation kinds, in the top 3 bits of `user_data`.
const ACCEPT: u64 = 1;
const WAKER: u64 = 2;
const RECV: u64 = 3;
const SEND: u64 = 4;
const WRITABLE: u64 = 5;
const CANCEL: u64 = 6;

fn data(kind: u64, key: ConnKey) -> u64 {
    (kind << 61) | ((u64::from(key.index) & 0x1FFF_FFFF) << 32) | u64::from(key.generation)
}

fn decode(data: u64) -> (u64, ConnKey) {
    (data >> 61, ConnKey { index: ((data >> 32) & 0x1FFF_FFFF) as u32, generation: data as u32 })
}

/// The shard's ring, set up on the shard's thread (see [`choose`] for why).
pub struct Ring {
    ring: IoUring,
    buffers: BufRing,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").finish_non_exhaustive()
    }
}

impl Ring {
    /// A ring with its provided-buffer ring registered, set up on the thread that will use it.
    ///
    /// Task work (a multishot receive's wake-ups, send completions) runs when that thread
    /// waits, not as an interruption of whatever it is doing (`DEFER_TASKRUN`, with
    /// `SINGLE_ISSUER`: kernel 6.1+; older kernels get a plain ring). Measured: request round
    /// trip at one in flight 9.1 → 6.9 µs of server CPU (BENCHMARKS.md, io_uring driver).
    pub fn new() -> io::Result<Self> {
        let deferred = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 16)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(RING_ENTRIES);
        let ring = match deferred {
            Ok(ring) => ring,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                IoUring::builder().setup_cqsize(RING_ENTRIES * 16).build(RING_ENTRIES)?
            }
            Err(e) => return Err(e),
        };
        let buffers = BufRing::new(&ring)?;
        Ok(Ring { ring, buffers })
    }
}

/// A provided-buffer ring (kernel 5.19+): the entries the kernel picks buffers from, and the
/// buffers.
struct BufRing {
    entries: *mut types::BufRingEntry,
    entries_layout: std::alloc::Layout,
    memory: *mut u8,
    memory_layout: std::alloc::Layout,
    tail: u16,
}

impl BufRing {
    fn new(ring: &IoUring) -> io::Result<Self> {
        let entries_layout = std::alloc::Layout::from_size_align(
            usize::from(BUFFERS) * size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        let memory_layout = std::alloc::Layout::from_size_align(usize::from(BUFFERS) * BUFFER_SIZE, 4096)
            .map_err(io::Error::other)?;
        // SAFETY: non-zero sizes; zeroed memory is untouched (not resident) until used.
        let (entries, memory) = unsafe {
            (
                std::alloc::alloc_zeroed(entries_layout) as *mut types::BufRingEntry,
                std::alloc::alloc_zeroed(memory_layout),
            )
        };
        if entries.is_null() || memory.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut buffers = BufRing { entries, entries_layout, memory, memory_layout, tail: 0 };
        // SAFETY: the entries live until `Drop`, after the ring (and with it the registration)
        // is gone.
        unsafe { ring.submitter().register_buf_ring_with_flags(entries as u64, BUFFERS, GROUP, 0)? };
        for bid in 0..BUFFERS {
            buffers.give_back(bid);
        }
        Ok(buffers)
    }

    /// The first `len` bytes of buffer `bid`, which the kernel filled and handed to us.
    fn slice(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let len = len.min(BUFFER_SIZE);
        let bid = usize::from(bid % BUFFERS);
        // SAFETY: inside the allocation; the kernel is done with a buffer it completed, and it
        // is not handed out again before `give_back`.
        unsafe { std::slice::from_raw_parts_mut(self.memory.add(bid * BUFFER_SIZE), len) }
    }

    /// Puts buffer `bid` back in the ring.
    fn give_back(&mut self, bid: u16) {
        let bid = bid % BUFFERS;
        let slot = usize::from(self.tail & (BUFFERS - 1));
        // SAFETY: `slot` is inside the entries; the kernel reads an entry only once the tail
        // (published below, with release ordering) covers it.
        unsafe {
            let entry = &mut *self.entries.add(slot);
            entry.set_addr(self.memory.add(usize::from(bid) * BUFFER_SIZE) as u64);
            entry.set_len(BUFFER_SIZE as u32);
            entry.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts.
        unsafe {
            std::alloc::dealloc(self.entries as *mut u8, self.entries_layout);
            std::alloc::dealloc(self.memory, self.memory_layout);
        }
    }
}

/// When `driver` asks for io_uring, sets up (and drops) a trial ring; on any failure (no
/// io_uring in the kernel, `io_uring_disabled`, a seccomp filter, memory limits) every shard
/// runs epoll and the reason is logged. Returns the driver the shards run.
///
/// The trial runs on a thread of its own, and each shard sets up its ring on its own thread:
/// the kernel ties a ring to the threads that set it up, and when the ring goes it interrupts
/// them (a blocking read with a timeout would fail with `EINTR` in the caller's thread).
pub fn choose(driver: IoDriver, parts: &mut [ShardParts]) -> &'static str {
    if driver == IoDriver::Epoll {
        return "epoll";
    }
    let trial = std::thread::Builder::new()
        .name("customws-uring-probe".into())
        .spawn(|| Ring::new().map(drop))
        .map_err(io::Error::other)
        .and_then(|thread| thread.join().unwrap_or_else(|_| Err(io::Error::other("probe panicked"))));
    if let Err(e) = trial {
        log::warn!("io_uring unavailable ({e}); io_driver {} falls back to epoll", driver_name(driver));
        return "epoll";
    }
    for part in parts.iter_mut() {
        part.uring = true;
    }
    "io_uring"
}

fn driver_name(driver: IoDriver) -> &'static str {
    match driver {
        IoDriver::Epoll => "epoll",
        IoDriver::IoUring => "io_uring",
        IoDriver::Auto => "auto",
    }
}

/// A send in flight: the frames the kernel is writing, kept alive until its completion.
struct InFlight {
    frames: Vec<Bytes>,
    iov: Vec<libc::iovec>,
    bytes: usize,
}

/// The loop's side of the ring: what it armed and what it holds for the kernel.
struct Driver {
    ring: Ring,
    /// Sends in flight, by connection.
    sends: HashMap<ConnKey, InFlight, foldhash::fast::RandomState>,
    /// Spare allocations for the next sends.
    spare: Vec<InFlight>,
    /// Connections waiting for `POLLOUT` after a send was refused with `EAGAIN`.
    writable: std::collections::HashSet<ConnKey, foldhash::fast::RandomState>,
    /// Completions of this turn: (user_data, result, flags).
    cqes: Vec<(u64, i32, u32)>,
    /// Operations the kernel holds (multishots until their last completion, sends, polls).
    live: usize,
    accept_armed: bool,
    waker_armed: bool,
    listener_fd: Option<RawFd>,
    epoll_fd: RawFd,
}

impl Driver {
    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: every buffer an entry points at (iovecs, frames, the buffer ring) lives until
        // the operation's last completion (see `sends` and `shutdown`).
        while unsafe { self.ring.ring.submission().push(&entry) }.is_err() {
            if let Err(e) = self.ring.ring.submit() {
                log::error!("io_uring submit failed: {e}");
                return;
            }
        }
    }

    fn arm_recv(&mut self, fd: RawFd, key: ConnKey) {
        self.live += 1;
        self.push(opcode::RecvMulti::new(types::Fd(fd), GROUP).build().user_data(data(RECV, key)));
    }

    fn arm_accept(&mut self) {
        if let Some(fd) = self.listener_fd {
            self.live += 1;
            self.accept_armed = true;
            let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
            let entry = opcode::AcceptMulti::new(types::Fd(fd)).flags(flags).build();
            self.push(entry.user_data(data(ACCEPT, ConnKey { index: 0, generation: 0 })));
        }
    }

    fn arm_waker(&mut self) {
        self.live += 1;
        self.waker_armed = true;
        let entry = opcode::PollAdd::new(types::Fd(self.epoll_fd), libc::POLLIN as u32).multi(true).build();
        self.push(entry.user_data(data(WAKER, ConnKey { index: 0, generation: 0 })));
    }

    fn cancel(&mut self, target: u64) {
        let entry = opcode::AsyncCancel::new(target).build();
        self.push(entry.user_data(data(CANCEL, ConnKey { index: 0, generation: 0 })));
    }

    /// Waits for at least one completion, or `timeout`, submitting what was queued. A zero
    /// timeout waits too (for nothing): with `DEFER_TASKRUN` completions are posted only by a
    /// wait, never by a plain submit.
    fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let result = match timeout {
            Some(t) => {
                let ts = types::Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.ring.submit_and_wait(1),
        };
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Moves this turn's completions out of the ring.
    fn collect(&mut self) {
        self.cqes.clear();
        for cqe in self.ring.ring.completion() {
            self.cqes.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
    }
}

impl Shard {
    /// The loop under io_uring; see the module documentation.
    pub(super) fn run_uring(mut self, ring: Box<Ring>) {
        // The listener is the ring's now; the poll keeps only the waker.
        if let Some(listener) = self.listener.as_mut() {
            let _ = self.poll.registry().deregister(listener);
        }
        self.io.uring = true;
        let mut driver = Driver {
            ring: *ring,
            sends: Default::default(),
            spare: Vec::new(),
            writable: Default::default(),
            cqes: Vec::with_capacity(1024),
            live: 0,
            accept_armed: false,
            waker_armed: false,
            listener_fd: self.listener.as_ref().map(|l| l.as_raw_fd()),
            epoll_fd: self.poll.as_raw_fd(),
        };
        driver.arm_waker();
        driver.arm_accept();
        loop {
            self.prepare(&mut driver);
            let timeout = self.poll_timeout();
            let link = &self.shared.fabric.links[self.id];
            link.set_sleeping(true);
            let timeout = if self.inbox.is_empty() { timeout } else { Some(Duration::ZERO) };
            if let Err(e) = driver.submit_and_wait(timeout) {
                log::error!("shard {}: io_uring wait failed: {e}", self.id);
                break;
            }
            link.set_sleeping(false);
            let woke = Instant::now();
            let messages_before = self.metrics().messages_in.load(Ordering::Relaxed);
            self.now = woke.duration_since(self.epoch).as_millis() as u64;
            driver.collect();
            let cqes = std::mem::take(&mut driver.cqes);
            // Sends first: most completed during the submission itself, and a queue whose send
            // is done can take a burst (or be written at once when it overflows, as under
            // epoll) rather than look like a slow consumer's.
            let is_send = |&&(user_data, _, _): &&(u64, i32, u32)| decode(user_data).0 == SEND;
            for &(user_data, result, flags) in cqes.iter().filter(is_send) {
                self.on_completion(&mut driver, user_data, result, flags);
            }
            // Then the inbox, as under epoll: what another shard sent before a client's bytes
            // reached us must be known when those bytes are routed.
            self.drain_inbox();
            for &(user_data, result, flags) in cqes.iter().filter(|cqe| !is_send(cqe)) {
                self.on_completion(&mut driver, user_data, result, flags);
            }
            driver.cqes = cqes;
            self.turn();
            self.observe_latency(woke, messages_before);
            if self.finished() {
                break;
            }
        }
        self.shutdown_ring(driver);
        self.summarise_refusals(true);
        log::debug!("shard {} stopped", self.id);
    }

    /// Queues what the last turn asked for: receives of new connections, cancels for dropped
    /// ones, sends, and the multishots that ended.
    fn prepare(&mut self, driver: &mut Driver) {
        for key in std::mem::take(&mut self.io.admitted) {
            if let Some(conn) = self.conn_mut(key) {
                let fd = conn.stream.as_raw_fd();
                driver.arm_recv(fd, key);
            }
        }
        for key in std::mem::take(&mut self.io.dropped) {
            driver.cancel(data(RECV, key));
            if driver.sends.contains_key(&key) {
                driver.cancel(data(SEND, key));
            }
            if driver.writable.contains(&key) {
                driver.cancel(data(WRITABLE, key));
            }
        }
        let mut to_send = std::mem::take(&mut self.io.to_send);
        for key in to_send.drain(..) {
            self.submit_send(driver, key);
        }
        self.io.to_send = to_send;
        if self.listener.is_none() && driver.listener_fd.take().is_some() && driver.accept_armed {
            // Shutdown: the multishot accept holds the listener open; let it go.
            driver.cancel(data(ACCEPT, ConnKey { index: 0, generation: 0 }));
        }
        if !driver.accept_armed && driver.listener_fd.is_some() && self.accept_retry_at.is_none() {
            driver.arm_accept();
        }
        if !driver.waker_armed {
            driver.arm_waker();
        }
    }

    fn submit_send(&mut self, driver: &mut Driver, key: ConnKey) {
        if driver.sends.contains_key(&key) || driver.writable.contains(&key) {
            return; // its completion resubmits
        }
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        if conn.out.is_empty() || conn.held > 0 {
            return;
        }
        let mut send =
            driver.spare.pop().unwrap_or(InFlight { frames: Vec::new(), iov: Vec::new(), bytes: 0 });
        send.frames.extend(conn.out.front(MAX_IOV));
        send.bytes = 0;
        for frame in &send.frames {
            send.iov
                .push(libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() });
            send.bytes += frame.len();
        }
        let fd = conn.stream.as_raw_fd();
        let entry = opcode::Writev::new(types::Fd(fd), send.iov.as_ptr(), send.iov.len() as u32).build();
        driver.sends.insert(key, send);
        self.sink.busy.insert(key);
        driver.live += 1;
        driver.push(entry.user_data(data(SEND, key)));
    }

    fn on_completion(&mut self, driver: &mut Driver, user_data: u64, result: i32, flags: u32) {
        let (kind, key) = decode(user_data);
        let more = cqueue::more(flags);
        if kind != CANCEL && !more {
            driver.live = driver.live.saturating_sub(1);
        }
        match kind {
            RECV => self.on_recv(driver, key, result, flags),
            SEND => self.on_sent(driver, key, result),
            WRITABLE => {
                driver.writable.remove(&key);
                if self.conn_mut(key).is_some() {
                    self.submit_send(driver, key);
                }
            }
            ACCEPT => {
                if !more {
                    driver.accept_armed = false;
                }
                self.on_accepted(driver, result);
            }
            // Nothing to read: the inbox is drained by the turn. The epoll set is never waited
            // on, so the waker stays in its ready list; each `wake` still wakes the set's
            // pollers, and this multishot poll completes once per wake-up.
            WAKER if !more => driver.waker_armed = false,
            _ => {}
        }
    }

    fn on_accepted(&mut self, driver: &mut Driver, result: i32) {
        if result < 0 {
            let e = io::Error::from_raw_os_error(-result);
            if result != -libc::ECANCELED {
                log::warn!(
                    "shard {}: accept failed: {e}; retrying in {} ms",
                    self.id,
                    super::ACCEPT_RETRY_MS
                );
                self.accept_retry_at = Some(self.now + super::ACCEPT_RETRY_MS);
            }
            return;
        }
        // SAFETY: the kernel handed us this new descriptor.
        let stream = unsafe { std::net::TcpStream::from_raw_fd(result) };
        if self.listener.is_none() {
            return; // shutting down: closed at once
        }
        let Ok(peer) = stream.peer_addr() else {
            return; // already reset by the peer
        };
        let _ = driver;
        self.admit(mio::net::TcpStream::from_std(stream), peer);
    }

    fn on_recv(&mut self, driver: &mut Driver, key: ConnKey, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        if let Some(bid) = cqueue::buffer_select(flags) {
            if result > 0 && self.conn_mut(key).is_some() {
                let buf = driver.ring.buffers.slice(bid, result as usize);
                let n = buf.len(); // never past the buffer, whatever the completion says
                self.ingest(key, buf, n);
            }
            driver.ring.buffers.give_back(bid);
        }
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        match result {
            0 => self.on_eof(key),
            n if n > 0 || n == -libc::ENOBUFS => {
                if !more {
                    let fd = conn.stream.as_raw_fd();
                    driver.arm_recv(fd, key);
                }
            }
            n if n == -libc::ECANCELED => {}
            n => {
                let e = io::Error::from_raw_os_error(-n);
                self.drop_conn(key, &format!("read failed: {e}"));
            }
        }
    }

    fn on_sent(&mut self, driver: &mut Driver, key: ConnKey, result: i32) {
        self.sink.busy.remove(&key);
        let Some(mut send) = driver.sends.remove(&key) else {
            return;
        };
        let submitted = send.bytes;
        send.frames.clear();
        send.iov.clear();
        if driver.spare.len() < 64 {
            driver.spare.push(send);
        }
        let (now, write_wait) = (self.now, self.limits.write_wait_ms);
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        if result == -libc::EAGAIN {
            // The socket refused at once (non-blocking): wait until it takes bytes.
            let fd = conn.stream.as_raw_fd();
            if conn.write_blocked_at == u64::MAX {
                conn.write_blocked_at = now;
                self.schedule_before(key, now + write_wait);
            }
            driver.writable.insert(key);
            driver.live += 1;
            let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32).build();
            driver.push(entry.user_data(data(WRITABLE, key)));
            return;
        }
        if result <= 0 {
            let e = if result == 0 {
                io::ErrorKind::WriteZero.into()
            } else {
                io::Error::from_raw_os_error(-result)
            };
            return self.drop_conn(key, &format!("write failed: {e}"));
        }
        let written = result as usize;
        conn.out.advance(written);
        if conn.out.is_empty() {
            conn.write_blocked_at = u64::MAX;
            if let Phase::Closing { peer_done } = conn.phase {
                self.after_last_byte(key, peer_done);
            }
            return;
        }
        if written < submitted {
            // A short write: the socket's buffer is full; progress restarts the write wait.
            conn.write_blocked_at = now;
            self.schedule_before(key, now + write_wait);
        }
        // The rest goes with the next submission; until then the queue is not busy, so a burst
        // that overflows it this turn is written at once (as under epoll) instead of closing
        // the connection as a slow consumer.
        self.io.to_send.push(key);
    }

    /// Cancels everything the kernel holds and waits (bounded) for it to let go, so that no
    /// buffer is freed while the kernel may still write into it; past the bound, the buffers
    /// are leaked rather than freed.
    fn shutdown_ring(&mut self, mut driver: Driver) {
        let builder = types::CancelBuilder::any();
        let entry = opcode::AsyncCancel2::new(builder).build();
        driver.push(entry.user_data(data(CANCEL, ConnKey { index: 0, generation: 0 })));
        // The connections still open go now: their sockets close once their operations end.
        self.conns.clear();
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while driver.live > 0 && Instant::now() < deadline {
            if driver.submit_and_wait(Some(Duration::from_millis(50))).is_err() {
                break;
            }
            driver.collect();
            for &(user_data, _, flags) in &driver.cqes {
                let (kind, _) = decode(user_data);
                if kind != CANCEL && !cqueue::more(flags) {
                    driver.live = driver.live.saturating_sub(1);
                }
                if let Some(bid) = cqueue::buffer_select(flags) {
                    driver.ring.buffers.give_back(bid);
                }
            }
        }
        if driver.live > 0 {
            log::warn!("shard {}: io_uring operations still pending at exit; leaking their buffers", self.id);
            std::mem::forget(driver);
        }
    }
}

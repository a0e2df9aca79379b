//! One event-loop thread: its `SO_REUSEPORT` listener, its connections (a slab keyed by mio
//! token + generation), its timer wheel, its share of the directory and presence, and its
//! inbox from the other shards. The loop is a thin driver over the sans-IO pieces in `ws`,
//! `http`, `protocol` and `core`. See `LIFECYCLE.md` for the connection state machine.

mod admin;
mod authorize;
mod callbacks;
mod cluster;
pub mod conn;
mod deliver;
mod handshake;
mod lifecycle;
mod limits;
mod read;
mod rooms;
pub mod sink;
#[cfg(all(feature = "io-uring", target_os = "linux"))]
pub mod uring;
mod waits;

use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::config::Config;
use crate::core::directory::{ConnAddr, ShardId};
use crate::core::pending::{PendingTable, WaitKey};
use crate::core::{ConnKey, Directory, PresenceTable, TimerWheel};
use crate::http::Gate;
use crate::metrics::{Metrics, ShardMetrics};
use crate::route::Completion;
use crate::route::link::{Link, Parcel, ShedKind};
use crate::route::msg::{DirMsg, ShardMsg};
use conn::{Conn, Flushed, Phase};
use sink::Sink;

const LISTENER: Token = Token(1 << 40);
const WAKER: Token = Token((1 << 40) + 1);
/// Reads per connection per wake-up before yielding to the others (fairness).
const READS_PER_WAKE: usize = 8;
/// Accepts per wake-up before serving the established connections.
const ACCEPTS_PER_WAKE: usize = 256;
/// Scratch read buffer, shared by all connections of the shard.
const SCRATCH: usize = 64 * 1024;
/// Pause after a failed `accept` before trying again.
const ACCEPT_RETRY_MS: u64 = 100;
/// How long a closing connection waits for the peer's EOF after our last byte.
const LINGER_MS: u64 = 2_000;

/// What a timer-wheel entry points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKey {
    /// A connection's earliest deadline.
    Conn(ConnKey),
    /// A server-initiated wait's timeout.
    Wait(WaitKey),
}

/// What every shard shares, read-only (atomics aside).
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// Handshake rules.
    pub gate: Gate,
    /// One link per shard, and what the application's handle reads.
    pub fabric: Arc<crate::route::Fabric>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Process start, for `/health` uptime.
    pub started: Instant,
    /// Global connection open order.
    pub next_seq: std::sync::atomic::AtomicU64,
    /// The application's callbacks.
    pub app: crate::app::application::App,
    /// Admission counts (per process, IP, user); locked once per handshake and disconnect.
    pub occupancy: std::sync::Mutex<crate::core::occupancy::Occupancy>,
    /// Admission limits.
    pub caps: crate::core::occupancy::Caps,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Set first thing when a shutdown starts: `/ready` answers 503 from then on.
    pub draining: AtomicBool,
    /// The `authorize_url` backend, when configured.
    #[cfg(feature = "backend")]
    pub authorizer: Option<Arc<crate::backend::Authorizer>>,
}

impl Shared {
    /// Counts a new connection against the admission limits; on success, the user's message
    /// bucket, shared by all of its connections on every shard and kept across reconnects
    /// (`None` when `rate_limit` is off).
    pub fn admit(
        &self,
        ip: std::net::IpAddr,
        user: i64,
    ) -> Result<Option<Arc<crate::core::ratelimit::SharedBucket>>, crate::core::occupancy::Refusal> {
        let (rate, now_ms) = (limits::Rates::from(&self.config).messages, self.clock_ms());
        let mut occupancy = self.occupancy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        occupancy.admit(ip, user, self.caps, rate, now_ms)
    }

    /// Forgets a connection counted by [`Shared::admit`].
    pub fn release(&self, ip: std::net::IpAddr, user: i64) {
        let (rate, now_ms) = (limits::Rates::from(&self.config).messages, self.clock_ms());
        let mut occupancy = self.occupancy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        occupancy.release(ip, user, rate, now_ms);
    }

    /// Milliseconds since `started`: the clock the users' shared buckets are charged with.
    fn clock_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("shards", &self.fabric.links.len())
            .field("listen", &self.config.listen)
            .finish()
    }
}

/// Timeouts and bounds in the shard's units (milliseconds).
#[derive(Debug, Clone, Copy)]
struct Limits {
    handshake_ms: u64,
    pong_wait_ms: u64,
    ping_period_ms: u64,
    write_wait_ms: u64,
    max_message: usize,
    per_user: usize,
}

impl Limits {
    fn from(config: &Config) -> Self {
        let ms = |d: Duration| d.as_millis() as u64;
        Limits {
            handshake_ms: ms(config.handshake_timeout),
            pong_wait_ms: ms(config.pong_wait),
            ping_period_ms: ms(config.ping_period),
            write_wait_ms: ms(config.write_wait),
            max_message: config.max_message_size,
            per_user: config.connections_per_user,
        }
    }
}

/// The parts of a shard that exist before its thread starts.
#[derive(Debug)]
pub struct ShardParts {
    poll: Poll,
    listener: TcpListener,
    inbox: Receiver<Parcel>,
    /// The io_uring driver runs this shard (see [`choose_driver`]); its ring is set up on the
    /// shard's thread.
    #[cfg(all(feature = "io-uring", target_os = "linux"))]
    uring: bool,
}

/// Sets up the I/O driver `config.io_driver` asks for on every shard; where io_uring cannot
/// be set up (or is not built in), every shard runs epoll and the reason is logged. Returns
/// the driver's name.
pub fn choose_driver(driver: crate::config::IoDriver, parts: &mut [ShardParts]) -> &'static str {
    #[cfg(all(feature = "io-uring", target_os = "linux"))]
    return uring::choose(driver, parts);
    #[cfg(not(all(feature = "io-uring", target_os = "linux")))]
    {
        let _ = parts;
        if driver != crate::config::IoDriver::Epoll {
            log::warn!("io_uring is not built in (feature io-uring, Linux); io_driver falls back to epoll");
        }
        "epoll"
    }
}

/// What the io_uring driver hears from the shard's logic (nothing under epoll).
#[derive(Debug, Default)]
struct Io {
    /// The io_uring driver runs this shard.
    uring: bool,
    /// Connections admitted since the driver last looked: their receive is armed.
    admitted: Vec<ConnKey>,
    /// Connections dropped since: their receive and send are cancelled.
    dropped: Vec<ConnKey>,
    /// Connections to write to: one send each, submitted with the next wait.
    to_send: Vec<ConnKey>,
}

impl ShardParts {
    /// Creates the poll, registers the listener, and returns the link other threads use.
    pub fn new(listener: std::net::TcpListener) -> io::Result<(Self, Link)> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let (link, inbox) = Link::new(waker);
        Ok((
            ShardParts {
                poll,
                listener,
                inbox,
                #[cfg(all(feature = "io-uring", target_os = "linux"))]
                uring: false,
            },
            link,
        ))
    }
}

/// One event loop.
pub struct Shard {
    id: ShardId,
    shared: Arc<Shared>,
    poll: Poll,
    listener: Option<TcpListener>,
    inbox: Receiver<Parcel>,
    conns: Slab<Conn>,
    /// The slab is shrunk when fewer connections than this are left (see `drop_conn`).
    shrink_conns_below: usize,
    next_generation: u32,
    wheel: TimerWheel<TimerKey>,
    /// Expired timer keys, reused between ticks.
    due: Vec<TimerKey>,
    pending: PendingTable<Completion>,
    directory: Directory,
    presence: PresenceTable,
    rooms: crate::core::rooms::RoomTable,
    sink: Sink,
    scratch: Vec<u8>,
    /// Connections that still had bytes to read when their per-wake budget ran out.
    pending_reads: Vec<ConnKey>,
    accept_pending: bool,
    /// After a failed `accept` (EMFILE…): when to try again.
    accept_retry_at: Option<u64>,
    /// Peers sent to during this iteration, to wake once each.
    to_wake: Vec<bool>,
    limits: Limits,
    epoch: Instant,
    now: u64,
    shutdown_deadline: Option<u64>,
    /// Shutdown with `drain_window`: (when, connection) still to close, latest first.
    drain: Vec<(u64, ConnKey)>,
    /// The drain's random source (set once shutdown begins).
    drain_random: Option<lifecycle::Jitter>,
    /// Refused handshakes, summarised per status and interval.
    refusals: crate::logfmt::RefusalLog,
    /// For callbacks: a handle to the whole server.
    handle: crate::route::Handle,
    /// Frames a callback queued, reused between calls.
    app_out: Vec<bytes::Bytes>,
    /// Typing-like statuses: expiry and coalescing.
    transient: crate::core::presence::TransientPolicy,
    /// Rate limits.
    rates: limits::Rates,
    /// `room_presence` requests gathering member lists.
    rosters: Slab<rooms::Roster>,
    /// Connections' messages waiting for authorization decisions.
    authz: authorize::Pending,
    /// True while handling what a client asked for: sends that may be shed are shed when the
    /// receiving inbox is over `inbox_max_bytes`.
    client_work: bool,
    /// A send was shed since the current client message began (its sender gets 503).
    shed: bool,
    /// Handshakes waiting for the application's deferred authentication (at most
    /// `auth_max_pending`), with what their upgrade needs.
    auth_pending: std::collections::HashMap<ConnKey, handshake::AwaitedAuth, foldhash::fast::RandomState>,
    /// Home shard, with a cluster: users homed here that another live node holds.
    /// (The value: since when, Unix ms, as this node learned it.)
    remote_users: std::collections::HashMap<i64, u64, foldhash::fast::RandomState>,
    /// Home shard, with a cluster and `connections_per_user`: when each connection homed
    /// here opened (Unix ms), by open order, for evictions other nodes ask for.
    opened_ms: std::collections::HashMap<u64, u64, foldhash::fast::RandomState>,
    /// The driver's side of the loop (io_uring).
    io: Io,
    #[cfg(all(feature = "io-uring", target_os = "linux"))]
    use_uring: bool,
}

impl Shard {
    /// A shard ready to run on its own thread.
    pub fn new(id: ShardId, shared: Arc<Shared>, parts: ShardParts) -> Self {
        let config = &shared.config;
        let limits = Limits::from(config);
        let sink = Sink::new(config.send_queue, config.send_queue_bytes, Arc::clone(&shared.metrics), id);
        let peers = shared.fabric.links.len();
        let _ =
            shared.metrics.inboxes.set(shared.fabric.links.iter().map(|l| Arc::clone(l.depth())).collect());
        Shard {
            id,
            poll: parts.poll,
            listener: Some(parts.listener),
            inbox: parts.inbox,
            conns: Slab::new(),
            shrink_conns_below: usize::MAX,
            next_generation: 0,
            wheel: TimerWheel::new(crate::core::timer::DEFAULT_TICK_MS, crate::core::timer::DEFAULT_SLOTS, 0),
            due: Vec::new(),
            pending: PendingTable::new(id),
            directory: Directory::default(),
            presence: PresenceTable::default(),
            rooms: crate::core::rooms::RoomTable::new(peers),
            sink,
            scratch: vec![0; SCRATCH],
            pending_reads: Vec::new(),
            accept_pending: false,
            accept_retry_at: None,
            to_wake: vec![false; peers],
            limits,
            epoch: Instant::now(),
            now: 0,
            shutdown_deadline: None,
            drain: Vec::new(),
            drain_random: None,
            refusals: Default::default(),
            handle: crate::route::Handle::new(Arc::clone(&shared.fabric)),
            app_out: Vec::new(),
            transient: crate::core::presence::TransientPolicy {
                statuses: shared.config.transient_statuses.clone(),
                ttl_ms: shared.config.transient_ttl.as_millis() as u64,
                coalesce_ms: shared.config.presence_coalesce.as_millis() as u64,
            },
            rates: limits::Rates::from(&shared.config),
            rosters: Slab::new(),
            authz: Default::default(),
            client_work: false,
            shed: false,
            auth_pending: Default::default(),
            remote_users: Default::default(),
            opened_ms: Default::default(),
            io: Io::default(),
            #[cfg(all(feature = "io-uring", target_os = "linux"))]
            use_uring: parts.uring,
            shared,
        }
    }

    /// Runs until shutdown completes.
    pub fn run(mut self) {
        // Application callbacks run here: a blocking `Waiter::wait` is refused on this thread.
        crate::route::handle::mark_shard_thread();
        #[cfg(all(feature = "io-uring", target_os = "linux"))]
        if self.use_uring {
            match uring::Ring::new() {
                Ok(ring) => return self.run_uring(Box::new(ring)),
                Err(e) => log::warn!("shard {}: io_uring unavailable ({e}); this shard runs epoll", self.id),
            }
        }
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            let link = &self.shared.fabric.links[self.id];
            link.set_sleeping(true);
            let timeout = if self.inbox.is_empty() { timeout } else { Some(Duration::ZERO) };
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                log::error!("shard {}: poll failed: {e}", self.id);
                return;
            }
            link.set_sleeping(false);
            let woke = Instant::now();
            let messages_before = self.metrics().messages_in.load(std::sync::atomic::Ordering::Relaxed);
            self.now = woke.duration_since(self.epoch).as_millis() as u64;
            // The inbox first: whatever another shard sent before a client's bytes reached us
            // (a directory update, say) must be known when those bytes are routed.
            self.drain_inbox();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    WAKER => {}
                    Token(index) => self.on_ready(index, event),
                }
            }
            self.turn();
            self.observe_latency(woke, messages_before);
            if self.finished() {
                break;
            }
        }
        self.summarise_refusals(true);
        log::debug!("shard {} stopped", self.id);
    }

    /// Everything a loop iteration does after the readiness events.
    fn turn(&mut self) {
        self.drain_inbox();
        if self.accept_pending || self.accept_retry_at.is_some_and(|at| at <= self.now) {
            self.accept_all();
        }
        self.continue_reads();
        self.drain_due();
        self.summarise_refusals(false);
        self.expire_timers();
        self.close_overflowed();
        self.flush_dirty();
        self.wake_peers();
    }

    /// One latency sample per client message handled in this iteration: the time from the
    /// wake-up that read it until its deliveries were written (one clock read per iteration).
    fn observe_latency(&self, woke: Instant, messages_before: u64) {
        let metrics = self.metrics();
        let handled = metrics.messages_in.load(std::sync::atomic::Ordering::Relaxed) - messages_before;
        if handled > 0 {
            metrics.latency.observe_n(woke.elapsed().as_secs_f64(), handled);
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if self.accept_pending || !self.pending_reads.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut ms = self.wheel.next_timeout(self.now);
        if let Some(at) = self.accept_retry_at {
            ms = Some(ms.unwrap_or(u64::MAX).min(at.saturating_sub(self.now)));
        }
        if let Some(deadline) = self.shutdown_deadline {
            ms = Some(ms.unwrap_or(u64::MAX).min(deadline.saturating_sub(self.now)));
        }
        for at in [self.next_drain(), self.refusals.next_deadline()].into_iter().flatten() {
            ms = Some(ms.unwrap_or(u64::MAX).min(at.saturating_sub(self.now)));
        }
        ms.map(Duration::from_millis)
    }

    fn finished(&self) -> bool {
        self.shutdown_deadline.is_some_and(|deadline| self.conns.is_empty() || self.now >= deadline)
    }

    fn metrics(&self) -> &ShardMetrics {
        &self.shared.metrics.shards[self.id]
    }

    fn shards(&self) -> usize {
        self.shared.fabric.links.len()
    }

    fn wall_ms() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    fn addr(&self, key: ConnKey) -> ConnAddr {
        ConnAddr { shard: self.id, key }
    }

    fn key_of(&self, index: usize) -> Option<ConnKey> {
        self.conns.get(index).map(|c| ConnKey { index: index as u32, generation: c.generation })
    }

    fn conn_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        self.conns.get_mut(key.index as usize).filter(|c| c.generation == key.generation)
    }

    // ----- accepting ---------------------------------------------------------------------

    fn accept_all(&mut self) {
        self.accept_pending = false;
        self.accept_retry_at = None;
        for _ in 0..ACCEPTS_PER_WAKE {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: the backlog keeps the connection, and edge-triggered
                    // readiness will not fire again for it; retry shortly instead of spinning.
                    log::warn!("shard {}: accept failed: {e}; retrying in {ACCEPT_RETRY_MS} ms", self.id);
                    self.accept_retry_at = Some(self.now + ACCEPT_RETRY_MS);
                    return;
                }
            }
        }
        self.accept_pending = true;
    }

    /// (TCP_NODELAY comes from the listener: accepted sockets inherit it.)
    fn admit(&mut self, mut stream: mio::net::TcpStream, peer: std::net::SocketAddr) {
        let entry = self.conns.vacant_entry();
        let index = entry.key();
        let token = Token(index);
        if !self.io.uring
            && let Err(e) =
                self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
        {
            log::warn!("shard {}: register {peer} failed: {e}", self.id);
            return;
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        let deadline = self.now + self.limits.handshake_ms;
        entry.insert(Conn::new(stream, peer, self.next_generation, deadline));
        let key = ConnKey { index: index as u32, generation: self.next_generation };
        self.wheel.insert(deadline, TimerKey::Conn(key));
        if self.io.uring {
            self.io.admitted.push(key);
        }
    }

    // ----- readiness ---------------------------------------------------------------------

    fn on_ready(&mut self, index: usize, event: &mio::event::Event) {
        let Some(key) = self.key_of(index) else {
            return;
        };
        if event.is_writable() {
            self.flush(key);
        }
        if event.is_readable() {
            self.read_ready(key, event.is_read_closed());
        }
    }

    fn continue_reads(&mut self) {
        for key in std::mem::take(&mut self.pending_reads) {
            self.read(key);
        }
    }

    // ----- writing -----------------------------------------------------------------------

    fn flush_dirty(&mut self) {
        while !self.sink.dirty.is_empty() {
            for key in std::mem::take(&mut self.sink.dirty) {
                if let Some(conn) = self.conn_mut(key) {
                    conn.dirty = false;
                    self.flush(key);
                }
            }
            self.close_overflowed();
        }
    }

    fn flush(&mut self, key: ConnKey) {
        let now = self.now;
        let write_wait = self.limits.write_wait_ms;
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        if conn.out.is_empty() || conn.held > 0 {
            return;
        }
        if self.io.uring {
            return self.io.to_send.push(key); // submitted with the next wait
        }
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        let before = conn.out.bytes();
        match conn.out.flush(&mut conn.stream) {
            Ok(Flushed::Empty) => {
                conn.write_blocked_at = u64::MAX;
                if let Phase::Closing { peer_done } = conn.phase {
                    self.after_last_byte(key, peer_done);
                }
            }
            Ok(Flushed::Blocked) => {
                if conn.out.bytes() < before || conn.write_blocked_at == u64::MAX {
                    conn.write_blocked_at = now;
                    let deadline = now + write_wait;
                    self.schedule_before(key, deadline);
                }
            }
            Err(e) => self.drop_conn(key, &format!("write failed: {e}")),
        }
    }

    /// Our last byte is out: drop now if the peer is done, else half-close and linger.
    fn after_last_byte(&mut self, key: ConnKey, peer_done: bool) {
        if peer_done {
            self.drop_conn(key, "closed");
            return;
        }
        if let Some(conn) = self.conn_mut(key) {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    // ----- cross-shard -------------------------------------------------------------------

    /// Sends to a shard; a message to ourselves is handled at once.
    ///
    /// While handling client work (`client_work`), a message that may be shed
    /// ([`ShardMsg::shed_kind`]) is dropped when the receiving inbox is over
    /// `inbox_max_bytes`: counted in `customws_inbox_shed_total{kind}` and noted in `shed` so
    /// that the client is told 503. Everything else always goes.
    fn send_to(&mut self, shard: ShardId, msg: impl Into<ShardMsg>) {
        let msg = msg.into();
        if shard == self.id {
            self.handle(msg);
            return;
        }
        let link = &self.shared.fabric.links[shard];
        match msg.shed_kind().filter(|_| self.client_work) {
            Some(kind) => {
                if link.try_send(msg, self.shared.config.inbox_max_bytes as u64).is_err() {
                    self.count_shed(kind);
                    return;
                }
            }
            None => link.send(msg),
        }
        self.to_wake[shard] = true;
    }

    fn count_shed(&mut self, kind: ShedKind) {
        self.shed = true;
        let index = ShedKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        ShardMetrics::inc(&self.metrics().inbox_shed[index]);
    }

    /// Whether our own inbox is over its bound: a client request whose answers come back
    /// through it is refused (503) rather than adding to it.
    fn own_inbox_full(&self) -> bool {
        self.shared.fabric.links[self.id].depth_bytes() > self.shared.config.inbox_max_bytes as u64
    }

    /// Runs `work` as client work (see [`Shard::send_to`]); restores the previous mode.
    fn as_client_work<T>(&mut self, work: impl FnOnce(&mut Self) -> T) -> T {
        let before = std::mem::replace(&mut self.client_work, true);
        if !before {
            self.shed = false;
        }
        let out = work(self);
        self.client_work = before;
        out
    }

    fn wake_peers(&mut self) {
        for (shard, wake) in self.to_wake.iter_mut().enumerate() {
            if std::mem::take(wake) {
                self.shared.fabric.links[shard].wake();
            }
        }
    }

    /// Handles a message from another shard (or from ourselves): one arm per concern, each
    /// handler matching its own messages in full (no catch-all arm anywhere, so a message
    /// nobody handles does not compile).
    fn handle(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Dir(msg) => self.on_dir(msg),
            ShardMsg::Deliver(msg) => self.on_deliver(msg),
            ShardMsg::Presence(msg) => self.on_presence(msg),
            ShardMsg::Room(msg) => self.on_room(msg),
            ShardMsg::Op(msg) => self.on_op(msg),
            ShardMsg::Admin(msg) => self.on_admin(msg),
            ShardMsg::Cluster(msg) => self.on_cluster(msg),
            ShardMsg::Shutdown => self.begin_shutdown(),
        }
    }

    fn drain_inbox(&mut self) {
        // Bounded so that a flood from other shards cannot starve our own sockets.
        for _ in 0..65_536 {
            match self.inbox.try_recv() {
                Ok(parcel) => {
                    let msg = self.shared.fabric.links[self.id].unpack(parcel);
                    self.handle(msg);
                }
                Err(_) => return,
            }
        }
    }

    /// Tells every shard (ourselves included) whether we hold `user`.
    fn announce_replica(&mut self, user: i64, present: bool) {
        for shard in 0..self.shards() {
            self.send_to(shard, DirMsg::Replica { user, shard: self.id, present });
        }
    }
}

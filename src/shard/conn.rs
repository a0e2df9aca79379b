//! One connection slot of a shard's slab, and its bounded output queue.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::net::SocketAddr;

use bytes::Bytes;
use mio::net::TcpStream;

use crate::core::pending::WaitKey;
use crate::core::ratelimit::{Rate, TokenBucket};
use crate::http::auth::Roles;
use crate::ws::{Assembled, Frame, FrameError, Reassembly};

/// Most frames handed to one `writev`.
const MAX_IOV: usize = 64;

/// Where a connection is in its life. See `LIFECYCLE.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the HTTP request head.
    Http,
    /// An open WebSocket.
    Open,
    /// Our last bytes are queued (close frame or HTTP response); after they are flushed the
    /// write side is shut and we wait for the peer's EOF until the deadline.
    Closing {
        /// The peer already closed (its close frame or EOF): drop right after the flush.
        peer_done: bool,
    },
}

/// The authenticated user of an open connection.
///
/// What every connection needs is inline (72 bytes: glibc's 80-byte chunk); what most never
/// use — claims, application data, presence coalescing, the presence budget, a forwarded
/// client address — is one box made on first use, so an idle connection of the built-in
/// application holds none of it (see BENCHMARKS.md, issue 15).
#[derive(Debug)]
pub struct Session {
    /// User id.
    pub user: i64,
    /// Global open order (for `connections_per_user`).
    pub seq: u64,
    /// When the token expires, in shard milliseconds (`u64::MAX`: never).
    pub expires_deadline: u64,
    /// When the WebSocket opened, shard milliseconds (admin listing; the buckets' start).
    pub opened_at: u64,
    /// Rooms this connection is in.
    pub rooms: List<std::sync::Arc<str>>,
    /// The user's message bucket, shared by its connections on every shard (`None` with
    /// `rate_limit` off).
    pub user_bucket: Option<std::sync::Arc<crate::core::ratelimit::SharedBucket>>,
    /// The connection's own rate limits; allocated by its first charged message (see
    /// [`Session::rate_state`]), so an idle connection holds none.
    pub rate_state: Option<Box<RateState>>,
    /// What few connections use; `None` until one of them is set.
    more: Option<Box<SessionMore>>,
    /// Permissions.
    pub roles: Roles,
}

/// The parts of a [`Session`] most connections never use.
#[derive(Debug, Default)]
struct SessionMore {
    /// The token's claim set; empty when nothing reads it (see `Application::reads_claims`).
    claims: Box<str>,
    /// The application's data for this connection.
    user_data: Option<crate::app::application::UserData>,
    /// Presence coalescing and transient-status expiry.
    debounce: crate::core::presence::Debounce,
    /// Members per second `room_presence` and `presence_subscribe` may still cost (see
    /// [`Session::take_presence_budget`]).
    presence_budget: Option<TokenBucket>,
    /// The client's address as counted for `max_connections_per_ip`, when it is not the TCP
    /// peer's (behind a trusted proxy).
    forwarded_ip: Option<std::net::IpAddr>,
    /// A `room_presence` answer is being gathered (one at a time per connection).
    roster_in_flight: bool,
}

/// A connection's message and byte buckets and its refusals.
#[derive(Debug)]
pub struct RateState {
    /// Message rate limit.
    pub messages: TokenBucket,
    /// Byte rate limit.
    pub bytes: TokenBucket,
    /// Refusals, for closing sustained abusers.
    pub strikes: crate::core::ratelimit::Strikes,
}

impl Session {
    /// A session opened at `opened_at` (shard ms) with its user, open order and roles; the
    /// caller sets the rest.
    pub fn new(user: i64, seq: u64, roles: Roles, opened_at: u64) -> Self {
        Session {
            user,
            seq,
            expires_deadline: u64::MAX,
            opened_at,
            rooms: List::default(),
            user_bucket: None,
            rate_state: None,
            more: None,
            roles,
        }
    }

    /// The rarely used parts, made on first use.
    fn more(&mut self) -> &mut SessionMore {
        self.more.get_or_insert_default()
    }

    /// The token's claim set (empty when nothing reads it).
    pub fn claims(&self) -> &str {
        self.more.as_ref().map_or("", |more| &more.claims)
    }

    /// Replaces the claim set (an empty one takes no memory while the rest is unused).
    pub fn set_claims(&mut self, claims: Box<str>) {
        if !claims.is_empty() || self.more.is_some() {
            self.more().claims = claims;
        }
    }

    /// The application's data for this connection.
    pub fn user_data(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        self.more.as_ref().and_then(|more| more.user_data.as_deref())
    }

    /// Sets the application's data.
    pub fn set_user_data(&mut self, data: Option<crate::app::application::UserData>) {
        if data.is_some() || self.more.is_some() {
            self.more().user_data = data;
        }
    }

    /// The client's address as counted for `max_connections_per_ip`: the TCP `peer`'s,
    /// unless [`Session::set_client_ip`] gave another.
    pub fn client_ip(&self, peer: std::net::IpAddr) -> std::net::IpAddr {
        self.more.as_ref().and_then(|more| more.forwarded_ip).unwrap_or(peer)
    }

    /// Sets the admitted client address; only one other than the TCP `peer`'s is stored.
    pub fn set_client_ip(&mut self, ip: std::net::IpAddr, peer: std::net::IpAddr) {
        if ip != peer || self.more.is_some() {
            self.more().forwarded_ip = (ip != peer).then_some(ip);
        }
    }

    /// Presence coalescing and transient-status expiry, made on first use.
    pub fn debounce(&mut self) -> &mut crate::core::presence::Debounce {
        &mut self.more().debounce
    }

    /// When the current transient status expires (`u64::MAX`: none).
    pub fn transient_until(&self) -> u64 {
        self.more.as_ref().map_or(u64::MAX, |more| more.debounce.transient_until)
    }

    /// A transient status that expired at `now`, if any (see `Debounce::expire`).
    pub fn expire_transient(&mut self, now: u64) -> Option<crate::core::presence::Expired> {
        self.more.as_mut().and_then(|more| more.debounce.expire(now))
    }

    /// A `room_presence` answer is being gathered.
    pub fn roster_in_flight(&self) -> bool {
        self.more.as_ref().is_some_and(|more| more.roster_in_flight)
    }

    /// Marks a `room_presence` answer as being gathered, or done.
    pub fn set_roster_in_flight(&mut self, in_flight: bool) {
        if in_flight || self.more.is_some() {
            self.more().roster_in_flight = in_flight;
        }
    }

    /// The connection's rate state, allocated on first use. A bucket nobody charged is full,
    /// so one made now — full, and refilling since the connection opened — is exactly the one
    /// made at the handshake would be: the rates behave as if it had always been there.
    pub fn rate_state(&mut self, messages: Rate, bytes: Rate) -> &mut RateState {
        let opened_at = self.opened_at;
        self.rate_state.get_or_insert_with(|| {
            Box::new(RateState {
                messages: TokenBucket::full(messages, opened_at),
                bytes: TokenBucket::full(bytes, opened_at),
                strikes: Default::default(),
            })
        })
    }

    /// Takes `cost` from the presence budget (`rate`) at `now`, allocating it on first use
    /// (full since the connection opened, as in [`Session::rate_state`]).
    pub fn take_presence_budget(&mut self, rate: Rate, cost: u64, now: u64) -> bool {
        let opened_at = self.opened_at;
        self.more()
            .presence_budget
            .get_or_insert_with(|| TokenBucket::full(rate, opened_at))
            .take(rate, cost, now)
    }
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The connection is closing.
    Closing,
    /// The queue bound was hit; the frame is handed back.
    Overflow(Bytes),
}

/// Frames waiting for the socket, shared `Bytes` each.
///
/// The front frame is kept inline: a connection that gets one frame at a time (the 101, a
/// ping, a lone message) never allocates the deque, so an idle connection holds no queue
/// memory (the deque's first allocation is 4 frames, 128 bytes, kept for the connection's
/// life; see BENCHMARKS.md, issue 15). The deque itself is boxed, so a connection that never
/// had two frames queued pays 8 bytes for it rather than 32.
#[derive(Debug, Default)]
pub struct OutQueue {
    /// The front frame (the one being written); `None` only when the queue is empty.
    head: Option<Bytes>,
    /// The frames behind `head`; allocated on the first frame queued behind another.
    #[expect(clippy::box_collection, reason = "boxed, an unused deque costs 8 bytes, not 32")]
    rest: Option<Box<VecDeque<Bytes>>>,
    /// Bytes of the front frame already written.
    offset: usize,
    /// Bytes not yet written.
    bytes: usize,
}

/// Outcome of a flush.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything was written.
    Empty,
    /// The socket is full; wait for `WRITABLE`.
    Blocked,
}

impl OutQueue {
    /// Number of queued frames.
    pub fn len(&self) -> usize {
        usize::from(self.head.is_some()) + self.rest.as_ref().map_or(0, |rest| rest.len())
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// Queued bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes queued behind the front frame (the one being written).
    pub fn waiting_bytes(&self) -> usize {
        self.bytes - self.head.as_ref().map_or(0, |f| f.len() - self.offset)
    }

    /// Appends a frame.
    pub fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        if self.head.is_none() {
            self.head = Some(frame);
        } else {
            self.rest.get_or_insert_default().push_back(frame);
        }
    }

    /// Drops every frame not yet started, keeping a partly written one so the stream stays
    /// well-formed. Returns how many frames were dropped.
    pub fn discard_unsent(&mut self) -> usize {
        let mut dropped = self.rest.as_ref().map_or(0, |rest| rest.len());
        if let Some(rest) = &mut self.rest {
            rest.clear();
        }
        if self.offset == 0 && self.head.take().is_some() {
            dropped += 1;
        }
        self.bytes = self.head.as_ref().map_or(0, |f| f.len() - self.offset);
        dropped
    }

    /// Writes as much as the socket takes, several frames per `writev`.
    pub fn flush(&mut self, out: &mut impl Write) -> io::Result<Flushed> {
        while let Some(head) = &self.head {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            slices[0] = IoSlice::new(&head[self.offset..]);
            let mut count = 1;
            for frame in self.rest.iter().flat_map(|rest| rest.iter()).take(MAX_IOV - 1) {
                slices[count] = IoSlice::new(frame);
                count += 1;
            }
            match out.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Flushed::Empty)
    }

    /// The frames a write would take, at most `max`: the front one from where its writing
    /// stopped, then those behind it (for a write the io_uring driver submits itself; the
    /// handles keep the bytes alive until it completes, and [`OutQueue::advance`] takes what
    /// it wrote).
    pub fn front(&self, max: usize) -> impl Iterator<Item = Bytes> + '_ {
        let head = self.head.iter().map(|head| head.slice(self.offset..));
        head.chain(self.rest.iter().flat_map(|rest| rest.iter()).take(max.saturating_sub(1)).cloned())
    }

    /// Takes `written` bytes off the front of the queue.
    pub fn advance(&mut self, mut written: usize) {
        self.bytes -= written;
        while let Some(front) = &self.head {
            let rest = front.len() - self.offset;
            if written < rest {
                self.offset += written;
                return;
            }
            written -= rest;
            self.offset = 0;
            self.head = self.rest.as_mut().and_then(|rest| rest.pop_front());
        }
    }
}

/// A peer's address without IPv6 flow information and scope (which only logs would show):
/// 20 bytes where `SocketAddr` takes 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    ip: std::net::IpAddr,
    port: u16,
}

impl Peer {
    /// The address.
    pub fn ip(&self) -> std::net::IpAddr {
        self.ip
    }
}

impl From<SocketAddr> for Peer {
    fn from(addr: SocketAddr) -> Self {
        Peer { ip: addr.ip(), port: addr.port() }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        SocketAddr::new(self.ip, self.port).fmt(f)
    }
}

/// A list most connections never use (rooms, server-initiated waits): one pointer, and no
/// allocation while empty — a `Vec` would take 24 bytes in every connection.
#[derive(Debug, Clone)]
#[expect(clippy::box_collection, reason = "boxed, an empty list costs 8 bytes, not 24")]
pub struct List<T>(Option<Box<Vec<T>>>);

impl<T> Default for List<T> {
    fn default() -> Self {
        List(None)
    }
}

impl<T> std::ops::Deref for List<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl<T> List<T> {
    /// Appends an item.
    pub fn push(&mut self, item: T) {
        self.0.get_or_insert_default().push(item);
    }

    /// Removes the item at `index` (which must be in bounds), moving the last one into its
    /// place; the allocation goes with the last item.
    pub fn swap_remove(&mut self, index: usize) -> T {
        let items = self.0.as_mut().expect("swap_remove on an empty List");
        let item = items.swap_remove(index);
        if items.is_empty() {
            self.0 = None;
        }
        item
    }

    /// Keeps the items `keep` accepts; the allocation goes with the last item.
    pub fn retain(&mut self, keep: impl FnMut(&T) -> bool) {
        if let Some(items) = &mut self.0 {
            items.retain(keep);
            if items.is_empty() {
                self.0 = None;
            }
        }
    }

    /// The items, as a `Vec`.
    pub fn into_vec(self) -> Vec<T> {
        self.0.map_or_else(Vec::new, |items| *items)
    }
}

/// What a connection holds between reads that ended mid-frame or mid-message.
#[derive(Debug, Default)]
struct Input {
    /// Bytes of an incomplete HTTP head or frame.
    bytes: Vec<u8>,
    /// Fragmented message in progress.
    reassembly: Reassembly,
}

/// One connection.
///
/// `repr(C)` with the fields in falling alignment, so the size is what the fields need and no
/// more (160 bytes in release; see `idle_connection_layout`) whatever order the compiler
/// would pick.
#[derive(Debug)]
#[repr(C)]
pub struct Conn {
    /// Bytes of an incomplete HTTP head or frame and a fragmented message in progress; `None`
    /// (8 bytes, no allocation) while there are none. See [`Conn::inbuf`], [`Conn::assemble`].
    input: Option<Box<Input>>,
    /// Output queue.
    pub out: OutQueue,
    /// The user, once open.
    pub session: Option<Box<Session>>,
    /// The deadline currently scheduled in the wheel (ms).
    pub timer_at: u64,
    /// By phase: the handshake deadline (Http), the next ping (Open), the linger deadline
    /// (Closing). One field, since a connection is in one phase at a time.
    pub deadline: u64,
    /// No pong by then: close (Open).
    pub read_deadline: u64,
    /// When the socket last refused bytes with output still queued; `u64::MAX` when not.
    pub write_blocked_at: u64,
    /// Server-initiated waits sent on this connection (failed with `Closed` when it goes).
    pub waits: List<WaitKey>,
    /// The socket.
    pub stream: TcpStream,
    /// Generation of this slab slot.
    pub generation: u32,
    /// Client messages received (admin listing; wraps).
    pub messages_in: u32,
    /// Frames queued to the client (admin listing; wraps).
    pub messages_out: u32,
    /// When the client last sent a message or connected, in shard seconds (admin listing).
    pub last_active_s: u32,
    /// Peer address, for logs.
    pub peer: Peer,
    /// Life-cycle phase.
    pub phase: Phase,
    /// In the shard's flush list.
    pub dirty: bool,
    /// With a cluster: how many `ClusterMsg::Ready` this connection waits for (its `101` until
    /// the broker reaches its user here, a join's ack until it reaches the room); nothing is
    /// written while above 0.
    pub held: u8,
    /// An echo-endpoint connection (conformance runs): messages come back as they came.
    pub echo: bool,
}

impl Conn {
    /// A freshly accepted connection.
    pub fn new(stream: TcpStream, peer: SocketAddr, generation: u32, deadline: u64) -> Self {
        Conn {
            stream,
            peer: Peer::from(peer),
            generation,
            phase: Phase::Http,
            input: None,
            out: OutQueue::default(),
            dirty: false,
            held: 0,
            echo: false,
            session: None,
            timer_at: deadline,
            deadline,
            read_deadline: u64::MAX,
            write_blocked_at: u64::MAX,
            waits: List::default(),
            messages_in: 0,
            messages_out: 0,
            last_active_s: (deadline / 1000) as u32,
        }
    }

    /// Bytes of an incomplete HTTP head or frame (empty when none).
    pub fn inbuf(&self) -> &[u8] {
        self.input.as_ref().map_or(&[], |input| &input.bytes)
    }

    /// The buffer for bytes of an incomplete HTTP head or frame, allocated on first use; hand
    /// an emptied one back with [`Conn::set_inbuf`] so an idle connection holds none.
    pub fn inbuf_mut(&mut self) -> &mut Vec<u8> {
        &mut self.input.get_or_insert_default().bytes
    }

    /// Takes the incomplete bytes out (see [`Conn::set_inbuf`]).
    pub fn take_inbuf(&mut self) -> Vec<u8> {
        let bytes = self.input.as_mut().map_or_else(Vec::new, |input| std::mem::take(&mut input.bytes));
        self.release_input();
        bytes
    }

    /// Keeps `bytes` as the incomplete bytes; empty, it frees them (and the box, when no
    /// fragmented message is in progress).
    pub fn set_inbuf(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            if let Some(input) = &mut self.input {
                input.bytes = Vec::new();
            }
            self.release_input();
        } else {
            *self.inbuf_mut() = bytes;
        }
    }

    /// True while a fragmented message awaits its continuation frames.
    pub fn reassembling(&self) -> bool {
        self.input.as_ref().is_some_and(|input| input.reassembly.in_progress())
    }

    /// Feeds one data frame to the reassembly (see `Reassembly::push`): a whole message in one
    /// frame, the common case, touches no connection memory.
    pub fn assemble(&mut self, frame: &Frame, payload: &[u8], max: usize) -> Result<Assembled, FrameError> {
        let Some(input) = &mut self.input else {
            let mut reassembly = Reassembly::default();
            let assembled = reassembly.push(frame, payload, max);
            if reassembly.in_progress() {
                self.input = Some(Box::new(Input { bytes: Vec::new(), reassembly }));
            }
            return assembled;
        };
        let assembled = input.reassembly.push(frame, payload, max);
        self.release_input();
        assembled
    }

    /// Frees the input box once it holds nothing.
    fn release_input(&mut self) {
        if self
            .input
            .as_ref()
            .is_some_and(|input| input.bytes.capacity() == 0 && !input.reassembly.in_progress())
        {
            self.input = None;
        }
    }

    /// When the next ping is due (Open).
    pub fn next_ping(&self) -> u64 {
        self.deadline
    }

    /// The user id, when open.
    pub fn user(&self) -> Option<i64> {
        self.session.as_ref().map(|s| s.user)
    }

    /// The client's address: the one admitted (behind a trusted proxy, the
    /// `X-Forwarded-For` client), else the TCP peer's.
    pub fn client_ip(&self) -> std::net::IpAddr {
        self.session.as_ref().map_or(self.peer.ip(), |s| s.client_ip(self.peer.ip()))
    }

    /// Queues a frame within the bounds; over them, hands it back. The byte bound applies to
    /// the frames waiting behind the one being written: one frame of any size (up to
    /// `max_message_size`) may be in flight, so a message larger than the bound reaches a
    /// reader that keeps up instead of closing it as a slow consumer.
    pub fn queue(&mut self, frame: Bytes, max_frames: usize, max_bytes: usize) -> Result<(), Refused> {
        if self.phase != Phase::Open {
            return Err(Refused::Closing);
        }
        let over_bytes = !self.out.is_empty() && self.out.waiting_bytes() + frame.len() > max_bytes;
        if self.out.len() >= max_frames || over_bytes {
            return Err(Refused::Overflow(frame));
        }
        self.out.push(frame);
        Ok(())
    }

    /// The earliest deadline this connection needs.
    pub fn next_deadline(&self, write_wait_ms: u64) -> u64 {
        match self.phase {
            Phase::Open => {
                let write = self.write_blocked_at.saturating_add(write_wait_ms);
                let session = self.session.as_deref();
                let transient = session.map_or(u64::MAX, |s| s.transient_until().min(s.expires_deadline));
                self.read_deadline.min(self.deadline).min(write).min(transient)
            }
            _ => self.deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `cap` bytes per call, then blocks.
    struct Trickle {
        taken: Vec<u8>,
        cap: usize,
        calls: usize,
        budget: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.calls == self.budget {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.cap - n);
                self.taken.extend_from_slice(&b[..take]);
                n += take;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_resume_mid_frame() {
        let mut q = OutQueue::default();
        for f in [&b"abc"[..], b"defg", b"hi"] {
            q.push(Bytes::copy_from_slice(f));
        }
        let mut w = Trickle { taken: vec![], cap: 4, calls: 0, budget: 1 };
        assert_eq!(q.flush(&mut w).unwrap(), Flushed::Blocked);
        assert_eq!((q.len(), q.bytes()), (2, 5));
        w.budget = 10;
        assert_eq!(q.flush(&mut w).unwrap(), Flushed::Empty);
        assert_eq!(w.taken, b"abcdefghi");
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn the_frame_being_written_does_not_count_against_the_byte_bound() {
        let mut q = OutQueue::default();
        assert_eq!(q.waiting_bytes(), 0);
        q.push(Bytes::from(vec![1u8; 100]));
        assert_eq!(q.waiting_bytes(), 0, "a lone frame is the one being written");
        q.push(Bytes::from(vec![2u8; 10]));
        assert_eq!((q.bytes(), q.waiting_bytes()), (110, 10));
        let mut out = Trickle { taken: Vec::new(), cap: 40, calls: 0, budget: 1 };
        assert_eq!(q.flush(&mut out).unwrap(), Flushed::Blocked);
        assert_eq!((q.bytes(), q.waiting_bytes()), (70, 10));
    }

    #[test]
    fn one_frame_at_a_time_never_allocates_the_deque() {
        let mut q = OutQueue::default();
        let mut w = Trickle { taken: vec![], cap: 100, calls: 0, budget: 100 };
        for f in [&b"101"[..], b"ping", b"lone message"] {
            q.push(Bytes::copy_from_slice(f));
            assert_eq!(q.flush(&mut w).unwrap(), Flushed::Empty);
        }
        assert_eq!(w.taken, b"101pinglone message");
        assert!(q.rest.is_none(), "an idle connection holds no queue memory");
        q.push(Bytes::from_static(b"a"));
        q.push(Bytes::from_static(b"b"));
        assert_eq!((q.len(), q.bytes(), q.waiting_bytes()), (2, 2, 1));
    }

    fn idle_session(opened_at: u64) -> Session {
        Session::new(7, 1, Roles::default(), opened_at)
    }

    /// A session of the built-in application that only connected holds nothing beyond its
    /// inline part; each rarely used part allocates the rest on first use and reads back.
    #[test]
    fn an_idle_session_holds_only_its_inline_part() {
        let peer = std::net::IpAddr::from([127, 0, 0, 1]);
        let mut session = idle_session(0);
        session.set_claims(Box::default());
        session.set_user_data(None);
        session.set_client_ip(peer, peer);
        session.set_roster_in_flight(false);
        assert!(session.more.is_none(), "nothing allocated for what is unused");
        assert_eq!(
            (session.claims(), session.client_ip(peer), session.transient_until()),
            ("", peer, u64::MAX)
        );
        assert!(session.user_data().is_none() && !session.roster_in_flight());
        assert!(session.expire_transient(u64::MAX - 1).is_none());
        let forwarded = std::net::IpAddr::from([10, 0, 0, 9]);
        session.set_client_ip(forwarded, peer);
        assert!(session.more.is_some());
        assert_eq!(session.client_ip(peer), forwarded);
        session.set_claims(r#"{"sub":"7"}"#.into());
        session.set_user_data(Some(Box::new(5u32)));
        session.set_roster_in_flight(true);
        assert_eq!(session.claims(), r#"{"sub":"7"}"#);
        assert_eq!(session.user_data().and_then(|d| d.downcast_ref::<u32>()), Some(&5));
        assert!(session.roster_in_flight());
        session.set_client_ip(peer, peer);
        assert_eq!(session.client_ip(peer), peer);
    }

    fn text_frame(fin: bool, kind: crate::ws::FrameKind) -> Frame {
        Frame { kind, fin, payload: 0..0, len: 0 }
    }

    /// Whole messages never allocate the input box; a fragmented message or an incomplete
    /// frame does, and the box goes when both are done.
    #[test]
    fn the_input_box_exists_only_while_something_is_incomplete() {
        use crate::ws::FrameKind::{Continuation, Text};
        let (peer, stream) = loopback_pair();
        let mut conn = Conn::new(stream, peer, 1, 0);
        assert_eq!(conn.assemble(&text_frame(true, Text), b"whole", 100), Ok(Assembled::InPlace(Text)));
        assert!(conn.input.is_none());
        assert_eq!(conn.assemble(&text_frame(false, Text), b"ab", 100), Ok(Assembled::Pending));
        assert!(conn.reassembling() && conn.input.is_some());
        conn.set_inbuf(b"partial frame".to_vec());
        let bytes = conn.take_inbuf();
        assert_eq!(bytes, b"partial frame");
        assert!(conn.input.is_some(), "the fragmented message is still in progress");
        assert_eq!(
            conn.assemble(&text_frame(true, Continuation), b"cd", 100),
            Ok(Assembled::Buffered(Text, b"abcd".to_vec()))
        );
        assert!(!conn.reassembling() && conn.input.is_none(), "nothing left: the box is gone");
        conn.inbuf_mut().extend_from_slice(b"GET / HT");
        assert_eq!(conn.inbuf(), b"GET / HT");
        conn.set_inbuf(Vec::new());
        assert!(conn.input.is_none() && conn.inbuf().is_empty());
        assert!(conn.take_inbuf().is_empty());
        assert_eq!(
            conn.assemble(&text_frame(true, Continuation), b"x", 100),
            Err(FrameError::Protocol("continuation without message"))
        );
        assert!(conn.input.is_none());
    }

    /// A connected mio stream (the server side of a loopback connection) and its peer address.
    fn loopback_pair() -> (SocketAddr, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        drop(client);
        (peer, TcpStream::from_std(server))
    }

    /// The buckets made on first use behave exactly as the ones made at the handshake did:
    /// full, and refilling since the connection opened (a message larger than the byte burst
    /// passes after enough idle time, as before).
    #[test]
    fn buckets_made_on_first_use_match_buckets_made_at_open() {
        let messages = Rate { per_second: 10, burst: 5 };
        let bytes = Rate { per_second: 1000, burst: 1000 };
        let opened = 1_000;
        let (mut eager_m, mut eager_b) =
            (TokenBucket::full(messages, opened), TokenBucket::full(bytes, opened));
        let mut session = idle_session(opened);
        assert!(session.rate_state.is_none() && session.more.is_none(), "idle: nothing allocated");
        for (at, len) in [(6_000, 5_000), (6_001, 1), (6_002, 900), (6_003, 900)] {
            let eager = eager_m.take(messages, 1, at) && eager_b.take(bytes, len, at);
            let state = session.rate_state(messages, bytes);
            let lazy = state.messages.take(messages, 1, at) && state.bytes.take(bytes, len, at);
            assert_eq!(lazy, eager, "at {at} ms, {len} bytes");
            assert_eq!((state.messages, state.bytes), (eager_m, eager_b));
        }
        let presence = Rate { per_second: 100, burst: 100 };
        let mut eager = TokenBucket::full(presence, opened);
        for (at, cost) in [(3_000, 250), (3_000, 1), (3_010, 1)] {
            assert_eq!(session.take_presence_budget(presence, cost, at), eager.take(presence, cost, at));
        }
    }

    #[test]
    fn discard_drops_everything_when_nothing_is_started() {
        let mut q = OutQueue::default();
        for f in [&b"abc"[..], b"def"] {
            q.push(Bytes::copy_from_slice(f));
        }
        assert_eq!(q.discard_unsent(), 2);
        assert!(q.is_empty());
        assert_eq!((q.len(), q.bytes()), (0, 0));
    }

    #[test]
    fn discard_keeps_the_partly_written_frame() {
        let mut q = OutQueue::default();
        for f in [&b"abc"[..], b"def", b"ghi"] {
            q.push(Bytes::copy_from_slice(f));
        }
        let mut w = Trickle { taken: vec![], cap: 2, calls: 0, budget: 1 };
        let _ = q.flush(&mut w);
        assert_eq!(q.discard_unsent(), 2);
        assert_eq!((q.len(), q.bytes()), (1, 1));
        w.budget = 5;
        q.flush(&mut w).unwrap();
        assert_eq!(w.taken, b"abc");
    }
}

#[cfg(test)]
mod layout {
    use super::*;
    use std::mem::size_of;

    /// The inline sizes behind BENCHMARKS.md's "where an idle connection's bytes go" (issue
    /// 15); run with `--nocapture` to see them. The bounds keep them from growing unnoticed.
    #[test]
    fn idle_connection_layout() {
        let sizes = [
            ("Conn", size_of::<Conn>()),
            ("Option<Conn> (as a slab entry)", size_of::<Option<Conn>>()),
            ("Session", size_of::<Session>()),
            ("OutQueue", size_of::<OutQueue>()),
            ("Reassembly", size_of::<Reassembly>()),
            ("Input (boxed while used)", size_of::<Input>()),
            ("SessionMore (boxed when used)", size_of::<SessionMore>()),
            ("Phase", size_of::<Phase>()),
            ("SocketAddr", size_of::<SocketAddr>()),
            ("Peer", size_of::<Peer>()),
            ("TcpStream", size_of::<TcpStream>()),
            ("List", size_of::<List<WaitKey>>()),
            ("Option<Box<Session>>", size_of::<Option<Box<Session>>>()),
            ("Debounce", size_of::<crate::core::presence::Debounce>()),
            ("TokenBucket", size_of::<TokenBucket>()),
            ("RateState (boxed when used)", size_of::<RateState>()),
            ("Strikes", size_of::<crate::core::ratelimit::Strikes>()),
            ("IpAddr", size_of::<std::net::IpAddr>()),
            ("UserData option", size_of::<Option<crate::app::application::UserData>>()),
            ("Bytes", size_of::<Bytes>()),
            ("timer-wheel entry (rotation, key)", size_of::<(u32, super::super::TimerKey)>()),
        ];
        for (name, size) in sizes {
            println!("size_of {name}: {size}");
        }
        // Issue 15, fourth step: `Conn` 208 → 160 (`inbuf` and `reassembly`, 56 bytes, in one
        // box made only while something is incomplete) and `Session` 160 → 72 (glibc's 80-byte
        // chunk rather than 176: claims, application data, presence coalescing and budget, a
        // forwarded address and the roster flag in one box made on first use).
        // Measured 2026-11-27 (x86_64). Issue 15, second step: `Conn` 280 → 208 (a compact
        // `Peer`, one deadline field per phase, boxed deque and wait list, `repr(C)`) and
        // `Session` 216 → 160 (glibc's 176-byte chunk rather than 224: the connection's own
        // buckets and presence budget boxed on first use, boxed room list, `Strikes` 8
        // bytes, with the user's rate bucket now held here rather than in a shard map).
        // mio's `TcpStream` carries a selector id under `debug_assertions` (16 bytes, 4 in
        // release), hence two figures for `Conn`.
        let conn_max = if cfg!(debug_assertions) { 168 } else { 160 };
        assert!(size_of::<Conn>() <= conn_max, "Conn grew: {}", size_of::<Conn>());
        assert_eq!(size_of::<Option<Conn>>(), size_of::<Conn>(), "a slab slot costs no more than a Conn");
        assert!(size_of::<Session>() <= 72, "Session grew: {}", size_of::<Session>());
        assert!(size_of::<(u32, super::super::TimerKey)>() <= 16, "timer-wheel entry grew");
        assert!(size_of::<OutQueue>() <= 56, "OutQueue grew: {}", size_of::<OutQueue>());
        assert!(size_of::<Peer>() <= 20, "Peer grew: {}", size_of::<Peer>());
        assert!(size_of::<List<WaitKey>>() <= 8, "List grew");
        assert!(size_of::<crate::core::ratelimit::Strikes>() <= 8, "Strikes grew");
        assert!(size_of::<crate::core::presence::Debounce>() <= 40, "Debounce grew");
    }
}

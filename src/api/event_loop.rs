//! The API thread: one `mio` poll over the listener, the connections and a waker; outcomes of
//! started calls arrive on a channel tagged `slab index << 32 | request number`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::admin;
use super::chunked::{self, Chunked};
use super::conn::{CHUNKED_CAP, Conn, Current, Fill, HEAD_CAP, State, Waiting};
use super::head::{self, Parsed};
use super::reply::{CONTINUE, Reply, wait_failed};
use super::routes::{self, Call, Route};
use super::{LISTENER, MAX_BODY_BYTES, RUN, STOP, WAKER};
use crate::route::{Completion, Outcome, WaitError};
use crate::route::{Handle, Op};
use crate::shard::Shared;

/// Time to receive a complete request (and the keep-alive idle bound).
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for a client to take its response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to wait for the client's close after ours.
const LINGER: Duration = Duration::from_secs(2);
/// Bound on a call that does not wait for a client (the shards answer at once).
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Added to a wait's own timeout before the API gives up on the shard's answer.
const WAIT_MARGIN: Duration = Duration::from_secs(2);

/// What the loop needs from the configuration.
#[derive(Debug)]
pub(super) struct Settings {
    /// The API key (replaced by [`super::ApiServer::set_key`] on SIGHUP).
    pub(super) key: Arc<std::sync::RwLock<Box<[u8]>>>,
    /// Default ack wait.
    pub(super) ack_timeout: Duration,
    /// Default request wait.
    pub(super) request_timeout: Duration,
    /// Most API connections open at once (`api_max_connections`).
    pub(super) max_connections: usize,
}

/// The API event loop.
pub(super) struct ApiLoop {
    poll: Poll,
    listener: TcpListener,
    handle: Handle,
    shared: Arc<Shared>,
    settings: Settings,
    waker: Arc<Waker>,
    control: Arc<AtomicU8>,
    conns: Slab<Conn>,
    tx: Sender<(u64, Outcome)>,
    rx: Receiver<(u64, Outcome)>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    next_id: u64,
    next_seq: u32,
}

impl ApiLoop {
    /// Registers the listener; the loop runs in [`ApiLoop::run`].
    pub(super) fn new(
        poll: Poll,
        mut listener: TcpListener,
        handle: Handle,
        shared: Arc<Shared>,
        settings: Settings,
        waker: Arc<Waker>,
        control: Arc<AtomicU8>,
    ) -> io::Result<Self> {
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        Ok(ApiLoop {
            poll,
            listener,
            handle,
            shared,
            settings,
            waker,
            control,
            conns: Slab::new(),
            tx,
            rx,
            timers: BinaryHeap::new(),
            next_id: 0,
            next_seq: 0,
        })
    }

    /// Runs until [`super::ApiServer::shutdown`].
    pub(super) fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout =
                self.timers.peek().map(|Reverse((at, ..))| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("API poll failed, the API stops: {e}");
                return;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(index) => self.on_ready(index, event.is_writable()),
                }
            }
            self.drain_outcomes();
            if self.control.load(Ordering::Acquire) == STOP {
                self.stop();
                return;
            }
            self.fire_timers(Instant::now());
        }
    }

    fn accept(&mut self) {
        loop {
            let (mut stream, peer) = match self.listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("API accept failed: {e}");
                    return;
                }
            };
            if self.conns.len() >= self.settings.max_connections {
                // Answered without reading and closed at once, so the descriptor is free
                // again before the next accept: WebSocket handshakes keep theirs.
                let refused = self.shared.metrics.api_refused.fetch_add(1, Ordering::Relaxed) + 1;
                if refused.is_power_of_two() {
                    log::warn!("API {peer}: 503, api_max_connections reached ({refused} refused so far)");
                }
                let reply = Reply::fatal(503, "too many API connections");
                let _ = io::Write::write(&mut stream, &reply.encode(false));
                continue;
            }
            let _ = stream.set_nodelay(true);
            let entry = self.conns.vacant_entry();
            let index = entry.key();
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) = self.poll.registry().register(&mut stream, Token(index), interest) {
                log::warn!("API {peer}: cannot register the connection: {e}");
                continue;
            }
            self.next_id += 1;
            let deadline = Instant::now() + READ_TIMEOUT;
            entry.insert(Conn::new(stream, peer, self.next_id, deadline));
            self.set_deadline(index, deadline);
        }
    }

    fn on_ready(&mut self, index: usize, writable: bool) {
        let Some(conn) = self.conns.get_mut(index) else { return };
        if writable && let Err(e) = conn.flush() {
            log::debug!("API {}: write failed: {e}", conn.peer);
            self.remove(index);
            return;
        }
        if !matches!(conn.state, State::Lingering)
            && let Err(e) = conn.fill()
        {
            log::debug!("API {}: read failed: {e}", conn.peer);
            self.remove(index);
            return;
        }
        self.advance(index);
    }

    /// Moves a connection as far as its buffers allow.
    fn advance(&mut self, index: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(index) else { return };
            match conn.state {
                // Nothing more is read from either: input is discarded until the peer's EOF.
                State::Lingering | State::Streaming => {
                    loop {
                        conn.input.clear();
                        match conn.fill() {
                            Ok(Fill::Full) => continue,
                            Ok(Fill::Blocked) => return,
                            Ok(Fill::Eof) | Err(_) => break,
                        }
                    }
                    self.remove(index);
                    return;
                }
                State::Responding { close } => {
                    match conn.flush() {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => {
                            log::debug!("API {}: write failed: {e}", conn.peer);
                            self.remove(index);
                            return;
                        }
                    }
                    if close || conn.peer_closed {
                        let _ = conn.stream.shutdown(Shutdown::Write);
                        conn.state = State::Lingering;
                        self.set_deadline(index, Instant::now() + LINGER);
                    } else {
                        conn.state = State::Reading;
                        conn.continue_sent = false;
                        if let Err(e) = conn.fill() {
                            log::debug!("API {}: read failed: {e}", conn.peer);
                            self.remove(index);
                            return;
                        }
                        self.set_deadline(index, Instant::now() + READ_TIMEOUT);
                    }
                }
                State::Waiting(_) => return,
                State::Reading => {
                    if !self.read_request(index) {
                        return;
                    }
                }
            }
        }
    }

    /// Parses what a `Reading` connection has; true when it changed state.
    ///
    /// The API key is checked on the head: a request without it is answered 401 and the
    /// connection closed before any of its body is read (and without `100 Continue`), so an
    /// unauthenticated client never has more than its head ([`HEAD_CAP`]) buffered.
    fn read_request(&mut self, index: usize) -> bool {
        loop {
            let Some(conn) = self.conns.get_mut(index) else { return false };
            let (head, head_len) = match head::parse(&conn.input) {
                Parsed::Complete(head, len) => (head, len),
                Parsed::Partial => {
                    if conn.peer_closed {
                        self.remove(index);
                    }
                    return false;
                }
                Parsed::Invalid(status, message) => {
                    self.respond(index, Reply::fatal(status, message), None);
                    return true;
                }
            };
            let current = Current {
                method: head.method.clone(),
                path: head.path.clone(),
                keep_alive: head.keep_alive,
                started: Instant::now(),
            };
            if let Some(mut reply) = routes::public(&head.method, &head.path) {
                // No body is read for a public route: one sent anyway ends the connection.
                reply.close |= head.transfer_encoding || head.content_length > 0;
                conn.input.drain(..head_len);
                self.respond(index, reply, Some(current));
                return true;
            }
            let key = self.settings.key.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let authorized = head::authorized(head.authorization.as_deref(), &key);
            drop(key);
            if !authorized {
                self.respond(index, Reply { close: true, ..Reply::unauthorized() }, Some(current));
                return true;
            }
            if let Some(reply) = framing_error(&head) {
                self.respond(index, reply, Some(current));
                return true;
            }
            let limit = if head.chunked { head_len + CHUNKED_CAP } else { head_len + head.content_length };
            let raised = conn.limit != limit.max(HEAD_CAP);
            conn.limit = limit.max(HEAD_CAP);
            let complete = if head.chunked {
                match chunked::scan(&conn.input[head_len..], &mut conn.chunks, MAX_BODY_BYTES) {
                    Chunked::Complete(end) => Some((head_len + end, true)),
                    Chunked::Invalid(status, message) => {
                        self.respond(index, Reply::fatal(status, message), Some(current));
                        return true;
                    }
                    Chunked::Partial if conn.input.len() >= conn.limit => {
                        let reply = Reply::fatal(413, "chunked request body too large");
                        self.respond(index, reply, Some(current));
                        return true;
                    }
                    Chunked::Partial => None,
                }
            } else {
                let total = head_len + head.content_length;
                (conn.input.len() >= total).then_some((total, false))
            };
            let Some((total, chunked)) = complete else {
                if conn.peer_closed {
                    self.remove(index);
                    return false;
                }
                if head.expect_continue && !conn.continue_sent {
                    conn.continue_sent = true;
                    conn.queue(CONTINUE);
                    if let Err(e) = conn.flush() {
                        log::debug!("API {}: write failed: {e}", conn.peer);
                        self.remove(index);
                        return false;
                    }
                }
                if !raised {
                    return false;
                }
                // The socket may hold more of the body than the head-only cap let in.
                if let Err(e) = conn.fill() {
                    log::debug!("API {}: read failed: {e}", conn.peer);
                    self.remove(index);
                    return false;
                }
                continue;
            };
            let body = if chunked {
                chunked::decode(&conn.input[head_len..], total - head_len)
            } else {
                conn.input[head_len..total].to_vec()
            };
            conn.input.drain(..total);
            conn.limit = HEAD_CAP;
            conn.chunks = Default::default();
            if conn.input.capacity() > 4 * HEAD_CAP {
                conn.input.shrink_to(HEAD_CAP);
            }
            self.dispatch(index, head, &body, current);
            return true;
        }
    }

    /// Authenticates and routes a complete request; starts its call or answers at once.
    fn dispatch(&mut self, index: usize, head: head::Head, body: &[u8], current: Current) {
        if self.control.load(Ordering::Acquire) != RUN {
            self.respond(index, wait_failed(WaitError::ShuttingDown), Some(current));
            return;
        }
        let call = match routes::route(&head.method, &head.path) {
            Ok(Route::Events) => {
                self.start_stream(index, &current);
                return;
            }
            Ok(Route::Connections) => admin::connections_call(&head.query),
            Ok(Route::Rooms) => admin::rooms_call(&head.query),
            Ok(route) => routes::call(route, body),
            Err(reply) => Err(reply),
        };
        let call = match call {
            Ok(call) => call,
            Err(reply) => {
                self.respond(index, reply, Some(current));
                return;
            }
        };
        self.next_seq = self.next_seq.wrapping_add(1);
        let seq = self.next_seq;
        let tag = ((index as u64) << 32) | u64::from(seq);
        let done = Completion::new(self.tx.clone(), tag, Some(Arc::clone(&self.waker)));
        let tally = call.submit(&self.handle, &done);
        if let Some(reply) = tally.finished() {
            self.respond(index, reply, Some(current));
            return;
        }
        let deadline = current.started + self.give_up_after(&call);
        let Some(conn) = self.conns.get_mut(index) else { return };
        conn.state = State::Waiting(Box::new(Waiting { seq, tally, current }));
        self.set_deadline(index, deadline);
    }

    /// Answers `GET /api/v1/events` with an event stream: a snapshot now, then one a second.
    fn start_stream(&mut self, index: usize, current: &Current) {
        let first = admin::snapshot(&self.shared);
        let Some(conn) = self.conns.get_mut(index) else { return };
        log::info!("API {} {} {}: 200 event stream", conn.peer, current.method, current.path);
        conn.queue(admin::STREAM_HEAD);
        conn.queue(&first);
        conn.state = State::Streaming;
        if let Err(e) = conn.flush() {
            log::debug!("API {}: write failed: {e}", conn.peer);
            self.remove(index);
            return;
        }
        self.set_deadline(index, Instant::now() + admin::SNAPSHOT_PERIOD);
    }

    /// The next snapshot of a stream, unless its client has not taken the earlier ones
    /// ([`admin::STREAM_BACKLOG`]): a slow reader skips snapshots instead of growing memory.
    fn stream_tick(&mut self, index: usize, now: Instant) {
        let backlog = self.conns.get(index).map_or(0, Conn::unsent);
        if backlog < admin::STREAM_BACKLOG {
            let event = admin::snapshot(&self.shared);
            let Some(conn) = self.conns.get_mut(index) else { return };
            conn.queue(&event);
            if let Err(e) = conn.flush() {
                log::debug!("API {}: write failed: {e}", conn.peer);
                self.remove(index);
                return;
            }
        }
        self.set_deadline(index, now + admin::SNAPSHOT_PERIOD);
    }

    /// How long the API waits for a call's outcomes before answering without them.
    fn give_up_after(&self, call: &Call) -> Duration {
        match (call, call.wait_timeout()) {
            (_, Some(Some(timeout))) => timeout + WAIT_MARGIN,
            (Call::Ack { .. }, Some(None)) => self.settings.ack_timeout + WAIT_MARGIN,
            (_, Some(None)) => self.settings.request_timeout + WAIT_MARGIN,
            (_, None) => OP_TIMEOUT,
        }
    }

    fn drain_outcomes(&mut self) {
        while let Ok((tag, outcome)) = self.rx.try_recv() {
            let index = (tag >> 32) as usize;
            let seq = tag as u32;
            let Some(conn) = self.conns.get_mut(index) else { continue };
            let State::Waiting(waiting) = &mut conn.state else { continue };
            if waiting.seq != seq {
                continue;
            }
            // A second step (room presence) goes out under the same tag: the first step's
            // outcomes are all in by then, so the call still counts every outcome it is owed.
            let (handle, tx, waker) = (&self.handle, &self.tx, &self.waker);
            let mut done = None;
            let mut submit = |op: Op<'_>| {
                let done =
                    done.get_or_insert_with(|| Completion::new(tx.clone(), tag, Some(Arc::clone(waker))));
                handle.submit(op, done)
            };
            if let Some(reply) = waiting.tally.absorb(outcome, &mut submit) {
                self.finish_waiting(index, reply);
            }
        }
    }

    /// Answers the call a `Waiting` connection was waiting for.
    fn finish_waiting(&mut self, index: usize, reply: Reply) {
        let Some(conn) = self.conns.get_mut(index) else { return };
        let State::Waiting(waiting) = std::mem::replace(&mut conn.state, State::Reading) else { return };
        self.respond(index, reply, Some(waiting.current));
        self.advance(index);
    }

    /// Queues `reply` and switches to `Responding`; logs the request.
    fn respond(&mut self, index: usize, reply: Reply, current: Option<Current>) {
        let Some(conn) = self.conns.get_mut(index) else { return };
        let keep_alive = current.as_ref().is_some_and(|c| c.keep_alive);
        match &current {
            Some(c) => {
                let took = c.started.elapsed();
                if reply.status >= 400 {
                    log::warn!(
                        "API {} {} {}: {} {} ({took:?})",
                        conn.peer,
                        c.method,
                        c.path,
                        reply.status,
                        reply.message()
                    );
                } else {
                    log::debug!("API {} {} {}: {} ({took:?})", conn.peer, c.method, c.path, reply.status);
                }
            }
            None => log::warn!("API {}: {} {}", conn.peer, reply.status, reply.message()),
        }
        conn.queue(&reply.encode(keep_alive));
        conn.state = State::Responding { close: reply.close || !keep_alive };
        self.set_deadline(index, Instant::now() + WRITE_TIMEOUT);
    }

    fn set_deadline(&mut self, index: usize, at: Instant) {
        if let Some(conn) = self.conns.get_mut(index) {
            conn.deadline = at;
            if conn.armed.is_none_or(|armed| at < armed) {
                conn.armed = Some(at);
                self.timers.push(Reverse((at, index, conn.id)));
            }
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, index, id))) = self.timers.peek() {
            if at > now {
                return;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(index) else { continue };
            if conn.id != id || conn.armed != Some(at) {
                continue;
            }
            conn.armed = None;
            if conn.deadline > now {
                let deadline = conn.deadline;
                self.set_deadline(index, deadline);
                continue;
            }
            match &conn.state {
                State::Reading if conn.input.is_empty() => self.remove(index),
                State::Reading => {
                    let reply = Reply::fatal(408, "request not received in time");
                    self.respond(index, reply, None);
                    self.advance(index);
                }
                State::Waiting(waiting) => {
                    let reply = if waiting.tally.waits_for_client() {
                        wait_failed(WaitError::TimedOut)
                    } else {
                        Reply::wait_error(503, "unavailable", "no answer from the shards")
                    };
                    self.finish_waiting(index, reply);
                }
                State::Responding { .. } | State::Lingering => self.remove(index),
                State::Streaming => self.stream_tick(index, now),
            }
        }
    }

    fn remove(&mut self, index: usize) {
        if self.conns.contains(index) {
            let mut conn = self.conns.remove(index);
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
    }

    /// Final stop: calls still waiting get a best-effort 503; every connection closes.
    fn stop(&mut self) {
        let reply = wait_failed(WaitError::ShuttingDown);
        let mut answered = 0;
        for (_, conn) in self.conns.iter_mut() {
            if matches!(conn.state, State::Waiting(_)) {
                conn.queue(&Reply { close: true, ..reply.clone() }.encode(false));
                let _ = conn.flush();
                answered += 1;
            }
        }
        if answered > 0 {
            log::warn!("API stopped with {answered} calls still waiting; answered 503");
        }
        self.conns.clear();
        log::info!("backend HTTP API stopped");
    }
}

/// A body the API cannot frame: another transfer coding, both framings at once, or a
/// `Content-Length` over the limit.
fn framing_error(head: &head::Head) -> Option<Reply> {
    if head.transfer_encoding && !head.chunked {
        return Some(Reply::fatal(501, "only Transfer-Encoding: chunked is supported"));
    }
    if head.chunked && head.has_length {
        return Some(Reply::fatal(400, "both Transfer-Encoding and Content-Length"));
    }
    if head.content_length > MAX_BODY_BYTES {
        return Some(Reply::fatal(413, &format!("request body over {MAX_BODY_BYTES} bytes")));
    }
    None
}

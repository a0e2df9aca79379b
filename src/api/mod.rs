//! The backend HTTP API: server-initiated operations for backends written in any language.
//!
//! One thread runs its own `mio` event loop with a listener on `api_listen` (loopback by
//! default, so it is never exposed next to public clients by accident). Every request is
//! authenticated with `Authorization: apikey <api_key>` and turned into a [`crate::app::Handle`]
//! operation whose outcomes come back through a channel and a [`mio::Waker`]. A call that waits
//! for a client (`"ack": true`, `request`) is just a slab entry until its outcome arrives: no
//! thread and no shard is held per waiting call, so thousands can wait at once. A call in two
//! steps (room presence: the member list from every shard, then each member's presence from
//! its home shard) starts its second step from the loop when the first step's last outcome
//! arrives, so it waits the same way.
//!
//! # Routes
//!
//! | request | success | body |
//! |---|---|---|
//! | `POST /api/v1/send` `{"userId", "message", "ack"?, "timeoutMs"?}` | 200 | `{"delivered": n}`; with `"ack": true` `{"delivered": 1, "ack": {"status", "error"}}` |
//! | `POST /api/v1/send_many` `{"userIds", "message"}` | 200 | `{"delivered": total}` |
//! | `POST /api/v1/broadcast` `{"message", "exclude"?}` | 200 | `{"delivered": total}` |
//! | `POST /api/v1/request` `{"userId", "message", "timeoutMs"?}` | 200 | `{"response": <the client's whole message>}` |
//! | `GET /api/v1/users/{id}` | 200 | `{"userId", "online", "connections", "presence": {"status", "context", "since"}}` |
//! | `DELETE /api/v1/users/{id}/connections` | 200 | `{"disconnected": n}` |
//! | `POST /api/v1/rooms/{room}/publish` `{"body", "meta"?, "fromUserId"?}` | 200 | `{"delivered": n}` |
//! | `GET /api/v1/rooms/{room}` | 200 | `{"room", "members": [user ids, sorted, unique], "count"}` |
//! | `GET /api/v1/rooms/{room}/presence` | 200 | `{"room", "members": [{"userId", "status", "context", "since"}, …]}`, sorted by `userId`, each user once |
//! | `GET /api/v1/connections?cursor=&limit=&user=` | 200 | `{"connections": [{"userId", "shard", "ip", "connectedAt", "rooms", "queued", "messagesIn", "messagesOut", "lastActive"}, …], "nextCursor"}`: open connections in the order they opened, `limit` (1–1000, default 50) per page; pass `nextCursor` back as `cursor` (`null`: last page) |
//! | `GET /api/v1/rooms?limit=` | 200 | `{"rooms": [{"room", "members"}, …], "total"}`, the `limit` (default 200) largest rooms |
//! | `GET /api/v1/events` | 200 | `text/event-stream`: `data: {"ts", "connections", "users", "shards", "messagesIn", "messagesOut", "errors", "slowConsumerCloses", "rateLimited", "admissionRefusals", …}` every second (counters cumulative); a reader more than 64 KiB behind skips snapshots |
//! | `GET /admin/clients` | 200 | the admin page (HTML, no key needed for the page itself; every call it makes needs the key) |
//!
//! `message` is `{"type": string, "payload"?: any JSON (forwarded byte-for-byte),
//! "fromUserId"?: int}`. An acknowledged send and a request go to the user's newest
//! connection; a plain send goes to all of the user's connections.
//!
//! `{room}` is a room name as clients `join` it (1–128 characters from `A-Z a-z 0-9 _ - . :
//! @ #`), percent-decoded first: `#` must be sent as `%23`. A publish queues
//! `{"type": "room_message", "payload": {"from": fromUserId or null, "room", "ts" (ms),
//! "body", "meta" (null when absent)}}` on every member connection on every shard; `body`
//! (required, any JSON including `null`) and `meta` are forwarded byte-for-byte, and
//! `delivered` counts those connections (0 for a room nobody is in). The member list of an
//! unknown or empty room is `[]`; members leave asynchronously when they disconnect.
//!
//! A presence is what the user's home shard stores: `status` is `"offline"` when the user has
//! no connection, `"online"` on connect, or the last status the user set with
//! `presence_update`; `context` is the JSON the user set with it, forwarded byte-for-byte
//! (`null` when none); `since` is when it was set (for an offline user, the time of the query),
//! RFC 3339 UTC with milliseconds (`"2024-05-01T12:00:00.123Z"`). A `presence_update` reaches
//! the home shard asynchronously, so the API may show the previous status for a moment after
//! the client's ack. Room presence lists the room's members (as `GET /api/v1/rooms/{room}`
//! does, `[]` for an unknown or empty room) and then asks each member's presence; a member who
//! disconnected in between is listed `"offline"`.
//!
//! # Errors
//!
//! Every error is `{"error": message}` (waits add `"reason"`):
//!
//! | status | when |
//! |---|---|
//! | 400 | malformed HTTP, bad JSON, a missing or mistyped field (e.g. no `body` in a publish), a bad user id or room name in the path |
//! | 401 | no `Authorization: apikey <key>` header, or the wrong key (answered with `WWW-Authenticate: apikey`, from the request head alone: no body is read and no `100 Continue` sent; the connection closes) |
//! | 404 | unknown path; the user is offline (`send`, `"reason": "offline"`) |
//! | 405 | known path, wrong method (with `Allow`) |
//! | 408 | the request was not received within 30 s |
//! | 410 | `"reason": "closed"`: the connection asked closed before the client answered |
//! | 413 | a body over 1 MiB (`Content-Length` or decoded `Transfer-Encoding: chunked`) |
//! | 431 | a request head over 8 KiB or with too many headers |
//! | 501 | a transfer coding other than `chunked` |
//! | 503 | `"reason": "shutting_down"`: the server is shutting down; more than `api_max_connections` API connections (closed at once, counted in `customws_api_refused_connections_total`) |
//! | 504 | `"reason": "timeout"`: the client did not answer within `timeoutMs` (default `ack_timeout` / `request_timeout`) |
//!
//! HTTP/1.1 keep-alive is supported (HTTP/1.0 only with `Connection: keep-alive`); requests
//! pipelined on one connection are answered in order. Error responses that leave the request
//! stream in an unknown state (400 malformed, 401, 408, 413, 431, 501) close the connection.
//! A body is framed by `Content-Length` or `Transfer-Encoding: chunked` (both at once: 400).

mod admin;
mod chunked;
mod conn;
mod event_loop;
mod head;
pub mod internal;
mod reply;
mod routes;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::thread::JoinHandle;

use mio::{Poll, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::app::Handle;
use crate::shard::Shared;

/// Largest request body accepted; a larger `Content-Length` is answered 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Listen backlog of the API socket.
const BACKLOG: i32 = 1024;

/// The API thread's run state, set by [`ApiServer`].
const RUN: u8 = 0;
/// New requests are answered 503; waits in flight still get their outcomes.
const DRAIN: u8 = 1;
/// Answer what is waiting with 503 and exit.
const STOP: u8 = 2;

/// Token of the API thread's waker (outcomes and control).
const WAKER: Token = Token(usize::MAX - 1);
/// Token of the API listener.
const LISTENER: Token = Token(usize::MAX - 2);

/// The running API thread. Dropping it stops the thread and waits for it.
#[derive(Debug)]
pub struct ApiServer {
    local_addr: SocketAddr,
    waker: Arc<Waker>,
    control: Arc<AtomicU8>,
    thread: Option<JoinHandle<()>>,
    key: Arc<std::sync::RwLock<Box<[u8]>>>,
}

/// Starts the API listener and its thread; `Ok(None)` when `api_key` is not configured (the
/// API is off).
pub fn start(shared: Arc<Shared>) -> io::Result<Option<ApiServer>> {
    let config = &shared.config;
    let Some(key) = config.api_key.as_deref() else {
        return Ok(None);
    };
    let listener = bind(config.api_listen)?;
    let local_addr = listener.local_addr()?;
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let control = Arc::new(AtomicU8::new(RUN));
    let key = Arc::new(std::sync::RwLock::new(Box::<[u8]>::from(key.as_bytes())));
    let api = event_loop::ApiLoop::new(
        poll,
        mio::net::TcpListener::from_std(listener),
        Handle::new(Arc::clone(&shared.fabric)),
        Arc::clone(&shared),
        event_loop::Settings {
            key: Arc::clone(&key),
            ack_timeout: config.ack_timeout,
            request_timeout: config.request_timeout,
            max_connections: match config.api_max_connections {
                0 => usize::MAX,
                n => n,
            },
        },
        Arc::clone(&waker),
        Arc::clone(&control),
    )?;
    let thread = std::thread::Builder::new().name("customws-api".into()).spawn(move || api.run())?;
    log::info!("backend HTTP API listening on {local_addr}");
    Ok(Some(ApiServer { local_addr, waker, control, thread: Some(thread), key }))
}

fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

impl ApiServer {
    /// The address the API listens on (the real port when 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the API key (SIGHUP re-reads `api_key_file`); the next request is checked
    /// against the new one.
    pub fn set_key(&self, key: &str) {
        *self.key.write().unwrap_or_else(std::sync::PoisonError::into_inner) = key.as_bytes().into();
    }

    /// Begins shutdown: new requests are answered 503, calls already waiting still receive
    /// their outcomes (the shards fail pending waits as shutting down). Does not wait.
    pub fn begin_shutdown(&self) {
        let _ = self.control.compare_exchange(RUN, DRAIN, Ordering::AcqRel, Ordering::Acquire);
        let _ = self.waker.wake();
    }

    /// Stops the thread and waits for it: calls still waiting are answered 503 (best effort)
    /// and every API connection is closed.
    pub fn shutdown(&mut self) {
        self.control.store(STOP, Ordering::Release);
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the API thread panicked");
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

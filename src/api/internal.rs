//! The internal listener (`internal_listen`): `/metrics`, `/health` and `/ready` for
//! Prometheus, orchestrators and load balancers, off the public WebSocket port. Plain
//! `Connection: close` HTTP/1.1, no key: bind it to a private address.
//!
//! One accepting thread hands each connection to a short-lived thread (at most
//! `MAX_ACTIVE` at once; more are closed unanswered) that reads one request head within
//! `IO_TIMEOUT` and answers it. It keeps serving while the shards drain, so `/ready` shows
//! 503 for the whole shutdown; it stops after the shards.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::http::request::{MAX_HEAD_BYTES, MAX_HEADERS};
use crate::http::response::{json_error, response};
use crate::shard::Shared;

/// Connections served at once.
const MAX_ACTIVE: usize = 32;
/// Bound on reading a request and on writing its answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// The running internal listener. Dropping it stops the thread and waits for it.
#[derive(Debug)]
pub struct InternalServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Binds `addr` and starts serving.
pub fn start(shared: Arc<Shared>, addr: SocketAddr) -> io::Result<InternalServer> {
    let listener = TcpListener::bind(addr)?;
    let local_addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("customws-internal".into())
        .spawn(move || serve(&listener, &shared, &flag))?;
    log::info!("/metrics, /health and /ready served on {local_addr} (internal_listen)");
    Ok(InternalServer { local_addr, stop, thread: Some(thread) })
}

fn serve(listener: &TcpListener, shared: &Arc<Shared>, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_ACTIVE {
            active.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (shared, finished) = (Arc::clone(shared), Arc::clone(&active));
        let spawned = std::thread::Builder::new().name("customws-internal-conn".into()).spawn(move || {
            answer(stream, &shared);
            finished.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Reads one request head and answers it.
fn answer(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let reply = loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let path = req.path.unwrap_or("/");
                let path = path.split_once('?').map_or(path, |(p, _)| p);
                let accept = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("accept"))
                    .and_then(|h| std::str::from_utf8(h.value).ok());
                break route(req.method.unwrap_or(""), path, accept, shared);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => {}
            Ok(httparse::Status::Partial) => break json_error(431, "request header too large"),
            Err(_) => break json_error(400, "malformed HTTP request"),
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let _ = stream.write_all(&reply);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Let the client read the answer before the socket goes (unread input would reset it).
    let _ = stream.read(&mut chunk);
}

fn route(method: &str, path: &str, accept: Option<&str>, shared: &Shared) -> Vec<u8> {
    match (method, path) {
        ("GET", "/metrics") => {
            let format = crate::metrics::Format::negotiate(accept);
            let text = shared.metrics.render_as(shared.counters(), format);
            response(200, format.content_type(), "", text.as_bytes())
        }
        ("GET", "/health") => response(200, "application/json", "", shared.health_json().as_bytes()),
        ("GET", "/ready") => {
            let (status, body) = shared.readiness();
            response(status, "application/json", "", body.as_bytes())
        }
        (_, "/metrics" | "/health" | "/ready") => json_error(405, "use GET"),
        _ => json_error(404, &format!("no endpoint at {path}")),
    }
}

impl InternalServer {
    /// The address it listens on (the real port when 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and waits for the accepting thread.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let _ = TcpStream::connect_timeout(&wake_addr(self.local_addr), IO_TIMEOUT);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the internal listener thread panicked");
        }
    }
}

/// Where to connect to reach a listener bound to `addr` (an unspecified address is reached on
/// loopback).
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    let mut to = addr;
    if addr.ip().is_unspecified() {
        to.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    to
}

impl Drop for InternalServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

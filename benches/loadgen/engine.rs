//! A small single-threaded WebSocket client engine on mio: non-blocking connect from a chosen
//! source address, HTTP upgrade, minimal RFC 6455 client framing (masked text/pong/close out,
//! unmasked frames in), ping answering. Scenario logic plugs in through [`Handler`].

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

/// Fixed, non-zero client mask (the server cannot tell it from a random one).
const MASK: [u8; 4] = [0x3a, 0x9c, 0x51, 0xe7];

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Appends one masked client frame to `out`.
pub(crate) fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= MASK[i & 3];
    }
}

/// Appends one masked text frame.
pub(crate) fn push_text(out: &mut Vec<u8>, text: &[u8]) {
    push_frame(out, OP_TEXT, text);
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// TCP connect failed.
    ConnectFailed,
    /// The HTTP upgrade was refused, malformed, or the socket closed during it.
    HandshakeFailed,
    /// The server sent a close frame.
    ServerClose,
    /// EOF or reset without a close frame.
    Eof,
    /// Closed by us.
    Local,
}

/// Scenario callbacks. `out` is the connection's output buffer: append frames with
/// [`push_text`]; the engine flushes it after the callback.
pub(crate) trait Handler {
    /// The upgrade succeeded. Return false to close the connection at once (close frame + drop).
    fn on_open(&mut self, _id: usize, _tag: u32, _out: &mut Vec<u8>) -> bool {
        true
    }
    /// One complete text message.
    fn on_text(&mut self, id: usize, tag: u32, text: &[u8], out: &mut Vec<u8>);
    /// The connection is gone (not called for [`Engine::close`] / [`Engine::close_all`]).
    fn on_ended(&mut self, _id: usize, _tag: u32, _why: Ended) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Handshaking,
    Open,
}

struct Conn {
    sock: TcpStream,
    state: State,
    tag: u32,
    wbuf: Vec<u8>,
    wpos: usize,
    rbuf: Vec<u8>,
    /// Opcode and data of a fragmented message being reassembled.
    frag: Option<(u8, Vec<u8>)>,
    accept: String,
    started: Instant,
}

/// Counters of everything that happened on the wire, good or bad.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) connects_started: u64,
    pub(crate) connect_errors: BTreeMap<String, u64>,
    pub(crate) handshakes_ok: u64,
    pub(crate) handshake_http_status: BTreeMap<u16, u64>,
    pub(crate) handshake_other_errors: BTreeMap<String, u64>,
    pub(crate) server_close_codes: BTreeMap<u16, u64>,
    pub(crate) eof_on_open: u64,
    pub(crate) io_errors: BTreeMap<String, u64>,
    pub(crate) protocol_errors: BTreeMap<String, u64>,
    pub(crate) pings_received: u64,
    pub(crate) text_frames_in: u64,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

fn bump<K: Ord>(m: &mut BTreeMap<K, u64>, k: K) {
    *m.entry(k).or_insert(0) += 1;
}

fn err_key(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{:?} (os {code})", e.kind()),
        None => format!("{:?}", e.kind()),
    }
}

impl Stats {
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "connects_started": self.connects_started,
            "connect_errors": self.connect_errors,
            "handshakes_ok": self.handshakes_ok,
            "handshake_http_status": self.handshake_http_status.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
            "handshake_other_errors": self.handshake_other_errors,
            "server_close_codes": self.server_close_codes.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
            "eof_on_open": self.eof_on_open,
            "io_errors": self.io_errors,
            "protocol_errors": self.protocol_errors,
            "pings_received": self.pings_received,
            "text_frames_in": self.text_frames_in,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        })
    }
}

/// The client engine.
pub(crate) struct Engine {
    poll: Poll,
    events: Events,
    ready: Vec<(usize, bool, bool)>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// The servers connections go to (several nodes of one tier: [`Engine::connect_to`]).
    servers: Vec<SocketAddr>,
    path: String,
    src_ips: Vec<Ipv4Addr>,
    next_src: usize,
    scratch: Vec<u8>,
    /// Connections in connect or upgrade.
    pub(crate) pending: usize,
    /// Upgraded connections currently open.
    pub(crate) open: usize,
    /// Connections that ended in connect or upgrade.
    pub(crate) failed: usize,
    pub(crate) stats: Stats,
    /// Connect start to 101, in microseconds.
    pub(crate) handshake_hist: Histogram<u64>,
}

impl Engine {
    pub(crate) fn new(server: SocketAddr, path: &str, src_ips: Vec<Ipv4Addr>) -> io::Result<Self> {
        Self::with_servers(vec![server], path, src_ips)
    }

    /// An engine whose connections go to any of `servers` (the nodes of a cluster), chosen per
    /// connection by [`Engine::connect_to`]; [`Engine::connect`] uses the first.
    pub(crate) fn with_servers(
        servers: Vec<SocketAddr>,
        path: &str,
        src_ips: Vec<Ipv4Addr>,
    ) -> io::Result<Self> {
        assert!(!servers.is_empty(), "at least one server");
        Ok(Engine {
            poll: Poll::new()?,
            events: Events::with_capacity(4096),
            ready: Vec::with_capacity(4096),
            conns: Vec::new(),
            free: Vec::new(),
            servers,
            path: path.to_string(),
            src_ips,
            next_src: 0,
            scratch: vec![0u8; 256 * 1024],
            pending: 0,
            open: 0,
            failed: 0,
            stats: Stats::default(),
            handshake_hist: Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram"),
        })
    }

    /// Starts a connection authenticating with `token`; the upgrade request is sent once TCP
    /// connects. Returns the connection id.
    pub(crate) fn connect(&mut self, token: &str, tag: u32) -> io::Result<usize> {
        self.connect_to(0, token, tag)
    }

    /// [`Engine::connect`] to server `node` (modulo the number of servers).
    pub(crate) fn connect_to(&mut self, node: usize, token: &str, tag: u32) -> io::Result<usize> {
        self.stats.connects_started += 1;
        let server = self.servers[node % self.servers.len()];
        match self.try_connect(server, token, tag) {
            Ok(id) => {
                self.pending += 1;
                Ok(id)
            }
            Err(e) => {
                bump(&mut self.stats.connect_errors, err_key(&e));
                self.failed += 1;
                Err(e)
            }
        }
    }

    fn try_connect(&mut self, server: SocketAddr, token: &str, tag: u32) -> io::Result<usize> {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        sock.set_nonblocking(true)?;
        sock.set_tcp_nodelay(true)?;
        if !self.src_ips.is_empty() {
            let ip = self.src_ips[self.next_src % self.src_ips.len()];
            self.next_src += 1;
            sock.bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())?;
        }
        match sock.connect(&server.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(115) || e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let std_stream: std::net::TcpStream = sock.into();
        let mut stream = TcpStream::from_std(std_stream);
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        if let Err(e) =
            self.poll.registry().register(&mut stream, Token(id), Interest::READABLE | Interest::WRITABLE)
        {
            self.free.push(id);
            return Err(e);
        }
        let key = tungstenite::handshake::client::generate_key();
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut wbuf = Vec::with_capacity(512);
        write!(
            wbuf,
            "GET {}?token={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            self.path, token, server, key
        )?;
        self.conns[id] = Some(Conn {
            sock: stream,
            state: State::Connecting,
            tag,
            wbuf,
            wpos: 0,
            rbuf: Vec::new(),
            frag: None,
            accept,
            started: Instant::now(),
        });
        Ok(id)
    }

    /// Number of connection slots (ids are below this).
    pub(crate) fn capacity(&self) -> usize {
        self.conns.len()
    }

    /// Tag of connection `id`, if it exists.
    pub(crate) fn tag(&self, id: usize) -> Option<u32> {
        self.conns.get(id)?.as_ref().map(|c| c.tag)
    }

    /// Whether `id` is an open (upgraded) connection.
    pub(crate) fn is_open(&self, id: usize) -> bool {
        matches!(self.conns.get(id), Some(Some(c)) if c.state == State::Open)
    }

    /// Queues several frames at once (already encoded with [`push_text`]) and writes.
    pub(crate) fn send_raw(&mut self, id: usize, frames: &[u8]) {
        if let Some(Some(c)) = self.conns.get_mut(id) {
            c.wbuf.extend_from_slice(frames);
        }
        self.flush(id);
    }

    /// Closes `id` locally: close frame (when open), best-effort write, drop.
    pub(crate) fn close(&mut self, id: usize) {
        if let Some(Some(c)) = self.conns.get_mut(id)
            && c.state == State::Open
        {
            push_frame(&mut c.wbuf, OP_CLOSE, &1000u16.to_be_bytes());
        }
        self.flush(id);
        self.drop_conn(id, Ended::Local, None::<&mut NoHandler>);
    }

    /// Closes every connection.
    pub(crate) fn close_all(&mut self) {
        for id in 0..self.conns.len() {
            if self.conns[id].is_some() {
                self.close(id);
            }
        }
    }

    fn drop_conn<H: Handler>(&mut self, id: usize, why: Ended, h: Option<&mut H>) {
        let Some(mut c) = self.conns[id].take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.sock);
        match c.state {
            State::Open => self.open -= 1,
            _ => {
                self.pending -= 1;
                if why != Ended::Local {
                    self.failed += 1;
                }
            }
        }
        self.free.push(id);
        if let Some(h) = h {
            h.on_ended(id, c.tag, why);
        }
    }

    /// Writes as much of the output buffer as the socket takes. Returns false on error (the
    /// connection is then left for the read path to reap).
    fn flush(&mut self, id: usize) -> bool {
        let Some(Some(c)) = self.conns.get_mut(id) else {
            return false;
        };
        if c.state == State::Connecting {
            return true;
        }
        while c.wpos < c.wbuf.len() {
            match c.sock.write(&c.wbuf[c.wpos..]) {
                Ok(0) => return false,
                Ok(n) => {
                    c.wpos += n;
                    self.stats.bytes_out += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    bump(&mut self.stats.io_errors, format!("write {}", err_key(&e)));
                    return false;
                }
            }
        }
        c.wbuf.clear();
        c.wpos = 0;
        true
    }

    /// Waits up to `timeout` for socket events and handles them.
    pub(crate) fn poll_once<H: Handler>(&mut self, h: &mut H, timeout: Duration) {
        if let Err(e) = self.poll.poll(&mut self.events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                bump(&mut self.stats.io_errors, format!("poll {}", err_key(&e)));
            }
            return;
        }
        let mut ready = std::mem::take(&mut self.ready);
        ready.clear();
        for ev in self.events.iter() {
            ready.push((
                ev.token().0,
                ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                ev.is_writable() || ev.is_error() || ev.is_write_closed(),
            ));
        }
        for &(id, readable, writable) in &ready {
            if writable {
                self.on_writable(id, h);
            }
            if readable {
                self.on_readable(id, h);
            }
        }
        self.ready = ready;
    }

    fn on_writable<H: Handler>(&mut self, id: usize, h: &mut H) {
        let Some(Some(c)) = self.conns.get_mut(id) else {
            return;
        };
        if c.state == State::Connecting {
            match c.sock.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    bump(&mut self.stats.connect_errors, err_key(&e));
                    self.drop_conn(id, Ended::ConnectFailed, Some(h));
                    return;
                }
            }
            match c.sock.peer_addr() {
                Ok(_) => c.state = State::Handshaking,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => {
                    bump(&mut self.stats.connect_errors, err_key(&e));
                    self.drop_conn(id, Ended::ConnectFailed, Some(h));
                    return;
                }
            }
        }
        self.flush(id);
    }

    fn on_readable<H: Handler>(&mut self, id: usize, h: &mut H) {
        loop {
            let Some(Some(c)) = self.conns.get_mut(id) else {
                return;
            };
            if c.state == State::Connecting {
                // Readiness before connect completion: let the writable path decide.
                match c.sock.take_error() {
                    Ok(Some(e)) | Err(e) => {
                        bump(&mut self.stats.connect_errors, err_key(&e));
                        self.drop_conn(id, Ended::ConnectFailed, Some(h));
                    }
                    Ok(None) => {}
                }
                return;
            }
            match c.sock.read(&mut self.scratch) {
                Ok(0) => {
                    self.on_eof(id, h);
                    return;
                }
                Ok(n) => {
                    self.stats.bytes_in += n as u64;
                    c.rbuf.extend_from_slice(&self.scratch[..n]);
                    if !self.process(id, h) {
                        return;
                    }
                    self.flush(id);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    bump(&mut self.stats.io_errors, format!("read {}", err_key(&e)));
                    self.on_eof(id, h);
                    return;
                }
            }
        }
    }

    fn on_eof<H: Handler>(&mut self, id: usize, h: &mut H) {
        let Some(Some(c)) = self.conns.get(id) else {
            return;
        };
        match c.state {
            State::Open => {
                self.stats.eof_on_open += 1;
                self.drop_conn(id, Ended::Eof, Some(h));
            }
            _ => {
                bump(&mut self.stats.handshake_other_errors, "eof during upgrade".to_string());
                self.drop_conn(id, Ended::HandshakeFailed, Some(h));
            }
        }
    }

    /// Consumes buffered input. Returns false when the connection was dropped.
    fn process<H: Handler>(&mut self, id: usize, h: &mut H) -> bool {
        let Some(Some(c)) = self.conns.get_mut(id) else {
            return false;
        };
        if c.state == State::Handshaking {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            let consumed = match resp.parse(&c.rbuf) {
                Ok(httparse::Status::Partial) => return true,
                Ok(httparse::Status::Complete(n)) => n,
                Err(e) => {
                    bump(&mut self.stats.handshake_other_errors, format!("bad http response: {e}"));
                    self.drop_conn(id, Ended::HandshakeFailed, Some(h));
                    return false;
                }
            };
            let code = resp.code.unwrap_or(0);
            if code != 101 {
                bump(&mut self.stats.handshake_http_status, code);
                self.drop_conn(id, Ended::HandshakeFailed, Some(h));
                return false;
            }
            let accept_ok = resp.headers.iter().any(|hd| {
                hd.name.eq_ignore_ascii_case("sec-websocket-accept") && hd.value == c.accept.as_bytes()
            });
            if !accept_ok {
                bump(
                    &mut self.stats.handshake_other_errors,
                    "missing/wrong Sec-WebSocket-Accept".to_string(),
                );
                self.drop_conn(id, Ended::HandshakeFailed, Some(h));
                return false;
            }
            c.rbuf.drain(..consumed);
            c.state = State::Open;
            self.pending -= 1;
            self.open += 1;
            self.stats.handshakes_ok += 1;
            let us = c.started.elapsed().as_micros() as u64;
            let _ = self.handshake_hist.record(us.max(1));
            let keep = h.on_open(id, c.tag, &mut c.wbuf);
            if !keep {
                self.close(id);
                return false;
            }
        }
        // Frames.
        let Conn { rbuf, wbuf, frag, tag, .. } = c;
        let tag = *tag;
        let mut pos = 0usize;
        let mut close_code: Option<u16> = None;
        let mut proto_err: Option<&'static str> = None;
        loop {
            let avail = rbuf.len() - pos;
            if avail < 2 {
                break;
            }
            let b0 = rbuf[pos];
            let b1 = rbuf[pos + 1];
            let fin = b0 & 0x80 != 0;
            let op = b0 & 0x0f;
            let masked = b1 & 0x80 != 0;
            let len7 = (b1 & 0x7f) as usize;
            let (mut hdr, len) = if len7 == 126 {
                if avail < 4 {
                    break;
                }
                (4, u16::from_be_bytes([rbuf[pos + 2], rbuf[pos + 3]]) as usize)
            } else if len7 == 127 {
                if avail < 10 {
                    break;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&rbuf[pos + 2..pos + 10]);
                (10, u64::from_be_bytes(b) as usize)
            } else {
                (2, len7)
            };
            let mut mask = [0u8; 4];
            if masked {
                if avail < hdr + 4 {
                    break;
                }
                mask.copy_from_slice(&rbuf[pos + hdr..pos + hdr + 4]);
                hdr += 4;
                if proto_err.is_none() {
                    proto_err = Some("masked server frame");
                }
            }
            if len > 64 * 1024 * 1024 {
                proto_err = Some("frame too large");
                break;
            }
            if avail < hdr + len {
                break;
            }
            let start = pos + hdr;
            let end = start + len;
            if masked {
                for (i, b) in rbuf[start..end].iter_mut().enumerate() {
                    *b ^= mask[i & 3];
                }
            }
            pos = end;
            let payload = &rbuf[start..end];
            match op {
                OP_TEXT | OP_BINARY => {
                    if frag.is_some() {
                        proto_err = Some("new data frame inside fragmented message");
                    }
                    if fin {
                        if op == OP_TEXT {
                            self.stats.text_frames_in += 1;
                            h.on_text(id, tag, payload, wbuf);
                        } else {
                            bump(&mut self.stats.protocol_errors, "binary frame".to_string());
                        }
                    } else {
                        *frag = Some((op, payload.to_vec()));
                    }
                }
                OP_CONT => match frag {
                    Some((fop, data)) => {
                        data.extend_from_slice(payload);
                        if fin {
                            let fop = *fop;
                            let data = frag.take().map(|f| f.1).unwrap_or_default();
                            if fop == OP_TEXT {
                                self.stats.text_frames_in += 1;
                                h.on_text(id, tag, &data, wbuf);
                            }
                        }
                    }
                    None => proto_err = Some("continuation without start"),
                },
                OP_PING => {
                    self.stats.pings_received += 1;
                    let p = payload.to_vec();
                    push_frame(wbuf, OP_PONG, &p);
                }
                OP_PONG => {}
                OP_CLOSE => {
                    let code =
                        if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 1005 };
                    close_code = Some(code);
                    break;
                }
                _ => proto_err = Some("unknown opcode"),
            }
        }
        rbuf.drain(..pos);
        if let Some(e) = proto_err {
            bump(&mut self.stats.protocol_errors, e.to_string());
        }
        if let Some(code) = close_code {
            bump(&mut self.stats.server_close_codes, code);
            let mut echo = [0u8; 2];
            echo.copy_from_slice(&code.to_be_bytes());
            if code != 1005 {
                push_frame(wbuf, OP_CLOSE, &echo);
            } else {
                push_frame(wbuf, OP_CLOSE, &[]);
            }
            self.flush(id);
            self.drop_conn(id, Ended::ServerClose, Some(h));
            return false;
        }
        true
    }
}

/// A handler that does nothing (for engine-internal calls without one).
pub(crate) struct NoHandler;

impl Handler for NoHandler {
    fn on_text(&mut self, _id: usize, _tag: u32, _text: &[u8], _out: &mut Vec<u8>) {}
}

//! Shared helpers for the integration tests: one server per test on an ephemeral port, JWTs,
//! a blocking WebSocket client whose reads are bounded (no test can hang), raw HTTP, raw
//! WebSocket sockets that never answer anything, and `/metrics` parsing.
#![allow(dead_code, unreachable_pub)]
pub mod api;
pub mod brokers;
pub mod http_backend;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use customws::{Config, ServerHandle};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Response;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::{HandshakeError, Message, WebSocket};

/// HS256 secret every test server is configured with.
pub const SECRET: &str = "test-secret";
/// Upper bound of any single blocking read in the tests.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// Base configuration of every test server: 2 shards on 127.0.0.1:0, HS256 `test-secret`,
/// short handshake and shutdown bounds.
pub fn test_config() -> Config {
    let mut cfg = Config::default();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.shards = 2;
    cfg.jwt_secret = Some(SECRET.into());
    cfg.handshake_timeout = Duration::from_secs(2);
    cfg.shutdown_timeout = Duration::from_secs(3);
    // Many tests send bursts far above a production rate; the rate-limit tests turn it on.
    cfg.rate_limit = 0;
    cfg.rate_limit_bytes = 0;
    // The suite (or a part of it, see .ci/run) runs once more under the io_uring driver; the
    // same variable configures the binaries the tests start.
    if let Ok(driver) = std::env::var("CUSTOMWS_IO_DRIVER") {
        cfg.io_driver = match driver.as_str() {
            "io_uring" => customws::config::IoDriver::IoUring,
            "auto" => customws::config::IoDriver::Auto,
            "epoll" => customws::config::IoDriver::Epoll,
            other => panic!("CUSTOMWS_IO_DRIVER={other}: expected epoll, io_uring or auto"),
        };
    }
    cfg
}

/// Starts a server from [`test_config`] after `tweak` has adjusted it.
pub fn start(tweak: impl FnOnce(&mut Config)) -> ServerHandle {
    let mut cfg = test_config();
    tweak(&mut cfg);
    let driver = cfg.io_driver;
    let server = customws::start(cfg).expect("customws::start failed");
    if driver == customws::config::IoDriver::IoUring {
        assert_eq!(server.io_driver(), "io_uring", "io_uring asked for, but the server fell back to epoll");
    }
    server
}

/// Polls `cond` every 10 ms until it holds; panics after `timeout` naming `what`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Standard claims: numeric `user_id`, `roles`, `exp` one hour ahead.
pub fn claims(user_id: i64, roles: &[&str]) -> Value {
    json!({ "user_id": user_id, "roles": roles, "exp": now_secs() + 3600 })
}

/// Signs `claims` with an HMAC algorithm and `secret`.
pub fn sign_hmac(claims: &Value, alg: Algorithm, secret: &[u8]) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret))
        .expect("encode HMAC token")
}

/// An HS256 token for `user_id` with `roles`, signed with [`SECRET`].
pub fn token(user_id: i64, roles: &[&str]) -> String {
    sign_hmac(&claims(user_id, roles), Algorithm::HS256, SECRET.as_bytes())
}

/// Path of a file under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(name)
}

/// Signs `claims` with RS256 and the committed RSA test key.
pub fn sign_rs256(claims: &Value) -> String {
    let pem = std::fs::read(fixture("rsa_private.pem")).unwrap();
    let key = EncodingKey::from_rsa_pem(&pem).expect("RSA private key");
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &key).expect("encode RS256")
}

/// Signs `claims` with ES256 and the committed P-256 test key.
pub fn sign_es256(claims: &Value) -> String {
    let pem = std::fs::read(fixture("ec_private.pem")).unwrap();
    let key = EncodingKey::from_ec_pem(&pem).expect("EC private key");
    jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &key).expect("encode ES256")
}

/// Unpadded base64url (RFC 4648 §5).
pub fn b64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize] as char);
        }
    }
    out
}

/// An unsigned token: header `{"alg":"none","typ":"JWT"}`, the claims, empty signature.
pub fn unsigned_token(claims: &Value) -> String {
    format!("{}.{}.", b64url(br#"{"alg":"none","typ":"JWT"}"#), b64url(claims.to_string().as_bytes()))
}

// ---------------------------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------------------------

/// A blocking tungstenite client over a `TcpStream` with 5 s read/write timeouts.
pub struct Client {
    /// The WebSocket.
    pub ws: WebSocket<TcpStream>,
    /// The user id the token carried (informational).
    pub user_id: i64,
    /// The 101 response.
    pub response: Response,
}

/// Why a handshake did not produce a WebSocket.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered plain HTTP (non-101).
    Http { status: u16, body: String },
    /// Anything else (I/O, protocol violation in the 101, ...).
    Other(String),
}

fn is_timeout(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io)
        if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

/// Opens a TCP connection with bounded read/write timeouts.
pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Handshake at `path_and_query` with extra request headers.
pub fn try_connect_with(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<(WebSocket<TcpStream>, Response), ConnectError> {
    let mut req = format!("ws://{addr}{path_and_query}").into_client_request().expect("client request");
    for (k, v) in headers {
        req.headers_mut()
            .append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    match tungstenite::client(req, tcp(addr)) {
        Ok(pair) => Ok(pair),
        Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => Err(ConnectError::Http {
            status: resp.status().as_u16(),
            body: resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default(),
        }),
        Err(e) => Err(ConnectError::Other(format!("{e:?}"))),
    }
}

/// Handshake that must succeed; `user_id` is recorded on the client.
pub fn connect_with(
    addr: SocketAddr,
    user_id: i64,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Client {
    match try_connect_with(addr, path_and_query, headers) {
        Ok((ws, response)) => Client { ws, user_id, response },
        Err(e) => panic!("handshake for user {user_id} at {path_and_query} failed: {e:?}"),
    }
}

/// Connects `user_id` with `roles` via `Authorization: Bearer`.
pub fn connect(addr: SocketAddr, user_id: i64, roles: &[&str]) -> Client {
    let auth = format!("Bearer {}", token(user_id, roles));
    connect_with(addr, user_id, "/ws", &[("Authorization", &auth)])
}

/// A handshake that must be refused with plain HTTP; returns (status, body).
pub fn expect_refused(addr: SocketAddr, path_and_query: &str, headers: &[(&str, &str)]) -> (u16, String) {
    match try_connect_with(addr, path_and_query, headers) {
        Ok((_, resp)) => {
            panic!("expected the upgrade to be refused, got {} (headers {:?})", resp.status(), resp.headers())
        }
        Err(ConnectError::Http { status, body }) => (status, body),
        Err(ConnectError::Other(e)) => panic!("expected an HTTP refusal, got {e}"),
    }
}

impl Client {
    /// Sends one text frame.
    pub fn send_json(&mut self, text: &str) {
        let user = self.user_id;
        self.ws
            .send(Message::text(text.to_owned()))
            .unwrap_or_else(|e| panic!("user {user}: send failed: {e:?}"));
    }

    /// Sends a JSON value as one text frame.
    pub fn send_value(&mut self, v: &Value) {
        self.send_json(&v.to_string());
    }

    /// Next text message (pings/pongs skipped); panics on close, binary, error or timeout.
    pub fn recv_text(&mut self) -> String {
        let user = self.user_id;
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return t.as_str().to_owned(),
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
                Ok(Message::Close(f)) => {
                    panic!("user {user}: expected a text message, got close {f:?}")
                }
                Ok(other) => panic!("user {user}: expected a text message, got {other:?}"),
                Err(e) if is_timeout(&e) => {
                    panic!("user {user}: no text message within the read timeout")
                }
                Err(e) => panic!("user {user}: expected a text message, read failed: {e:?}"),
            }
        }
    }

    /// Next text message parsed as JSON.
    pub fn recv_json(&mut self) -> Value {
        let t = self.recv_text();
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("user {}: not JSON ({e}): {t}", self.user_id))
    }

    /// Next text message, which must have `"type": ty`.
    pub fn recv_of_type(&mut self, ty: &str) -> Value {
        let v = self.recv_json();
        assert_eq!(v["type"], ty, "user {}: expected a {ty} message, got {v}", self.user_id);
        v
    }

    /// Reads until a close frame arrives (text messages before it are skipped, up to the read
    /// timeout) and asserts its code; completes the closing handshake. Returns the reason.
    pub fn expect_close(&mut self, code: u16) -> String {
        let user = self.user_id;
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => {
                    let got = u16::from(f.code);
                    assert_eq!(
                        got, code,
                        "user {user}: close code {got} (reason {:?}), expected {code}",
                        f.reason
                    );
                    let reason = f.reason.as_str().to_owned();
                    // Let tungstenite write the close reply; the server may already be gone.
                    let _ = self.ws.flush();
                    return reason;
                }
                Ok(Message::Close(None)) => {
                    panic!("user {user}: close frame without a code, expected {code}")
                }
                Ok(_) => continue,
                Err(e) if is_timeout(&e) => {
                    panic!("user {user}: no close frame within the read timeout (expected {code})")
                }
                Err(e) => {
                    panic!("user {user}: connection ended without a close frame (expected {code}): {e:?}")
                }
            }
        }
    }

    /// Asserts that no text/binary/close message arrives within `dur` (pings are answered).
    pub fn expect_silence(&mut self, dur: Duration) {
        let user = self.user_id;
        let deadline = Instant::now() + dur;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.ws.get_ref().set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            match self.ws.read() {
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
                Ok(m) => panic!("user {user}: expected silence for {dur:?}, got {m:?}"),
                Err(e) if is_timeout(&e) => break,
                Err(e) => panic!("user {user}: expected silence, read failed: {e:?}"),
            }
        }
        self.ws.get_ref().set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    }

    /// A `generic_request` with `pid` whose `generic_response` must be the very next message:
    /// proves the connection is open and that nothing else was queued for it before.
    pub fn roundtrip(&mut self, pid: &str) {
        self.send_value(&json!({"pid": pid, "type": "generic_request", "payload": {"probe": pid}}));
        let v = self.recv_json();
        assert_eq!(
            v["type"], "generic_response",
            "user {}: expected the generic_response for {pid} next, got {v}",
            self.user_id
        );
        assert_eq!(v["pid"], pid, "user {}: {v}", self.user_id);
    }

    /// Sends a `data_request` to `target` with `pid` and waits for the `delivered` ack.
    pub fn send_p2p_acked(&mut self, target: i64, pid: &str, payload: &Value) {
        self.send_value(&json!({
            "pid": pid, "type": "data_request", "targetUserId": target, "payload": payload
        }));
        let v = self.recv_json();
        assert_eq!(v["type"], "server_ack", "user {}: {v}", self.user_id);
        assert_eq!(v["payload"]["acknowledgedPid"], pid, "{v}");
        assert_eq!(v["payload"]["status"], "delivered", "{v}");
    }

    /// Closes with 1000 and waits (bounded) for the server's reply.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let deadline = Instant::now() + READ_TIMEOUT;
        while Instant::now() < deadline {
            match self.ws.read() {
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw sockets
// ---------------------------------------------------------------------------------------------

/// Completes a WebSocket handshake by hand (Bearer token) and returns the socket positioned
/// right after the 101 headers. Nothing is ever answered on it unless the test does so.
/// `recv_buf` sets SO_RCVBUF before connecting.
pub fn raw_ws_connect(addr: SocketAddr, token: &str, recv_buf: Option<usize>) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(n) = recv_buf {
        sock.set_recv_buffer_size(n).unwrap();
    }
    sock.connect(&addr.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    // Byte by byte so that no frame after the headers is consumed.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut b).expect("reading the 101 response");
        assert_eq!(n, 1, "EOF during handshake; got so far: {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "raw handshake refused: {head}");
    assert!(
        head.to_ascii_lowercase().contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "wrong Sec-WebSocket-Accept: {head}"
    );
    s
}

/// How a raw socket ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Orderly EOF.
    Eof,
    /// ECONNRESET / EPIPE.
    Reset,
}

/// Reads (and keeps) everything until EOF/reset; `None` in the first slot if `within` passes
/// first. Returns how it ended, the elapsed time and the bytes read.
pub fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Option<Ended>, Duration, Vec<u8>) {
    let start = Instant::now();
    let deadline = start + within;
    let mut data = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (None, start.elapsed(), data);
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (Some(Ended::Eof), start.elapsed(), data),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return (None, start.elapsed(), data);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                return (Some(Ended::Reset), start.elapsed(), data);
            }
            Err(e) => panic!("raw read failed: {e}"),
        }
    }
}
/// A masked client frame of any length, with FIN set or not (for tests that write raw bytes).
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x13, 0xc7, 0x09];
    let mut out = vec![u8::from(fin) << 7 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Splits server→client (unmasked) frames; a truncated tail is ignored.
/// Returns (opcode, payload) pairs.
pub fn parse_frames(mut data: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let opcode = data[0] & 0x0f;
        let masked = data[1] & 0x80 != 0;
        let mut len = u64::from(data[1] & 0x7f);
        let mut pos = 2usize;
        if len == 126 {
            if data.len() < 4 {
                break;
            }
            len = u64::from(u16::from_be_bytes([data[2], data[3]]));
            pos = 4;
        } else if len == 127 {
            if data.len() < 10 {
                break;
            }
            len = u64::from_be_bytes(data[2..10].try_into().unwrap());
            pos = 10;
        }
        if masked {
            pos += 4;
        }
        let end = pos + len as usize;
        if data.len() < end {
            break;
        }
        out.push((opcode, data[pos..end].to_vec()));
        data = &data[end..];
    }
    out
}

/// The code of the first close frame among `frames`, if any.
pub fn close_code(frames: &[(u8, Vec<u8>)]) -> Option<u16> {
    frames
        .iter()
        .find(|(op, _)| *op == 0x8)
        .and_then(|(_, p)| (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])))
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP
// ---------------------------------------------------------------------------------------------

/// A parsed plain-HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// Body (de-chunked), lossy UTF-8.
    pub body: String,
}

impl HttpResponse {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics with the body otherwise).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&b[..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Sends `request` verbatim on a fresh connection and reads one response.
pub fn http_raw(addr: SocketAddr, request: &str) -> HttpResponse {
    let mut s = tcp(addr);
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let (status, headers, body_start) = loop {
        let n = s.read(&mut chunk).unwrap_or_else(|e| panic!("reading HTTP response to {request:?}: {e}"));
        assert!(
            n > 0,
            "EOF before a complete HTTP response head to {request:?}; got {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut hs);
        if let httparse::Status::Complete(len) = resp.parse(&buf).expect("malformed HTTP response") {
            let headers: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                .collect();
            break (resp.code.unwrap(), headers, len);
        }
    };
    let find =
        |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
    let body: Vec<u8> = if let Some(cl) = find("content-length") {
        let cl: usize = cl.trim().parse().unwrap();
        while buf.len() < body_start + cl {
            let n = s.read(&mut chunk).expect("reading HTTP body");
            assert!(n > 0, "EOF inside an HTTP body of {cl} bytes");
            buf.extend_from_slice(&chunk[..n]);
        }
        buf[body_start..body_start + cl].to_vec()
    } else if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            if let Some(b) = dechunk(&buf[body_start..]) {
                break b;
            }
            let n = s.read(&mut chunk).expect("reading chunked HTTP body");
            assert!(n > 0, "EOF inside a chunked HTTP body");
            buf.extend_from_slice(&chunk[..n]);
        }
    } else if status == 101 || status == 204 || status == 304 {
        Vec::new()
    } else {
        // Delimited by EOF (we asked for Connection: close).
        loop {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("reading an EOF-delimited HTTP body: {e}"),
            }
        }
        buf[body_start..].to_vec()
    };
    HttpResponse { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
}

/// `GET path` with `Connection: close` and extra headers.
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    http_raw(addr, &req)
}

/// The WebSocket upgrade headers (fixed key), to combine with others in [`http_get`].
pub const UPGRADE_HEADERS: [(&str, &str); 4] = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
];

/// A raw upgrade request at `path` with extra headers; the response head only (no body read
/// for a 101). Uses `Connection: Upgrade` instead of `close`.
pub fn raw_upgrade(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> HttpResponse {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in UPGRADE_HEADERS.iter().chain(extra.iter()) {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    http_raw(addr, &req)
}

/// Asserts `body` is a JSON object with a string `error`.
pub fn assert_json_error_body(resp: &HttpResponse) {
    let v = resp.json();
    assert!(
        v["error"].is_string(),
        "expected a JSON body {{\"error\": ...}} with status {}, got {:?}",
        resp.status,
        resp.body
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// `GET /metrics` body (asserts 200).
pub fn metrics(addr: SocketAddr) -> String {
    let r = http_get(addr, "/metrics", &[]);
    assert_eq!(r.status, 200, "/metrics: {r:?}");
    r.body
}

/// Samples of metric `name` in Prometheus text: (labels inside braces, value).
pub fn metric_samples(text: &str, name: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        if &line[..name_end] != name {
            continue;
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            let close = line.rfind('}').expect("unterminated labels");
            (line[name_end + 1..close].to_owned(), &line[close + 1..])
        } else {
            (String::new(), &line[name_end..])
        };
        let value = rest.split_whitespace().next().expect("sample without value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad sample value in {line:?}"));
        out.push((labels, value));
    }
    out
}

/// Sum of all samples of `name`, or `None` when the series is absent.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let s = metric_samples(text, name);
    (!s.is_empty()).then(|| s.iter().map(|(_, v)| v).sum())
}

/// `customws_shard_connections{shard="0"}` and `{shard="1"}`.
pub fn shard_connections_in(text: &str) -> [u64; 2] {
    let samples = metric_samples(text, "customws_shard_connections");
    let mut out = [None, None];
    for (labels, v) in samples {
        for (i, slot) in out.iter_mut().enumerate() {
            if labels.contains(&format!("shard=\"{i}\"")) {
                *slot = Some(v as u64);
            }
        }
    }
    [
        out[0].unwrap_or_else(|| panic!("no customws_shard_connections{{shard=\"0\"}} in:\n{text}")),
        out[1].unwrap_or_else(|| panic!("no customws_shard_connections{{shard=\"1\"}} in:\n{text}")),
    ]
}

/// Per-shard WebSocket connection gauges from `/metrics`.
pub fn metrics_shard_connections(addr: SocketAddr) -> [u64; 2] {
    shard_connections_in(&metrics(addr))
}

/// Connects `user_id` (Bearer token) until the connection lands on `shard`, learnt from the
/// per-shard gauges around each attempt. Wrong-shard attempts are closed and their removal
/// awaited before the next try.
pub fn connect_on_shard(addr: SocketAddr, user_id: i64, roles: &[&str], shard: usize) -> Client {
    for _ in 0..40 {
        let before = metrics_shard_connections(addr);
        let c = connect(addr, user_id, roles);
        let after = metrics_shard_connections(addr);
        let d: Vec<i64> = (0..2).map(|i| after[i] as i64 - before[i] as i64).collect();
        let landed = match (d[0], d[1]) {
            (1, 0) => Some(0),
            (0, 1) => Some(1),
            _ => None,
        };
        if landed == Some(shard) {
            return c;
        }
        c.close();
        wait_until(
            Duration::from_secs(3),
            "the per-shard gauges to drop back after a wrong-shard attempt",
            || metrics_shard_connections(addr) == before,
        );
    }
    panic!("user {user_id}: 40 connections never landed on shard {shard}");
}

// ---------------------------------------------------------------------------------------------
// Formats
// ---------------------------------------------------------------------------------------------

/// Asserts `s` is an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`).
pub fn assert_rfc3339(s: &str) {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    let ok_head = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b'T' || b[10] == b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    assert!(ok_head, "not an RFC 3339 timestamp: {s:?}");
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        assert!(i > start, "empty fraction in {s:?}");
    }
    let tz = &s[i..];
    let ok_tz = tz == "Z"
        || tz == "z"
        || (tz.len() == 6
            && (tz.starts_with('+') || tz.starts_with('-'))
            && tz.as_bytes()[3] == b':'
            && tz[1..3].bytes().all(|c| c.is_ascii_digit())
            && tz[4..6].bytes().all(|c| c.is_ascii_digit()));
    assert!(ok_tz, "bad RFC 3339 offset in {s:?}");
}

/// In a raw server envelope, the exact bytes of the `payload` value must start with
/// `expected` and be followed (after optional whitespace) by `,` or `}`.
pub fn assert_raw_payload(raw: &str, expected: &str) {
    let key = raw.find("\"payload\"").unwrap_or_else(|| panic!("no \"payload\" key in {raw}"));
    let rest = raw[key + "\"payload\"".len()..].trim_start();
    let rest =
        rest.strip_prefix(':').unwrap_or_else(|| panic!("no ':' after \"payload\" in {raw}")).trim_start();
    assert!(
        rest.starts_with(expected),
        "payload not forwarded byte-for-byte:\n  sent:     {expected}\n  envelope: {raw}"
    );
    let after = rest[expected.len()..].trim_start();
    assert!(
        after.starts_with(',') || after.starts_with('}'),
        "payload value longer than what was sent:\n  sent:     {expected}\n  envelope: {raw}"
    );
}

// ---------------------------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------------------------

/// Subscribes `w` to `users` with `pid`; returns the initial presence events (the ack, in any
/// position among them, is checked and removed).
pub fn subscribe(w: &mut Client, users: &[i64], pid: &str) -> Vec<Value> {
    w.send_value(&json!({"pid": pid, "type": "presence_subscribe", "payload": {"userIds": users}}));
    let mut events = Vec::new();
    let mut acked = false;
    for _ in 0..=users.len() {
        let v = w.recv_json();
        if v["type"] == "server_ack" {
            assert!(!acked, "two acks for {pid}: {v}");
            assert_eq!(v["payload"]["acknowledgedPid"], pid, "{v}");
            assert_eq!(v["payload"]["status"], "ok", "{v}");
            acked = true;
        } else {
            assert_eq!(v["type"], "presence_event", "while subscribing: {v}");
            events.push(v);
        }
    }
    assert!(acked, "no server_ack for {pid}");
    events
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A port free at the time of asking (for a child process's listener; it may be taken
/// meanwhile, so callers that can retry do).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills the child on drop unless it already exited.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

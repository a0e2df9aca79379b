//! A minimal client for the backend HTTP API (`api_listen`, `Authorization: apikey <key>`):
//! a server with the API on, one-shot `Connection: close` calls, responses parsed into an
//! [`Answer`], and the status assertions the API tests share.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use customws::{Config, ServerHandle};
use serde_json::Value;

use super::start;

/// The API key of every test server.
pub const KEY: &str = "k";
/// Read bound of one API call in these tests (above every wait they make).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A server with the API on 127.0.0.1:0 and key [`KEY`], then `tweak`;
/// (server, WebSocket addr, API addr).
pub fn api_server(tweak: impl FnOnce(&mut Config)) -> (ServerHandle, SocketAddr, SocketAddr) {
    let server = start(|c| {
        c.api_listen = "127.0.0.1:0".parse().unwrap();
        c.api_key = Some(KEY.into());
        tweak(c);
    });
    let api = server.api_addr().expect("the API must run when api_key is set");
    let ws = server.local_addr();
    (server, ws, api)
}

/// A response read off an API call.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// Every header, in order, as (name, value).
    pub headers: Vec<(String, String)>,
    /// The body as JSON; `Value::Null` when it is empty.
    pub body: Value,
    /// The body as text.
    pub raw: String,
}

impl Answer {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body's `"error"` string; panics when there is none.
    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_else(|| panic!("no \"error\" string in {}", self.raw))
    }
}

/// Parses one response from `buf` (head + `Content-Length` body); `None` when incomplete,
/// else the answer and how many bytes of `buf` it took.
pub fn parse_answer(buf: &[u8]) -> Option<(Answer, usize)> {
    let mut hs = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut hs);
    let httparse::Status::Complete(head_len) = resp.parse(buf).expect("malformed HTTP response") else {
        return None;
    };
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
        .collect();
    let status = resp.code.unwrap();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no Content-Length in a {status} response"));
    if buf.len() < head_len + length {
        return None;
    }
    let raw = String::from_utf8_lossy(&buf[head_len..head_len + length]).into_owned();
    let body = if raw.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{status} body is not JSON ({e}): {raw}"))
    };
    Some((Answer { status, headers, body, raw }, head_len + length))
}

/// Reads one response from a blocking stream, keeping what follows it in `buf`.
pub fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>) -> Answer {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some((answer, used)) = parse_answer(buf) {
            buf.drain(..used);
            return answer;
        }
        let n = s.read(&mut chunk).unwrap_or_else(|e| panic!("reading an API response: {e}"));
        assert!(n > 0, "EOF before a complete API response; got {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One API call on a fresh `Connection: close` connection (the answer must say
/// `Connection: close` too); `key` None sends no `Authorization`.
pub fn call(api: SocketAddr, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Answer {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n");
    if let Some(key) = key {
        req.push_str(&format!("Authorization: {key}\r\n"));
    }
    if let Some(body) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let answer = read_answer(&mut s, &mut Vec::new());
    assert_eq!(answer.header("connection"), Some("close"), "asked for Connection: close: {answer:?}");
    answer
}

/// POST with a raw body text (so tests control its exact bytes) and key [`KEY`].
pub fn post_raw(api: SocketAddr, path: &str, body: &str) -> Answer {
    call(api, "POST", path, Some(&format!("apikey {KEY}")), Some(body))
}

/// POST of a JSON body with key [`KEY`].
pub fn post(api: SocketAddr, path: &str, body: &Value) -> Answer {
    post_raw(api, path, &body.to_string())
}

/// GET with key [`KEY`].
pub fn get(api: SocketAddr, path: &str) -> Answer {
    call(api, "GET", path, Some(&format!("apikey {KEY}")), None)
}

/// The answer must be a 200.
pub fn assert_ok(answer: &Answer) {
    assert_eq!(answer.status, 200, "expected 200, got {} {}", answer.status, answer.raw);
}

/// The answer must have `status` and an `{"error": "…"}` body.
pub fn assert_status(answer: &Answer, status: u16) {
    assert_eq!(answer.status, status, "expected {status}, got {} {}", answer.status, answer.raw);
    assert!(answer.body["error"].is_string(), "an error body must be {{\"error\": …}}: {}", answer.raw);
}

//! Request heads of the API: what the generic [`crate::http::request`] parser keeps, plus the
//! framing headers a request with a body needs (`Content-Length`, `Transfer-Encoding`,
//! `Connection`, `Expect`).

use crate::http::request::{MAX_HEAD_BYTES, MAX_HEADERS};

/// The parts of an API request head that matter.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Head {
    /// Method, e.g. `POST`.
    pub(super) method: String,
    /// Path without the query.
    pub(super) path: String,
    /// The query (after `?`), empty when none.
    pub(super) query: String,
    /// `Content-Length` (0 when absent).
    pub(super) content_length: usize,
    /// A `Transfer-Encoding` header was present.
    pub(super) transfer_encoding: bool,
    /// `Transfer-Encoding: chunked` (and no other coding).
    pub(super) chunked: bool,
    /// A `Content-Length` header was present.
    pub(super) has_length: bool,
    /// The client allows the connection to stay open after the response.
    pub(super) keep_alive: bool,
    /// `Expect: 100-continue`.
    pub(super) expect_continue: bool,
    /// `Authorization`.
    pub(super) authorization: Option<String>,
}

/// Outcome of parsing the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Parsed {
    /// A full head of this many bytes.
    Complete(Head, usize),
    /// More bytes are needed.
    Partial,
    /// Unacceptable; answer with this status and message, then close.
    Invalid(u16, &'static str),
}

/// Parses a request head.
pub(super) fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
            Parsed::Invalid(431, "request header too large")
        }
        Ok(httparse::Status::Complete(len)) => match extract(&req) {
            Ok(head) => Parsed::Complete(head, len),
            Err(message) => Parsed::Invalid(400, message),
        },
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            Parsed::Invalid(431, "request header too large")
        }
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => Parsed::Invalid(431, "too many request headers"),
        Err(_) => Parsed::Invalid(400, "malformed HTTP request"),
    }
}

fn extract(req: &httparse::Request<'_, '_>) -> Result<Head, &'static str> {
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let http11 = req.version == Some(1);
    let mut head = Head {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query: query.to_string(),
        keep_alive: http11,
        ..Head::default()
    };
    let mut length: Option<usize> = None;
    for header in req.headers.iter() {
        let name = header.name;
        let value = std::str::from_utf8(header.value).map(str::trim);
        if name.eq_ignore_ascii_case("content-length") {
            let parsed = value
                .ok()
                .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok().map(|n| usize::try_from(n).unwrap_or(usize::MAX)));
            match (parsed, length) {
                (None, _) => return Err("invalid Content-Length"),
                (Some(n), Some(previous)) if n != previous => return Err("conflicting Content-Length"),
                (Some(n), _) => length = Some(n),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // A second header line adds codings: only one line saying just `chunked` counts.
            head.chunked = !head.transfer_encoding && value.is_ok_and(|v| v.eq_ignore_ascii_case("chunked"));
            head.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case("connection") {
            let value = value.unwrap_or("");
            if has_token(value, "close") {
                head.keep_alive = false;
            } else if has_token(value, "keep-alive") {
                head.keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue |= value.is_ok_and(|v| v.eq_ignore_ascii_case("100-continue"));
        } else if name.eq_ignore_ascii_case("authorization") {
            head.authorization = value.ok().map(str::to_string);
        }
    }
    head.has_length = length.is_some();
    head.content_length = length.unwrap_or(0);
    Ok(head)
}

fn has_token(value: &str, token: &str) -> bool {
    value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// True when `authorization` is `apikey <key>` (scheme case-insensitive). The key comparison
/// takes the same time wherever the first difference is (only the length can leak).
pub(super) fn authorized(authorization: Option<&str>, key: &[u8]) -> bool {
    let Some((scheme, given)) = authorization.and_then(|a| a.trim().split_once(' ')) else {
        return false;
    };
    scheme.eq_ignore_ascii_case("apikey") && constant_time_eq(given.trim().as_bytes(), key)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_post_with_a_body() {
        let req = b"POST /api/v1/send?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nAuthorization: apikey k\r\nExpect: 100-continue\r\n\r\n{\"userId\":1}";
        let Parsed::Complete(head, len) = parse(req) else { panic!("not complete") };
        assert_eq!(len, req.len() - 12);
        assert_eq!(head.method, "POST");
        assert_eq!((head.path.as_str(), head.query.as_str()), ("/api/v1/send", "x=1"));
        assert_eq!(head.content_length, 12);
        assert!(head.keep_alive && head.expect_continue && !head.transfer_encoding);
        assert_eq!(head.authorization.as_deref(), Some("apikey k"));
    }

    #[test]
    fn connection_semantics() {
        let parsed = |text: &str| match parse(text.as_bytes()) {
            Parsed::Complete(head, _) => head,
            other => panic!("{other:?}"),
        };
        assert!(!parsed("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!parsed("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(parsed("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(parsed("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").transfer_encoding);
        assert!(parsed("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").chunked);
        assert!(!parsed("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").chunked);
        let twice =
            parsed("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(twice.transfer_encoding && !twice.chunked);
        assert!(parsed("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").has_length);
    }

    #[test]
    fn bad_lengths_are_refused() {
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Parsed::Invalid(400, "invalid Content-Length")
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Parsed::Invalid(400, "conflicting Content-Length")
        );
        assert_eq!(parse(b"POST / HTTP/1.1\r\nContent-Le"), Parsed::Partial);
        let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(long.as_bytes()), Parsed::Invalid(431, "request header too large"));
    }

    #[test]
    fn api_key_check() {
        assert!(authorized(Some("apikey k1"), b"k1"));
        assert!(authorized(Some("ApiKey  k1 "), b"k1"));
        assert!(!authorized(Some("apikey k2"), b"k1"));
        assert!(!authorized(Some("apikey k"), b"k1"));
        assert!(!authorized(Some("Bearer k1"), b"k1"));
        assert!(!authorized(Some("k1"), b"k1"));
        assert!(!authorized(None, b"k1"));
    }
}

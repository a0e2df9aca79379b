//! Plain HTTP/1.1 request parsing (httparse) and the checks of a WebSocket upgrade.

/// Largest request head accepted; a larger one is answered 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers accepted; more is answered 431.
pub const MAX_HEADERS: usize = 48;

/// The parts of a request the tier looks at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Raw query string (after `?`), if any.
    pub query: Option<String>,
    /// `Host`.
    pub host: Option<String>,
    /// `Origin`.
    pub origin: Option<String>,
    /// `Upgrade` contains `websocket`.
    pub upgrade_websocket: bool,
    /// `Connection` contains the `upgrade` token.
    pub connection_upgrade: bool,
    /// `Sec-WebSocket-Key`.
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version`.
    pub ws_version: Option<String>,
    /// `Sec-WebSocket-Protocol` (comma-separated offers).
    pub ws_protocol: Option<String>,
    /// `Authorization`.
    pub authorization: Option<String>,
    /// `Cookie` (several header lines are joined with `; `).
    pub cookie: Option<String>,
    /// `X-Forwarded-For` (all values joined with commas).
    pub forwarded_for: Option<String>,
    /// `Accept` (for `/metrics` content negotiation; all values joined with commas).
    pub accept: Option<String>,
    /// The request line said `HTTP/1.0` (an upgrade needs HTTP/1.1).
    pub http_1_0: bool,
}

/// Outcome of parsing the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A full request head of this many bytes.
    Complete(Box<Request>, usize),
    /// More bytes are needed.
    Partial,
    /// Unacceptable; answer with this status and message.
    Invalid(u16, &'static str),
}

/// Parses a request head.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
            Parsed::Invalid(431, "request header too large")
        }
        Ok(httparse::Status::Complete(len)) => Parsed::Complete(Box::new(extract(&req)), len),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            Parsed::Invalid(431, "request header too large")
        }
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => Parsed::Invalid(431, "too many request headers"),
        Err(_) => Parsed::Invalid(400, "malformed HTTP request"),
    }
}

fn extract(req: &httparse::Request<'_, '_>) -> Request {
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_string())),
        None => (target, None),
    };
    let mut out = Request {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query,
        http_1_0: req.version == Some(0),
        ..Request::default()
    };
    for header in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(header.value) else {
            continue;
        };
        let value = value.trim();
        let name = header.name;
        if name.eq_ignore_ascii_case("host") {
            out.host = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("origin") {
            out.origin = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("upgrade") {
            out.upgrade_websocket |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            out.connection_upgrade |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            out.ws_key = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            out.ws_version = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            out.ws_protocol = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("authorization") {
            out.authorization = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("cookie") {
            let joined = match out.cookie.take() {
                Some(before) => format!("{before}; {value}"),
                None => value.to_string(),
            };
            out.cookie = Some(joined);
        } else if name.eq_ignore_ascii_case("accept") {
            let joined = match out.accept.take() {
                Some(before) => format!("{before}, {value}"),
                None => value.to_string(),
            };
            out.accept = Some(joined);
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            let joined = match out.forwarded_for.take() {
                Some(before) => format!("{before}, {value}"),
                None => value.to_string(),
            };
            out.forwarded_for = Some(joined);
        }
    }
    out
}

fn has_token(value: &str, token: &str) -> bool {
    value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl Request {
    /// True when this is a well-formed WebSocket upgrade request (RFC 6455 §4.2.1).
    pub fn is_upgrade(&self) -> bool {
        self.method == "GET" && self.upgrade_websocket && self.connection_upgrade && self.ws_key.is_some()
    }

    /// Why an upgrade request (see [`Request::is_upgrade`]) is still unacceptable (answered
    /// 400): RFC 6455 §4.2.1 wants HTTP/1.1 and a `Sec-WebSocket-Key` that is the base64 of
    /// 16 bytes.
    pub fn upgrade_problem(&self) -> Option<&'static str> {
        use base64::Engine as _;
        if self.http_1_0 {
            return Some("a WebSocket upgrade needs HTTP/1.1");
        }
        let key = self.ws_key.as_deref().unwrap_or("");
        let decoded = base64::engine::general_purpose::STANDARD.decode(key);
        if !decoded.is_ok_and(|bytes| bytes.len() == 16) {
            return Some("Sec-WebSocket-Key must be the base64 of 16 bytes");
        }
        None
    }

    /// Value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then(|| percent_decode(value))
        })
    }

    /// Value of cookie `name`.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookie.as_deref()?.split(';').find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        })
    }
}

/// Decodes `%XX` escapes and `+`; invalid escapes are kept literally.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    // A JWT (base64url and dots) has nothing to decode: copy it whole instead of byte by byte
    // (about 3,000 instructions less per query-token handshake; BENCHMARKS.md, issue 15).
    if memchr::memchr2(b'%', b'+', bytes).is_none() {
        return s.to_owned();
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &str = "GET /ws?token=a%2Eb&x=1 HTTP/1.1\r\nHost: h:1\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nCookie: a=1; auth_token=tok\r\n\r\n";

    #[test]
    fn parses_an_upgrade() {
        let Parsed::Complete(req, len) = parse(UPGRADE.as_bytes()) else { panic!("not complete") };
        assert_eq!(len, UPGRADE.len());
        assert!(req.is_upgrade());
        assert_eq!(req.path, "/ws");
        assert_eq!(req.query_param("token").as_deref(), Some("a.b"));
        assert_eq!(req.query_param("missing"), None);
        assert_eq!(req.cookie("auth_token"), Some("tok"));
        assert_eq!(req.host.as_deref(), Some("h:1"));
    }

    #[test]
    fn partial_and_limits() {
        assert_eq!(parse(&UPGRADE.as_bytes()[..20]), Parsed::Partial);
        let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(long.as_bytes()), Parsed::Invalid(431, "request header too large"));
        let complete = format!("{long}\r\n\r\n");
        assert_eq!(
            parse(complete.as_bytes()),
            Parsed::Invalid(431, "request header too large"),
            "complete at once"
        );
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("X-{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(parse(many.as_bytes()), Parsed::Invalid(431, "too many request headers"));
        assert!(matches!(parse(b"\x00\x01 garbage\r\n\r\n"), Parsed::Invalid(400, _)));
    }

    #[test]
    fn upgrade_problems() {
        let Parsed::Complete(req, _) = parse(UPGRADE.as_bytes()) else { panic!() };
        assert_eq!(req.upgrade_problem(), None);
        for key in
            ["", "abc", "dGhlIHNhbXBsZSBub25jZQ", "dGhlIHNhbXBsZSBub25jZXg=", "!GhlIHNhbXBsZSBub25jZQ=="]
        {
            let head = UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", key);
            let Parsed::Complete(req, _) = parse(head.as_bytes()) else { panic!("{head}") };
            assert!(req.upgrade_problem().is_some(), "key {key:?}");
        }
        let Parsed::Complete(req, _) = parse(UPGRADE.replace("HTTP/1.1", "HTTP/1.0").as_bytes()) else {
            panic!()
        };
        assert_eq!(req.upgrade_problem(), Some("a WebSocket upgrade needs HTTP/1.1"));
    }

    #[test]
    fn cookie_lines_are_all_read() {
        let head = "GET /ws HTTP/1.1\r\nCookie: a=1\r\nCookie: auth_token=tok; b=2\r\nCookie: c=3\r\n\r\n";
        let Parsed::Complete(req, _) = parse(head.as_bytes()) else { panic!() };
        assert_eq!(req.cookie("auth_token"), Some("tok"));
        assert_eq!(req.cookie("a"), Some("1"));
        assert_eq!(req.cookie("c"), Some("3"));
    }

    #[test]
    fn plain_get_is_not_an_upgrade() {
        let Parsed::Complete(req, _) = parse(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n") else { panic!() };
        assert!(!req.is_upgrade());
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
        assert_eq!(percent_decode("%41+b%"), "A b%");
        assert_eq!(percent_decode("eyJh.eyJ1.c2ln-_"), "eyJh.eyJ1.c2ln-_");
        assert_eq!(percent_decode("x+y"), "x y");
    }
}

//! API responses: a status, a JSON body, and whether the connection must close after it.

use std::io::Write;

use http::StatusCode;

use crate::http::response::response;
use crate::route::WaitError;

/// One response of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reply {
    /// HTTP status.
    pub(super) status: u16,
    /// JSON body.
    pub(super) body: String,
    /// Close the connection after this response whatever the client asked.
    pub(super) close: bool,
    /// One extra header line, e.g. `Allow: POST` (405) or `WWW-Authenticate: apikey` (401).
    pub(super) header: Option<(&'static str, &'static str)>,
    /// `Content-Type` of the body.
    pub(super) content_type: &'static str,
    /// More header lines, each ending in CRLF (the admin page's security headers).
    pub(super) extra: &'static str,
}

/// The content type of every API answer but the admin page.
const JSON: &str = "application/json";

impl Reply {
    /// 200 with an HTML page and `extra` header lines.
    pub(super) fn html(body: String, extra: &'static str) -> Self {
        Reply { content_type: "text/html; charset=utf-8", extra, ..Reply::ok(body) }
    }

    /// 200 with a JSON body.
    pub(super) fn ok(body: String) -> Self {
        Reply { status: 200, body, close: false, header: None, content_type: JSON, extra: "" }
    }

    /// `{"error": message}`.
    pub(super) fn error(status: u16, message: &str) -> Self {
        let body = serde_json::json!({ "error": message }).to_string();
        Reply { status, body, close: false, header: None, content_type: JSON, extra: "" }
    }

    /// `{"error": message, "reason": reason}`: a wait that ended without an answer.
    pub(super) fn wait_error(status: u16, reason: &str, message: &str) -> Self {
        let body = serde_json::json!({ "error": message, "reason": reason }).to_string();
        Reply { status, body, close: false, header: None, content_type: JSON, extra: "" }
    }

    /// An error after which the request stream cannot be trusted: the connection closes.
    pub(super) fn fatal(status: u16, message: &str) -> Self {
        Reply { close: true, ..Reply::error(status, message) }
    }

    /// 405 naming the allowed method.
    pub(super) fn method_not_allowed(allow: &'static str) -> Self {
        Reply {
            header: Some(("Allow", allow)),
            ..Reply::error(405, &format!("method not allowed; use {allow}"))
        }
    }

    /// 401 with the scheme to use.
    pub(super) fn unauthorized() -> Self {
        let message = "missing or wrong API key (Authorization: apikey <key>)";
        Reply { header: Some(("WWW-Authenticate", "apikey")), ..Reply::error(401, message) }
    }

    /// The error message of an error reply, for the log.
    pub(super) fn message(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_default()
    }

    /// The bytes on the wire; `keep_alive` is what the client allowed.
    pub(super) fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let mut extra = self.header.map(|(name, value)| format!("{name}: {value}\r\n")).unwrap_or_default();
        extra.push_str(self.extra);
        if self.close || !keep_alive {
            return response(self.status, self.content_type, &extra, self.body.as_bytes());
        }
        let reason = StatusCode::from_u16(self.status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
        let mut out = Vec::with_capacity(128 + self.body.len());
        let _ = write!(
            out,
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{extra}Connection: keep-alive\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// The answer to a wait that ended without the client's answer.
pub(super) fn wait_failed(error: WaitError) -> Reply {
    let (status, reason) = match error {
        WaitError::TimedOut => (504, "timeout"),
        WaitError::Offline => (404, "offline"),
        WaitError::Closed => (410, "closed"),
        WaitError::ShuttingDown => (503, "shutting_down"),
        WaitError::Invalid(_) => (400, "invalid"),
        WaitError::Limit(_) => (429, "limit"),
        WaitError::OnShardThread => (500, "on_shard_thread"),
        WaitError::Unavailable => (503, "cluster_unavailable"),
    };
    Reply::wait_error(status, reason, &error.to_string())
}

/// The interim answer to `Expect: 100-continue`.
pub(super) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_and_close_encodings() {
        let reply = Reply::ok(r#"{"delivered":1}"#.into());
        let open = String::from_utf8(reply.encode(true)).unwrap();
        assert!(open.starts_with("HTTP/1.1 200 OK\r\n"), "{open}");
        assert!(open.contains("Connection: keep-alive\r\n") && open.ends_with("\r\n\r\n{\"delivered\":1}"));
        let closed = String::from_utf8(Reply::fatal(413, "too big").encode(true)).unwrap();
        assert!(closed.contains("Connection: close\r\n"), "{closed}");
        let allow = String::from_utf8(Reply::method_not_allowed("GET").encode(true)).unwrap();
        assert!(allow.starts_with("HTTP/1.1 405 Method Not Allowed\r\n") && allow.contains("Allow: GET\r\n"));
    }

    #[test]
    fn wait_errors_map_to_statuses() {
        assert_eq!(wait_failed(WaitError::TimedOut).status, 504);
        assert_eq!(wait_failed(WaitError::Offline).status, 404);
        assert_eq!(wait_failed(WaitError::Closed).status, 410);
        assert_eq!(wait_failed(WaitError::ShuttingDown).status, 503);
        assert_eq!(wait_failed(WaitError::Invalid("x")).status, 400);
        assert_eq!(wait_failed(WaitError::Limit("x")).status, 429);
        assert_eq!(wait_failed(WaitError::OnShardThread).status, 500);
        assert_eq!(wait_failed(WaitError::Closed).message(), "connection closed before the client answered");
    }
}

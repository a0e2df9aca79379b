//! Plain HTTP/1.1 responses written by the tier; every one closes the connection.

use std::io::Write;

use http::StatusCode;

/// A complete response with a body.
pub fn response(status: u16, content_type: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let reason = StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    let mut out = Vec::with_capacity(128 + body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len()
    );
    out.extend_from_slice(body);
    out
}

/// `{"error": message}` with the given status.
pub fn json_error(status: u16, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": message }).to_string();
    let extra = if status == 426 { "Sec-WebSocket-Version: 13\r\n" } else { "" };
    response(status, "application/json", extra, body.as_bytes())
}

/// The 101 answer to an accepted upgrade.
pub fn switching_protocols(ws_key: &str, subprotocol: Option<&str>) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    let mut out = Vec::with_capacity(160);
    let _ = write!(
        out,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(protocol) = subprotocol {
        let _ = write!(out, "Sec-WebSocket-Protocol: {protocol}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_sample_accept_key() {
        let text =
            String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", Some("bearer"))).unwrap();
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: bearer\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn error_body_is_json() {
        let text = String::from_utf8(json_error(401, "missing \"token\"")).unwrap();
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(text.ends_with(r#"{"error":"missing \"token\""}"#));
    }
}

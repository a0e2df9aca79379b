//! The inputs of the handshake and envelope-JSON benchmarks (issue 15), shared by the
//! micro-benchmarks and the allocation counts.

use customws::Config;
use customws::http::Gate;
use customws::http::auth::Authenticator;

/// The JWT secret of the benchmark gate.
pub(crate) const SECRET: &str = "bench-secret";

/// An HS256 token as the load generator mints it: `{"user_id", "exp", "roles": []}`.
pub(crate) fn token(user_id: i64) -> String {
    let exp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() + 3600;
    let claims = serde_json::json!({ "user_id": user_id, "exp": exp, "roles": [] });
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("jwt encode")
}

/// The request head the load generator's handshake scenario sends.
pub(crate) fn upgrade_head(token: &str) -> Vec<u8> {
    format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:18082\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// The server's gate with HS256 verification and the default configuration otherwise.
pub(crate) fn gate() -> Gate {
    let config = config();
    Gate::new(&config, Some(authenticator()))
}

/// The default configuration with the benchmark's JWT secret.
pub(crate) fn config() -> Config {
    let mut config = Config::default();
    config.jwt_secret = Some(SECRET.into());
    config
}

/// The HS256 verifier of [`config`].
pub(crate) fn authenticator() -> Authenticator {
    Authenticator::from_config(&config()).expect("authenticator")
}

/// The real envelope shapes of issue 15's JSON comparison, as (name, bytes).
pub(crate) fn envelope_shapes() -> Vec<(&'static str, Vec<u8>)> {
    let p2p_small = super::messages::p2p_message(&super::messages::payload(100));
    let presence = br#"{"pid":"c-000043","type":"presence_update","payload":{"status":"away","context":{"device":"web","note":"back in 5 minutes"}}}"#.to_vec();
    let room = br#"{"pid":"c-000044","type":"broadcast","payload":{"room":"lobby-42","body":{"text":"Hello everyone, this is a short chat message.","mentions":[12345,67890]},"meta":{"client":"web","v":3}}}"#.to_vec();
    let p2p_4k = super::messages::p2p_message(&document(4096));
    vec![("p2p_100B", p2p_small), ("presence", presence), ("room_publish", room), ("p2p_4KB", p2p_4k)]
}

/// A JSON document of about `len` bytes that looks like application data: objects with
/// numbers (one written `1.50`), escaped quotes, a `\u` escape and non-ASCII text.
pub(crate) fn document(len: usize) -> Vec<u8> {
    let mut out = b"[".to_vec();
    let mut i = 0;
    while out.len() + 120 < len {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(
            format!(
                r#"{{"id":{i},"name":"user \"{i}\"","score":1.50,"tags":["a","b"],"text":"caf\u00e9 — naïve"}}"#
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.push(b']');
    out
}

//! Development mode (`--dev`): a generated HS256 secret, ready-made tokens and the banner the
//! binary prints at start, so that two clients can talk to each other within a minute.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// How long the tokens printed by [`banner`] stay valid.
const BANNER_TOKEN_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The claims of a development token, as the handshake reads them.
#[derive(Serialize)]
struct Claims<'a> {
    user_id: i64,
    sub: String,
    roles: &'a [&'a str],
    exp: u64,
    iat: u64,
}

/// A fresh secret for `jwt_secret`: 32 random bytes from the operating system, hex-encoded.
///
/// # Panics
/// If the operating system has no random source, which leaves dev mode nothing to start with.
pub fn random_secret() -> String {
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf).expect("the operating system's random source is available");
    buf.iter().fold(String::with_capacity(64), |mut hex, byte| {
        let _ = write!(hex, "{byte:02x}");
        hex
    })
}

/// An HS256 token for `user_id` with `roles`, issued now and expiring after `ttl`; claims
/// `user_id`, `sub` (the id as a string), `roles`, `iat` and `exp`.
///
/// # Panics
/// Never in practice: HS256 signing accepts any secret and these claims always serialize.
pub fn mint_token(secret: &str, user_id: i64, roles: &[&str], ttl: Duration) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let claims =
        Claims { user_id, sub: user_id.to_string(), roles, exp: now.saturating_add(ttl.as_secs()), iat: now };
    let key = EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
        .expect("HS256 signing of serializable claims cannot fail")
}

/// The text printed at start in dev mode: the generated `secret`, 24-hour tokens for user 1
/// (role `broadcast`) and user 2 (no roles), the example-client command line for each, two
/// messages to paste, and the demo page's link for each user (the token in the URL fragment,
/// which the browser never sends to the server).
pub fn banner(listen: SocketAddr, ws_path: &str, secret: &str) -> String {
    let user1 = mint_token(secret, 1, &["broadcast"], BANNER_TOKEN_TTL);
    let user2 = mint_token(secret, 2, &[], BANNER_TOKEN_TTL);
    let base = format!("ws://{}{}", connect_address(listen), ws_path);
    let demo = format!("http://{}/demo", connect_address(listen));
    let sdk = match crate::http::demo::bundle_path() {
        Some(path) => format!("serves the SDK bundle {}", path.display()),
        None => format!(
            "needs the SDK bundle {}: not built, run `npm ci && npm run build` in clients/typescript",
            crate::http::demo::BUNDLE
        ),
    };
    format!(
        "customws is running in DEV mode: never use these settings in production.\n\
         \n\
         JWT secret (HS256): {secret}\n\
         Tokens, valid for 24h:\n  \
           user 1 (roles: broadcast): {user1}\n  \
           user 2 (no roles):         {user2}\n\
         \n\
         Connect user 1 and user 2 from two other terminals (the release build, like the server):\n  \
           cargo run --release --example client -- '{base}?token={user1}'\n  \
           cargo run --release --example client -- '{base}?token={user2}'\n\
         \n\
         Then paste into user 1's client (user 2 receives a data_event):\n  \
           {P2P_EXAMPLE}\n\
         and into user 2's client (it receives user 1's presence):\n  \
           {PRESENCE_EXAMPLE}\n\
         \n\
         Or open the demo page as user 1 and as user 2, in two browser tabs (it {sdk}):\n  \
           {demo}#token={user1}\n  \
           {demo}#token={user2}\n"
    )
}

/// A peer-to-peer message from user 1 to user 2.
const P2P_EXAMPLE: &str = r#"{"type":"data_request","targetUserId":2,"pid":"p1","payload":{"text":"hi"}}"#;
/// A presence subscription to user 1.
const PRESENCE_EXAMPLE: &str = r#"{"type":"presence_subscribe","payload":{"userIds":[1]}}"#;

/// The address a local client dials: the listen address, with the loopback address in place
/// of an unspecified one (`0.0.0.0`, `::`).
fn connect_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[derive(serde::Deserialize)]
    struct Decoded {
        user_id: i64,
        sub: String,
        roles: Vec<String>,
        exp: u64,
        iat: u64,
    }

    fn decode(token: &str, secret: &str) -> Decoded {
        let key = DecodingKey::from_secret(secret.as_bytes());
        let validation = Validation::new(Algorithm::HS256);
        jsonwebtoken::decode::<Decoded>(token, &key, &validation).expect("valid token").claims
    }

    /// The tokens in the banner's `token=` command lines, in order.
    fn banner_tokens(text: &str) -> Vec<String> {
        let tokens = text.lines().filter_map(|line| line.split_once("?token="));
        tokens.map(|(_, rest)| rest.trim_end_matches('\'').to_string()).collect()
    }

    #[test]
    fn random_secret_is_64_hex_digits_and_fresh() {
        let secret = random_secret();
        assert_eq!(secret.len(), 64);
        assert!(secret.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(secret, random_secret());
    }

    #[test]
    fn minted_token_decodes_with_the_secret() {
        let token = mint_token("s3cret", 42, &["broadcast", "admin"], Duration::from_secs(60));
        let claims = decode(&token, "s3cret");
        assert_eq!(claims.user_id, 42);
        assert_eq!(claims.sub, "42");
        assert_eq!(claims.roles, ["broadcast", "admin"]);
        assert_eq!(claims.exp - claims.iat, 60);
    }

    #[test]
    fn minted_token_is_refused_with_another_secret() {
        let token = mint_token("s3cret", 1, &[], Duration::from_secs(60));
        let key = DecodingKey::from_secret(b"other");
        let validation = Validation::new(Algorithm::HS256);
        assert!(jsonwebtoken::decode::<Decoded>(&token, &key, &validation).is_err());
    }

    #[test]
    fn banner_has_both_tokens_and_commands() {
        let secret = random_secret();
        let text = banner(SocketAddr::from(([0, 0, 0, 0], 8082)), "/ws", &secret);
        assert!(text.contains(&secret));
        let tokens = banner_tokens(&text);
        assert_eq!(tokens.len(), 2, "{text}");
        for (token, user) in tokens.iter().zip([1, 2]) {
            let shown = text.matches(token.as_str()).count();
            assert_eq!(shown, 3, "token line, command and demo link for user {user}");
            assert_eq!(decode(token, &secret).user_id, user);
        }
        assert_eq!(decode(&tokens[0], &secret).roles, ["broadcast"]);
        assert!(decode(&tokens[1], &secret).roles.is_empty());
        // The release build the server came from: no second, debug build of the crate.
        let command = "cargo run --release --example client -- 'ws://127.0.0.1:8082/ws?token=";
        assert!(text.contains(command), "{text}");
        assert!(text.contains(P2P_EXAMPLE) && text.contains(PRESENCE_EXAMPLE));
    }

    #[test]
    fn banner_links_the_demo_page_with_the_token_in_the_fragment() {
        let secret = random_secret();
        let text = banner(SocketAddr::from(([0, 0, 0, 0], 8082)), "/ws", &secret);
        let links: Vec<&str> =
            text.lines().filter_map(|l| l.trim().strip_prefix("http://127.0.0.1:8082/demo#token=")).collect();
        assert_eq!(links.len(), 2, "{text}");
        for (token, user) in links.into_iter().zip([1, 2]) {
            assert_eq!(decode(token, &secret).user_id, user);
        }
        assert!(text.contains("clients/typescript"), "{text}");
    }

    #[test]
    fn banner_keeps_a_specific_listen_address() {
        let text = banner(SocketAddr::from(([10, 0, 0, 5], 9000)), "/socket", "s");
        assert!(text.contains("'ws://10.0.0.5:9000/socket?token="), "{text}");
        let text = banner("[::]:9000".parse().unwrap(), "/ws", "s");
        assert!(text.contains("'ws://[::1]:9000/ws?token="), "{text}");
    }
}

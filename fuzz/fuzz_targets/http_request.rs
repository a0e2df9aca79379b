//! The HTTP handshake as a hostile client drives it: `http::request::parse` on arbitrary
//! bytes (the shard's connection buffer), then everything the upgrade gate does with a
//! complete head — query and cookie decoding, token lookup, JWT verification, the client IP
//! behind a trusted proxy — and the claim-set decoding of a token.
//!
//! Invariants beyond "no panic":
//! - a complete head is never longer than the input nor than `MAX_HEAD_BYTES` (the documented
//!   431 limit), and a partial one is shorter than that limit (the buffer a connection may
//!   hold is bounded);
//! - only 400 and 431 come out of the parser;
//! - reading the same bytes in two pieces gives the same answer as reading them at once;
//! - the gate answers a status the protocol defines;
//! - `client_ip` returns the peer or an untrusted address named in `X-Forwarded-For`.
#![no_main]

use std::net::IpAddr;
use std::sync::LazyLock;

use customws::Config;
use customws::core::occupancy::client_ip;
use customws::http::auth::{Authenticator, identity_from_claims};
use customws::http::request::{MAX_HEAD_BYTES, Parsed, parse};
use customws::http::{Decision, Gate};
use libfuzzer_sys::fuzz_target;

/// Secret of the gate's HS256 key; `fuzz/seeds/http_request` holds tokens signed with it.
const SECRET: &str = "fuzz-secret";

static GATE: LazyLock<Gate> = LazyLock::new(|| gate(false));
static INSECURE_GATE: LazyLock<Gate> = LazyLock::new(|| gate(true));

fn gate(insecure_user_id: bool) -> Gate {
    let mut config = Config::default();
    config.jwt_secret = Some(SECRET.into());
    config.allow_insecure_user_id = insecure_user_id;
    config.echo_path = Some("/echo".into());
    config.allowed_origins = vec!["https://app.example".into()];
    let auth = Authenticator::from_config(&config).expect("HS256 authenticator");
    Gate::new(&config, Some(auth))
}

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    check_outcome(data, &whole);
    check_split(data, &whole);
    if let Parsed::Complete(request, _) = &whole {
        check_request(request);
    }
    // A token's claims are attacker-chosen JSON once the signature checks out.
    if let Ok(claims) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = identity_from_claims(claims);
    }
});

fn check_outcome(data: &[u8], parsed: &Parsed) {
    match parsed {
        Parsed::Complete(_, len) => {
            assert!(*len <= data.len(), "head of {len} bytes in {} bytes of input", data.len());
            assert!(
                *len <= MAX_HEAD_BYTES,
                "a {len}-byte request head was accepted; heads over {MAX_HEAD_BYTES} bytes must get 431"
            );
        }
        Parsed::Partial => {
            assert!(data.len() < MAX_HEAD_BYTES, "{} bytes still partial: unbounded head buffer", data.len())
        }
        Parsed::Invalid(status, message) => {
            assert!(matches!(status, 400 | 431), "parser answered {status} {message}");
            assert!(!message.is_empty());
        }
    }
}

/// The shard parses its buffer after every read: a head complete in a prefix is the same
/// head in the whole input, and a malformed prefix never becomes a valid whole.
fn check_split(data: &[u8], whole: &Parsed) {
    if data.is_empty() {
        return;
    }
    let cut = usize::from(data[0]) * data.len() / 256;
    match (parse(&data[..cut]), whole) {
        (Parsed::Complete(first, len), Parsed::Complete(second, whole_len)) => {
            assert_eq!(len, *whole_len, "the head length depends on how the bytes arrived");
            assert_eq!(&first, second, "the parsed head depends on how the bytes arrived");
        }
        (Parsed::Complete(_, len), other) => {
            panic!("a prefix is a complete {len}-byte head but the whole input is {other:?}")
        }
        (Parsed::Invalid(status, _), Parsed::Complete(_, len)) => {
            panic!("a prefix was refused {status} but the whole input is a complete {len}-byte head")
        }
        _ => {}
    }
}

fn check_request(request: &customws::http::request::Request) {
    let _ = request.is_upgrade();
    for name in ["token", "userId", ""] {
        let _ = request.query_param(name);
    }
    let _ = request.cookie("auth_token");
    for gate in [&*GATE, &*INSECURE_GATE] {
        match gate.decide(request) {
            Decision::Refuse { status, message } => {
                assert!(matches!(status, 400 | 403 | 404 | 426), "gate refused with {status}: {message}")
            }
            Decision::Upgrade { jwt: Ok(identity), insecure_user_id: false, .. } => {
                // A verified token: the identity must be what the claims say.
                let claims: serde_json::Value = serde_json::from_str(&identity.claims).expect("claims JSON");
                assert_eq!(identity_from_claims(claims).ok(), Some(identity));
            }
            Decision::Upgrade { .. }
            | Decision::UpgradeThenClose { .. }
            | Decision::Echo
            | Decision::Health
            | Decision::Metrics
            | Decision::Ready
            | Decision::Page(_) => {}
        }
    }
    let proxy = IpAddr::from([127, 0, 0, 1]);
    let trusted = [proxy, IpAddr::from([10, 0, 0, 1])];
    let forwarded = request.forwarded_for.as_deref();
    let ip = client_ip(proxy, forwarded, &trusted);
    assert!(
        ip == proxy
            || (!trusted.contains(&ip)
                && forwarded.is_some_and(|f| f.split(',').any(|e| e.trim().parse() == Ok(ip)))),
        "client ip {ip} is neither the peer nor an untrusted X-Forwarded-For entry of {forwarded:?}"
    );
    let untrusted_peer = IpAddr::from([192, 0, 2, 7]);
    assert_eq!(client_ip(untrusted_peer, forwarded, &trusted), untrusted_peer);
}

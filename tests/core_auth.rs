//! Handshake authentication and origin checks (SPEC "Wire protocol" → "Authentication").
//!
//! Every refusal must be plain HTTP (never a 101) with a JSON `{"error": …}` body.

mod common;

use std::net::SocketAddr;

use common::*;
use customws::config::JwtAlgorithm;
use jsonwebtoken::Algorithm;
use serde_json::json;

/// Proves `c`'s server-side identity: a P2P message from it reaches a probe user with
/// `fromUserId == expected`.
fn assert_identity(addr: SocketAddr, c: &mut Client, expected: i64) {
    assert_identity_with(addr, c, expected, &token(900, &[]));
}

/// [`assert_identity`] with the probe's token given (for servers not on HS256/`test-secret`).
fn assert_identity_with(addr: SocketAddr, c: &mut Client, expected: i64, probe_token: &str) {
    let mut probe = connect_with(addr, 900, "/ws", &[("Authorization", &format!("Bearer {probe_token}"))]);
    c.send_p2p_acked(900, "who-am-i", &json!({"probe": true}));
    let ev = probe.recv_of_type("data_event");
    assert_eq!(ev["fromUserId"], expected, "identity taken from the token: {ev}");
}

/// A raw upgrade that must be refused with `status` and a JSON error body.
fn assert_refused_raw(addr: SocketAddr, path: &str, headers: &[(&str, &str)], status: u16) {
    let r = raw_upgrade(addr, path, headers);
    assert_eq!(r.status, status, "{path} {headers:?}: {r:?}");
    assert_json_error_body(&r);
    assert!(r.header("sec-websocket-accept").is_none(), "a refusal must not carry upgrade headers: {r:?}");
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[test]
fn bearer_header_token_is_accepted_and_sets_identity() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut c = connect_with(addr, 11, "/ws", &[("Authorization", &bearer(&token(11, &[])))]);
    assert_eq!(c.response.status(), 101);
    assert_identity(addr, &mut c, 11);
}

#[test]
fn query_token_is_accepted() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut c = connect_with(addr, 12, &format!("/ws?token={}", token(12, &[])), &[]);
    assert_identity(addr, &mut c, 12);
}

#[test]
fn cookie_auth_token_is_accepted() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let cookie = format!("theme=dark; auth_token={}; lang=es", token(13, &[]));
    let mut c = connect_with(addr, 13, "/ws", &[("Cookie", &cookie)]);
    assert_identity(addr, &mut c, 13);
}

#[test]
fn subprotocol_bearer_token_is_accepted_and_bearer_selected() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let offer = format!("bearer, {}", token(14, &[]));
    let mut c = connect_with(addr, 14, "/ws", &[("Sec-WebSocket-Protocol", &offer)]);
    assert_eq!(
        c.response.headers().get("Sec-WebSocket-Protocol").map(|v| v.to_str().unwrap()),
        Some("bearer"),
        "the 101 must select the `bearer` subprotocol"
    );
    assert_identity(addr, &mut c, 14);
}

#[test]
fn token_sources_are_tried_in_order_header_query_cookie() {
    let server = start(|_| {});
    let addr = server.local_addr();
    // Header beats query.
    let mut c = connect_with(
        addr,
        21,
        &format!("/ws?token={}", token(22, &[])),
        &[("Authorization", &bearer(&token(21, &[])))],
    );
    assert_identity(addr, &mut c, 21);
    // Query beats cookie.
    let cookie = format!("auth_token={}", token(23, &[]));
    let mut c = connect_with(addr, 22, &format!("/ws?token={}", token(22, &[])), &[("Cookie", &cookie)]);
    assert_identity(addr, &mut c, 22);
}

#[test]
fn sub_claim_as_decimal_string_sets_identity() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let t = sign_hmac(&json!({"sub": "31", "exp": now_secs() + 600}), Algorithm::HS256, SECRET.as_bytes());
    let mut c = connect_with(addr, 31, "/ws", &[("Authorization", &bearer(&t))]);
    assert_identity(addr, &mut c, 31);
}

#[test]
fn missing_token_is_401_with_json_error() {
    let server = start(|_| {});
    let addr = server.local_addr();
    assert_refused_raw(addr, "/ws", &[], 401);
    let (status, _) = expect_refused(addr, "/ws", &[]);
    assert_eq!(status, 401);
}

#[test]
fn malformed_tokens_are_401() {
    let server = start(|_| {});
    let addr = server.local_addr();
    for t in ["not.a.jwt", "garbage", ""] {
        assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(t))], 401);
    }
    assert_refused_raw(addr, "/ws?token=abc.def.ghi", &[], 401);
}

#[test]
fn expired_token_is_401() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let t = sign_hmac(
        &json!({"user_id": 41, "roles": [], "exp": now_secs() - 3600}),
        Algorithm::HS256,
        SECRET.as_bytes(),
    );
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&t))], 401);
}

#[test]
fn token_without_exp_is_401() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let t = sign_hmac(&json!({"user_id": 42, "roles": []}), Algorithm::HS256, SECRET.as_bytes());
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&t))], 401);
}

#[test]
fn wrong_signature_is_401() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let t = sign_hmac(&claims(43, &[]), Algorithm::HS256, b"some-other-secret");
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&t))], 401);
    // A valid token with its signature tampered with.
    let good = token(43, &[]);
    let (head, sig) = good.rsplit_once('.').unwrap();
    let mut sig: Vec<u8> = sig.bytes().collect();
    sig[0] = if sig[0] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{head}.{}", String::from_utf8(sig).unwrap());
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&tampered))], 401);
}

#[test]
fn hs384_token_with_the_right_secret_is_401() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let t = sign_hmac(&claims(44, &[]), Algorithm::HS384, SECRET.as_bytes());
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&t))], 401);
}

#[test]
fn alg_none_token_is_401() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let t = unsigned_token(&claims(45, &["admin", "broadcast"]));
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&t))], 401);
    assert_refused_raw(addr, &format!("/ws?token={t}"), &[], 401);
}

#[test]
fn rs256_server_accepts_rs256_and_rejects_other_algorithms() {
    let server = start(|c| {
        c.jwt_algorithm = JwtAlgorithm::Rs256;
        c.jwt_public_key = Some(fixture("rsa_public.pem"));
    });
    let addr = server.local_addr();
    let good = sign_rs256(&claims(51, &[]));
    let mut c = connect_with(addr, 51, "/ws", &[("Authorization", &bearer(&good))]);
    assert_identity_with(addr, &mut c, 51, &sign_rs256(&claims(900, &[])));

    let hs = token(52, &[]); // HS256 with the configured (unused) secret
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&hs))], 401);
    // Key confusion: HS256 keyed with the RSA public key PEM.
    let pem = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let confused = sign_hmac(&claims(52, &[]), Algorithm::HS256, &pem);
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&confused))], 401);
    let es = sign_es256(&claims(52, &[]));
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&es))], 401);
    let none = unsigned_token(&claims(52, &[]));
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&none))], 401);
    let expired = sign_rs256(&json!({"user_id": 52, "exp": now_secs() - 3600}));
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&expired))], 401);
}

#[test]
fn es256_server_accepts_es256_and_rejects_other_algorithms() {
    let server = start(|c| {
        c.jwt_algorithm = JwtAlgorithm::Es256;
        c.jwt_public_key = Some(fixture("ec_public.pem"));
    });
    let addr = server.local_addr();
    let good = sign_es256(&claims(61, &[]));
    let mut c = connect_with(addr, 61, "/ws", &[("Authorization", &bearer(&good))]);
    assert_identity_with(addr, &mut c, 61, &sign_es256(&claims(900, &[])));

    let hs = token(62, &[]);
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&hs))], 401);
    let pem = std::fs::read(fixture("ec_public.pem")).unwrap();
    let confused = sign_hmac(&claims(62, &[]), Algorithm::HS256, &pem);
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&confused))], 401);
    let rs = sign_rs256(&claims(62, &[]));
    assert_refused_raw(addr, "/ws", &[("Authorization", &bearer(&rs))], 401);
}

/// A server pinned to `iss-a` / `aud-a`.
fn start_with_iss_aud() -> customws::ServerHandle {
    start(|c| {
        c.jwt_issuer = Some("iss-a".into());
        c.jwt_audience = Some("aud-a".into());
    })
}

fn sign_claims(v: &serde_json::Value) -> String {
    sign_hmac(v, Algorithm::HS256, SECRET.as_bytes())
}

/// Every claim set must be refused with 401; all offenders are reported together.
fn assert_all_refused(addr: SocketAddr, claim_sets: &[serde_json::Value]) {
    let mut accepted = Vec::new();
    for bad in claim_sets {
        let r = raw_upgrade(addr, "/ws", &[("Authorization", &bearer(&sign_claims(bad)))]);
        if r.status != 401 {
            accepted.push(format!("{bad} -> {}", r.status));
        } else {
            assert_json_error_body(&r);
        }
    }
    assert!(accepted.is_empty(), "expected 401 for: {accepted:#?}");
}

#[test]
fn matching_issuer_and_audience_are_accepted() {
    let server = start_with_iss_aud();
    let addr = server.local_addr();
    let exp = now_secs() + 600;
    let good = sign_claims(&json!({"user_id": 71, "exp": exp, "iss": "iss-a", "aud": "aud-a"}));
    let mut c = connect_with(addr, 71, "/ws", &[("Authorization", &bearer(&good))]);
    let probe = sign_claims(&json!({"user_id": 900, "exp": exp, "iss": "iss-a", "aud": "aud-a"}));
    assert_identity_with(addr, &mut c, 71, &probe);
}

#[test]
fn wrong_issuer_or_audience_is_401() {
    let server = start_with_iss_aud();
    let exp = now_secs() + 600;
    assert_all_refused(
        server.local_addr(),
        &[
            json!({"user_id": 72, "exp": exp, "iss": "iss-b", "aud": "aud-a"}),
            json!({"user_id": 72, "exp": exp, "iss": "iss-a", "aud": "aud-b"}),
        ],
    );
}

#[test]
fn missing_issuer_or_audience_claim_is_401_when_configured() {
    let server = start_with_iss_aud();
    let exp = now_secs() + 600;
    assert_all_refused(
        server.local_addr(),
        &[
            json!({"user_id": 72, "exp": exp, "aud": "aud-a"}),
            json!({"user_id": 72, "exp": exp, "iss": "iss-a"}),
        ],
    );
}

#[test]
fn origin_allow_list_is_enforced() {
    let server = start(|c| c.allowed_origins = vec!["https://good.example".into()]);
    let addr = server.local_addr();
    let auth = bearer(&token(81, &[]));
    assert_refused_raw(addr, "/ws", &[("Authorization", &auth), ("Origin", "https://evil.example")], 403);
    let (status, _) =
        expect_refused(addr, "/ws", &[("Authorization", &auth), ("Origin", "https://evil.example")]);
    assert_eq!(status, 403);
    let mut c =
        connect_with(addr, 81, "/ws", &[("Authorization", &auth), ("Origin", "https://good.example")]);
    assert_eq!(c.response.status(), 101);
    c.roundtrip("origin-ok");
}

#[test]
fn default_origins_accept_no_origin_and_same_origin_but_refuse_cross_origin() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let auth = bearer(&token(82, &[]));
    // No Origin header (non-browser client).
    let mut c = connect_with(addr, 82, "/ws", &[("Authorization", &auth)]);
    assert_identity(addr, &mut c, 82);
    // Same origin as the Host header.
    let same = format!("http://{addr}");
    connect_with(addr, 82, "/ws", &[("Authorization", &auth), ("Origin", &same)]);
    // Cross origin.
    assert_refused_raw(addr, "/ws", &[("Authorization", &auth), ("Origin", "https://evil.example")], 403);
}

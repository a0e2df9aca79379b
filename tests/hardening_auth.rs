//! Hardening (issue 9) of a session's identity, over real TCP: a fractional `exp` (PyJWT
//! issues them) expires like any other, at the handshake's token and through `auth_refresh`;
//! and `auth_refresh` replaces the roles and claims, so a refresh can take a permission away.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use customws::app::application::Conn;
use customws::protocol::ClientMessage;
use customws::{Application, Handled};
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

/// Seconds since the Unix epoch, with the fraction.
fn now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// An HS256 token for `user` with `roles` whose `exp` is the JSON number `exp`.
fn token_with_exp(user: i64, roles: &[&str], exp: Value) -> String {
    sign_hmac(&json!({ "user_id": user, "roles": roles, "exp": exp }), Algorithm::HS256, SECRET.as_bytes())
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn refresh(c: &mut Client, pid: &str, token: &str) -> Value {
    c.send_value(&json!({"type": "auth_refresh", "pid": pid, "payload": {"token": token}}));
    c.recv_json()
}

fn assert_error(v: &Value, code: i64) {
    assert_eq!(v["type"], "error_notification", "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
}

fn assert_refreshed(v: &Value, pid: &str) {
    assert_eq!(v["type"], "server_ack", "{v}");
    assert_eq!(v["payload"]["acknowledgedPid"], pid, "{v}");
    assert_eq!(v["payload"]["status"], "refreshed", "{v}");
}

/// The expiry notice (401) and then the close 1008 arrive, no later than `within` from `start`.
fn expect_expiry(c: &mut Client, start: Instant, within: Duration) {
    let v = c.recv_json();
    assert_error(&v, 401);
    assert_eq!(c.expect_close(1008), "token expired");
    assert!(start.elapsed() <= within, "expired {:?} after connecting", start.elapsed());
}

/// Regression: an `exp` with a fraction was read as "no expiry" and the session lived forever.
#[test]
fn a_fractional_exp_expires_while_connected() {
    let server = start(|c| c.jwt_leeway = Duration::ZERO);
    let addr = server.local_addr();
    let token = token_with_exp(1, &[], json!(now_f64() + 1.5));
    let start = Instant::now();
    let mut c = connect_with(addr, 1, "/ws", &[("Authorization", &bearer(&token))]);
    c.roundtrip("before-exp");
    expect_expiry(&mut c, start, Duration::from_secs(3));
}

/// Regression: `auth_refresh` with a fractional `exp` turned expiry off for the session.
#[test]
fn auth_refresh_with_a_fractional_exp_keeps_the_expiry() {
    let server = start(|c| c.jwt_leeway = Duration::ZERO);
    let addr = server.local_addr();
    let start = Instant::now();
    let first = token_with_exp(1, &[], json!(now_secs() + 60));
    let mut c = connect_with(addr, 1, "/ws", &[("Authorization", &bearer(&first))]);
    let v = refresh(&mut c, "r", &token_with_exp(1, &[], json!(now_f64() + 1.5)));
    assert_refreshed(&v, "r");
    expect_expiry(&mut c, start, Duration::from_secs(3));
}

/// A non-numeric `exp` is a malformed token: 401 before the upgrade and for a refresh.
#[test]
fn a_non_numeric_exp_is_refused() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let bad = token_with_exp(1, &[], json!("tomorrow"));
    let (status, _) = expect_refused(addr, "/ws", &[("Authorization", &bearer(&bad))]);
    assert_eq!(status, 401);
    let mut c = connect(addr, 1, &[]);
    assert_error(&refresh(&mut c, "bad", &bad), 401);
    c.roundtrip("kept");
}

/// Answers `{"type": "claims"}` with the connection's claims as the application sees them.
struct ClaimsEcho;

impl Application for ClaimsEcho {
    fn on_message(&self, conn: &mut Conn<'_>, msg: &ClientMessage<'_>, _raw: &[u8]) -> Handled {
        if &*msg.kind != "claims" {
            return Handled::No;
        }
        let claims = conn.claims().to_owned();
        conn.respond(msg.pid.as_deref().unwrap_or(""), "claims_response", &claims);
        Handled::Yes
    }
}

/// Regression: a refresh kept the old token's roles, so a user whose new token no longer
/// carried `broadcast` could still broadcast; and the application kept seeing the old claims.
#[test]
fn auth_refresh_replaces_roles_and_claims() {
    let server = customws::start_with(test_config(), Arc::new(ClaimsEcho)).unwrap();
    let addr = server.local_addr();
    let mut c = connect(addr, 5, &["broadcast"]);
    let mut listener = connect(addr, 6, &[]);
    let broadcast = |c: &mut Client, pid: &str| {
        c.send_value(&json!({"pid": pid, "type": "data_request", "payload": {"hi": pid}}));
        c.recv_json()
    };
    let v = broadcast(&mut c, "b1");
    assert_eq!(v["payload"]["status"], "broadcast", "role broadcast may broadcast: {v}");
    assert_eq!(listener.recv_of_type("data_event")["payload"]["hi"], "b1");

    let plain = sign_hmac(
        &json!({"user_id": 5, "roles": [], "exp": now_secs() + 3600, "tier": "basic"}),
        Algorithm::HS256,
        SECRET.as_bytes(),
    );
    assert_refreshed(&refresh(&mut c, "r", &plain), "r");
    let v = broadcast(&mut c, "b2");
    assert_error(&v, 403);
    listener.expect_silence(Duration::from_millis(300));

    c.send_value(&json!({"pid": "c", "type": "claims"}));
    let v = c.recv_of_type("claims_response");
    assert_eq!(v["payload"]["tier"], "basic", "the application sees the refreshed claims: {v}");
    assert_eq!(v["payload"]["roles"], json!([]), "{v}");
}

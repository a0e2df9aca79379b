//! Secrets from files and key rotation: `jwt_secret_file` / `api_key_file` (systemd
//! `LoadCredential=`), a JWKS `jwt_keys_file` whose keys the token's `kid` selects with each
//! key's algorithm pinned, and SIGHUP re-reading them without dropping a connection.

mod common;
mod ops_support;

use std::time::{Duration, Instant};

use common::api::call;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ops_support::{Bin, free_port, temp_file};
use serde_json::json;

fn signed(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, user: i64) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, &claims(user, &[]), key).unwrap()
}

fn hs(kid: Option<&str>, secret: &str, user: i64) -> String {
    signed(Algorithm::HS256, kid, &EncodingKey::from_secret(secret.as_bytes()), user)
}

fn bearer(addr: std::net::SocketAddr, token: &str) -> Result<Client, u16> {
    let auth = format!("Bearer {token}");
    match try_connect_with(addr, "/ws", &[("Authorization", &auth)]) {
        Ok((ws, response)) => Ok(Client { ws, user_id: 0, response }),
        Err(ConnectError::Http { status, .. }) => Err(status),
        Err(ConnectError::Other(e)) => panic!("handshake failed oddly: {e}"),
    }
}

/// Polls until a handshake with `token` gets `status` (SIGHUP is handled asynchronously).
fn until_refused(addr: std::net::SocketAddr, token: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match bearer(addr, token) {
            Err(401) => return,
            Err(other) => panic!("{what}: expected 401, got {other}"),
            Ok(_) => assert!(Instant::now() < deadline, "{what}: still admitted 5 s after SIGHUP"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn oct(kid: &str, secret: &str) -> serde_json::Value {
    json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": b64url(secret.as_bytes())})
}

#[test]
fn secret_and_api_key_files_are_read_and_reloaded_on_sighup() {
    let secret = temp_file("jwt_secret", "first-secret\n");
    let api_key = temp_file("api_key", "key-one\n");
    let api_port = free_port().to_string();
    let api_listen = format!("127.0.0.1:{api_port}");
    let bin = Bin::start(
        "files",
        &[
            "--jwt-secret-file",
            secret.to_str().unwrap(),
            "--api-key-file",
            api_key.to_str().unwrap(),
            "--api-listen",
            &api_listen,
        ],
        &[],
    );
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", bin.child.id())).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("first-secret"),
        "the secret is not on the command line"
    );
    let api = api_listen.parse().unwrap();
    let mut kept = bearer(bin.addr, &hs(None, "first-secret", 1)).expect("the file's secret admits");
    kept.roundtrip("before");
    assert_eq!(bearer(bin.addr, &hs(None, "second-secret", 2)).err(), Some(401));
    assert_eq!(call(api, "GET", "/api/v1/users/1", Some("apikey key-one"), None).status, 200);
    assert_eq!(call(api, "GET", "/api/v1/users/1", Some("apikey key-two"), None).status, 401);

    std::fs::write(&secret, "second-secret\n").unwrap();
    std::fs::write(&api_key, "key-two").unwrap();
    bin.signal("HUP");
    until_refused(bin.addr, &hs(None, "first-secret", 3), "the old secret");
    bearer(bin.addr, &hs(None, "second-secret", 4)).expect("the new secret admits").roundtrip("new");
    kept.roundtrip("after");
    assert_eq!(call(api, "GET", "/api/v1/users/1", Some("apikey key-one"), None).status, 401);
    assert_eq!(call(api, "GET", "/api/v1/users/1", Some("apikey key-two"), None).status, 200);

    // A broken file keeps the keys in force.
    std::fs::write(&secret, "").unwrap();
    bin.signal("HUP");
    bin.wait_for_line(Duration::from_secs(5), "the reload error", |l| l.contains("JWT keys unchanged"));
    bearer(bin.addr, &hs(None, "second-secret", 5)).expect("still the second secret").roundtrip("kept");
    drop(kept);
    bin.stop();
}

#[test]
fn jwks_rotation_overlap_then_removal_with_sighup() {
    let keys = temp_file("jwks-rotate", &json!({"keys": [oct("old", "old-secret")]}).to_string());
    let bin = Bin::start("rotate", &["--jwt-keys-file", keys.to_str().unwrap()], &[]);
    let mut old_conn = bearer(bin.addr, &hs(Some("old"), "old-secret", 1)).expect("old key admits");
    old_conn.roundtrip("old-1");
    assert_eq!(bearer(bin.addr, &hs(Some("new"), "new-secret", 2)).err(), Some(401), "new key not yet known");

    // Overlap: both keys in the file; both tokens work.
    let both = json!({"keys": [oct("old", "old-secret"), oct("new", "new-secret")]});
    std::fs::write(&keys, both.to_string()).unwrap();
    bin.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut new_conn = loop {
        match bearer(bin.addr, &hs(Some("new"), "new-secret", 2)) {
            Ok(c) => break c,
            Err(401) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(status) => panic!("the new key is not accepted after SIGHUP: {status}"),
        }
    };
    bearer(bin.addr, &hs(Some("old"), "old-secret", 3)).expect("old key still admits during the overlap");
    // The kid selects the key: a token naming "new" but signed with the old secret fails.
    assert_eq!(bearer(bin.addr, &hs(Some("new"), "old-secret", 4)).err(), Some(401));

    // The old key is removed: new handshakes with it fail, connections made with it stay.
    std::fs::write(&keys, json!({"keys": [oct("new", "new-secret")]}).to_string()).unwrap();
    bin.signal("HUP");
    until_refused(bin.addr, &hs(Some("old"), "old-secret", 5), "the removed key");
    old_conn.roundtrip("old-2");
    new_conn.roundtrip("new-1");
    drop((old_conn, new_conn));
    bin.stop();
}

#[test]
fn jwks_rsa_and_ec_keys_are_chosen_by_kid_with_their_own_algorithm() {
    let server = start(|c| {
        c.jwt_secret = None;
        c.jwt_keys_file = Some(fixture("jwks_rsa_ec.json"));
    });
    let addr = server.local_addr();
    let rsa = EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    let ec = EncodingKey::from_ec_pem(&std::fs::read(fixture("ec_private.pem")).unwrap()).unwrap();
    bearer(addr, &signed(Algorithm::RS256, Some("rsa-1"), &rsa, 1)).expect("RS256 by kid").roundtrip("rs");
    bearer(addr, &signed(Algorithm::ES256, Some("ec-1"), &ec, 2)).expect("ES256 by kid").roundtrip("es");
    // The key's algorithm is pinned: the token's header cannot pick another one.
    assert_eq!(bearer(addr, &signed(Algorithm::ES256, Some("rsa-1"), &ec, 3)).err(), Some(401));
    assert_eq!(bearer(addr, &signed(Algorithm::RS384, Some("rsa-1"), &rsa, 3)).err(), Some(401));
    // HMAC with the public key as secret (algorithm confusion) is refused.
    let public = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let confused = signed(Algorithm::HS256, Some("rsa-1"), &EncodingKey::from_secret(&public), 4);
    assert_eq!(bearer(addr, &confused).err(), Some(401));
    // No kid and several keys, or an unknown kid: refused.
    assert_eq!(bearer(addr, &signed(Algorithm::RS256, None, &rsa, 5)).err(), Some(401));
    assert_eq!(bearer(addr, &signed(Algorithm::RS256, Some("other"), &rsa, 6)).err(), Some(401));
}

#[test]
fn unusable_key_files_stop_the_start() {
    let mut cfg = test_config();
    cfg.jwt_secret = None;
    cfg.jwt_keys_file = Some(temp_file("jwks-bad", r#"{"keys":[{"kty":"oct","kid":"a","k":"eA"}]}"#));
    let err = customws::start(cfg).unwrap_err().to_string();
    assert!(err.contains("has no alg"), "{err}");
    let mut cfg = test_config();
    cfg.jwt_secret = None;
    cfg.jwt_secret_file = Some("/nonexistent/customws-secret".into());
    let err = customws::start(cfg).unwrap_err().to_string();
    assert!(err.contains("cannot read jwt_secret_file"), "{err}");
}

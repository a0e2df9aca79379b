//! Handshake authentication: where the token comes from and what it must say.

use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;

use super::hmac_jwt::Parts;
use super::keys::{KeyFileError, KeyStore, Verifier};
use super::request::Request;
use crate::config::Config;

/// Permissions carried by the token's `roles` claim.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles {
    /// `broadcast`: may broadcast to every connection.
    pub broadcast: bool,
    /// `admin`: may use the admin API.
    pub admin: bool,
}

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id from `user_id` or `sub`.
    pub user_id: i64,
    /// Permissions from `roles`.
    pub roles: Roles,
    /// The whole claim set as JSON: the connection's user data for the application.
    pub claims: Box<str>,
    /// Token expiry, Unix seconds.
    pub expires_at: u64,
}

/// Why a handshake was refused (answered 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No token in any of the accepted places.
    #[error("missing token")]
    Missing,
    /// Signature, algorithm, expiry, issuer or audience check failed.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The claims name no usable user id.
    #[error("token has no numeric user_id or decimal sub claim")]
    NoUserId,
    /// No JWT key is configured, so no token can be verified.
    #[error("no JWT key configured")]
    Unconfigured,
}

/// Bad authentication configuration, reported at start-up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthConfigError {
    /// HS256 without `jwt_secret`.
    #[error("jwt_algorithm HS256 needs jwt_secret")]
    MissingSecret,
    /// RS256/ES256 without `jwt_public_key`.
    #[error("jwt_algorithm RS256/ES256 needs jwt_public_key (a PEM file)")]
    MissingPublicKey,
    /// The PEM file could not be read.
    #[error("cannot read jwt_public_key {path}: {source}")]
    ReadKey {
        /// The configured path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The PEM file is not a key of the configured kind.
    #[error("jwt_public_key is not a valid PEM key for the algorithm: {0}")]
    BadKey(jsonwebtoken::errors::Error),
    /// `jwt_secret_file`, `jwt_keys_file` or `api_key_file` is unusable.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
}

/// Where the token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer`.
    Header,
    /// `?token=`.
    Query,
    /// Cookie `auth_token`.
    Cookie,
    /// `Sec-WebSocket-Protocol: bearer, <token>`; the 101 must select `bearer`.
    Subprotocol,
}

/// Verifies tokens with the configured, pinned algorithm and key (or the JWKS key the
/// token's `kid` names; see [`KeyStore`]).
pub struct Authenticator {
    keys: KeyStore,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("keys", &self.keys)
            .field("leeway", &self.validation.leeway)
            .finish()
    }
}

impl Authenticator {
    /// Builds the verifier from configuration.
    pub fn from_config(config: &Config) -> Result<Self, AuthConfigError> {
        // Each key pins its own algorithm (see `keys`); this is the template of the claim checks.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_nbf = true;
        validation.leeway = config.jwt_leeway.as_secs();
        // A configured issuer/audience must be present, not merely match when present.
        match &config.jwt_issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                validation.required_spec_claims.insert("iss".into());
            }
            None => validation.iss = None,
        }
        match &config.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        let keys = KeyStore::new(config, validation.clone())?;
        Ok(Authenticator { keys, validation })
    }

    /// Re-reads the key files (SIGHUP); on error the keys in force stay.
    pub fn reload_keys(&self) -> Result<usize, AuthConfigError> {
        self.keys.reload()
    }

    /// Verifies `token` and extracts the identity.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let invalid = |e: jsonwebtoken::errors::Error| AuthError::Invalid(jwt_problem(&e).into());
        let keys = self.keys.current();
        // The header is decoded once: it names the key, and an HMAC key verifies from it.
        let parts = Parts::new(token).map_err(invalid)?;
        match keys.select(parts.header.kid.as_deref())? {
            Verifier::Hmac(mac, validation) => {
                // The token's own claim text is kept, not the parsed claims written again.
                let (claims, text) = parts.verify(mac, validation).map_err(invalid)?;
                identity(&claims, || text.into_boxed_str())
            }
            Verifier::Jwt(key, validation) => {
                let data = jsonwebtoken::decode::<Value>(token, key, validation).map_err(invalid)?;
                identity_from_claims(data.claims)
            }
        }
    }
}

/// What is wrong with a token, in the project's words (the 401 body and the log): never the
/// JWT library's internal parse errors.
pub(super) fn jwt_problem(error: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind as K;
    match error.kind() {
        K::ExpiredSignature => "expired",
        K::ImmatureSignature => "not yet valid",
        K::InvalidSignature => "bad signature",
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::UnsupportedAlgorithm | K::MissingAlgorithm => {
            "wrong algorithm"
        }
        K::InvalidIssuer => "wrong issuer",
        K::InvalidAudience => "wrong audience",
        K::InvalidSubject => "wrong subject",
        K::MissingRequiredClaim(claim) => match claim.as_str() {
            "exp" => "missing exp claim",
            "nbf" => "missing nbf claim",
            "iss" => "missing issuer",
            "aud" => "missing audience",
            _ => "missing a required claim",
        },
        K::InvalidClaimFormat(_) => "malformed claim",
        K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => "malformed",
        _ => "cannot be verified",
    }
}

/// Extracts user id, roles and expiry from a verified claim set.
pub fn identity_from_claims(claims: Value) -> Result<Identity, AuthError> {
    identity(&claims, || claims.to_string().into_boxed_str())
}

/// [`identity_from_claims`], with the claims' JSON text from `text`.
fn identity(claims: &Value, text: impl FnOnce() -> Box<str>) -> Result<Identity, AuthError> {
    let user_id = match (claims.get("user_id"), claims.get("sub")) {
        (Some(Value::Number(n)), _) => n.as_i64(),
        (_, Some(Value::String(s))) => s.parse().ok(),
        _ => None,
    }
    .ok_or(AuthError::NoUserId)?;
    let mut roles = Roles::default();
    if let Some(Value::Array(list)) = claims.get("roles") {
        for role in list.iter().filter_map(Value::as_str) {
            roles.broadcast |= role == "broadcast";
            roles.admin |= role == "admin";
        }
    }
    let expires_at = match claims.get("exp") {
        None => u64::MAX,
        Some(exp) => {
            unix_seconds(exp).ok_or_else(|| AuthError::Invalid("exp is not a NumericDate".into()))?
        }
    };
    Ok(Identity { user_id, roles, claims: text(), expires_at })
}

/// A JWT NumericDate (RFC 7519 §2): any non-negative JSON number of seconds. A fraction counts
/// (PyJWT and others issue them); it is cut to the whole second before it, so a token never
/// lives longer than it says. Anything else (a string, a negative or huge number) is `None`.
fn unix_seconds(value: &Value) -> Option<u64> {
    if let Some(secs) = value.as_u64() {
        return Some(secs);
    }
    let secs = value.as_f64().filter(|s| s.is_finite() && *s >= 0.0 && *s < u64::MAX as f64)?;
    Some(secs.floor() as u64)
}

/// Finds the token, in SPEC order: header, query, cookie, subprotocol.
pub fn find_token(req: &Request) -> Option<(String, TokenSource)> {
    if let Some(token) = req.authorization.as_deref().and_then(bearer) {
        return Some((token.to_string(), TokenSource::Header));
    }
    if let Some(token) = req.query_param("token").filter(|t| !t.is_empty()) {
        return Some((token, TokenSource::Query));
    }
    if let Some(token) = req.cookie("auth_token").filter(|t| !t.is_empty()) {
        return Some((token.to_string(), TokenSource::Cookie));
    }
    let offers = req.ws_protocol.as_deref()?;
    let mut parts = offers.split(',').map(str::trim);
    parts
        .any(|p| p.eq_ignore_ascii_case("bearer"))
        .then(|| parts.next())
        .flatten()
        .filter(|t| !t.is_empty())
        .map(|t| (t.to_string(), TokenSource::Subprotocol))
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(
        authorization: Option<&str>,
        query: Option<&str>,
        cookie: Option<&str>,
        protocol: Option<&str>,
    ) -> Request {
        Request {
            authorization: authorization.map(str::to_string),
            query: query.map(str::to_string),
            cookie: cookie.map(str::to_string),
            ws_protocol: protocol.map(str::to_string),
            ..Request::default()
        }
    }

    #[test]
    fn token_sources_in_order() {
        let all = request(Some("Bearer h"), Some("token=q"), Some("auth_token=c"), Some("bearer, p"));
        assert_eq!(find_token(&all), Some(("h".into(), TokenSource::Header)));
        let rest = request(Some("Basic x"), Some("token=q"), Some("auth_token=c"), None);
        assert_eq!(find_token(&rest), Some(("q".into(), TokenSource::Query)));
        assert_eq!(
            find_token(&request(None, None, Some("x=1; auth_token=c"), None)),
            Some(("c".into(), TokenSource::Cookie))
        );
        assert_eq!(
            find_token(&request(None, None, None, Some("bearer, p"))),
            Some(("p".into(), TokenSource::Subprotocol))
        );
        assert_eq!(find_token(&request(None, None, None, Some("chat, bearer"))), None);
        assert_eq!(find_token(&request(None, Some("token="), None, None)), None);
    }

    #[test]
    fn identity_from_user_id_or_sub() {
        let id = identity_from_claims(json!({"user_id": 7, "roles": ["broadcast", "x"], "exp": 10})).unwrap();
        assert_eq!((id.user_id, id.roles, id.expires_at), (7, Roles { broadcast: true, admin: false }, 10));
        assert_eq!(identity_from_claims(json!({"sub": "42"})).unwrap().user_id, 42);
        assert_eq!(identity_from_claims(json!({"sub": "alice"})), Err(AuthError::NoUserId));
        assert_eq!(identity_from_claims(json!({"user_id": "7"})), Err(AuthError::NoUserId));
    }

    #[test]
    fn any_numeric_exp_counts() {
        let exp = |v: Value| identity_from_claims(json!({"user_id": 1, "exp": v})).map(|id| id.expires_at);
        assert_eq!(exp(json!(10)), Ok(10));
        assert_eq!(exp(json!(10.9)), Ok(10), "a fraction is cut, never read as no expiry");
        assert_eq!(exp(json!(1e3)), Ok(1000));
        for bad in [json!("10"), json!(-1), json!(-0.5), json!(1e300), json!(null), json!([1])] {
            assert!(matches!(exp(bad.clone()), Err(AuthError::Invalid(_))), "exp {bad} must be refused");
        }
        assert_eq!(identity_from_claims(json!({"user_id": 1})).unwrap().expires_at, u64::MAX);
    }

    fn authenticator() -> Authenticator {
        let config = Config {
            jwt_secret: Some("s".into()),
            jwt_leeway: std::time::Duration::ZERO,
            ..Config::default()
        };
        Authenticator::from_config(&config).unwrap()
    }

    fn sign(claims: &Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(b"s");
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key).unwrap()
    }

    #[test]
    fn fractional_exp_and_nbf_are_checked_at_verification() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let auth = authenticator();
        let id = auth.verify(&sign(&json!({"user_id": 1, "exp": now + 100.5}))).unwrap();
        assert_eq!(id.expires_at, (now + 100.5).floor() as u64);
        assert!(auth.verify(&sign(&json!({"user_id": 1, "exp": now - 100.5}))).is_err(), "expired");
        let future_nbf = json!({"user_id": 1, "exp": now + 100.0, "nbf": now + 50.5});
        assert!(auth.verify(&sign(&future_nbf)).is_err(), "not yet valid");
        assert!(auth.verify(&sign(&json!({"user_id": 1, "exp": "soon"}))).is_err(), "malformed exp");
    }
}

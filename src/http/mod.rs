//! The HTTP side of a connection before it becomes a WebSocket: parsing, the upgrade gate
//! (path, origin, authentication), and plain responses.

pub mod auth;
pub mod demo;
mod hmac_jwt;
pub mod keys;
pub mod request;
pub mod response;

use auth::{AuthError, Authenticator, Identity, TokenSource, find_token};
use request::Request;

use crate::config::Config;

/// What to do with a complete request head.
#[derive(Debug)]
pub enum Decision {
    /// An acceptable upgrade; the application decides on `jwt`.
    Upgrade {
        /// The result of the JWT check.
        jwt: Result<Identity, AuthError>,
        /// Subprotocol to select in the 101 (`bearer` when the token came that way).
        subprotocol: Option<&'static str>,
        /// Admitted through seed 004's `?userId=` (dev-only mode): greet with `CONNECT`.
        insecure_user_id: bool,
    },
    /// Seed 004's contract for a bad `?userId=`: complete the handshake, then close 1002.
    UpgradeThenClose {
        /// Close reason.
        reason: &'static str,
    },
    /// An upgrade at `echo_path`: no authentication, messages echoed (conformance runs).
    Echo,
    /// `GET /health`.
    Health,
    /// `GET /metrics`.
    Metrics,
    /// A dev-mode page (`GET /demo`, `GET /demo/customws.js`): answer it as it is.
    Page(demo::Page),
    /// `GET /ready`.
    Ready,
    /// Refuse with a JSON error and close.
    Refuse {
        /// HTTP status.
        status: u16,
        /// Message for the `{"error"}` body and the log.
        message: String,
    },
}

/// The handshake rules of one server, shared read-only by every shard.
#[derive(Debug)]
pub struct Gate {
    ws_path: String,
    allowed_origins: Vec<String>,
    auth: Option<Authenticator>,
    insecure_user_id: bool,
    echo_path: Option<String>,
    dev: bool,
    /// `internal_listen` is set: `/health`, `/metrics` and `/ready` are served there, not here.
    internal: bool,
}

impl Gate {
    /// Builds the gate from configuration; without an authenticator every JWT check fails
    /// with [`AuthError::Unconfigured`] and only an application's own scheme can admit.
    pub fn new(config: &Config, auth: Option<Authenticator>) -> Self {
        let allowed_origins =
            config.allowed_origins.iter().map(|o| o.trim_end_matches('/').to_ascii_lowercase()).collect();
        Gate {
            ws_path: config.ws_path.clone(),
            allowed_origins,
            auth,
            insecure_user_id: config.allow_insecure_user_id,
            echo_path: config.echo_path.clone(),
            dev: config.dev,
            internal: config.internal_listen.is_some(),
        }
    }

    /// Decides what a request gets.
    pub fn decide(&self, req: &Request) -> Decision {
        if self.echo_path.as_deref() == Some(req.path.as_str()) {
            return match (req.is_upgrade(), req.upgrade_problem()) {
                (true, None) => Decision::Echo,
                (true, Some(problem)) => refuse(400, problem.into()),
                (false, _) => refuse(400, "expected a WebSocket upgrade request".into()),
            };
        }
        // Seed 004 clients connect to `ws://host:port?userId=…`, path `/`.
        if req.path == self.ws_path || (self.insecure_user_id && req.path == "/" && req.is_upgrade()) {
            return self.upgrade(req);
        }
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/health") if !self.internal => Decision::Health,
            ("GET", "/metrics") if !self.internal => Decision::Metrics,
            ("GET", "/ready") if !self.internal => Decision::Ready,
            ("GET", path) if self.dev && path.starts_with("/demo") => demo::route(path, &self.ws_path)
                .map_or_else(|| refuse(404, format!("no endpoint at {path}")), Decision::Page),
            _ => refuse(404, format!("no endpoint at {}", req.path)),
        }
    }

    fn upgrade(&self, req: &Request) -> Decision {
        if !req.is_upgrade() {
            return refuse(400, "expected a WebSocket upgrade request".into());
        }
        if let Some(problem) = req.upgrade_problem() {
            return refuse(400, problem.into());
        }
        if req.ws_version.as_deref() != Some("13") {
            return refuse(426, "unsupported Sec-WebSocket-Version; use 13".into());
        }
        if !self.origin_allowed(req) {
            return refuse(403, format!("origin {} not allowed", req.origin.as_deref().unwrap_or("")));
        }
        let Some((token, source)) = find_token(req) else {
            if self.insecure_user_id {
                return insecure_user_id(req);
            }
            return Decision::Upgrade {
                jwt: Err(AuthError::Missing),
                subprotocol: None,
                insecure_user_id: false,
            };
        };
        let jwt = match &self.auth {
            Some(auth) => auth.verify(&token),
            None => Err(AuthError::Unconfigured),
        };
        let subprotocol = (source == TokenSource::Subprotocol).then_some("bearer");
        Decision::Upgrade { jwt, subprotocol, insecure_user_id: false }
    }

    /// Re-reads the JWT key files (SIGHUP): `Ok(None)` when no authenticator is configured.
    pub fn reload_keys(&self) -> Result<Option<usize>, auth::AuthConfigError> {
        self.auth.as_ref().map(Authenticator::reload_keys).transpose()
    }

    /// Verifies a token with the configured key (for `auth_refresh`).
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.auth.as_ref().map_or(Err(AuthError::Unconfigured), |auth| auth.verify(token))
    }

    /// `allowed_origins`: `*` allows any; an empty list allows only the request's own host;
    /// otherwise exact (case-insensitive) matches. A request without `Origin` is not from a
    /// browser and is allowed.
    fn origin_allowed(&self, req: &Request) -> bool {
        let Some(origin) = req.origin.as_deref() else {
            return true;
        };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.allowed_origins.is_empty() {
            let host = origin.split_once("://").map_or(origin.as_str(), |(_, rest)| rest);
            return req.host.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(host));
        }
        self.allowed_origins.iter().any(|allowed| allowed == "*" || *allowed == origin)
    }
}

/// Dev-only seed 004 mode: `?userId=<int>` is the identity, unverified.
fn insecure_user_id(req: &Request) -> Decision {
    match req.query_param("userId").map(|v| v.parse::<i64>()) {
        Some(Ok(user_id)) => {
            let claims = format!("{{\"user_id\":{user_id},\"insecure\":true}}").into_boxed_str();
            let identity = Identity { user_id, roles: auth::Roles::default(), claims, expires_at: u64::MAX };
            Decision::Upgrade { jwt: Ok(identity), subprotocol: None, insecure_user_id: true }
        }
        Some(Err(_)) => Decision::UpgradeThenClose { reason: "userId must be an integer" },
        None => Decision::UpgradeThenClose { reason: "userId required" },
    }
}

fn refuse(status: u16, message: String) -> Decision {
    Decision::Refuse { status, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(origins: &[&str]) -> Gate {
        let config = Config {
            jwt_secret: Some("s".into()),
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            ..Config::default()
        };
        Gate::new(&config, Some(Authenticator::from_config(&config).unwrap()))
    }

    fn req(origin: Option<&str>) -> Request {
        Request {
            host: Some("example.com:8082".into()),
            origin: origin.map(str::to_string),
            ..Request::default()
        }
    }

    #[test]
    fn default_origin_policy_is_same_host() {
        let g = gate(&[]);
        assert!(g.origin_allowed(&req(None)));
        assert!(g.origin_allowed(&req(Some("https://example.com:8082"))));
        assert!(!g.origin_allowed(&req(Some("https://evil.example"))));
    }

    #[test]
    fn listed_and_wildcard_origins() {
        let g = gate(&["https://good.example/"]);
        assert!(g.origin_allowed(&req(Some("https://GOOD.example"))));
        assert!(!g.origin_allowed(&req(Some("https://evil.example"))));
        assert!(gate(&["*"]).origin_allowed(&req(Some("https://any.example"))));
    }

    #[test]
    fn routes_paths() {
        let g = gate(&[]);
        let get = |path: &str| Request { method: "GET".into(), path: path.into(), ..Request::default() };
        assert!(matches!(g.decide(&get("/health")), Decision::Health));
        assert!(matches!(g.decide(&get("/metrics")), Decision::Metrics));
        assert!(matches!(g.decide(&get("/ready")), Decision::Ready));
        assert!(matches!(g.decide(&get("/nope")), Decision::Refuse { status: 404, .. }));
        assert!(matches!(g.decide(&get("/ws")), Decision::Refuse { status: 400, .. }));
    }

    #[test]
    fn demo_page_only_in_dev_mode() {
        let get = |path: &str| Request { method: "GET".into(), path: path.into(), ..Request::default() };
        let config = Config { dev: true, ..Config::default() };
        let dev = Gate::new(&config, None);
        assert!(matches!(gate(&[]).decide(&get("/demo")), Decision::Refuse { status: 404, .. }));
        assert!(matches!(dev.decide(&get("/demo")), Decision::Page(demo::Page { status: 200, .. })));
        assert!(matches!(dev.decide(&get("/demo/customws.js")), Decision::Page(_)));
        assert!(matches!(dev.decide(&get("/demo/x")), Decision::Refuse { status: 404, .. }));
    }
}

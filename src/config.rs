//! Server configuration: one TOML file, `CUSTOMWS_*` environment variables and command-line
//! flags, all with the same key names. Precedence: flag > environment > file > default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// JWT signature algorithm accepted at the handshake. Pinned by configuration, never taken
/// from the token header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with `jwt_secret`.
    Hs256,
    /// RSA PKCS#1 v1.5 SHA-256 with the PEM public key at `jwt_public_key`.
    Rs256,
    /// ECDSA P-256 SHA-256 with the PEM public key at `jwt_public_key`.
    Es256,
}

/// Who receives a `presence_update` that names no target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PresenceScope {
    /// Users subscribed to the sender's presence (and, later, the sender's rooms).
    Watchers,
    /// Every connection of the server (the seed's behaviour; small deployments only).
    All,
}

/// The whole server configuration. Construct with [`Config::default`] and set fields, or load
/// from file/environment/flags with [`Config::load`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Address every shard's `SO_REUSEPORT` listener binds (`listen`).
    pub listen: SocketAddr,
    /// Event-loop threads; 0 means one per available core (`shards`).
    pub shards: usize,
    /// Path of the WebSocket endpoint (`ws_path`).
    pub ws_path: String,
    /// Deadline for a connection to complete its HTTP request/upgrade (`handshake_timeout`).
    pub handshake_timeout: Duration,
    /// A connection whose queued output makes no progress for this long is closed (`write_wait`).
    pub write_wait: Duration,
    /// No pong within this long after the last one: the connection is closed (`pong_wait`).
    pub pong_wait: Duration,
    /// Interval between server pings; must be below `pong_wait` (`ping_period`).
    pub ping_period: Duration,
    /// Largest accepted client message in bytes, after reassembly (`max_message_size`).
    pub max_message_size: usize,
    /// Outgoing queue bound per connection, in messages (`send_queue`, the seed's
    /// `SendChannelBuffer`).
    pub send_queue: usize,
    /// Outgoing queue bound per connection, in bytes (`send_queue_bytes`).
    pub send_queue_bytes: usize,
    /// Default wait for a client's `client_ack` (`ack_timeout`).
    pub ack_timeout: Duration,
    /// Default wait for a client's reply to a server request (`request_timeout`).
    pub request_timeout: Duration,
    /// Origins allowed to open a WebSocket; empty means same-origin only (or no `Origin`
    /// header), `*` allows any (`allowed_origins`).
    pub allowed_origins: Vec<String>,
    /// Process-wide connection limit; 0 means unlimited (`max_connections`).
    pub max_connections: usize,
    /// Connections per user: 0 unlimited, 1 replaces the older connection (close 4000), N keeps
    /// the newest N (`connections_per_user`).
    pub connections_per_user: usize,
    /// HS256 secret (`jwt_secret`).
    pub jwt_secret: Option<String>,
    /// Path to a PEM public key for RS256/ES256 (`jwt_public_key`).
    pub jwt_public_key: Option<PathBuf>,
    /// Accepted JWT algorithm (`jwt_algorithm`: `HS256`, `RS256`, `ES256`).
    pub jwt_algorithm: JwtAlgorithm,
    /// Required `iss` claim, when set (`jwt_issuer`).
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set (`jwt_audience`).
    pub jwt_audience: Option<String>,
    /// Let any authenticated client broadcast, not only role `broadcast`
    /// (`allow_client_broadcast`).
    pub allow_client_broadcast: bool,
    /// Fan-out scope of untargeted presence updates (`presence_scope`: `watchers` or `all`).
    pub presence_scope: PresenceScope,
    /// Dev-only: accept `?userId=<int>` without a token (`allow_insecure_user_id`).
    pub allow_insecure_user_id: bool,
    /// Bound on graceful shutdown (`shutdown_timeout`).
    pub shutdown_timeout: Duration,
    /// Log level: error, warn, info, debug, trace (`log_level`).
    pub log_level: String,
    /// Address of the backend HTTP API listener (`api_listen`).
    pub api_listen: SocketAddr,
    /// API key for the backend HTTP API; the API is off without one (`api_key`).
    pub api_key: Option<String>,
    /// Path of an unauthenticated echo endpoint for conformance runs; off when unset
    /// (`echo_path`).
    pub echo_path: Option<String>,
    /// Development mode: generate a secret and print ready-to-use tokens (`dev`).
    pub dev: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8082)),
            shards: 0,
            ws_path: "/ws".to_string(),
            handshake_timeout: Duration::from_secs(5),
            write_wait: Duration::from_secs(10),
            pong_wait: Duration::from_secs(60),
            ping_period: Duration::from_secs(54),
            max_message_size: 64 * 1024,
            send_queue: 256,
            send_queue_bytes: 1024 * 1024,
            ack_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            allowed_origins: Vec::new(),
            max_connections: 0,
            connections_per_user: 0,
            jwt_secret: None,
            jwt_public_key: None,
            jwt_algorithm: JwtAlgorithm::Hs256,
            jwt_issuer: None,
            jwt_audience: None,
            allow_client_broadcast: false,
            presence_scope: PresenceScope::Watchers,
            allow_insecure_user_id: false,
            shutdown_timeout: Duration::from_secs(10),
            log_level: "info".to_string(),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8083)),
            api_key: None,
            echo_path: None,
            dev: false,
        }
    }
}

impl Config {
    /// Number of shards to run: `shards`, or the available cores when 0.
    pub fn effective_shards(&self) -> usize {
        if self.shards > 0 {
            return self.shards;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

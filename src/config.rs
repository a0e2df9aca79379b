//! Server configuration: one TOML file, `CUSTOMWS_*` environment variables and command-line
//! flags, all with the same key names. Precedence: flag > environment > file > default.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogFormat {
    /// `2026-01-01T00:00:00.000Z INFO  target] message key=value` (env_logger's format).
    Text,
    /// One JSON object per line: `ts`, `level`, `target`, `msg`, `fields`.
    Json,
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

/// How the shards do their I/O (`io_driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoDriver {
    /// Readiness with epoll (mio), then `read`/`writev`: every kernel.
    Epoll,
    /// io_uring (multishot accept and receive into a provided-buffer ring, sends batched into
    /// one submission per loop turn); falls back to epoll, with a warning, where the ring
    /// cannot be set up (old kernel, seccomp, `io_uring_disabled`, or a build without the
    /// `io-uring` feature).
    IoUring,
    /// io_uring where it can be set up, else epoll (the fallback logged at start-up).
    Auto,
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
    /// Authentications the application completes later (`Application::authenticate_deferred`)
    /// waiting at once per shard; beyond it the handshake gets 503 (`auth_max_pending`).
    pub auth_max_pending: usize,
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
    /// File holding the HS256 secret, re-read on SIGHUP (`jwt_secret_file`).
    pub jwt_secret_file: Option<PathBuf>,
    /// JWKS document of verification keys chosen by the token's `kid`, re-read on SIGHUP
    /// (`jwt_keys_file`).
    pub jwt_keys_file: Option<PathBuf>,
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
    /// JWT claim whose value is included as `info` in presence events (`presence_info_claim`).
    pub presence_info_claim: Option<String>,
    /// POST `{"event":"online"|"offline","userId","at"}` to this URL on each user's first
    /// connect / last disconnect (`presence_webhook_url`); off when unset.
    pub presence_webhook_url: Option<String>,
    /// Dev-only: accept `?userId=<int>` without a token (`allow_insecure_user_id`).
    pub allow_insecure_user_id: bool,
    /// Bound on graceful shutdown (`shutdown_timeout`).
    pub shutdown_timeout: Duration,
    /// Log filter: a level, or `env_logger` directives like `info,customws::shard=debug`
    /// (`log_level`).
    pub log_level: String,
    /// Log line format (`log_format`: `text` or `json`).
    pub log_format: LogFormat,
    /// The shards' I/O driver (`io_driver`: `epoll`, `io_uring` or `auto`).
    pub io_driver: IoDriver,
    /// Address of the backend HTTP API listener (`api_listen`).
    pub api_listen: SocketAddr,
    /// API key for the backend HTTP API; the API is off without one (`api_key`).
    pub api_key: Option<String>,
    /// File holding the API key, re-read on SIGHUP (`api_key_file`).
    pub api_key_file: Option<PathBuf>,
    /// On shutdown, connections are closed spread over this window (`drain_window`).
    pub drain_window: Duration,
    /// Backend API connections open at once; more are refused 503; 0 means unlimited
    /// (`api_max_connections`).
    pub api_max_connections: usize,
    /// Address serving `/metrics`, `/health` and `/ready` instead of the public port; unset
    /// serves them on the public port (`internal_listen`).
    pub internal_listen: Option<SocketAddr>,
    /// Path of an unauthenticated echo endpoint for conformance runs; off when unset
    /// (`echo_path`).
    pub echo_path: Option<String>,
    /// Client messages per second per connection and per user, across its connections and reconnects (`rate_limit`).
    pub rate_limit: usize,
    /// Burst above the rate (`rate_limit_burst`).
    pub rate_limit_burst: usize,
    /// Client message bytes per second per connection (`rate_limit_bytes`).
    pub rate_limit_bytes: usize,
    /// Refusals within 10 s that close the connection with 1008 (`rate_limit_close_after`).
    pub rate_limit_close_after: usize,
    /// WebSocket connections per client IP (`max_connections_per_ip`).
    pub max_connections_per_ip: usize,
    /// Proxies whose `X-Forwarded-For` is believed (`trusted_proxies`).
    pub trusted_proxies: Vec<String>,
    /// WebSocket connections per user, refused beyond (`max_connections_per_user`).
    pub max_connections_per_user: usize,
    /// Allowed clock skew on `exp`/`nbf` (`jwt_leeway`).
    pub jwt_leeway: Duration,
    /// Presence statuses that expire by themselves (`transient_statuses`).
    pub transient_statuses: Vec<String>,
    /// Lifetime of a transient status (`transient_ttl`).
    pub transient_ttl: Duration,
    /// Window in which identical presence updates are coalesced (`presence_coalesce`).
    pub presence_coalesce: Duration,
    /// Rooms one connection may be in (`max_rooms_per_connection`).
    pub max_rooms_per_connection: usize,
    /// Members one room may have (`max_room_members`).
    pub max_room_members: usize,
    /// Rooms up to this size announce joins and leaves (`room_presence_max_members`).
    pub room_presence_max_members: usize,
    /// Most members in one `room_presence` answer (`room_presence_page`).
    pub room_presence_page: usize,
    /// Members per second one connection's `room_presence` and `presence_subscribe` may cost
    /// (`presence_budget`).
    pub presence_budget: usize,
    /// Bytes of client-originated messages a shard's inbox may hold (`inbox_max_bytes`).
    pub inbox_max_bytes: usize,
    /// Built-in client operations turned off, answered 403 `operation disabled`
    /// (`disabled_ops`): any of `data_request`, `broadcast`, `presence_subscribe`,
    /// `presence_update`, `join`, `room_broadcast`, `room_presence`.
    pub disabled_ops: Vec<String>,
    /// Backend to forward `generic_request` and unknown types to (`backend_url`).
    pub backend_url: Option<String>,
    /// Bound on one backend call (`backend_timeout`).
    pub backend_timeout: Duration,
    /// Backend calls in flight at once (`backend_concurrency`).
    pub backend_concurrency: usize,
    /// Backend calls waiting for a worker (`backend_queue`).
    pub backend_queue: usize,
    /// Backend asked before built-in client operations (`authorize_url`); unset = allow.
    pub authorize_url: Option<String>,
    /// Which built-in operations go to `authorize_url` (`authorize_ops`); same names as
    /// `disabled_ops`; default all.
    pub authorize_ops: Vec<String>,
    /// Messages of one connection that may wait for authorization decisions
    /// (`authorize_max_pending`); one more is refused 429.
    pub authorize_max_pending: usize,
    /// Development mode: generate a secret and print ready-to-use tokens (`dev`).
    pub dev: bool,
    /// Broker of a multi-node cluster, `redis://host:port[/db]` or `nats://host:port`; unset
    /// runs one node (`cluster`).
    pub cluster: Option<String>,
    /// This node's name in the cluster, `[A-Za-z0-9_-]{1,64}`; unset = `{hostname}-{pid}-{random}`
    /// (`node_id`).
    pub node_id: Option<String>,
    /// Prefix of every broker channel, subject and key (`cluster_prefix`).
    pub cluster_prefix: String,
    /// Interval between this node's heartbeats on the broker (`cluster_heartbeat`).
    pub cluster_heartbeat: Duration,
    /// A node not heard for this long is dead: its users go offline (`cluster_node_ttl`).
    pub cluster_node_ttl: Duration,
    /// Bound on a cross-node operation's wait for the broker or other nodes (`cluster_timeout`).
    pub cluster_timeout: Duration,
    /// Bytes waiting for the broker before publishes are shed (`cluster_queue_bytes`).
    pub cluster_queue_bytes: usize,
    /// Cross-node operations in flight at once (`cluster_max_pending`).
    pub cluster_max_pending: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8082)),
            shards: 0,
            ws_path: "/ws".to_string(),
            handshake_timeout: Duration::from_secs(5),
            auth_max_pending: 1024,
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
            jwt_secret_file: None,
            jwt_keys_file: None,
            jwt_public_key: None,
            jwt_algorithm: JwtAlgorithm::Hs256,
            jwt_issuer: None,
            jwt_audience: None,
            allow_client_broadcast: false,
            presence_scope: PresenceScope::Watchers,
            presence_info_claim: None,
            presence_webhook_url: None,
            allow_insecure_user_id: false,
            shutdown_timeout: Duration::from_secs(10),
            log_level: "info".to_string(),
            log_format: LogFormat::Text,
            io_driver: IoDriver::Epoll,
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8083)),
            api_key: None,
            api_key_file: None,
            drain_window: Duration::ZERO,
            api_max_connections: 1024,
            internal_listen: None,
            echo_path: None,
            rate_limit: 100,
            rate_limit_burst: 200,
            rate_limit_bytes: 1024 * 1024,
            rate_limit_close_after: 100,
            max_connections_per_ip: 0,
            trusted_proxies: Vec::new(),
            max_connections_per_user: 0,
            jwt_leeway: Duration::from_secs(60),
            transient_statuses: vec!["typing".to_string()],
            transient_ttl: Duration::from_secs(5),
            presence_coalesce: Duration::from_secs(1),
            max_rooms_per_connection: 64,
            max_room_members: 100_000,
            room_presence_max_members: 1000,
            room_presence_page: 100,
            presence_budget: 5000,
            inbox_max_bytes: 16 * 1024 * 1024,
            disabled_ops: Vec::new(),
            backend_url: None,
            backend_timeout: Duration::from_secs(5),
            backend_concurrency: 16,
            backend_queue: 1024,
            authorize_url: None,
            authorize_ops: crate::protocol::router::BuiltinOp::ALL
                .iter()
                .map(|op| op.name().to_string())
                .collect(),
            authorize_max_pending: 16,
            dev: false,
            cluster: None,
            node_id: None,
            cluster_prefix: "customws".to_string(),
            cluster_heartbeat: Duration::from_secs(1),
            cluster_node_ttl: Duration::from_secs(3),
            cluster_timeout: Duration::from_secs(2),
            cluster_queue_bytes: 16 * 1024 * 1024,
            cluster_max_pending: 65_536,
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

    /// Loads the configuration from command-line `args` (without the program name) and the
    /// environment `env`, reading the TOML file named by `--config PATH` or `CUSTOMWS_CONFIG`
    /// when there is one, then [validates](Config::validate) it.
    ///
    /// Precedence: flag > environment > file > default. `--help` or `-h` returns
    /// [`ConfigError::Help`] with the text to print.
    pub fn load<A, E>(args: A, env: E) -> Result<Config, ConfigError>
    where
        A: IntoIterator<Item = String>,
        E: IntoIterator<Item = (String, String)>,
    {
        let flags = parse_args(args)?;
        let env = parse_env(env)?;
        let file = match flags.config.as_ref().or(env.config.as_ref()) {
            Some(path) => read_file(path)?,
            None => Vec::new(),
        };
        let mut config = Config::default();
        for setting in file.iter().chain(&env.settings).chain(&flags.settings) {
            setting.apply(&mut config)?;
        }
        config.validate()?;
        Ok(config)
    }

    /// [`Config::load`] from this process's arguments and environment.
    pub fn from_process() -> Result<Config, ConfigError> {
        let args = std::env::args_os().skip(1);
        let args = args.map(|arg| arg.to_string_lossy().into_owned());
        let env = std::env::vars_os()
            .map(|(name, value)| (name.to_string_lossy().into_owned(), value.to_string_lossy().into_owned()));
        Config::load(args, env)
    }

    /// Checks the rules that involve more than one key or a bound: `ping_period < pong_wait`,
    /// `send_queue >= 1`, `max_message_size >= 125`, and the key material the chosen
    /// `jwt_algorithm` needs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_timers()?;
        self.validate_bounds()?;
        self.validate_proxies()?;
        self.validate_cluster()?;
        self.validate_auth()
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        if self.cluster_heartbeat.is_zero() {
            return Err(invalid("cluster_heartbeat", "cluster_heartbeat must be greater than 0".into()));
        }
        if self.cluster_node_ttl < self.cluster_heartbeat * 2 {
            let reason = format!(
                "cluster_node_ttl ({}) must be at least twice cluster_heartbeat ({})",
                show_duration(&self.cluster_node_ttl),
                show_duration(&self.cluster_heartbeat)
            );
            return Err(invalid("cluster_node_ttl", reason));
        }
        Ok(())
    }

    /// The `trusted_proxies` as addresses (validated by [`Config::validate`]; invalid entries
    /// are skipped here).
    pub fn trusted_proxy_ips(&self) -> Vec<std::net::IpAddr> {
        self.trusted_proxies.iter().filter_map(|p| p.parse().ok()).collect()
    }

    fn validate_proxies(&self) -> Result<(), ConfigError> {
        match self.trusted_proxies.iter().find(|p| p.parse::<std::net::IpAddr>().is_err()) {
            Some(bad) => Err(invalid("trusted_proxies", format!("{bad:?} is not an IP address"))),
            None => Ok(()),
        }
    }

    /// The configuration keys as a Markdown table (key, flag / env, default, meaning), for the
    /// README.
    pub fn markdown_table() -> String {
        let defaults = Config::default();
        let mut out = String::from("| key | flag / env | default | meaning |\n|---|---|---|---|\n");
        out.push_str(&format!("| `config` | `--config` / `{CONFIG_ENV}` | none | {CONFIG_HELP} |\n"));
        for key in KEYS {
            out.push_str(&format!(
                "| `{}` | `{}` / `{}` | {} | {} |\n",
                key.name,
                key.flag(),
                key.env(),
                markdown_code(&key.default_text(&defaults)),
                key.help.replace('|', "\\|"),
            ));
        }
        out
    }

    fn validate_timers(&self) -> Result<(), ConfigError> {
        if self.ping_period.is_zero() {
            return Err(invalid("ping_period", "ping_period must be greater than 0".into()));
        }
        if self.ping_period >= self.pong_wait {
            let reason = format!(
                "ping_period ({}) must be less than pong_wait ({})",
                show_duration(&self.ping_period),
                show_duration(&self.pong_wait)
            );
            return Err(invalid("ping_period", reason));
        }
        Ok(())
    }

    fn validate_bounds(&self) -> Result<(), ConfigError> {
        if self.send_queue < 1 {
            return Err(invalid("send_queue", "send_queue must be at least 1".into()));
        }
        if self.max_message_size < 125 {
            let reason = format!("max_message_size ({}) must be at least 125 bytes", self.max_message_size);
            return Err(invalid("max_message_size", reason));
        }
        if let Err(unknown) = crate::protocol::router::OpSet::from_names(&self.disabled_ops) {
            let known: Vec<&str> =
                crate::protocol::router::BuiltinOp::ALL.iter().map(|op| op.name()).collect();
            return Err(invalid(
                "disabled_ops",
                format!("disabled_ops: unknown operation {unknown:?}; known: {}", known.join(", ")),
            ));
        }
        if let Err(unknown) = crate::protocol::router::OpSet::from_names(&self.authorize_ops) {
            let known: Vec<&str> =
                crate::protocol::router::BuiltinOp::ALL.iter().map(|op| op.name()).collect();
            return Err(invalid(
                "authorize_ops",
                format!("authorize_ops: unknown operation {unknown:?}; known: {}", known.join(", ")),
            ));
        }
        if let Some(url) = &self.authorize_url {
            let ok = url.trim().parse::<http::Uri>().is_ok_and(|uri| {
                matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some_and(|h| !h.is_empty())
            });
            if !ok {
                let reason = format!("authorize_url {url:?} is not an absolute http:// or https:// URL");
                return Err(invalid("authorize_url", reason));
            }
        }
        if self.authorize_url.is_some() && !cfg!(feature = "backend") {
            let reason = "authorize_url needs the `backend` feature (the HTTP client)".to_string();
            return Err(invalid("authorize_url", reason));
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        if self.jwt_secret.is_some() && self.jwt_secret_file.is_some() {
            return Err(invalid("jwt_secret_file", "set jwt_secret or jwt_secret_file, not both".into()));
        }
        if self.api_key.is_some() && self.api_key_file.is_some() {
            return Err(invalid("api_key_file", "set api_key or api_key_file, not both".into()));
        }
        if self.drain_window >= self.shutdown_timeout && !self.drain_window.is_zero() {
            let reason = format!(
                "drain_window ({}) must be less than shutdown_timeout ({})",
                show_duration(&self.drain_window),
                show_duration(&self.shutdown_timeout)
            );
            return Err(invalid("drain_window", reason));
        }
        // A JWKS file carries its own keys and algorithms.
        if self.jwt_keys_file.is_some() {
            return Ok(());
        }
        match self.jwt_algorithm {
            JwtAlgorithm::Hs256 => {
                let exempt = self.dev || self.allow_insecure_user_id || self.jwt_secret_file.is_some();
                if self.jwt_secret.is_none() && !exempt {
                    let reason = "jwt_algorithm HS256 needs jwt_secret, jwt_secret_file or jwt_keys_file \
                                  (or dev mode, or allow_insecure_user_id)";
                    return Err(invalid("jwt_secret", reason.into()));
                }
            }
            JwtAlgorithm::Rs256 | JwtAlgorithm::Es256 => {
                if self.jwt_public_key.is_none() {
                    let reason = "jwt_algorithm RS256 and ES256 need jwt_public_key or jwt_keys_file";
                    return Err(invalid("jwt_public_key", reason.into()));
                }
            }
        }
        Ok(())
    }
}

/// Where a configuration value came from; named in error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// The TOML file at this path.
    File(PathBuf),
    /// This environment variable (`CUSTOMWS_…`).
    Environment(String),
    /// This command-line flag (`--…`).
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::Environment(name) => write!(f, "environment {name}"),
            Source::Flag(name) => write!(f, "flag {name}"),
        }
    }
}

/// Why the configuration could not be loaded. Every variant stops start-up, except that
/// [`ConfigError::Help`] is a request to print the help text and exit successfully.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `--help` or `-h` was given: the text to print.
    #[error("{0}")]
    Help(String),
    /// A key that is not a configuration key.
    #[error("unknown configuration key {key:?} ({origin})")]
    UnknownKey {
        /// The key as written, with dashes turned into underscores.
        key: String,
        /// Where it was written.
        origin: Source,
    },
    /// A value that does not parse for its key.
    #[error("invalid value {value:?} for key {key:?} ({origin}): expected {expected}")]
    InvalidValue {
        /// The configuration key.
        key: &'static str,
        /// The value as written.
        value: String,
        /// Where it was written.
        origin: Source,
        /// What the key accepts.
        expected: &'static str,
    },
    /// A flag that needs a value came last, or was followed by another flag.
    #[error("missing value for key {key:?} ({origin})")]
    MissingValue {
        /// The configuration key (or `config`).
        key: String,
        /// The flag.
        origin: Source,
    },
    /// A command-line argument that is not a `--key` flag or its value.
    #[error("unexpected argument {arg:?}: settings are written --key value or --key=value")]
    UnexpectedArgument {
        /// The argument.
        arg: String,
    },
    /// The configuration file could not be read.
    #[error("cannot read configuration file {}: {error}", path.display())]
    ReadFile {
        /// The file named by `--config` or `CUSTOMWS_CONFIG`.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The configuration file is not valid TOML.
    #[error("cannot parse configuration file {}: {message}", path.display())]
    ParseFile {
        /// The file named by `--config` or `CUSTOMWS_CONFIG`.
        path: PathBuf,
        /// The TOML parser's message.
        message: String,
    },
    /// Values that parse but break a rule of [`Config::validate`].
    #[error("invalid configuration: {reason}")]
    Invalid {
        /// The key to change.
        key: &'static str,
        /// The rule, naming every key involved.
        reason: String,
    },
}

fn invalid(key: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { key, reason }
}

fn unknown(key: String, origin: Source) -> ConfigError {
    ConfigError::UnknownKey { key, origin }
}

const ENV_PREFIX: &str = "CUSTOMWS_";
const CONFIG_ENV: &str = "CUSTOMWS_CONFIG";
const CONFIG_HELP: &str =
    "TOML file with flat top-level keys; set only by flag or environment, none by default.";

/// How a key's value is written, which decides how a flag takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Scalar,
    /// `--key` alone means true.
    Bool,
    /// A TOML array is accepted besides a comma-separated string.
    List,
}

/// One configuration key: the single source for parsing, help and the README table.
struct KeyInfo {
    name: &'static str,
    help: &'static str,
    placeholder: &'static str,
    expected: &'static str,
    shape: Shape,
    set: fn(&mut Config, &str) -> Result<(), ()>,
    get: fn(&Config) -> String,
}

impl KeyInfo {
    fn flag(&self) -> String {
        format!("--{}", self.name.replace('_', "-"))
    }

    fn env(&self) -> String {
        format!("{ENV_PREFIX}{}", self.name.to_ascii_uppercase())
    }

    fn usage(&self) -> String {
        match self.shape {
            Shape::Bool => format!("{}[=true|false]", self.flag()),
            _ => format!("{} {}", self.flag(), self.placeholder),
        }
    }

    fn default_text(&self, defaults: &Config) -> String {
        (self.get)(defaults)
    }
}

fn lookup(name: &str) -> Option<&'static KeyInfo> {
    KEYS.iter().find(|key| key.name == name)
}

/// Builds [`KEYS`]: each entry names a `Config` field, the [`Format`] of its value and its
/// one-line description.
macro_rules! keys {
    ($($field:ident: $format:ty => $help:literal,)*) => {
        const KEYS: &[KeyInfo] = &[$(KeyInfo {
            name: stringify!($field),
            help: $help,
            placeholder: <$format as Format>::PLACEHOLDER,
            expected: <$format as Format>::EXPECTED,
            shape: <$format as Format>::SHAPE,
            set: |config, text| {
                config.$field = <$format as Format>::parse(text).ok_or(())?;
                Ok(())
            },
            get: |config| <$format as Format>::show(&config.$field),
        }),*];
    };
}

keys! {
    listen: Addr => "Address every shard's SO_REUSEPORT listener binds (:8082 = all interfaces).",
    shards: Count => "Event-loop threads; 0 means one per available core.",
    ws_path: UrlPath => "Path of the WebSocket endpoint.",
    handshake_timeout: Dur => "Deadline for a connection to complete its HTTP request and upgrade.",
    auth_max_pending: Count => "Deferred authentications waiting at once per shard; beyond it the handshake gets 503.",
    write_wait: Dur => "Close a connection whose queued output makes no progress for this long.",
    pong_wait: Dur => "Close a connection that sends no pong for this long.",
    ping_period: Dur => "Interval between server pings; must be less than pong_wait.",
    max_message_size: Size => "Largest accepted client message after reassembly (at least 125).",
    send_queue: Count => "Outgoing queue bound per connection in messages (the Go customws package's SendChannelBuffer).",
    send_queue_bytes: Size => "Outgoing queue bound per connection in bytes.",
    ack_timeout: Dur => "Default wait for a client's client_ack.",
    request_timeout: Dur => "Default wait for a client's reply to a server request.",
    allowed_origins: List => "Origins allowed to connect; empty = same-origin only, * = any.",
    max_connections: Count => "Process-wide connection limit; 0 means unlimited.",
    connections_per_user: Count =>
        "Per user: 0 unlimited, 1 replaces the older (close 4000), N keeps the newest N.",
    jwt_secret: OptText => "HS256 secret for client tokens (needed unless dev mode).",
    jwt_public_key: OptPath => "PEM public key file for RS256/ES256 tokens.",
    jwt_secret_file: OptPath =>
        "File holding the HS256 secret (instead of jwt_secret; systemd LoadCredential=); re-read on SIGHUP.",
    jwt_keys_file: OptPath =>
        "JWKS file of verification keys chosen by the token's kid (oct/RSA/EC, alg required); re-read on SIGHUP.",
    jwt_algorithm: Algorithm => "Accepted JWT algorithm: HS256, RS256 or ES256.",
    jwt_issuer: OptText => "Required iss claim, when set.",
    jwt_audience: OptText => "Required aud claim, when set.",
    allow_client_broadcast: Flag => "Let any authenticated client broadcast, not only role broadcast.",
    presence_scope: Scope => "Receivers of untargeted presence updates: watchers or all.",
    presence_info_claim: OptText =>
        "JWT claim (e.g. name) whose value (at most 1 KiB of JSON) is sent as info in the user's presence events; unset = none.",
    presence_webhook_url: OptText =>
        "POST {event: online|offline, userId, at} here on each user's first connect and last disconnect; off when unset.",
    allow_insecure_user_id: Flag => "Dev only: accept ?userId=N without a token.",
    shutdown_timeout: Dur => "Bound on graceful shutdown.",
    log_level: Level =>
        "Log filter: error, warn, info, debug, trace, off, or per module: info,customws::shard=debug (RUST_LOG adds to it).",
    log_format: LogStyle => "Log line format: text, or json (one JSON object per line).",
    io_driver: Driver =>
        "Shard I/O: epoll, io_uring, or auto (io_uring where it can be set up); falls back to epoll with a warning.",
    api_listen: Addr => "Address of the backend HTTP API listener.",
    api_key: OptText => "API key for the backend HTTP API; the API is off without one.",
    api_key_file: OptPath => "File holding the API key (instead of api_key); re-read on SIGHUP.",
    drain_window: Dur =>
        "On shutdown, close connections spread over this window (jittered batches); 0 = all at once.",
    api_max_connections: Count => "Backend API connections open at once; more are refused 503 and closed. 0 = unlimited.",
    internal_listen: OptAddr =>
        "Serve /metrics, /health and /ready on this address instead of the public port; unset = public port.",
    echo_path: OptUrlPath => "Unauthenticated echo endpoint for conformance runs; off when unset.",
    rate_limit: Count => "Client messages per second per connection, and per user across shards and reconnects; 0 = off.",
    rate_limit_burst: Count => "Messages a connection (or user) may send at once above the rate.",
    rate_limit_bytes: Size => "Client message bytes per second per connection; 0 = off (burst: one second's worth).",
    rate_limit_close_after: Count => "Refused messages within 10 s that close the connection with 1008; 0 = never.",
    max_connections_per_ip: Count => "WebSocket connections per client IP; over it the handshake gets 429. 0 = off.",
    trusted_proxies: List =>
        "Proxy IPs whose X-Forwarded-For names the client (for per-IP limits); others are the client.",
    max_connections_per_user: Count => "WebSocket connections per user; over it the handshake gets 429. 0 = off.",
    jwt_leeway: Dur => "Clock skew allowed on exp/nbf, at the handshake and for expiry while connected.",
    transient_statuses: List => "Presence statuses that expire by themselves (typing, as in the TypeScript client guide).",
    transient_ttl: Dur => "How long a transient status lasts unless repeated; then the last lasting one returns.",
    presence_coalesce: Dur => "Identical presence updates from a connection within this window are dropped.",
    max_rooms_per_connection: Count => "Rooms one connection may be in at once.",
    max_room_members: Count => "Members one room may have (all shards; may overshoot by a few during racing joins).",
    room_presence_max_members: Count =>
        "Rooms up to this size get joined/left presence events; bigger rooms stay quiet (0 = never).",
    room_presence_page: Count => "Most members in one room_presence answer; the rest are asked for with its cursor.",
    presence_budget: Count =>
        "Members per second a connection's room_presence pages and presence_subscribe ids may cost; 0 = off.",
    inbox_max_bytes: Size => "Client-originated messages a shard's inbox may hold; beyond it they are shed (503).",
    disabled_ops: List => "Built-in client operations turned off (403 operation disabled): data_request, broadcast, presence_subscribe, presence_update, join, room_broadcast, room_presence.",
    backend_url: OptText => "POST generic_request and unknown message types to this URL; off when unset.",
    backend_timeout: Dur => "Bound on one backend call; past it the client gets error_notification 504.",
    backend_concurrency: Count => "Backend calls in flight at once (worker threads).",
    backend_queue: Count => "Backend calls waiting for a worker; beyond it the client gets 503.",
    authorize_url: OptText =>
        "POST {op, userId, claims, targets} here before built-in client operations; a 2xx {\"allow\": bool} decides, anything else refuses (403). Unset = allow.",
    authorize_ops: List => "Operations that authorize_url decides (names as disabled_ops); default all.",
    authorize_max_pending: Count =>
        "Messages of one connection waiting for authorization decisions; one more is refused 429.",
    dev: Flag => "Development mode: generate a secret and print ready-to-use tokens.",
    cluster: ClusterUrl =>
        "Broker joining the nodes of a cluster: redis://host:port[/db] or nats://host:port; unset = one node.",
    node_id: OptName => "This node's name in the cluster ([A-Za-z0-9_-], at most 64); unset = hostname-pid-random.",
    cluster_prefix: Name => "Prefix of the cluster's broker channels, subjects and keys ([A-Za-z0-9_-]).",
    cluster_heartbeat: Dur => "Interval between a node's heartbeats on the broker.",
    cluster_node_ttl: Dur =>
        "A node not heard for this long is dead and its users offline elsewhere (at least 2 heartbeats).",
    cluster_timeout: Dur => "Bound on a cross-node operation's wait for the broker or other nodes.",
    cluster_queue_bytes: Size => "Bytes waiting for the broker; beyond it cross-node messages are shed (503).",
    cluster_max_pending: Count => "Cross-node operations (requests, gathers) in flight at once; beyond it 503.",
}

/// How one kind of value is parsed from text and shown as text (`parse(show(v)) == v`).
trait Format {
    type Value;
    const PLACEHOLDER: &'static str;
    const EXPECTED: &'static str;
    const SHAPE: Shape = Shape::Scalar;
    fn parse(text: &str) -> Option<Self::Value>;
    fn show(value: &Self::Value) -> String;
}

/// `5s`, `250ms`, `2m`, `1h`, or a bare number of seconds.
struct Dur;
/// Bytes, or `64KiB`, `1MiB`, `1GiB`, `64KB`, `1MB`, `1GB`.
struct Size;
/// A non-negative integer.
struct Count;
/// `true` / `false`.
struct Flag;
/// A socket address; `:PORT` means all IPv4 interfaces.
struct Addr;
/// A socket address, or empty for none.
struct OptAddr;
/// Comma-separated, trimmed, empty items dropped.
struct List;
/// A URL path starting with `/`.
struct UrlPath;
/// A URL path starting with `/`, or empty for none.
struct OptUrlPath;
/// Any text; empty for none.
struct OptText;
/// A file path; empty for none.
struct OptPath;
/// `HS256`, `RS256`, `ES256`, in any case.
struct Algorithm;
/// `watchers` or `all`.
struct Scope;
/// A log filter: a level name or `env_logger` directives.
struct Level;
/// `text` or `json`.
struct LogStyle;
/// `redis://…` or `nats://…`, or empty for none.
struct ClusterUrl;
/// `[A-Za-z0-9_-]{1,64}`.
struct Name;
/// `[A-Za-z0-9_-]{1,64}`, or empty for none.
struct OptName;

/// Whether `text` is a cluster name: node ids and prefixes become parts of broker subjects.
pub fn valid_cluster_name(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Format for ClusterUrl {
    type Value = Option<String>;
    const PLACEHOLDER: &'static str = "<url>";
    const EXPECTED: &'static str = "redis://host:port[/db] or nats://host:port";

    fn parse(text: &str) -> Option<Option<String>> {
        let text = text.trim();
        if text.is_empty() {
            return Some(None);
        }
        let rest = text.strip_prefix("redis://").or_else(|| text.strip_prefix("nats://"))?;
        (!rest.is_empty()).then(|| Some(text.to_string()))
    }

    fn show(value: &Option<String>) -> String {
        value.clone().unwrap_or_default()
    }
}

impl Format for Name {
    type Value = String;
    const PLACEHOLDER: &'static str = "<name>";
    const EXPECTED: &'static str = "1 to 64 of A-Z a-z 0-9 _ -";

    fn parse(text: &str) -> Option<String> {
        valid_cluster_name(text.trim()).then(|| text.trim().to_string())
    }

    fn show(value: &String) -> String {
        value.clone()
    }
}

impl Format for OptName {
    type Value = Option<String>;
    const PLACEHOLDER: &'static str = "<name>";
    const EXPECTED: &'static str = "1 to 64 of A-Z a-z 0-9 _ -, or empty";

    fn parse(text: &str) -> Option<Option<String>> {
        match text.trim() {
            "" => Some(None),
            name => Name::parse(name).map(Some),
        }
    }

    fn show(value: &Option<String>) -> String {
        value.clone().unwrap_or_default()
    }
}

/// Splits `"250ms"` into `(250, "ms")`; the number must be present.
fn split_number(text: &str) -> Option<(u64, &str)> {
    let text = text.trim();
    let end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let number = text[..end].parse().ok()?;
    Some((number, text[end..].trim()))
}

impl Format for Dur {
    type Value = Duration;
    const PLACEHOLDER: &'static str = "<duration>";
    const EXPECTED: &'static str = "a duration like 5s, 250ms, 2m";

    fn parse(text: &str) -> Option<Duration> {
        let (number, unit) = split_number(text)?;
        let seconds = match unit {
            "ms" => return Some(Duration::from_millis(number)),
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return None,
        };
        number.checked_mul(seconds).map(Duration::from_secs)
    }

    fn show(value: &Duration) -> String {
        show_duration(value)
    }
}

fn show_duration(value: &Duration) -> String {
    let secs = value.as_secs();
    if value.subsec_nanos() != 0 {
        return match value.subsec_nanos() % 1_000_000 {
            0 => format!("{}ms", value.as_millis()),
            _ => format!("{value:?}"),
        };
    }
    match secs {
        0 => "0s".to_string(),
        s if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        s if s.is_multiple_of(60) => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;

impl Format for Size {
    type Value = usize;
    const PLACEHOLDER: &'static str = "<size>";
    const EXPECTED: &'static str = "a size in bytes like 65536, 64KiB, 1MiB";

    fn parse(text: &str) -> Option<usize> {
        let (number, unit) = split_number(text)?;
        let scale: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            _ => return None,
        };
        usize::try_from(number.checked_mul(scale)?).ok()
    }

    fn show(value: &usize) -> String {
        match *value {
            0 => "0".to_string(),
            v if v.is_multiple_of(GIB) => format!("{}GiB", v / GIB),
            v if v.is_multiple_of(MIB) => format!("{}MiB", v / MIB),
            v if v.is_multiple_of(KIB) => format!("{}KiB", v / KIB),
            v => v.to_string(),
        }
    }
}

impl Format for Count {
    type Value = usize;
    const PLACEHOLDER: &'static str = "<n>";
    const EXPECTED: &'static str = "a non-negative integer";

    fn parse(text: &str) -> Option<usize> {
        text.trim().parse().ok()
    }

    fn show(value: &usize) -> String {
        value.to_string()
    }
}

impl Format for Flag {
    type Value = bool;
    const PLACEHOLDER: &'static str = "<bool>";
    const EXPECTED: &'static str = "true or false";
    const SHAPE: Shape = Shape::Bool;

    fn parse(text: &str) -> Option<bool> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Some(true),
            "false" | "no" | "off" | "0" => Some(false),
            _ => None,
        }
    }

    fn show(value: &bool) -> String {
        value.to_string()
    }
}

impl Format for Addr {
    type Value = SocketAddr;
    const PLACEHOLDER: &'static str = "<addr>";
    const EXPECTED: &'static str = "a socket address like 127.0.0.1:8082 or :8082";

    fn parse(text: &str) -> Option<SocketAddr> {
        let text = text.trim();
        match text.strip_prefix(':') {
            Some(port) => Some(SocketAddr::from(([0, 0, 0, 0], port.parse().ok()?))),
            None => text.parse().ok(),
        }
    }

    fn show(value: &SocketAddr) -> String {
        value.to_string()
    }
}

impl Format for OptAddr {
    type Value = Option<SocketAddr>;
    const PLACEHOLDER: &'static str = "<addr>";
    const EXPECTED: &'static str = "a socket address like 127.0.0.1:9090, or empty for none";

    fn parse(text: &str) -> Option<Option<SocketAddr>> {
        if text.trim().is_empty() {
            return Some(None);
        }
        Addr::parse(text).map(Some)
    }

    fn show(value: &Option<SocketAddr>) -> String {
        value.map(|addr| addr.to_string()).unwrap_or_default()
    }
}

impl Format for List {
    type Value = Vec<String>;
    const PLACEHOLDER: &'static str = "<a,b,...>";
    const EXPECTED: &'static str = "a comma-separated list";
    const SHAPE: Shape = Shape::List;

    fn parse(text: &str) -> Option<Vec<String>> {
        let items = text.split(',').map(str::trim).filter(|item| !item.is_empty());
        Some(items.map(str::to_string).collect())
    }

    fn show(value: &Vec<String>) -> String {
        value.join(",")
    }
}

fn parse_url_path(text: &str) -> Option<String> {
    let text = text.trim();
    let valid = text.starts_with('/') && !text.contains(char::is_whitespace);
    valid.then(|| text.to_string())
}

impl Format for UrlPath {
    type Value = String;
    const PLACEHOLDER: &'static str = "<path>";
    const EXPECTED: &'static str = "a URL path starting with /";

    fn parse(text: &str) -> Option<String> {
        parse_url_path(text)
    }

    fn show(value: &String) -> String {
        value.clone()
    }
}

impl Format for OptUrlPath {
    type Value = Option<String>;
    const PLACEHOLDER: &'static str = "<path>";
    const EXPECTED: &'static str = "a URL path starting with /, or empty for none";

    fn parse(text: &str) -> Option<Option<String>> {
        match text.trim() {
            "" => Some(None),
            path => parse_url_path(path).map(Some),
        }
    }

    fn show(value: &Option<String>) -> String {
        value.clone().unwrap_or_default()
    }
}

impl Format for OptText {
    type Value = Option<String>;
    const PLACEHOLDER: &'static str = "<text>";
    const EXPECTED: &'static str = "a string";

    fn parse(text: &str) -> Option<Option<String>> {
        Some((!text.is_empty()).then(|| text.to_string()))
    }

    fn show(value: &Option<String>) -> String {
        value.clone().unwrap_or_default()
    }
}

impl Format for OptPath {
    type Value = Option<PathBuf>;
    const PLACEHOLDER: &'static str = "<file>";
    const EXPECTED: &'static str = "a file path";

    fn parse(text: &str) -> Option<Option<PathBuf>> {
        Some((!text.is_empty()).then(|| PathBuf::from(text)))
    }

    fn show(value: &Option<PathBuf>) -> String {
        value.as_ref().map(|path| path.display().to_string()).unwrap_or_default()
    }
}

impl Format for Algorithm {
    type Value = JwtAlgorithm;
    const PLACEHOLDER: &'static str = "<HS256|RS256|ES256>";
    const EXPECTED: &'static str = "HS256, RS256 or ES256";

    fn parse(text: &str) -> Option<JwtAlgorithm> {
        match text.trim().to_ascii_uppercase().as_str() {
            "HS256" => Some(JwtAlgorithm::Hs256),
            "RS256" => Some(JwtAlgorithm::Rs256),
            "ES256" => Some(JwtAlgorithm::Es256),
            _ => None,
        }
    }

    fn show(value: &JwtAlgorithm) -> String {
        let name = match value {
            JwtAlgorithm::Hs256 => "HS256",
            JwtAlgorithm::Rs256 => "RS256",
            JwtAlgorithm::Es256 => "ES256",
        };
        name.to_string()
    }
}

impl Format for Scope {
    type Value = PresenceScope;
    const PLACEHOLDER: &'static str = "<watchers|all>";
    const EXPECTED: &'static str = "watchers or all";

    fn parse(text: &str) -> Option<PresenceScope> {
        match text.trim().to_ascii_lowercase().as_str() {
            "watchers" => Some(PresenceScope::Watchers),
            "all" => Some(PresenceScope::All),
            _ => None,
        }
    }

    fn show(value: &PresenceScope) -> String {
        let name = match value {
            PresenceScope::Watchers => "watchers",
            PresenceScope::All => "all",
        };
        name.to_string()
    }
}

const LOG_LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// True when `text` is a list of `env_logger` directives: `level` or `module::path=level`,
/// comma-separated. A bare word must be a level, so that a typo is not taken for a module.
pub fn valid_log_filter(text: &str) -> bool {
    let is_level = |level: &str| LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str());
    let is_module = |module: &str| {
        !module.is_empty() && module.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    text.split(',').map(str::trim).filter(|d| !d.is_empty()).all(|directive| {
        match directive.split_once('=') {
            Some((module, level)) => is_module(module.trim()) && is_level(level.trim()),
            None => is_level(directive),
        }
    })
}

impl Format for Level {
    type Value = String;
    const PLACEHOLDER: &'static str = "<filter>";
    const EXPECTED: &'static str =
        "a level (error, warn, info, debug, trace, off) or directives like info,customws::shard=debug";

    fn parse(text: &str) -> Option<String> {
        let filter = text.trim().to_ascii_lowercase();
        (!filter.is_empty() && valid_log_filter(&filter)).then_some(filter)
    }

    fn show(value: &String) -> String {
        value.clone()
    }
}

/// `epoll`, `io_uring` or `auto`.
struct Driver;

impl Format for Driver {
    type Value = IoDriver;
    const PLACEHOLDER: &'static str = "<epoll|io_uring|auto>";
    const EXPECTED: &'static str = "epoll, io_uring or auto";

    fn parse(text: &str) -> Option<IoDriver> {
        match text.trim().to_ascii_lowercase().as_str() {
            "epoll" => Some(IoDriver::Epoll),
            "io_uring" | "io-uring" | "uring" => Some(IoDriver::IoUring),
            "auto" => Some(IoDriver::Auto),
            _ => None,
        }
    }

    fn show(value: &IoDriver) -> String {
        let name = match value {
            IoDriver::Epoll => "epoll",
            IoDriver::IoUring => "io_uring",
            IoDriver::Auto => "auto",
        };
        name.to_string()
    }
}

impl Format for LogStyle {
    type Value = LogFormat;
    const PLACEHOLDER: &'static str = "<text|json>";
    const EXPECTED: &'static str = "text or json";

    fn parse(text: &str) -> Option<LogFormat> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }

    fn show(value: &LogFormat) -> String {
        let name = match value {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        name.to_string()
    }
}

/// One value for one key from one source, applied in precedence order.
struct Setting {
    key: &'static KeyInfo,
    value: String,
    origin: Source,
}

impl Setting {
    fn apply(&self, config: &mut Config) -> Result<(), ConfigError> {
        (self.key.set)(config, &self.value).map_err(|()| self.invalid())
    }

    fn invalid(&self) -> ConfigError {
        ConfigError::InvalidValue {
            key: self.key.name,
            value: self.value.clone(),
            origin: self.origin.clone(),
            expected: self.key.expected,
        }
    }
}

/// What the flags or the environment contribute: settings, and perhaps the file to read.
#[derive(Default)]
struct Layer {
    config: Option<PathBuf>,
    settings: Vec<Setting>,
}

fn parse_args<A: IntoIterator<Item = String>>(args: A) -> Result<Layer, ConfigError> {
    let args: Vec<String> = args.into_iter().collect();
    if args.iter().any(|arg| arg == "--help" || arg == "-h") {
        return Err(ConfigError::Help(help_text()));
    }
    let mut layer = Layer::default();
    let mut rest = args.into_iter();
    while let Some(arg) = rest.next() {
        parse_flag(arg, &mut rest, &mut layer)?;
    }
    Ok(layer)
}

fn parse_flag(
    arg: String,
    rest: &mut impl Iterator<Item = String>,
    layer: &mut Layer,
) -> Result<(), ConfigError> {
    let body = match arg.strip_prefix("--") {
        Some(body) if !body.is_empty() => body,
        _ => return Err(ConfigError::UnexpectedArgument { arg }),
    };
    let (name, inline) = match body.split_once('=') {
        Some((name, value)) => (name, Some(value.to_string())),
        None => (body, None),
    };
    let origin = Source::Flag(format!("--{name}"));
    if name == "config" {
        let path = flag_value(inline, rest, "config", &origin)?;
        layer.config = Some(PathBuf::from(path));
        return Ok(());
    }
    let key_name = name.replace('-', "_");
    let Some(key) = lookup(&key_name) else {
        return Err(unknown(key_name, origin));
    };
    let value = match (inline, key.shape) {
        (None, Shape::Bool) => "true".to_string(),
        (inline, _) => flag_value(inline, rest, key.name, &origin)?,
    };
    layer.settings.push(Setting { key, value, origin });
    Ok(())
}

/// The value written `--key=value`, or else the next argument unless that is another flag.
fn flag_value(
    inline: Option<String>,
    rest: &mut impl Iterator<Item = String>,
    key: &str,
    origin: &Source,
) -> Result<String, ConfigError> {
    if let Some(value) = inline {
        return Ok(value);
    }
    match rest.next() {
        Some(value) if !value.starts_with("--") => Ok(value),
        _ => Err(ConfigError::MissingValue { key: key.to_string(), origin: origin.clone() }),
    }
}

fn parse_env<E: IntoIterator<Item = (String, String)>>(env: E) -> Result<Layer, ConfigError> {
    let mut vars: Vec<(String, String)> =
        env.into_iter().filter(|(name, _)| name.starts_with(ENV_PREFIX)).collect();
    vars.sort();
    let mut layer = Layer::default();
    for (name, value) in vars {
        if name == CONFIG_ENV {
            layer.config = (!value.is_empty()).then(|| PathBuf::from(value));
            continue;
        }
        let key_name = name[ENV_PREFIX.len()..].to_ascii_lowercase();
        let origin = Source::Environment(name);
        let Some(key) = lookup(&key_name) else {
            return Err(unknown(key_name, origin));
        };
        layer.settings.push(Setting { key, value, origin });
    }
    Ok(layer)
}

/// Without the `toml-config` feature a configuration file is refused with a clear message.
#[cfg(not(feature = "toml-config"))]
fn read_file(path: &Path) -> Result<Vec<Setting>, ConfigError> {
    let message = "configuration files need customws's `toml-config` feature".to_string();
    Err(ConfigError::ParseFile { path: path.to_path_buf(), message })
}

#[cfg(feature = "toml-config")]
fn read_file(path: &Path) -> Result<Vec<Setting>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| ConfigError::ReadFile { path: path.to_path_buf(), error })?;
    let table: toml::Table = text.parse().map_err(|error: toml::de::Error| ConfigError::ParseFile {
        path: path.to_path_buf(),
        message: error.to_string(),
    })?;
    let settings = table.into_iter().map(|(name, value)| file_setting(path, name, &value));
    settings.collect()
}

#[cfg(feature = "toml-config")]
fn file_setting(path: &Path, name: String, value: &toml::Value) -> Result<Setting, ConfigError> {
    let origin = Source::File(path.to_path_buf());
    let Some(key) = lookup(&name) else {
        return Err(unknown(name, origin));
    };
    match toml_text(value, key.shape) {
        Some(value) => Ok(Setting { key, value, origin }),
        None => Err(Setting { key, value: value.to_string(), origin }.invalid()),
    }
}

#[cfg(feature = "toml-config")]
/// A TOML value as the text a flag would carry; arrays only for list keys.
fn toml_text(value: &toml::Value, shape: Shape) -> Option<String> {
    match value {
        toml::Value::Array(items) if shape == Shape::List => {
            let items: Option<Vec<String>> = items.iter().map(toml_scalar).collect();
            items.map(|items| items.join(","))
        }
        other => toml_scalar(other),
    }
}

#[cfg(feature = "toml-config")]
fn toml_scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(text) => Some(text.clone()),
        toml::Value::Integer(number) => Some(number.to_string()),
        toml::Value::Boolean(flag) => Some(flag.to_string()),
        _ => None,
    }
}

const HELP_INTRO: &str = "\
customws: a WebSocket connection tier.

Usage: customws [--config FILE] [--KEY VALUE | --KEY=VALUE]...

Every KEY below can be set in the TOML file (key = value), in the environment
(CUSTOMWS_KEY, upper case) or as a flag (--key, dashes for underscores).
Precedence: flag > environment > file > default.
Durations: 5s, 250ms, 2m, 1h, or a number of seconds. Sizes: bytes, 64KiB, 1MiB, 1GiB.
Lists: comma-separated. Booleans: --key alone means true; --key=false.

  -h, --help
        Print this help.
";

fn help_text() -> String {
    let defaults = Config::default();
    let mut out = String::from(HELP_INTRO);
    out.push_str(&format!("  --config <file>   ({CONFIG_ENV})\n        {CONFIG_HELP}\n"));
    for key in KEYS {
        let default = key.default_text(&defaults);
        let default = if default.is_empty() { "none".to_string() } else { default };
        out.push_str(&format!(
            "  {}   ({}, default {})\n        {}\n",
            key.usage(),
            key.env(),
            default,
            key.help
        ));
    }
    out
}

fn markdown_code(text: &str) -> String {
    match text {
        "" => "none".to_string(),
        text => format!("`{text}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| arg.to_string()).collect()
    }

    /// Loads with a JWT secret in the environment, so that validation passes.
    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut env: Vec<(String, String)> =
            env.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
        env.push(("CUSTOMWS_JWT_SECRET".into(), "test-secret".into()));
        Config::load(strings(args), env)
    }

    fn load_ok(args: &[&str]) -> Config {
        load(args, &[]).expect("configuration loads")
    }

    fn message(result: Result<Config, ConfigError>) -> String {
        result.expect_err("configuration is refused").to_string()
    }

    /// A TOML file under the temp directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &str) -> TempFile {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let name = format!(
                "customws-config-test-{}-{}.toml",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(name);
            std::fs::write(&path, contents).expect("write temp config");
            TempFile(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().expect("utf-8 temp path")
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(Dur::parse("5s"), Some(Duration::from_secs(5)));
        assert_eq!(Dur::parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(Dur::parse("2m"), Some(Duration::from_secs(120)));
        assert_eq!(Dur::parse("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(Dur::parse("7"), Some(Duration::from_secs(7)));
        assert_eq!(Dur::parse(" 3 s "), Some(Duration::from_secs(3)));
        for bad in ["abc", "5x", "", "s", "-1s", "1.5s"] {
            assert_eq!(Dur::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("65536"), Some(65536));
        assert_eq!(Size::parse("64KiB"), Some(64 * 1024));
        assert_eq!(Size::parse("1MiB"), Some(1 << 20));
        assert_eq!(Size::parse("1GiB"), Some(1 << 30));
        assert_eq!(Size::parse("2KB"), Some(2000));
        assert_eq!(Size::parse("1MB"), Some(1_000_000));
        assert_eq!(Size::parse("10B"), Some(10));
        for bad in ["1TiB", "x", "", "KiB"] {
            assert_eq!(Size::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn lists_trim_and_drop_empty_items() {
        let config = load_ok(&["--allowed-origins", " https://a.example, b ,,c "]);
        assert_eq!(config.allowed_origins, ["https://a.example", "b", "c"]);
        assert!(load_ok(&["--allowed-origins="]).allowed_origins.is_empty());
    }

    #[test]
    fn socket_addresses() {
        assert_eq!(load_ok(&["--listen", ":9000"]).listen, SocketAddr::from(([0, 0, 0, 0], 9000)));
        let config = load_ok(&["--listen=127.0.0.1:8082", "--api-listen", "[::1]:9001"]);
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 8082)));
        assert_eq!(config.api_listen.to_string(), "[::1]:9001");
        assert!(message(load(&["--listen", "8082"], &[])).contains("\"listen\""));
    }

    #[test]
    fn enums_and_options() {
        let config = load_ok(&["--jwt-algorithm", "hs256", "--presence-scope", "all"]);
        assert_eq!(config.jwt_algorithm, JwtAlgorithm::Hs256);
        assert_eq!(config.presence_scope, PresenceScope::All);
        assert_eq!(Algorithm::parse("Rs256"), Some(JwtAlgorithm::Rs256));
        assert_eq!(Algorithm::parse("ES256"), Some(JwtAlgorithm::Es256));
        assert_eq!(Scope::parse("watchers"), Some(PresenceScope::Watchers));
        assert!(message(load(&["--jwt-algorithm", "none"], &[])).contains("jwt_algorithm"));
        let config = load_ok(&["--jwt-issuer", "me", "--echo-path", "/echo"]);
        assert_eq!(config.jwt_issuer.as_deref(), Some("me"));
        assert_eq!(config.echo_path.as_deref(), Some("/echo"));
        assert!(message(load(&["--ws-path", "ws"], &[])).contains("ws_path"));
    }

    #[test]
    fn every_key_round_trips_its_default() {
        let defaults = Config::default();
        for key in KEYS {
            let text = key.default_text(&defaults);
            let mut config = Config::default();
            assert_eq!((key.set)(&mut config, &text), Ok(()), "{}", key.name);
            assert_eq!(key.default_text(&config), text, "{}", key.name);
        }
    }

    #[test]
    fn flags_take_space_or_equals() {
        let config = load_ok(&["--handshake-timeout", "7s", "--shards=3"]);
        assert_eq!(config.handshake_timeout, Duration::from_secs(7));
        assert_eq!(config.shards, 3);
    }

    #[test]
    fn environment_sets_keys() {
        let env = [("CUSTOMWS_HANDSHAKE_TIMEOUT", "250ms"), ("CUSTOMWS_MAX_MESSAGE_SIZE", "1MiB")];
        let config = load(&[], &env).expect("loads");
        assert_eq!(config.handshake_timeout, Duration::from_millis(250));
        assert_eq!(config.max_message_size, 1 << 20);
        assert_eq!(config.jwt_secret.as_deref(), Some("test-secret"));
    }

    #[test]
    fn file_sets_keys() {
        let file = TempFile::new(
            "handshake_timeout = \"5m\"\nshards = 2\nallowed_origins = [\"a\", \"b\"]\n\
             allow_client_broadcast = true\nsend_queue_bytes = \"64KiB\"\n",
        );
        let config = load_ok(&["--config", file.path()]);
        assert_eq!(config.handshake_timeout, Duration::from_secs(300));
        assert_eq!(config.shards, 2);
        assert_eq!(config.allowed_origins, ["a", "b"]);
        assert!(config.allow_client_broadcast);
        assert_eq!(config.send_queue_bytes, 64 * 1024);
    }

    #[test]
    fn file_list_may_be_a_comma_string_and_path_may_come_from_env() {
        let file = TempFile::new("allowed_origins = \"a, b\"\n");
        let config = load(&[], &[("CUSTOMWS_CONFIG", file.path())]).expect("loads");
        assert_eq!(config.allowed_origins, ["a", "b"]);
    }

    #[test]
    fn precedence_is_flag_env_file_default() {
        let file = TempFile::new("handshake_timeout = \"1s\"\nwrite_wait = \"1s\"\nack_timeout = \"1s\"\n");
        let env = [("CUSTOMWS_HANDSHAKE_TIMEOUT", "2s"), ("CUSTOMWS_WRITE_WAIT", "2s")];
        let args = ["--config", file.path(), "--handshake-timeout", "3s"];
        let config = load(&args, &env).expect("loads");
        assert_eq!(config.handshake_timeout, Duration::from_secs(3));
        assert_eq!(config.write_wait, Duration::from_secs(2));
        assert_eq!(config.ack_timeout, Duration::from_secs(1));
        assert_eq!(config.request_timeout, Config::default().request_timeout);
    }

    #[test]
    fn unknown_flag() {
        let error = load(&["--foo", "1"], &[]).expect_err("refused");
        assert_eq!(error.to_string(), "unknown configuration key \"foo\" (flag --foo)");
    }

    #[test]
    fn unknown_environment_variable() {
        let error = load(&[], &[("CUSTOMWS_FOO", "1"), ("OTHER_FOO", "1")]).expect_err("refused");
        let expected = "unknown configuration key \"foo\" (environment CUSTOMWS_FOO)";
        assert_eq!(error.to_string(), expected);
    }

    #[test]
    fn unknown_file_key() {
        let file = TempFile::new("foo = 1\n");
        let error = load(&["--config", file.path()], &[]).expect_err("refused");
        let expected = format!("unknown configuration key \"foo\" (file {})", file.path());
        assert_eq!(error.to_string(), expected);
    }

    #[test]
    fn bad_value_names_key_and_source() {
        let error = load(&[], &[("CUSTOMWS_HANDSHAKE_TIMEOUT", "abc")]).expect_err("refused");
        let expected = "invalid value \"abc\" for key \"handshake_timeout\" (environment \
                        CUSTOMWS_HANDSHAKE_TIMEOUT): expected a duration like 5s, 250ms, 2m";
        assert_eq!(error.to_string(), expected);
        let file = TempFile::new("shards = \"many\"\nlisten = [\"a\"]\n");
        let error = load(&["--config", file.path()], &[]).expect_err("refused");
        assert!(matches!(error, ConfigError::InvalidValue { key: "listen" | "shards", .. }));
    }

    #[test]
    fn missing_or_unreadable_file_is_an_error() {
        let file = TempFile::new("shards = \n");
        let error = load(&["--config", file.path()], &[]).expect_err("refused");
        assert!(matches!(error, ConfigError::ParseFile { .. }), "{error}");
        let missing = std::env::temp_dir().join("customws-config-test-missing.toml");
        let error = load(&["--config", missing.to_str().unwrap()], &[]).expect_err("refused");
        assert!(matches!(error, ConfigError::ReadFile { .. }), "{error}");
    }

    #[test]
    fn bool_flag_forms() {
        let config = load_ok(&["--dev", "--shards", "2", "--allow-client-broadcast=true"]);
        assert!(config.dev && config.allow_client_broadcast);
        assert_eq!(config.shards, 2);
        assert!(!load_ok(&["--dev=false"]).dev);
        let error = load(&["--dev", "false"], &[]).expect_err("refused");
        assert!(matches!(error, ConfigError::UnexpectedArgument { ref arg } if arg == "false"));
        assert!(message(load(&["--dev=maybe"], &[])).contains("expected true or false"));
        assert!(load(&[], &[("CUSTOMWS_DEV", "true")]).expect("loads").dev);
    }

    #[test]
    fn positional_and_missing_values_are_errors() {
        let error = load(&["serve"], &[]).expect_err("refused");
        assert!(matches!(error, ConfigError::UnexpectedArgument { .. }));
        let error = load(&["--listen"], &[]).expect_err("refused");
        assert_eq!(error.to_string(), "missing value for key \"listen\" (flag --listen)");
        let error = load(&["--listen", "--dev"], &[]).expect_err("refused");
        assert!(matches!(error, ConfigError::MissingValue { .. }));
    }

    #[test]
    fn ping_period_must_be_below_pong_wait() {
        let text = message(load(&["--ping-period", "60s", "--pong-wait", "60s"], &[]));
        assert!(text.contains("ping_period") && text.contains("pong_wait"), "{text}");
        assert!(load(&["--ping-period", "20s", "--pong-wait", "30s"], &[]).is_ok());
    }

    #[test]
    fn bounds_are_checked() {
        assert!(message(load(&["--send-queue", "0"], &[])).contains("send_queue"));
        assert!(message(load(&["--max-message-size", "124"], &[])).contains("max_message_size"));
        assert!(load(&["--max-message-size", "125"], &[]).is_ok());
    }

    #[test]
    fn jwt_key_material_is_required() {
        let mut config = Config::default();
        let error = config.validate().expect_err("HS256 without a secret");
        assert!(matches!(error, ConfigError::Invalid { key: "jwt_secret", .. }));
        config.dev = true;
        assert!(config.validate().is_ok());
        config.dev = false;
        config.allow_insecure_user_id = true;
        assert!(config.validate().is_ok());
        config.jwt_algorithm = JwtAlgorithm::Rs256;
        let error = config.validate().expect_err("RS256 without a key");
        assert!(matches!(error, ConfigError::Invalid { key: "jwt_public_key", .. }));
        config.jwt_public_key = Some(PathBuf::from("key.pem"));
        assert!(config.validate().is_ok());
    }

    #[test]
    fn help_lists_every_key() {
        for flag in ["--help", "-h"] {
            let Err(ConfigError::Help(text)) = load(&["--shards", "2", flag], &[]) else {
                panic!("{flag} gives help");
            };
            assert!(text.contains("--config") && text.contains(CONFIG_ENV));
            for key in KEYS {
                assert!(text.contains(&key.flag()), "{}", key.name);
                assert!(text.contains(&key.env()), "{}", key.name);
                assert!(text.contains(key.help), "{}", key.name);
            }
        }
    }

    #[test]
    fn markdown_table_has_a_row_per_key() {
        let table = Config::markdown_table();
        assert_eq!(table.lines().count(), 2 + 1 + KEYS.len());
        for key in KEYS {
            assert!(table.contains(&format!("| `{}` | `{}` / `{}` |", key.name, key.flag(), key.env())));
        }
        assert!(table.contains(
            "| `handshake_timeout` | `--handshake-timeout` / `CUSTOMWS_HANDSHAKE_TIMEOUT` | `5s` |"
        ));
    }

    #[test]
    fn log_filters_formats_and_secret_files() {
        let config = load_ok(&["--jwt-secret", "s", "--log-level", "INFO,customws::shard=debug"]);
        assert_eq!(config.log_level, "info,customws::shard=debug");
        assert!(message(load(&["--jwt-secret", "s", "--log-level", "inf"], &[])).contains("log_level"));
        assert!(message(load(&["--jwt-secret", "s", "--log-level", "x=loud"], &[])).contains("log_level"));
        assert_eq!(load_ok(&["--jwt-secret", "s", "--log-format", "json"]).log_format, LogFormat::Json);
        assert!(message(load(&["--jwt-secret", "s", "--log-format", "xml"], &[])).contains("text or json"));
        // A secret file or a JWKS file stands in for jwt_secret; both secret forms at once do not.
        let bare = |args: &[&str]| Config::load(strings(args), Vec::new());
        bare(&["--jwt-secret-file", "/run/secret"]).unwrap();
        bare(&["--jwt-keys-file", "/etc/jwks.json", "--jwt-algorithm", "RS256"]).unwrap();
        assert!(matches!(bare(&[]), Err(ConfigError::Invalid { key: "jwt_secret", .. })));
        let both = load(&["--jwt-secret", "s", "--jwt-secret-file", "/run/secret"], &[]);
        assert!(matches!(both, Err(ConfigError::Invalid { key: "jwt_secret_file", .. })));
        let both = load(&["--jwt-secret", "s", "--api-key", "k", "--api-key-file", "/run/k"], &[]);
        assert!(matches!(both, Err(ConfigError::Invalid { key: "api_key_file", .. })));
        assert_eq!(
            load_ok(&["--jwt-secret", "s", "--drain-window", "5s"]).drain_window,
            Duration::from_secs(5)
        );
    }

    #[test]
    fn cluster_keys_are_parsed_and_checked() {
        let config = load_ok(&["--jwt-secret", "s"]);
        assert_eq!((config.cluster.as_deref(), config.node_id.as_deref()), (None, None));
        assert_eq!(config.cluster_prefix, "customws");
        let config =
            load_ok(&["--jwt-secret", "s", "--cluster", "redis://127.0.0.1:6379/2", "--node-id", "a-1"]);
        assert_eq!(config.cluster.as_deref(), Some("redis://127.0.0.1:6379/2"));
        assert_eq!(config.node_id.as_deref(), Some("a-1"));
        let env = [("CUSTOMWS_CLUSTER", "nats://127.0.0.1:4222"), ("CUSTOMWS_CLUSTER_PREFIX", "x_y")];
        let config = load(&["--jwt-secret", "s"], &env).unwrap();
        assert_eq!(
            (config.cluster.as_deref(), config.cluster_prefix.as_str()),
            (Some("nats://127.0.0.1:4222"), "x_y")
        );
        assert!(message(load(&["--jwt-secret", "s", "--cluster", "http://x:1"], &[])).contains("redis://"));
        assert!(message(load(&["--jwt-secret", "s", "--node-id", "a.b"], &[])).contains("node_id"));
        assert!(
            message(load(&["--jwt-secret", "s", "--cluster-prefix", ""], &[])).contains("cluster_prefix")
        );
        let short = ["--jwt-secret", "s", "--cluster-heartbeat", "1s", "--cluster-node-ttl", "1500ms"];
        assert!(matches!(load(&short, &[]), Err(ConfigError::Invalid { key: "cluster_node_ttl", .. })));
        let zero = ["--jwt-secret", "s", "--cluster-heartbeat", "0s"];
        assert!(matches!(load(&zero, &[]), Err(ConfigError::Invalid { key: "cluster_heartbeat", .. })));
    }
}

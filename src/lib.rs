//! customws: a WebSocket connection tier.
//!
//! Sharded `mio` event loops (one per core, each with its own `SO_REUSEPORT` listener) hold
//! authenticated WebSocket connections and route messages between them: peer-to-peer through
//! the server, broadcast, rooms, presence, server-initiated acks and requests. See
//! `ARCHITECTURE.md` for the layers, bottom to top: `ws` (framing), `core` (directory,
//! presence, timers) → `protocol` (envelopes, router), `http` (upgrade gate) → `route` (links,
//! shard messages, the `Handle`) → `app` (what applications implement) → `shard` (event loop)
//! → `api` → `server` (start/stop); `cluster` (the broker engines and the node's link thread, on `route`) beside them.
//!
//! # Getting started
//!
//! An application implements [`Application`] (every callback is optional), starts the server
//! with [`start_with`] — or [`run_until_signal`], which also installs logging and handles
//! SIGTERM/SIGINT/SIGHUP as the `customws` binary does — and pushes to users from any thread
//! through a [`Handle`]. Callbacks run on the shard thread that owns the connection and must
//! not block: blocking work goes to a [`Workers`](prelude::Workers) pool, whose jobs answer
//! the connection later by its id. [`prelude`] has everything this takes.
//!
//! The application is the authority over its users:
//! - who connects: [`Application::authenticate`] (the fast path, e.g. the JWT check) or
//!   [`Application::authenticate_deferred`] (a session-table lookup on a worker);
//! - who may reach whom: [`Application::authorize`] sees every built-in client operation
//!   (`data_request`, `presence_subscribe`, `join`, …) with its targets and allows, refuses, or
//!   decides later from a worker;
//! - who is there: [`Application::on_user_online`] / [`Application::on_user_offline`], once per
//!   user transition across shards;
//! - what the tier does for them: [`Handle`] sends, asks for acks and replies, and drives rooms
//!   ([`Handle::join_room`]), presence watches ([`Handle::watch_presence`]) and presence
//!   ([`Handle::set_presence`], [`Handle::presence_many`]) on the users' behalf.
//!
//! ```
//! use std::sync::Arc;
//!
//! use customws::prelude::*;
//!
//! /// Answers `lookup` on a worker thread that keeps its own "database connection".
//! struct Lookups {
//!     workers: Workers<String>,
//! }
//!
//! impl Application for Lookups {
//!     fn on_message(&self, conn: &mut Conn<'_>, msg: &ClientMessage<'_>, _raw: &[u8]) -> Handled {
//!         if msg.kind != "lookup" {
//!             return Handled::No; // built-in behaviour: echo for generic_request, else 400
//!         }
//!         let (id, handle, pid) = (conn.id(), conn.handle().clone(), msg.pid_owned());
//!         let job = move |db: &mut String| {
//!             let answer = format!(r#"{{"from":"{db}"}}"#); // the blocking query goes here
//!             handle.respond(id, pid.as_deref().unwrap_or(""), "lookup_result", &answer);
//!         };
//!         if self.workers.spawn_with(job).is_err() {
//!             conn.error(msg.pid.as_deref(), 503, "busy, retry later");
//!         }
//!         Handled::Yes
//!     }
//!
//!     fn on_disconnect(&self, event: &Disconnect<'_>) {
//!         // The connection's data and the handle are there: tell someone.
//!         let note = OutMessage::json("left", &serde_json::json!({ "user": event.user_id }));
//!         if let Ok(note) = note {
//!             drop(event.handle().send_to_user(1, &note)); // fire-and-forget
//!         }
//!     }
//! }
//!
//! let mut config = Config::default();
//! config.listen = "127.0.0.1:0".parse().unwrap();
//! config.api_listen = "127.0.0.1:0".parse().unwrap();
//! config.jwt_secret = Some("a-secret-of-at-least-32-bytes-long!!".into());
//! let workers = Workers::with_init(4, 1024, || String::from("db"));
//! let server = start_with(config, Arc::new(Lookups { workers })).expect("start");
//! println!("listening on {}", server.local_addr());
//! server.shutdown();
//! server.wait();
//! ```
//!
//! Modules hidden from this documentation (`core`, `shard`, `ws`, …) are public only for the
//! benchmarks, the fuzz targets and the tests; they are not a stable API.
//!
//! # Cargo features
//!
//! All on by default; an embedding application can turn off what it does not use with
//! `default-features = false`:
//! - `backend`: forwarding to `backend_url` ([`backend`], pulls in `ureq` and rustls);
//! - `toml-config`: reading `--config` files (pulls in `toml`);
//! - `run`: [`run_until_signal`] and [`run::init_logging`] (pulls in `env_logger`,
//!   `signal-hook`);
//! - `cli`: all of the above, what the `customws` binary needs.

#[doc(hidden)]
pub mod api;
pub mod app;
#[cfg(feature = "backend")]
pub mod backend;
pub mod cluster;
pub mod config;
#[doc(hidden)]
pub mod core;
#[doc(hidden)]
pub mod dev;
pub mod http;
#[doc(hidden)]
pub mod logfmt;
#[doc(hidden)]
pub mod metrics;
pub mod protocol;
pub mod route;
#[cfg(feature = "run")]
pub mod run;
pub mod server;
#[doc(hidden)]
pub mod shard;
#[doc(hidden)]
pub mod ws;

pub use app::application::{Application, Handled};
pub use app::{Handle, OutMessage};
pub use config::Config;
#[cfg(feature = "run")]
pub use run::{run_until_signal, run_until_signal_with};
pub use server::{ServerHandle, StartError, start, start_with};

/// What an application needs, in one import: `use customws::prelude::*;`.
pub mod prelude {
    pub use crate::app::application::{
        Admission, Application, Busy, Conn, ConnId, Disconnect, Handled, Rejection, UserData, Workers,
    };
    pub use crate::app::application::{Authentication, Defer, PendingAuth};
    pub use crate::app::authorize::{BuiltinOp, Decision, Operation, Targets, Verdict};
    pub use crate::app::{AckReply, ClientReply, Handle, Joined, OutMessage, WaitError, Waiter};
    pub use crate::config::Config;
    pub use crate::http::auth::{AuthError, Identity, Roles};
    pub use crate::http::request::Request;
    pub use crate::protocol::ClientMessage;
    #[cfg(feature = "run")]
    pub use crate::run::{run_until_signal, run_until_signal_with};
    pub use crate::server::{ServerHandle, StartError, start, start_with};
}

/// README.md's Rust examples, compiled as doc tests so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

//! customws: a WebSocket connection tier.
//!
//! Sharded `mio` event loops (one per core, each with its own `SO_REUSEPORT` listener) hold
//! authenticated WebSocket connections and route messages between them: peer-to-peer through
//! the server, broadcast, presence. See `ARCHITECTURE.md` for the layers, bottom to top:
//! `ws` (framing) → `protocol` (envelopes, router) → `http` (upgrade gate) → `core`
//! (directory, presence, timers) → `shard` (event loop) → `server` (start/stop).

pub mod api;
pub mod app;
pub mod backend;
pub mod config;
pub mod core;
pub mod dev;
pub mod http;
pub mod logfmt;
pub mod metrics;
pub mod protocol;
pub mod route;
pub mod server;
pub mod shard;
pub mod ws;

pub use app::application::{Application, Handled};
pub use app::{Handle, OutMessage};
pub use config::Config;
pub use server::{ServerHandle, StartError, start, start_with};

/// README.md's Rust examples, compiled as doc tests so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

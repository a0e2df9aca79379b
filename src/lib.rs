//! customws: a WebSocket connection tier.
//!
//! Sharded `mio` event loops (one per core, each with its own `SO_REUSEPORT` listener) hold
//! authenticated WebSocket connections and route messages between them: peer-to-peer through
//! the server, broadcast, presence. See `ARCHITECTURE.md` for the layers.

pub mod config;

pub use config::Config;

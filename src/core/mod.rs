//! Sans-IO core state of a shard: timers, the user directory, presence. No sockets, no clock.

pub mod directory;
pub mod occupancy;
pub mod pending;
pub mod presence;
pub mod ratelimit;
pub mod rooms;
pub mod timer;

pub use directory::{ConnKey, Directory};
pub use presence::PresenceTable;
pub use timer::TimerWheel;

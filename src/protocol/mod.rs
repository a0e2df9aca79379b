//! The customws JSON protocol: envelopes and the built-in router's decisions.

pub mod envelope;
pub mod router;

pub use envelope::{ClientMessage, Envelope};

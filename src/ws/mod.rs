//! WebSocket wire layer: framing (sans-IO) and the upgrade response.

pub mod frame;

pub use frame::{Assembled, Frame, FrameEncoder, FrameError, FrameKind, OutKind, Reassembly, close};

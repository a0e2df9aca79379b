//! What applications implement and use: the [`application::Application`] callbacks, the
//! connection they see, the worker pool; and, re-exported from [`crate::route`], the handle
//! that issues server-initiated operations from any thread and their vocabulary.

pub mod application;
pub mod authorize;
pub mod handle {
    //! The application's handle (defined in [`crate::route::handle`]).
    pub use crate::route::handle::{Handle, Op, Waiter};
}
pub mod ops {
    //! The vocabulary of server-initiated operations (defined in [`crate::route`]).
    pub use crate::route::completion::*;
    pub use crate::route::out::OutMessage;
}

pub use handle::{Handle, Waiter};
pub use ops::{
    AckReply, ClientReply, Completion, ConnInfo, Joined, OutMessage, Outcome, UserPresence, WaitError,
};

//! Calling the application's callbacks from the shard: frames they queue are pushed to the
//! connection afterwards, and a panic closes that connection (1011) instead of the shard.

use std::panic::{AssertUnwindSafe, catch_unwind};

use super::Shard;
use crate::app::application::{Application, Conn, ConnId, Disconnect};
use crate::core::ConnKey;
use crate::ws::close;

impl Shard {
    /// Runs `f` with the connection `key` as the application sees it; `None` when the
    /// connection has no session or the callback panicked.
    pub(super) fn call_app<R>(
        &mut self,
        key: ConnKey,
        f: impl FnOnce(&dyn Application, &mut Conn<'_>) -> R,
    ) -> Option<R> {
        let id = ConnId(self.addr(key));
        let mut out = std::mem::take(&mut self.app_out);
        let result = {
            let session = self
                .conns
                .get(key.index as usize)
                .filter(|c| c.generation == key.generation)?
                .session
                .as_deref()?;
            let mut conn = Conn {
                id,
                user: session.user,
                claims: session.claims(),
                user_data: session.user_data(),
                handle: &self.handle,
                out: &mut out,
            };
            let app = &*self.shared.app;
            catch_unwind(AssertUnwindSafe(|| f(app, &mut conn)))
        };
        for frame in out.drain(..) {
            self.sink.push(&mut self.conns, key, frame);
        }
        self.app_out = out;
        match result {
            Ok(value) => Some(value),
            Err(_) => {
                log::error!("application callback panicked; closing the connection with 1011");
                self.close(key, close::INTERNAL, "internal error");
                None
            }
        }
    }

    /// Tells the application a connection is gone.
    pub(super) fn notify_disconnect(
        &self,
        user_id: i64,
        key: ConnKey,
        reason: &str,
        user_data: Option<&(dyn std::any::Any + Send + Sync)>,
    ) {
        let id = ConnId(self.addr(key));
        let event = Disconnect { user_id, id, reason, user_data, handle: &self.handle };
        let app = &*self.shared.app;
        if catch_unwind(AssertUnwindSafe(|| app.on_disconnect(&event))).is_err() {
            log::error!("application on_disconnect panicked");
        }
    }
}

impl Shard {
    /// Tells the application `user` (homed here) came online (`true`) or went offline at
    /// `at_ms`. Called by the home shard only, once per transition.
    pub(super) fn notify_user_transition(&self, user: i64, online: bool, at_ms: u64) {
        let app = &*self.shared.app;
        let handle = &self.handle;
        let call = || {
            if online {
                app.on_user_online(user, at_ms, handle);
            } else {
                app.on_user_offline(user, at_ms, handle);
            }
        };
        if catch_unwind(AssertUnwindSafe(call)).is_err() {
            log::error!(user, online; "application on_user_online/on_user_offline panicked");
        }
    }
}

//! Online/offline (seed §9), counted by the application until the tier reports first-connect
//! and last-disconnect itself (issue #10).
//!
//! `on_connect` / `on_disconnect` run on the shard threads of each connection; a user's
//! connections may live on several shards, so the count is one map under a lock. The 0 → 1
//! and 1 → 0 transitions queue a job in the user's serial lane (so online and offline are
//! applied in the order they happened) that stores the status (§9.2 `SetUserOnlineStatus`)
//! and pushes `PRESENCE_EVENT` to the user's **accepted contacts that are online** — nobody
//! else learns it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use customws::OutMessage;

use crate::app::Chat;
use crate::store::{self, now_ms};

/// Connections per user, in this process.
#[derive(Debug, Default)]
pub struct Presence {
    counts: Mutex<HashMap<i64, u32>>,
}

impl Presence {
    /// A connection of `user` opened; true when it is the first.
    pub fn opened(&self, user: i64) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(user).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// A connection of `user` closed; true when it was the last.
    pub fn closed(&self, user: i64) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match counts.get_mut(&user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                counts.remove(&user);
                true
            }
            None => false,
        }
    }

    /// Whether `user` has a connection now.
    pub fn is_online(&self, user: i64) -> bool {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&user)
    }
}

/// Runs in the user's lane after a 0 → 1 or 1 → 0 transition.
pub(crate) fn changed(chat: &Arc<Chat>, user: i64, online: bool) {
    let now = now_ms();
    let contacts = chat.db.conn().and_then(|mut db| {
        store::set_online(&mut db, user, online, now)?;
        store::accepted_contacts(&mut db, user)
    });
    let contacts = match contacts {
        Ok(list) => list,
        Err(e) => {
            log::error!("presence of user {user}: {e}");
            return;
        }
    };
    let watchers: Vec<i64> = contacts.into_iter().filter(|&c| chat.presence.is_online(c)).collect();
    if watchers.is_empty() {
        return;
    }
    let event = serde_json::json!({
        "userId": user,
        "event": if online { "user_online" } else { "user_offline" },
        "isOnline": online,
        "timestamp": now,
    });
    if let (Some(handle), Ok(msg)) = (chat.handle(), OutMessage::json("PRESENCE_EVENT", &event)) {
        drop(handle.send_to_users(&watchers, &msg));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_last_connection_are_reported_once() {
        let p = Presence::default();
        assert!(p.opened(1));
        assert!(!p.opened(1));
        assert!(p.is_online(1));
        assert!(!p.closed(1));
        assert!(p.is_online(1));
        assert!(p.closed(1));
        assert!(!p.is_online(1));
        assert!(!p.closed(1), "a close without an open is not a last close");
    }
}

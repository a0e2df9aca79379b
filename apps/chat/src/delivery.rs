//! Delivering chat messages with a client acknowledgement: a message becomes `delivered` only
//! when the recipient's client has acknowledged it (`client_ack`), so a connection dropping
//! mid-delivery never loses it — it stays `sent` and goes out again on the next connection.
//!
//! Each delivery is the tier's acknowledged send (`Handle::send_for_ack`'s operation,
//! `Op::Ack`) submitted with a [`Completion`] on this module's channel, so no thread blocks
//! while a client takes its time: one collector thread receives the outcomes and queues the
//! follow-up (store `delivered`, tell the sender) in the recipient's lane.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use crossbeam_channel::{Receiver, Sender};
use customws::app::handle::Op;
use customws::app::{Completion, Outcome, WaitError};
use customws::{Handle, OutMessage};

use crate::app::Chat;
use crate::store::{self, Message, now_ms};

/// How many times a delivery whose connection closed before acknowledging is retried at once
/// while the recipient still has another connection.
const RETRIES_ON_CLOSE: u32 = 3;
/// Most undelivered messages sent to a connecting user in one go: well under the tier's
/// per-connection queue (`send_queue`, 256 frames), which a bigger burst would overflow
/// (close 1013). The next batch goes when this one has been acknowledged.
pub const BACKLOG_BATCH: i64 = 64;

struct Pending {
    msg: Message,
    attempts: u32,
}

#[derive(Default)]
struct State {
    by_tag: HashMap<u64, Pending>,
    in_flight: HashSet<i64>,
    /// In-flight deliveries per recipient.
    per_user: HashMap<i64, usize>,
    /// Recipients whose last backlog batch was full: more may be waiting.
    more_backlog: HashSet<i64>,
    next_tag: u64,
}

/// Deliveries waiting for their client's acknowledgement.
pub struct Deliveries {
    tx: Sender<(u64, Outcome)>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries").field("in_flight", &self.in_flight()).finish()
    }
}

impl Deliveries {
    /// The tracker and the receiving end for [`start_collector`].
    pub fn new() -> (Deliveries, Receiver<(u64, Outcome)>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Deliveries { tx, state: Mutex::new(State::default()) }, rx)
    }

    /// Messages sent and not yet acknowledged or failed.
    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).in_flight.len()
    }

    /// Sends `msg` as `NEW_CHAT_MESSAGE` to the recipient's newest connection and waits (without
    /// a thread) for its `client_ack`. A message already on its way is not sent twice.
    pub fn deliver(&self, handle: &Handle, msg: Message, attempts: u32) {
        let payload = serde_json::json!({
            "id": msg.id.to_string(),
            "chatId": msg.chat_id,
            "fromUserId": msg.from,
            "fromUsername": msg.from_username,
            "toUserId": msg.to,
            "text": msg.text,
            "timestamp": msg.created_at,
        });
        let Ok(out) = OutMessage::json("NEW_CHAT_MESSAGE", &payload) else {
            return;
        };
        let to = msg.to;
        let tag = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if !state.in_flight.insert(msg.id) {
                return;
            }
            *state.per_user.entry(to).or_insert(0) += 1;
            state.next_tag += 1;
            let tag = state.next_tag;
            state.by_tag.insert(tag, Pending { msg, attempts });
            tag
        };
        handle.submit(
            Op::Ack { user: to, msg: &out, timeout: None },
            &Completion::new(self.tx.clone(), tag, None),
        );
    }

    fn take(&self, tag: u64) -> Option<Pending> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).by_tag.remove(&tag)
    }

    /// A delivery ended; true when it was the recipient's last in flight and a backlog batch
    /// was cut short, so the next batch should go.
    fn finished(&self, id: i64, to: i64) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.in_flight.remove(&id);
        let left = match state.per_user.get_mut(&to) {
            Some(n) if *n > 1 => {
                *n -= 1;
                *n
            }
            _ => {
                state.per_user.remove(&to);
                0
            }
        };
        left == 0 && state.more_backlog.remove(&to)
    }

    fn backlog_truncated(&self, user: i64, truncated: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if truncated {
            state.more_backlog.insert(user);
        } else {
            state.more_backlog.remove(&user);
        }
    }
}

/// Starts the thread that turns acknowledgements into status changes. It ends when the chat
/// server is gone.
pub fn start_collector(chat: Weak<Chat>, rx: Receiver<(u64, Outcome)>) {
    let spawned = std::thread::Builder::new().name("chat-acks".into()).spawn(move || {
        while let Ok((tag, outcome)) = rx.recv() {
            let Some(chat) = chat.upgrade() else {
                return;
            };
            let Some(pending) = chat.deliveries.take(tag) else {
                continue;
            };
            let to = pending.msg.to;
            let job_chat = Arc::clone(&chat);
            if chat.serial.submit_internal(to, move || settle(&job_chat, pending, outcome)).is_err() {
                log::error!("worker queue full: delivery outcome for user {to} dropped (message stays sent)");
            }
        }
    });
    if let Err(e) = spawned {
        log::error!("cannot start the delivery thread: {e}");
    }
}

/// Runs in the recipient's lane: records what the client's answer means.
fn settle(chat: &Arc<Chat>, pending: Pending, outcome: Outcome) {
    let Pending { msg, attempts } = pending;
    let (to, acked) = (msg.to, matches!(&outcome, Outcome::Ack(reply) if reply.error.is_none()));
    let next_batch = chat.deliveries.finished(msg.id, to);
    match outcome {
        Outcome::Ack(reply) if reply.error.is_none() => {
            let now = now_ms();
            let changed = chat.db.conn().and_then(|mut db| store::mark_delivered(&mut db, msg.id, now));
            match changed {
                Ok(true) => {
                    chat.count_delivered();
                    chat.push_status(msg.from, &msg.chat_id, &[msg.id], "delivered", now);
                }
                Ok(false) => {}
                Err(e) => log::error!("message {}: storing delivered: {e}", msg.id),
            }
        }
        Outcome::Failed(WaitError::Closed)
            if attempts < RETRIES_ON_CLOSE && chat.presence.is_online(msg.to) =>
        {
            // The connection it went to closed first; the user has another one.
            if let Some(handle) = chat.handle() {
                chat.deliveries.deliver(&handle, msg, attempts + 1);
            }
        }
        other => log::debug!("message {} to user {} stays sent: {other:?}", msg.id, msg.to),
    }
    if next_batch && acked {
        send_backlog(chat, to);
    }
}

/// Runs in the user's lane on every new connection: sends what is still undelivered.
pub(crate) fn send_backlog(chat: &Arc<Chat>, user: i64) {
    let Some(handle) = chat.handle() else {
        return;
    };
    match chat.db.conn().and_then(|mut db| store::undelivered(&mut db, user, BACKLOG_BATCH)) {
        Ok(messages) => {
            chat.deliveries.backlog_truncated(user, messages.len() as i64 >= BACKLOG_BATCH);
            for msg in messages {
                chat.deliveries.deliver(&handle, msg, 0);
            }
        }
        Err(e) => log::error!("undelivered messages of user {user}: {e}"),
    }
}

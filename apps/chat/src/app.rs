//! The chat application: the tier's callbacks and one handler per seed 002 message type.
//!
//! Callbacks run on shard threads and never touch the database: `on_message` recognises the
//! type, copies what the job needs and queues it in the sender's lane ([`Serial`]); the job
//! runs the queries on a worker and answers through the [`Handle`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use customws::app::application::{Admission, Conn, ConnId, Disconnect, Rejection};
use customws::http::auth::{AuthError, Identity};
use customws::http::request::Request;
use customws::protocol::ClientMessage;
use customws::{Application, Handle, Handled, OutMessage};
use serde_json::{Value, json};

use crate::auth::Sessions;
use crate::db::{Db, DbError, SlowQuery};
use crate::delivery::{self, Deliveries};
use crate::model::WsUserData;
use crate::presence::{self, Presence};
use crate::serial::Serial;
use crate::store::{self, now_ms};

/// Client → server types this application handles (seed 002 §5.2).
pub const CLIENT_TYPES: &[&str] = &[
    "GET_CHAT_LIST",
    "SEND_CHAT_MESSAGE",
    "MESSAGES_READ",
    "TYPING_INDICATOR_ON",
    "TYPING_INDICATOR_OFF",
    "GET_MY_PROFILE",
    "GET_USER_PROFILE",
    "UPDATE_MY_PROFILE",
    "GET_NOTIFICATIONS",
    "MARK_NOTIFICATION_READ",
];

/// Longest chat message text, in characters.
pub const MAX_TEXT_CHARS: usize = 4000;
/// Longest editable profile field, in characters.
pub const MAX_FIELD_CHARS: usize = 255;
/// Most notifications one `GET_NOTIFICATIONS` returns.
pub const MAX_NOTIFICATIONS: i64 = 200;
/// A viewer's repeated views of one profile notify its owner once per this period (ms).
pub const PROFILE_VIEW_PERIOD_MS: i64 = 3_600_000;
/// Remembered `(viewer, viewed)` pairs; the memory is cleared when it grows past this.
const MAX_REMEMBERED_VIEWS: usize = 100_000;

/// The state shared by callbacks and jobs.
#[derive(Debug)]
pub struct Chat {
    /// The database.
    pub db: Db,
    /// Session cache (authentication).
    pub sessions: Sessions,
    /// Connection counts (online/offline).
    pub presence: Presence,
    /// Per-user ordered jobs on the worker pool.
    pub serial: Arc<Serial>,
    /// Deliveries awaiting a client ack.
    pub deliveries: Deliveries,
    handle: RwLock<Option<Handle>>,
    /// `(viewer, viewed)` → when the viewed user was last notified.
    views: std::sync::Mutex<std::collections::HashMap<(i64, i64), i64>>,
    slow: Option<SlowQuery>,
    sent: AtomicU64,
    delivered: AtomicU64,
    read: AtomicU64,
}

impl Chat {
    /// The tier's handle (set at start, and by the first connection; `None` once stopped).
    pub fn handle(&self) -> Option<Handle> {
        self.handle.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Gives the chat the server's handle, unless it has one.
    pub fn set_handle(&self, handle: &Handle) {
        let mut slot = self.handle.write().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(handle.clone());
        }
    }

    /// Forgets the handle when the server stops: the handle keeps the tier's state alive, and
    /// that state keeps this application alive.
    pub fn clear_handle(&self) {
        *self.handle.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether a view of `viewed`'s profile by `viewer` at `now` should notify (once per
    /// [`PROFILE_VIEW_PERIOD_MS`], so repeated views cannot flood anyone's notifications).
    fn first_view(&self, viewer: i64, viewed: i64, now: i64) -> bool {
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if views.len() >= MAX_REMEMBERED_VIEWS {
            views.clear();
        }
        match views.get(&(viewer, viewed)) {
            Some(&at) if now - at < PROFILE_VIEW_PERIOD_MS => false,
            _ => {
                views.insert((viewer, viewed), now);
                true
            }
        }
    }

    pub(crate) fn count_delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// Pushes `MESSAGE_STATUS_UPDATE` to every connection of the sender.
    pub(crate) fn push_status(&self, sender: i64, chat_id: &str, ids: &[i64], status: &str, now: i64) {
        let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
        let payload = json!({ "chatId": chat_id, "messageIds": ids, "status": status, "timestamp": now });
        if let (Some(handle), Ok(msg)) = (self.handle(), OutMessage::json("MESSAGE_STATUS_UPDATE", &payload))
        {
            drop(handle.send_to_user(sender, &msg));
        }
    }
}

/// The application object given to `customws::start_with`.
#[derive(Debug, Clone)]
pub struct ChatApp {
    chat: Arc<Chat>,
}

impl ChatApp {
    /// Builds the application over an open database; `threads` workers, `queue` bound.
    pub fn new(db: Db, threads: usize, queue: usize, slow: Option<SlowQuery>) -> ChatApp {
        let (deliveries, outcomes) = Deliveries::new();
        let chat = Arc::new(Chat {
            db,
            sessions: Sessions::default(),
            presence: Presence::default(),
            serial: Serial::new(threads, queue, 64),
            deliveries,
            handle: RwLock::new(None),
            views: Default::default(),
            slow,
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            read: AtomicU64::new(0),
        });
        delivery::start_collector(Arc::downgrade(&chat), outcomes);
        ChatApp { chat }
    }

    /// The shared state.
    pub fn chat(&self) -> &Arc<Chat> {
        &self.chat
    }
}

/// A client request, as a job needs it.
struct Req {
    conn: ConnId,
    user: WsUserData,
    pid: Option<String>,
    kind: String,
    payload: Value,
}

/// A refusal: `ERROR_NOTIFICATION` `{code, message}` (seed §11.1).
struct Refusal {
    code: u16,
    message: String,
}

fn refuse(code: u16, message: impl Into<String>) -> Refusal {
    Refusal { code, message: message.into() }
}

impl From<DbError> for Refusal {
    fn from(e: DbError) -> Self {
        log::error!("{e}");
        refuse(500, "database error")
    }
}

impl Application for ChatApp {
    fn authenticate(
        &self,
        request: &Request,
        _jwt: Result<Identity, AuthError>,
    ) -> Result<Admission, Rejection> {
        self.chat.sessions.authenticate(request)
    }

    fn on_connect(&self, conn: &mut Conn<'_>) {
        if self.chat.handle.read().is_ok_and(|h| h.is_none()) {
            self.chat.set_handle(conn.handle());
        }
        let user = conn.user_id();
        let first = self.chat.presence.opened(user);
        let chat = Arc::clone(&self.chat);
        let job = move || {
            if first {
                presence::changed(&chat, user, true);
            }
            delivery::send_backlog(&chat, user);
        };
        if self.chat.serial.submit_internal(user, job).is_err() {
            log::error!("worker queue full: connect of user {user} not processed");
        }
    }

    fn on_disconnect(&self, event: &Disconnect<'_>) {
        let user = event.user_id;
        if self.chat.presence.closed(user) {
            let chat = Arc::clone(&self.chat);
            if self.chat.serial.submit_internal(user, move || presence::changed(&chat, user, false)).is_err()
            {
                log::error!("worker queue full: disconnect of user {user} not processed");
            }
        }
    }

    fn on_message(&self, conn: &mut Conn<'_>, msg: &ClientMessage<'_>, _raw: &[u8]) -> Handled {
        let Some(kind) = CLIENT_TYPES.iter().find(|k| **k == msg.kind) else {
            return Handled::No;
        };
        let pid = msg.pid.as_deref().map(str::to_owned);
        let payload = match msg.payload.map(|p| serde_json::from_str::<Value>(p.get())) {
            None => Value::Null,
            Some(Ok(value)) => value,
            Some(Err(_)) => Value::Null,
        };
        let user = conn.user_data::<WsUserData>().cloned().unwrap_or_else(|| WsUserData {
            id: conn.user_id(),
            username: String::new(),
            first_name: String::new(),
            last_name: String::new(),
        });
        let req = Req { conn: conn.id(), user, pid, kind: (*kind).to_string(), payload };
        let chat = Arc::clone(&self.chat);
        let key = conn.user_id();
        if self.chat.serial.submit(key, move || run(&chat, req)).is_err() {
            let frame = error_frame(msg.pid.as_deref(), 503, "server busy, retry later");
            conn.handle().send_frame_to_conn(conn.id(), frame);
        }
        Handled::Yes
    }

    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            ("chat_messages_sent", "Chat messages stored.", self.chat.sent.load(Ordering::Relaxed)),
            ("chat_messages_delivered", "Chat messages acknowledged by the recipient's client.", {
                self.chat.delivered.load(Ordering::Relaxed)
            }),
            ("chat_messages_read", "Chat messages marked read.", self.chat.read.load(Ordering::Relaxed)),
        ]
    }
}

fn error_frame(pid: Option<&str>, code: u16, message: &str) -> bytes::Bytes {
    let payload = json!({ "code": code, "message": message });
    OutMessage::json("ERROR_NOTIFICATION", &payload).map(|m| m.frame(pid)).unwrap_or_default()
}

/// Runs one request on a worker and answers it.
fn run(chat: &Arc<Chat>, req: Req) {
    let Some(handle) = chat.handle() else {
        return;
    };
    if let Some(slow) = chat.slow.as_ref().filter(|s| s.kind == req.kind)
        && let Err(e) = chat.db.conn().and_then(|mut db| db.sleep(slow.delay))
    {
        log::error!("slow query hook: {e}");
    }
    let result = match req.kind.as_str() {
        "GET_CHAT_LIST" => get_chat_list(chat, &req),
        "SEND_CHAT_MESSAGE" => send_chat_message(chat, &handle, &req),
        "MESSAGES_READ" => messages_read(chat, &req),
        "TYPING_INDICATOR_ON" => typing(chat, &handle, &req, true),
        "TYPING_INDICATOR_OFF" => typing(chat, &handle, &req, false),
        "GET_MY_PROFILE" => my_profile(chat, &req),
        "GET_USER_PROFILE" => user_profile(chat, &handle, &req),
        "UPDATE_MY_PROFILE" => update_my_profile(chat, &req),
        "GET_NOTIFICATIONS" => get_notifications(chat, &req),
        "MARK_NOTIFICATION_READ" => mark_notification_read(chat, &req),
        _ => Err(refuse(400, "unknown message type")),
    };
    let frame = match result {
        Ok(Some((kind, payload))) => match OutMessage::json(kind, &payload) {
            Ok(msg) => msg.frame(req.pid.as_deref()),
            Err(_) => return,
        },
        Ok(None) => return,
        Err(refusal) => error_frame(req.pid.as_deref(), refusal.code, &refusal.message),
    };
    handle.send_frame_to_conn(req.conn, frame);
}

type Answer = Result<Option<(&'static str, Value)>, Refusal>;

fn ack(req: &Req, status: &str, extra: Value) -> Answer {
    let mut payload = json!({ "acknowledgedPid": req.pid, "status": status });
    if let (Value::Object(map), Value::Object(more)) = (&mut payload, extra) {
        map.extend(more);
    }
    Ok(Some(("SERVER_ACK", payload)))
}

/// An id given as a number or a decimal string.
fn id_field(payload: &Value, name: &str) -> Option<i64> {
    match payload.get(name)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|&id| id > 0)
}

fn str_field<'a>(payload: &'a Value, name: &str) -> Option<&'a str> {
    payload.get(name).and_then(Value::as_str)
}

fn get_chat_list(chat: &Arc<Chat>, req: &Req) -> Answer {
    let mut chats = store::chat_list(&mut chat.db.conn()?, req.user.id)?;
    for info in &mut chats {
        info.is_other_online = chat.presence.is_online(info.other_user_id);
    }
    Ok(Some(("CHAT_LIST", json!({ "chats": chats }))))
}

fn send_chat_message(chat: &Arc<Chat>, handle: &Handle, req: &Req) -> Answer {
    let to = id_field(&req.payload, "toUserId").ok_or_else(|| refuse(400, "toUserId required"))?;
    let text = str_field(&req.payload, "text").ok_or_else(|| refuse(400, "text required"))?;
    if text.trim().is_empty() {
        return Err(refuse(400, "text must not be empty"));
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(refuse(413, format!("text longer than {MAX_TEXT_CHARS} characters")));
    }
    if to == req.user.id {
        return Err(refuse(400, "cannot message yourself"));
    }
    let mut db = chat.db.conn()?;
    let chat_id = store::chat_between(&mut db, req.user.id, to)?
        .ok_or_else(|| refuse(403, format!("user {to} is not an accepted contact")))?;
    let now = now_ms();
    let id = store::insert_message(&mut db, &chat_id, req.user.id, to, text, now)?;
    drop(db);
    chat.sent.fetch_add(1, Ordering::Relaxed);
    if chat.presence.is_online(to) {
        let msg = store::Message {
            id,
            chat_id: chat_id.clone(),
            from: req.user.id,
            from_username: req.user.username.clone(),
            to,
            text: text.to_string(),
            created_at: now,
        };
        chat.deliveries.deliver(handle, msg, 0);
    }
    ack(req, "sent", json!({ "messageId": id.to_string(), "chatId": chat_id, "timestamp": now }))
}

fn messages_read(chat: &Arc<Chat>, req: &Req) -> Answer {
    let chat_id = str_field(&req.payload, "chatId").ok_or_else(|| refuse(400, "chatId required"))?;
    let up_to = id_field(&req.payload, "upToMessageId");
    let mut db = chat.db.conn()?;
    let partner = store::chat_partner(&mut db, chat_id, req.user.id)?
        .ok_or_else(|| refuse(403, "not a chat of yours"))?;
    let now = now_ms();
    let ids = store::mark_read(&mut db, chat_id, req.user.id, up_to, now)?;
    drop(db);
    if !ids.is_empty() {
        chat.read.fetch_add(ids.len() as u64, Ordering::Relaxed);
        chat.push_status(partner, chat_id, &ids, "read", now);
    }
    ack(req, "read", json!({ "chatId": chat_id, "count": ids.len() }))
}

fn typing(chat: &Arc<Chat>, handle: &Handle, req: &Req, on: bool) -> Answer {
    let to = id_field(&req.payload, "toUserId").ok_or_else(|| refuse(400, "toUserId required"))?;
    let chat_id = store::chat_between(&mut chat.db.conn()?, req.user.id, to)?
        .ok_or_else(|| refuse(403, format!("user {to} is not an accepted contact")))?;
    let kind = if on { "TYPING_INDICATOR_ON" } else { "TYPING_INDICATOR_OFF" };
    let payload = json!({ "chatId": chat_id, "fromUserId": req.user.id, "isTyping": on });
    if let Ok(mut msg) = OutMessage::json(kind, &payload) {
        msg.from_user_id = Some(req.user.id);
        drop(handle.send_to_user(to, &msg));
    }
    if req.pid.is_some() { ack(req, "ok", json!({})) } else { Ok(None) }
}

fn my_profile(chat: &Arc<Chat>, req: &Req) -> Answer {
    let mut profile =
        store::profile(&mut chat.db.conn()?, req.user.id)?.ok_or_else(|| refuse(404, "no such user"))?;
    profile.is_online = chat.presence.is_online(req.user.id);
    Ok(Some(("MY_PROFILE_DATA", serde_json::to_value(profile).unwrap_or(Value::Null))))
}

fn user_profile(chat: &Arc<Chat>, handle: &Handle, req: &Req) -> Answer {
    let target = id_field(&req.payload, "userId").ok_or_else(|| refuse(400, "userId required"))?;
    let me = req.user.id;
    let mut db = chat.db.conn()?;
    let mut profile = store::profile(&mut db, target)?.ok_or_else(|| refuse(404, "no such user"))?;
    let contact = target == me || store::chat_between(&mut db, me, target)?.is_some();
    if contact {
        profile.is_online = chat.presence.is_online(target);
    } else {
        // Presence and contact details are for accepted contacts only.
        profile.email.clear();
        profile.phone.clear();
        profile.last_seen = None;
    }
    if target != me && chat.first_view(me, target, now_ms()) {
        let name = format!("{} {}", req.user.first_name, req.user.last_name);
        let note = store::insert_notification(
            &mut db,
            target,
            "profile_view",
            "Profile viewed",
            &format!("{} viewed your profile", name.trim()),
            Some(&json!({ "viewerId": me, "viewerUsername": req.user.username })),
            now_ms(),
        )?;
        if chat.presence.is_online(target)
            && let Ok(msg) = OutMessage::json("NEW_NOTIFICATION", &note)
        {
            drop(handle.send_to_user(target, &msg));
        }
    }
    Ok(Some(("USER_PROFILE_DATA", serde_json::to_value(profile).unwrap_or(Value::Null))))
}

fn update_my_profile(chat: &Arc<Chat>, req: &Req) -> Answer {
    let Value::Object(fields) = &req.payload else {
        return Err(refuse(400, "payload must be an object of profile fields"));
    };
    let mut changes = Vec::new();
    for (field, column) in store::EDITABLE {
        let Some(value) = fields.get(*field) else {
            continue;
        };
        let value = value.as_str().ok_or_else(|| refuse(400, format!("{field} must be a string")))?;
        if value.chars().count() > MAX_FIELD_CHARS {
            return Err(refuse(400, format!("{field} longer than {MAX_FIELD_CHARS} characters")));
        }
        changes.push((*column, value.to_string()));
    }
    if changes.is_empty() {
        return Err(refuse(400, "nothing to update"));
    }
    let mut db = chat.db.conn()?;
    store::update_profile(&mut db, req.user.id, &changes)?;
    let mut profile = store::profile(&mut db, req.user.id)?.ok_or_else(|| refuse(404, "no such user"))?;
    profile.is_online = chat.presence.is_online(req.user.id);
    Ok(Some(("MY_PROFILE_DATA", serde_json::to_value(profile).unwrap_or(Value::Null))))
}

fn get_notifications(chat: &Arc<Chat>, req: &Req) -> Answer {
    let unread_only = req.payload.get("unreadOnly").and_then(Value::as_bool).unwrap_or(false);
    let limit = req.payload.get("limit").and_then(Value::as_i64).unwrap_or(50).clamp(1, MAX_NOTIFICATIONS);
    let list = store::notifications(&mut chat.db.conn()?, req.user.id, unread_only, limit)?;
    Ok(Some(("NOTIFICATION_LIST", json!({ "notifications": list }))))
}

fn mark_notification_read(chat: &Arc<Chat>, req: &Req) -> Answer {
    let id =
        id_field(&req.payload, "notificationId").ok_or_else(|| refuse(400, "notificationId required"))?;
    if !store::mark_notification_read(&mut chat.db.conn()?, req.user.id, id)? {
        return Err(refuse(404, "no such notification"));
    }
    ack(req, "read", json!({ "notificationId": id.to_string() }))
}

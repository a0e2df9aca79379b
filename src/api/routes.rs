//! Routing: a request (method, path, JSON body) becomes a [`Call`] on the application
//! handle, and the call's outcomes become one [`Reply`].

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::reply::{Reply, wait_failed};
use crate::core::rooms::validate_name;
use crate::route::handle::{MAX_PRESENCE_MANY, MAX_STATUS_BYTES, MAX_WATCH_TARGETS};
use crate::route::{Completion, OutMessage, Outcome, UserPresence};
use crate::route::{Handle, Op};

/// Largest `timeoutMs` accepted (one hour).
const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// A routed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Route {
    /// `POST /api/v1/send`.
    Send,
    /// `POST /api/v1/send_many`.
    SendMany,
    /// `POST /api/v1/broadcast`.
    Broadcast,
    /// `POST /api/v1/request`.
    Request,
    /// `GET /api/v1/users/{id}`.
    User(i64),
    /// `DELETE /api/v1/users/{id}/connections`.
    Disconnect(i64),
    /// `POST /api/v1/rooms/{room}/publish`, with the room name (percent-decoded, valid).
    RoomPublish(String),
    /// `GET /api/v1/rooms/{room}`, with the room name (percent-decoded, valid).
    Room(String),
    /// `GET /api/v1/rooms/{room}/presence`, with the room name (percent-decoded, valid).
    RoomPresence(String),
    /// `GET /api/v1/connections?cursor=&limit=&user=` (admin listing).
    Connections,
    /// `GET /api/v1/rooms?limit=` (admin listing).
    Rooms,
    /// `GET /api/v1/events` (admin event stream).
    Events,
    /// `POST /api/v1/users/{id}/rooms/{room}`: the user's connections join the room.
    UserJoin(i64, String),
    /// `DELETE /api/v1/users/{id}/rooms/{room}`: the user's connections leave the room.
    UserLeave(i64, String),
    /// `POST /api/v1/users/{id}/watches` `{"userIds"}`: watch those users' presence.
    Watch(i64),
    /// `DELETE /api/v1/users/{id}/watches` `{"userIds"}`: stop watching them.
    Unwatch(i64),
    /// `PUT /api/v1/users/{id}/presence` `{"status", "context"?}`.
    SetPresence(i64),
    /// `POST /api/v1/presence` `{"userIds"}`: many users' presence in one call.
    PresenceMany,
}

/// The answer to a request that needs no API key (the admin page's HTML shell), if it is one.
pub(super) fn public(method: &str, path: &str) -> Option<Reply> {
    super::admin::public(method, path)
}

/// Finds the route of `method path`: 404 for an unknown path, 405 for a known path with
/// another method, 400 for a user id that is not an integer or an invalid room name.
pub(super) fn route(method: &str, path: &str) -> Result<Route, Reply> {
    let Some(rest) = path.strip_prefix("/api/v1/") else {
        return Err(not_found(path));
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let (route, allow) = match segments.as_slice() {
        ["send"] => (Route::Send, "POST"),
        ["send_many"] => (Route::SendMany, "POST"),
        ["broadcast"] => (Route::Broadcast, "POST"),
        ["request"] => (Route::Request, "POST"),
        ["connections"] => (Route::Connections, "GET"),
        ["rooms"] => (Route::Rooms, "GET"),
        ["events"] => (Route::Events, "GET"),
        ["users", id] if !id.is_empty() => (Route::User(user_id(id)?), "GET"),
        ["users", id, "connections"] if !id.is_empty() => (Route::Disconnect(user_id(id)?), "DELETE"),
        ["rooms", room] if !room.is_empty() => (Route::Room(room_name(room)?), "GET"),
        ["rooms", room, "publish"] if !room.is_empty() => (Route::RoomPublish(room_name(room)?), "POST"),
        ["rooms", room, "presence"] if !room.is_empty() => (Route::RoomPresence(room_name(room)?), "GET"),
        ["presence"] => (Route::PresenceMany, "POST"),
        ["users", id, "presence"] if !id.is_empty() => (Route::SetPresence(user_id(id)?), "PUT"),
        ["users", id, "rooms", room] if !id.is_empty() && !room.is_empty() => {
            let (user, room) = (user_id(id)?, room_name(room)?);
            return post_or_delete(method, Route::UserJoin(user, room.clone()), Route::UserLeave(user, room));
        }
        ["users", id, "watches"] if !id.is_empty() => {
            let user = user_id(id)?;
            return post_or_delete(method, Route::Watch(user), Route::Unwatch(user));
        }
        _ => return Err(not_found(path)),
    };
    if method == allow { Ok(route) } else { Err(Reply::method_not_allowed(allow)) }
}

/// A path with two methods: POST adds, DELETE takes away.
fn post_or_delete(method: &str, post: Route, delete: Route) -> Result<Route, Reply> {
    match method {
        "POST" => Ok(post),
        "DELETE" => Ok(delete),
        _ => Err(Reply::method_not_allowed("POST, DELETE")),
    }
}

fn not_found(path: &str) -> Reply {
    Reply::error(404, &format!("no API endpoint at {path}"))
}

fn user_id(segment: &str) -> Result<i64, Reply> {
    segment
        .parse()
        .map_err(|_| Reply::error(400, &format!("user id in the path must be an integer, got {segment:?}")))
}

/// The room name of a path segment: percent-decoded (so `#`, which cannot appear raw in a
/// request target, is written `%23`), then checked with [`validate_name`].
fn room_name(segment: &str) -> Result<String, Reply> {
    let bad = |why: &str| Reply::error(400, &format!("invalid room name {segment:?} in the path: {why}"));
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
            let Some(byte) = hex.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())
            else {
                return Err(bad("a '%' must be followed by two hex digits"));
            };
            decoded.push(byte);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let name = String::from_utf8(decoded).map_err(|_| bad("not UTF-8 once decoded"))?;
    validate_name(&name).map_err(|e| bad(&e.to_string()))?;
    Ok(name)
}

/// An operation to start on the handle, owning its inputs.
#[derive(Debug)]
pub(super) enum Call {
    /// Send to one user (404 when offline) or to several (`many`).
    Send {
        /// Receiving users.
        users: Vec<i64>,
        /// The message.
        msg: OutMessage,
        /// `send_many`: never 404.
        many: bool,
    },
    /// Broadcast with exclusions.
    Broadcast {
        /// The message.
        msg: OutMessage,
        /// Users to skip.
        exclude: Vec<i64>,
    },
    /// Send for a `client_ack`.
    Ack {
        /// Receiving user.
        user: i64,
        /// The message.
        msg: OutMessage,
        /// `timeoutMs`.
        timeout: Option<Duration>,
    },
    /// Send a request and wait for the reply.
    Request {
        /// Receiving user.
        user: i64,
        /// The message.
        msg: OutMessage,
        /// `timeoutMs`.
        timeout: Option<Duration>,
    },
    /// Query a user's connections and presence.
    Query {
        /// The user.
        user: i64,
    },
    /// Close a user's connections.
    Disconnect {
        /// The user.
        user: i64,
    },
    /// Publish a `room_message` to a room's members.
    RoomPublish {
        /// The room (valid).
        room: String,
        /// `body`, raw JSON (validated by the parse).
        body: Box<RawValue>,
        /// `meta`, raw JSON; `None` when absent or `null`.
        meta: Option<Box<RawValue>>,
        /// `fromUserId`; `null` in the envelope when `None`.
        from: Option<i64>,
    },
    /// List a room's members.
    RoomMembers {
        /// The room (valid).
        room: String,
    },
    /// A room's members with their presence: the member list from every shard, then one
    /// presence query per member.
    RoomPresence {
        /// The room (valid).
        room: String,
    },
    /// A page of the open connections (admin).
    Connections {
        /// Cursor: the last open order already listed.
        after: u64,
        /// Only this user's.
        user: Option<i64>,
        /// Page size.
        limit: usize,
    },
    /// Rooms and their member counts (admin).
    Rooms {
        /// Most rooms listed.
        limit: usize,
    },
    /// Put the user's connections into a room (`leave`: take them out).
    Membership {
        /// The user.
        user: i64,
        /// The room (valid).
        room: String,
        /// Leave instead of join.
        leave: bool,
    },
    /// Add presence watches for a user (`remove`: drop them).
    Watch {
        /// The watching user.
        watcher: i64,
        /// Users to watch.
        targets: Vec<i64>,
        /// Unwatch instead.
        remove: bool,
    },
    /// Set a user's presence.
    SetPresence {
        /// The user.
        user: i64,
        /// The status.
        status: String,
        /// The context, raw JSON; `None` when absent or `null`.
        context: Option<Box<RawValue>>,
    },
    /// Many users' presence.
    PresenceMany {
        /// The users.
        users: Vec<i64>,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageIn {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: Option<Box<RawValue>>,
    #[serde(default)]
    from_user_id: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendIn {
    user_id: i64,
    message: Box<RawValue>,
    #[serde(default)]
    ack: bool,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendManyIn {
    user_ids: Vec<i64>,
    message: Box<RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BroadcastIn {
    message: Box<RawValue>,
    #[serde(default)]
    exclude: Vec<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn {
    user_id: i64,
    message: Box<RawValue>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UserIdsIn {
    user_ids: Vec<i64>,
}

#[derive(Deserialize)]
struct PresenceIn {
    status: String,
    #[serde(default)]
    context: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RoomPublishIn {
    body: Box<RawValue>,
    #[serde(default)]
    meta: Option<Box<RawValue>>,
    #[serde(default)]
    from_user_id: Option<i64>,
}

/// The call for a routed request with its body, or the reply when there is nothing to start.
pub(super) fn call(route: Route, body: &[u8]) -> Result<Call, Reply> {
    Ok(match route {
        Route::Send => {
            let input: SendIn = parse_body(body)?;
            let msg = message(&input.message)?;
            if input.ack {
                Call::Ack { user: input.user_id, msg, timeout: timeout(input.timeout_ms)? }
            } else {
                Call::Send { users: vec![input.user_id], msg, many: false }
            }
        }
        Route::SendMany => {
            let input: SendManyIn = parse_body(body)?;
            Call::Send { users: input.user_ids, msg: message(&input.message)?, many: true }
        }
        Route::Broadcast => {
            let input: BroadcastIn = parse_body(body)?;
            Call::Broadcast { msg: message(&input.message)?, exclude: input.exclude }
        }
        Route::Request => {
            let input: RequestIn = parse_body(body)?;
            let msg = message(&input.message)?;
            Call::Request { user: input.user_id, msg, timeout: timeout(input.timeout_ms)? }
        }
        Route::User(user) => Call::Query { user },
        Route::Disconnect(user) => Call::Disconnect { user },
        Route::RoomPublish(room) => {
            let input: RoomPublishIn = parse_object(body)?;
            Call::RoomPublish { room, body: input.body, meta: input.meta, from: input.from_user_id }
        }
        Route::Room(room) => Call::RoomMembers { room },
        Route::RoomPresence(room) => Call::RoomPresence { room },
        Route::UserJoin(user, room) => Call::Membership { user, room, leave: false },
        Route::UserLeave(user, room) => Call::Membership { user, room, leave: true },
        Route::Watch(watcher) | Route::Unwatch(watcher) => {
            let remove = matches!(route, Route::Unwatch(_));
            let targets = user_ids(body, MAX_WATCH_TARGETS)?;
            Call::Watch { watcher, targets, remove }
        }
        Route::SetPresence(user) => {
            let input: PresenceIn = parse_object(body)?;
            if input.status.is_empty() || input.status.len() > MAX_STATUS_BYTES {
                let message = format!("status must be 1 to {MAX_STATUS_BYTES} bytes");
                return Err(Reply::error(400, &message));
            }
            let context = input.context.filter(|c| c.get() != "null");
            Call::SetPresence { user, status: input.status, context }
        }
        Route::PresenceMany => Call::PresenceMany { users: user_ids(body, MAX_PRESENCE_MANY)? },
        Route::Connections | Route::Rooms | Route::Events => {
            return Err(Reply::error(500, "admin routes take their parameters from the query"));
        }
    })
}

/// A body `{"userIds": [...]}` of at most `max` ids.
fn user_ids(body: &[u8], max: usize) -> Result<Vec<i64>, Reply> {
    let input: UserIdsIn = parse_object(body)?;
    if input.user_ids.len() > max {
        let message = format!("at most {max} userIds per call, got {}", input.user_ids.len());
        return Err(Reply::error(400, &message));
    }
    Ok(input.user_ids)
}

fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Reply> {
    serde_json::from_slice(body).map_err(|e| Reply::error(400, &describe("request body", &e)))
}

/// [`parse_body`] for a body that must be a JSON object: serde would otherwise take an array
/// as the struct's fields in order (`[1]` as `{"body": 1}`).
fn parse_object<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Reply> {
    if body.trim_ascii_start().starts_with(b"[") {
        return Err(Reply::error(400, "invalid request body: expected a JSON object"));
    }
    parse_body(body)
}

fn describe(what: &str, e: &serde_json::Error) -> String {
    match e.classify() {
        serde_json::error::Category::Data => format!("invalid {what}: {e}"),
        _ => format!("{what} is not valid JSON: {e}"),
    }
}

fn message(raw: &RawValue) -> Result<OutMessage, Reply> {
    let input: MessageIn = serde_json::from_str(raw.get()).map_err(|e| {
        let text = if raw.get().trim_start().starts_with('{') {
            format!("invalid message: {e}")
        } else {
            "invalid message: expected an object {\"type\", \"payload\"?, \"fromUserId\"?}".to_string()
        };
        Reply::error(400, &text)
    })?;
    if input.kind.is_empty() {
        return Err(Reply::error(400, "invalid message: `type` must not be empty"));
    }
    Ok(OutMessage { kind: input.kind, payload: input.payload, from_user_id: input.from_user_id })
}

fn timeout(ms: Option<u64>) -> Result<Option<Duration>, Reply> {
    match ms {
        None => Ok(None),
        Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Ok(Some(Duration::from_millis(ms))),
        Some(_) => Err(Reply::error(400, &format!("timeoutMs must be between 1 and {MAX_TIMEOUT_MS}"))),
    }
}

/// Starts one more operation of a call already waiting (with the call's completion); returns
/// how many outcomes it adds.
pub(super) type Submit<'s> = dyn FnMut(Op<'_>) -> usize + 's;

/// What a started call still waits for, and how its outcomes add up.
#[derive(Debug)]
pub(super) struct Tally {
    kind: Kind,
    left: usize,
    delivered: usize,
    /// `Joined`: connections the limits kept out of the room.
    refused: usize,
    members: Vec<i64>,
    /// `Query`: the user's connection count, once in.
    connections: Option<usize>,
    /// `Query`, `RoomPresence`: presences received.
    presences: Vec<UserPresence>,
    /// `RoomPresence`: the member list is complete and the presence queries are out.
    second_step: bool,
    /// `Connections`: the shards' pages (boxed: most calls never list connections).
    gather: Option<Box<super::admin::Gather>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    SendOne { user: i64 },
    Sum,
    Ack,
    Request,
    Query { user: i64 },
    Disconnect,
    Members { room: String },
    RoomPresence { room: String },
    Connections { limit: usize },
    Rooms,
    Joined,
    Affected,
    PresenceMany,
}

impl Call {
    /// Starts the call; its outcomes arrive through `done`.
    pub(super) fn submit(&self, handle: &Handle, done: &Completion) -> Tally {
        self.start(&mut |op| handle.submit(op, done))
    }

    /// Starts the call's operations with `submit`.
    fn start(&self, submit: &mut Submit<'_>) -> Tally {
        let (op, kind) = match self {
            Call::Send { users, msg, many } => {
                let kind = match (many, users.as_slice()) {
                    (false, [user]) => Kind::SendOne { user: *user },
                    _ => Kind::Sum,
                };
                (Op::Send { users, msg }, kind)
            }
            Call::Broadcast { msg, exclude } => (Op::Broadcast { msg, exclude }, Kind::Sum),
            Call::Ack { user, msg, timeout } => (Op::Ack { user: *user, msg, timeout: *timeout }, Kind::Ack),
            Call::Request { user, msg, timeout } => {
                (Op::Request { user: *user, msg, timeout: *timeout }, Kind::Request)
            }
            Call::Query { user } => {
                let left = submit(Op::Query { user: *user }) + submit(Op::Presence { user: *user });
                return Tally::new(Kind::Query { user: *user }, left);
            }
            Call::Disconnect { user } => (Op::Disconnect { user: *user }, Kind::Disconnect),
            Call::RoomPublish { room, body, meta, from } => {
                (Op::RoomPublish { room, body, meta: meta.as_deref(), from: *from }, Kind::Sum)
            }
            Call::RoomMembers { room } => (Op::RoomMembers { room }, Kind::Members { room: room.clone() }),
            Call::RoomPresence { room } => {
                (Op::RoomMembers { room }, Kind::RoomPresence { room: room.clone() })
            }
            Call::Connections { after, user, limit } => (
                Op::AdminConnections { after: *after, user: *user, limit: *limit },
                Kind::Connections { limit: *limit },
            ),
            Call::Rooms { limit } => (Op::AdminRooms { limit: *limit }, Kind::Rooms),
            Call::Membership { user, room, leave: false } => {
                (Op::JoinRoom { user: *user, room }, Kind::Joined)
            }
            Call::Membership { user, room, leave: true } => {
                (Op::LeaveRoom { user: *user, room }, Kind::Affected)
            }
            Call::Watch { watcher, targets, remove: false } => {
                (Op::Watch { watcher: *watcher, targets }, Kind::Affected)
            }
            Call::Watch { watcher, targets, remove: true } => {
                (Op::Unwatch { watcher: *watcher, targets }, Kind::Affected)
            }
            Call::SetPresence { user, status, context } => {
                (Op::SetPresence { user: *user, status, context: context.as_deref() }, Kind::Affected)
            }
            Call::PresenceMany { users } => (Op::PresenceMany { users }, Kind::PresenceMany),
        };
        let left = submit(op);
        Tally::new(kind, left)
    }

    /// Whether the call waits for a client (its safety deadline is the wait's timeout).
    pub(super) fn wait_timeout(&self) -> Option<Option<Duration>> {
        match self {
            Call::Ack { timeout, .. } | Call::Request { timeout, .. } => Some(*timeout),
            _ => None,
        }
    }
}

impl Tally {
    fn new(kind: Kind, left: usize) -> Self {
        Tally {
            kind,
            left,
            delivered: 0,
            refused: 0,
            members: Vec::new(),
            connections: None,
            presences: Vec::new(),
            second_step: false,
            gather: None,
        }
    }

    /// The reply when every outcome is already in (a call with no parts: `send_many` to an
    /// empty list).
    pub(super) fn finished(&self) -> Option<Reply> {
        (self.left == 0).then(|| match &self.kind {
            Kind::Members { room } => self.listed(room),
            Kind::RoomPresence { room } => self.room_presence(room),
            Kind::Joined => self.joined(),
            Kind::Affected => self.affected(),
            Kind::PresenceMany => self.presence_many(),
            _ => self.summed(),
        })
    }

    /// Takes one outcome; the reply once the call is complete. A call with a second step
    /// starts it through `submit` once its first step is complete (a room presence call asks
    /// each member's presence once every shard has listed its members).
    pub(super) fn absorb(&mut self, outcome: Outcome, submit: &mut Submit<'_>) -> Option<Reply> {
        self.left = self.left.saturating_sub(1);
        let reply = match (&self.kind, outcome) {
            (_, Outcome::Failed(e)) => wait_failed(e),
            (Kind::SendOne { user }, Outcome::Delivered(0)) => {
                Reply::wait_error(404, "offline", &format!("user {user} is not connected"))
            }
            (Kind::SendOne { .. } | Kind::Sum, Outcome::Delivered(n)) => {
                self.delivered += n;
                if self.left > 0 {
                    return None;
                }
                self.summed()
            }
            (Kind::Ack, Outcome::Ack(ack)) => Reply::ok(
                serde_json::json!({
                    "delivered": 1,
                    "ack": { "status": ack.status, "error": ack.error },
                })
                .to_string(),
            ),
            (Kind::Request, Outcome::Reply(reply)) => {
                let response = match serde_json::from_str::<&RawValue>(&reply.raw) {
                    Ok(raw) => raw.get().to_string(),
                    Err(_) => serde_json::Value::String(reply.raw).to_string(),
                };
                Reply::ok(format!("{{\"response\":{response}}}"))
            }
            (Kind::Query { user }, Outcome::User(conns)) if self.connections.is_none() => {
                self.connections = Some(conns.len());
                self.queried(*user)?
            }
            (Kind::Query { user }, Outcome::Presence(presence)) if self.presences.is_empty() => {
                self.presences.push(presence);
                self.queried(*user)?
            }
            (Kind::Disconnect, Outcome::Delivered(n)) => {
                // This node's connections, then (with a cluster) the other nodes'.
                self.delivered += n;
                if self.left > 0 {
                    return None;
                }
                Reply::ok(serde_json::json!({ "disconnected": self.delivered }).to_string())
            }
            (Kind::Members { room }, Outcome::Members(users)) => {
                self.members.extend(users);
                if self.left > 0 {
                    return None;
                }
                self.listed(room)
            }
            (Kind::RoomPresence { room }, Outcome::Members(users)) if !self.second_step => {
                self.members.extend(users);
                if self.left > 0 {
                    return None;
                }
                self.members.sort_unstable();
                self.members.dedup();
                self.second_step = true;
                for &user in &self.members {
                    self.left += submit(Op::Presence { user });
                }
                if self.left > 0 {
                    return None;
                }
                self.room_presence(room)
            }
            (Kind::RoomPresence { room }, Outcome::Presence(presence)) if self.second_step => {
                self.presences.push(presence);
                if self.left > 0 {
                    return None;
                }
                self.room_presence(room)
            }
            (Kind::Connections { limit }, Outcome::Connections { page, more }) => {
                let gather = self.gather.get_or_insert_with(Default::default);
                gather.add(page, more);
                if self.left > 0 {
                    return None;
                }
                gather.reply(*limit)
            }
            (Kind::Rooms, Outcome::Rooms { rooms, total }) => super::admin::rooms_reply(&rooms, total),
            (Kind::Joined, Outcome::Joined(joined)) => {
                self.delivered += joined.joined;
                self.refused += joined.refused;
                if self.left > 0 {
                    return None;
                }
                self.joined()
            }
            (Kind::Affected, Outcome::Delivered(n)) => {
                self.delivered += n;
                if self.left > 0 {
                    return None;
                }
                self.affected()
            }
            (Kind::PresenceMany, Outcome::Presences(list)) => {
                self.presences.extend(list);
                if self.left > 0 {
                    return None;
                }
                self.presence_many()
            }
            (kind, other) => {
                log::error!("API: unexpected outcome {other:?} for a {kind:?} call");
                Reply::error(500, "unexpected outcome from the server")
            }
        };
        Some(reply)
    }

    /// `{"connections", "refused"}`: the user's connections in the room, and those the
    /// limits kept out.
    fn joined(&self) -> Reply {
        Reply::ok(serde_json::json!({ "connections": self.delivered, "refused": self.refused }).to_string())
    }

    /// `{"connections"}`: the user's connections the call changed.
    fn affected(&self) -> Reply {
        Reply::ok(serde_json::json!({ "connections": self.delivered }).to_string())
    }

    /// `{"users": [{"userId", "status", "context", "since", "info"?}, …], "count"}`, by user id.
    fn presence_many(&self) -> Reply {
        let mut users: Vec<MemberOut<'_>> = self
            .presences
            .iter()
            .map(|p| MemberOut { user_id: p.user_id, presence: PresenceOut::of(p) })
            .collect();
        users.sort_unstable_by_key(|m| m.user_id);
        let count = users.len();
        json_reply(&PresenceManyOut { users, count })
    }

    fn summed(&self) -> Reply {
        Reply::ok(serde_json::json!({ "delivered": self.delivered }).to_string())
    }

    /// `{"room", "members", "count"}`: every shard's members, sorted, each user once.
    fn listed(&self, room: &str) -> Reply {
        let mut members = self.members.clone();
        members.sort_unstable();
        members.dedup();
        let count = members.len();
        Reply::ok(serde_json::json!({ "room": room, "members": members, "count": count }).to_string())
    }

    /// `{"userId", "online", "connections", "presence"}` once both the connections and the
    /// presence are in; `None` while one is missing.
    fn queried(&self, user: i64) -> Option<Reply> {
        if self.left > 0 {
            return None;
        }
        let (Some(connections), [presence]) = (self.connections, self.presences.as_slice()) else {
            log::error!("API: user {user} query complete without its connections or presence");
            return Some(Reply::error(500, "unexpected outcome from the server"));
        };
        let out = UserOut {
            user_id: user,
            online: connections > 0,
            connections,
            presence: PresenceOut::of(presence),
        };
        Some(json_reply(&out))
    }

    /// `{"room", "members": [{"userId", "status", "context", "since"}, …]}`, by user id.
    fn room_presence(&self, room: &str) -> Reply {
        let mut members: Vec<MemberOut<'_>> = self
            .presences
            .iter()
            .map(|p| MemberOut { user_id: p.user_id, presence: PresenceOut::of(p) })
            .collect();
        members.sort_unstable_by_key(|m| m.user_id);
        members.dedup_by_key(|m| m.user_id);
        let out = RoomPresenceOut { room, members };
        json_reply(&out)
    }

    /// Whether this call waits for a client's answer (its safety net answers 504, not 503).
    pub(super) fn waits_for_client(&self) -> bool {
        matches!(self.kind, Kind::Ack | Kind::Request)
    }
}

/// 200 with `out` as its body.
fn json_reply(out: &impl Serialize) -> Reply {
    match serde_json::to_string(out) {
        Ok(body) => Reply::ok(body),
        Err(e) => {
            log::error!("API: cannot encode a reply: {e}");
            Reply::error(500, "cannot encode the reply")
        }
    }
}

/// `GET /api/v1/users/{id}`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UserOut<'a> {
    user_id: i64,
    online: bool,
    connections: usize,
    presence: PresenceOut<'a>,
}

/// `GET /api/v1/rooms/{room}/presence`.
#[derive(Serialize)]
struct RoomPresenceOut<'a> {
    room: &'a str,
    members: Vec<MemberOut<'a>>,
}

/// `POST /api/v1/presence`.
#[derive(Serialize)]
struct PresenceManyOut<'a> {
    users: Vec<MemberOut<'a>>,
    count: usize,
}

/// One member of [`RoomPresenceOut`] (and one user of [`PresenceManyOut`]).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MemberOut<'a> {
    user_id: i64,
    #[serde(flatten)]
    presence: PresenceOut<'a>,
}

/// A presence as the API shows it: the context forwarded as the JSON the user set (`null`
/// when none), `since` as RFC 3339 with milliseconds.
#[derive(Serialize)]
struct PresenceOut<'a> {
    status: &'a str,
    context: Option<&'a RawValue>,
    since: String,
    /// The user's `presence_info_claim` value, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<&'a RawValue>,
}

impl<'a> PresenceOut<'a> {
    fn of(p: &'a UserPresence) -> Self {
        let context = p.context.as_deref().and_then(|raw| match serde_json::from_str::<&RawValue>(raw) {
            Ok(raw) => Some(raw),
            Err(e) => {
                log::warn!("API: user {}'s presence context is not JSON ({e}); shown as null", p.user_id);
                None
            }
        });
        let since = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(p.since_ms));
        // Stored from a verified token's claims as they parsed: valid JSON.
        let info = p.info.as_deref().and_then(|raw| serde_json::from_str::<&RawValue>(raw).ok());
        PresenceOut { status: &p.status, context, since: since.to_string(), info }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{AckReply, ClientReply, ConnInfo, Joined, WaitError};

    fn presence(user: i64, status: &str, context: Option<&str>, since_ms: u64) -> UserPresence {
        UserPresence {
            user_id: user,
            status: status.into(),
            context: context.map(Into::into),
            since_ms,
            info: None,
        }
    }

    /// What a call submits: each operation's debug text; every operation owes `parts` outcomes.
    fn started(call: &Call, parts: usize) -> (Tally, Vec<String>) {
        let mut ops = Vec::new();
        let tally = call.start(&mut |op| {
            ops.push(format!("{op:?}"));
            parts
        });
        (tally, ops)
    }

    #[test]
    fn routes_and_methods() {
        assert_eq!(route("POST", "/api/v1/send"), Ok(Route::Send));
        assert_eq!(route("POST", "/api/v1/send_many"), Ok(Route::SendMany));
        assert_eq!(route("POST", "/api/v1/broadcast"), Ok(Route::Broadcast));
        assert_eq!(route("POST", "/api/v1/request"), Ok(Route::Request));
        assert_eq!(route("GET", "/api/v1/users/-7"), Ok(Route::User(-7)));
        assert_eq!(route("DELETE", "/api/v1/users/7/connections"), Ok(Route::Disconnect(7)));
        assert_eq!(route("POST", "/api/v1/rooms/lobby/publish"), Ok(Route::RoomPublish("lobby".into())));
        assert_eq!(route("GET", "/api/v1/rooms/lobby"), Ok(Route::Room("lobby".into())));
        assert_eq!(route("GET", "/api/v1/rooms/lobby/presence"), Ok(Route::RoomPresence("lobby".into())));
        assert_eq!(route("GET", "/api/v1/rooms/%23a/presence"), Ok(Route::RoomPresence("#a".into())));
        assert_eq!(route("POST", "/api/v1/rooms/lobby/presence").unwrap_err().header, Some(("Allow", "GET")));
        assert_eq!(route("POST", "/api/v1/users/3/rooms/%23a"), Ok(Route::UserJoin(3, "#a".into())));
        assert_eq!(route("DELETE", "/api/v1/users/3/rooms/a"), Ok(Route::UserLeave(3, "a".into())));
        assert_eq!(
            route("PUT", "/api/v1/users/3/rooms/a").unwrap_err().header,
            Some(("Allow", "POST, DELETE"))
        );
        assert_eq!(route("POST", "/api/v1/users/3/rooms/").unwrap_err().status, 404);
        assert_eq!(route("POST", "/api/v1/users/3/rooms/a b").unwrap_err().status, 400);
        assert_eq!(route("POST", "/api/v1/users/3/watches"), Ok(Route::Watch(3)));
        assert_eq!(route("DELETE", "/api/v1/users/3/watches"), Ok(Route::Unwatch(3)));
        assert_eq!(route("GET", "/api/v1/users/3/watches").unwrap_err().status, 405);
        assert_eq!(route("PUT", "/api/v1/users/3/presence"), Ok(Route::SetPresence(3)));
        assert_eq!(route("PUT", "/api/v1/users/x/presence").unwrap_err().status, 400);
        assert_eq!(route("POST", "/api/v1/presence"), Ok(Route::PresenceMany));
        assert_eq!(route("GET", "/api/v1/rooms//presence").unwrap_err().status, 404);
        let e = route("GET", "/api/v1/rooms/bad!/presence").unwrap_err();
        assert!(e.status == 400 && e.message().contains("invalid room name"), "{}", e.message());
        assert_eq!(route("GET", "/api/v1/send").unwrap_err().status, 405);
        assert_eq!(route("GET", "/api/v1/send").unwrap_err().header, Some(("Allow", "POST")));
        assert_eq!(route("POST", "/api/v1/users/7").unwrap_err().status, 405);
        assert_eq!(route("GET", "/api/v1/users/x").unwrap_err().status, 400);
        assert_eq!(route("GET", "/api/v1/users/").unwrap_err().status, 404);
        assert_eq!(route("GET", "/api/v2/send").unwrap_err().status, 404);
        assert_eq!(route("GET", "/health").unwrap_err().status, 404);
        assert_eq!(route("GET", "/api/v1/rooms/lobby/publish").unwrap_err().header, Some(("Allow", "POST")));
        assert_eq!(route("POST", "/api/v1/rooms/lobby").unwrap_err().header, Some(("Allow", "GET")));
        assert_eq!(route("GET", "/api/v1/rooms/").unwrap_err().status, 404);
        assert_eq!(route("POST", "/api/v1/rooms//publish").unwrap_err().status, 404);
        assert_eq!(route("POST", "/api/v1/rooms/lobby/members").unwrap_err().status, 404);
    }

    #[test]
    fn room_names_are_decoded_and_checked() {
        let room = |path: &str| match route("GET", path) {
            Ok(Route::Room(room)) => Ok(room),
            Ok(other) => panic!("{other:?}"),
            Err(reply) => Err((reply.status, reply.message())),
        };
        assert_eq!(room("/api/v1/rooms/a-Z_0.9:x@y"), Ok("a-Z_0.9:x@y".into()));
        assert_eq!(room("/api/v1/rooms/%23general"), Ok("#general".into()));
        assert_eq!(room("/api/v1/rooms/team%3a1%40x"), Ok("team:1@x".into()));
        assert_eq!(room(&format!("/api/v1/rooms/{}", "r".repeat(128))), Ok("r".repeat(128)));
        for bad in ["bad!", "a%20b", "a%2Fb", "%C3%A9", "%ff", "%", "a%2", "a%zz", "%00", "%+4", "%-1"] {
            let Err((status, message)) = room(&format!("/api/v1/rooms/{bad}")) else {
                panic!("{bad} accepted")
            };
            assert_eq!(status, 400, "{bad}");
            assert!(message.contains("invalid room name"), "{bad}: {message}");
        }
        let long = format!("/api/v1/rooms/{}/publish", "r".repeat(129));
        let e = route("POST", &long).unwrap_err();
        assert!(e.status == 400 && e.message().contains("1 to 128"), "{}", e.message());
        let e = route("POST", "/api/v1/rooms/a%20b/publish").unwrap_err();
        assert!(e.status == 400 && e.message().contains("may only contain"), "{}", e.message());
    }

    #[test]
    fn room_bodies_become_calls() {
        let body = br#"{"body": {"text": "hi", "n": [1, 2]}, "meta": {"k" : true}, "fromUserId": 42}"#;
        let Ok(Call::RoomPublish { room, body, meta, from }) = call(Route::RoomPublish("r".into()), body)
        else {
            panic!()
        };
        assert_eq!((room.as_str(), from), ("r", Some(42)));
        assert_eq!(body.get(), r#"{"text": "hi", "n": [1, 2]}"#);
        assert_eq!(meta.as_ref().map(|m| m.get()), Some(r#"{"k" : true}"#));
        let bare = br#"{"body":"text","meta":null,"fromUserId":null}"#;
        let Ok(Call::RoomPublish { body, meta, from, .. }) = call(Route::RoomPublish("r".into()), bare)
        else {
            panic!()
        };
        assert_eq!((body.get(), meta.is_none(), from), (r#""text""#, true, None));
        let null = call(Route::RoomPublish("r".into()), br#"{"body":null}"#);
        assert!(matches!(null, Ok(Call::RoomPublish { body, .. }) if body.get() == "null"));
        assert!(matches!(call(Route::Room("r".into()), b""), Ok(Call::RoomMembers { room }) if room == "r"));
        let error = |body: &[u8]| call(Route::RoomPublish("r".into()), body).unwrap_err();
        for (body, needle) in [
            (&br#"{"meta":1}"#[..], "missing field `body`"),
            (b"", "not valid JSON"),
            (br#"{"body":}"#, "not valid JSON"),
            (br#"{"body":[1,}"#, "not valid JSON"),
            (br#"{"body":1,"fromUserId":"x"}"#, "invalid type"),
            (br#"{"body":1,"fromUserId":1.5}"#, "invalid type"),
            (br#"[1]"#, "expected a JSON object"),
            (br#" [1, null, 2]"#, "expected a JSON object"),
            (br#"5"#, "invalid type"),
        ] {
            let e = error(body);
            assert_eq!(e.status, 400, "{}", String::from_utf8_lossy(body));
            assert!(e.message().contains(needle), "{}: {}", String::from_utf8_lossy(body), e.message());
        }
    }

    #[test]
    fn bodies_become_calls() {
        let body = br#"{"userId":7,"message":{"type":"data_event","payload":{"a": [1, 2]},"fromUserId":3},"ack":true,"timeoutMs":250}"#;
        let Ok(Call::Ack { user, msg, timeout }) = call(Route::Send, body) else { panic!() };
        assert_eq!((user, timeout), (7, Some(Duration::from_millis(250))));
        assert_eq!(msg.kind, "data_event");
        assert_eq!(msg.payload.as_ref().map(|p| p.get()), Some(r#"{"a": [1, 2]}"#));
        assert_eq!(msg.from_user_id, Some(3));
        let body = br#"{"userIds":[1,2],"message":{"type":"t"}}"#;
        assert!(matches!(call(Route::SendMany, body), Ok(Call::Send { many: true, .. })));
        let body = br#"{"message":{"type":"t"},"exclude":[2]}"#;
        let Ok(Call::Broadcast { exclude, .. }) = call(Route::Broadcast, body) else { panic!() };
        assert_eq!(exclude, vec![2]);
    }

    #[test]
    fn bad_bodies_name_the_problem() {
        let error = |route, body: &[u8]| call(route, body).unwrap_err();
        let e = error(Route::Send, b"{nope");
        assert_eq!(e.status, 400);
        assert!(e.message().contains("not valid JSON"), "{}", e.message());
        assert!(error(Route::Send, br#"{"message":{"type":"t"}}"#).message().contains("userId"));
        assert!(error(Route::Send, br#"{"userId":1}"#).message().contains("message"));
        assert!(error(Route::Send, br#"{"userId":1,"message":{"payload":1}}"#).message().contains("type"));
        assert!(
            error(Route::Send, br#"{"userId":1,"message":{"type":5}}"#).message().contains("invalid type")
        );
        assert!(error(Route::Send, br#"{"userId":1,"message":[]}"#).message().contains("expected an object"));
        assert!(
            error(Route::Send, br#"{"userId":"x","message":{"type":"t"}}"#)
                .message()
                .contains("invalid type")
        );
        let zero = br#"{"userId":1,"message":{"type":"t"},"timeoutMs":0}"#;
        assert!(error(Route::Request, zero).message().contains("timeoutMs"));
    }

    /// [`Tally::absorb`] for a call without a second step.
    fn absorb(tally: &mut Tally, outcome: Outcome) -> Option<Reply> {
        tally.absorb(outcome, &mut |op| panic!("unexpected second step {op:?}"))
    }

    fn json(reply: Option<Reply>) -> serde_json::Value {
        serde_json::from_str(&reply.expect("a reply").body).expect("a JSON body")
    }

    #[test]
    fn outcomes_add_up() {
        let mut one = Tally::new(Kind::SendOne { user: 4 }, 1);
        assert_eq!(absorb(&mut one, Outcome::Delivered(0)).unwrap().status, 404);
        let mut sum = Tally::new(Kind::Sum, 2);
        assert!(absorb(&mut sum, Outcome::Delivered(2)).is_none());
        assert_eq!(json(absorb(&mut sum, Outcome::Delivered(3))), serde_json::json!({"delivered": 5}));
        assert_eq!(Tally::new(Kind::Sum, 0).finished().unwrap().status, 200);
        let mut ack = Tally::new(Kind::Ack, 1);
        let reply =
            absorb(&mut ack, Outcome::Ack(AckReply { status: Some("read".into()), error: None })).unwrap();
        assert_eq!(
            json(Some(reply)),
            serde_json::json!({"delivered": 1, "ack": {"status": "read", "error": null}})
        );
        let mut req = Tally::new(Kind::Request, 1);
        let raw = r#"{"pid":"s0.1.1", "type":"x"}"#.to_string();
        let reply = absorb(&mut req, Outcome::Reply(ClientReply { raw })).unwrap();
        assert_eq!(reply.body, r#"{"response":{"pid":"s0.1.1", "type":"x"}}"#);
        let mut query = Tally::new(Kind::Query { user: 9 }, 2);
        assert!(absorb(&mut query, Outcome::User(vec![ConnInfo { shard: 0, seq: 1 }])).is_none());
        let reply = absorb(&mut query, Outcome::Presence(presence(9, "online", None, 0))).unwrap();
        assert_eq!(
            json(Some(reply)),
            serde_json::json!({"userId": 9, "online": true, "connections": 1, "presence": {
                "status": "online", "context": null, "since": "1970-01-01T00:00:00.000Z"}})
        );
        let mut wait = Tally::new(Kind::Request, 1);
        assert_eq!(absorb(&mut wait, Outcome::Failed(WaitError::TimedOut)).unwrap().status, 504);
    }

    #[test]
    fn control_calls_and_their_answers() {
        let call_of = |route, body: &str| call(route, body.as_bytes());
        let Ok(Call::Watch { watcher, targets, remove }) = call_of(Route::Unwatch(4), r#"{"userIds":[1,2]}"#)
        else {
            panic!()
        };
        assert_eq!((watcher, targets, remove), (4, vec![1, 2], true));
        let Ok(Call::SetPresence { status, context, .. }) =
            call_of(Route::SetPresence(4), r#"{"status":"away","context":null}"#)
        else {
            panic!()
        };
        assert_eq!((status.as_str(), context.is_none()), ("away", true));
        let many = format!(r#"{{"userIds":[{}]}}"#, vec!["1"; 1001].join(","));
        assert!(call_of(Route::PresenceMany, &many).unwrap_err().message().contains("at most 1000"));

        let mut joined = Tally::new(Kind::Joined, 2);
        assert!(absorb(&mut joined, Outcome::Joined(Joined { joined: 1, refused: 0 })).is_none());
        let reply = absorb(&mut joined, Outcome::Joined(Joined { joined: 0, refused: 1 }));
        assert_eq!(json(reply), serde_json::json!({"connections": 1, "refused": 1}));
        let mut affected = Tally::new(Kind::Affected, 1);
        assert_eq!(json(absorb(&mut affected, Outcome::Delivered(2))), serde_json::json!({"connections": 2}));
        let mut limited = Tally::new(Kind::Affected, 1);
        let reply = absorb(&mut limited, Outcome::Failed(WaitError::Limit("watch list limit reached")));
        assert_eq!(reply.unwrap().status, 429);
        let mut many = Tally::new(Kind::PresenceMany, 2);
        assert!(absorb(&mut many, Outcome::Presences(vec![presence(9, "online", None, 0)])).is_none());
        let reply = absorb(&mut many, Outcome::Presences(vec![presence(2, "away", Some("1"), 0)]));
        assert_eq!(
            json(reply),
            serde_json::json!({"users": [
                {"userId": 2, "status": "away", "context": 1, "since": "1970-01-01T00:00:00.000Z"},
                {"userId": 9, "status": "online", "context": null, "since": "1970-01-01T00:00:00.000Z"},
            ], "count": 2})
        );
        assert_eq!(
            json(Tally::new(Kind::PresenceMany, 0).finished()),
            serde_json::json!({"users": [], "count": 0})
        );
    }

    #[test]
    fn room_members_merge_across_shards() {
        let mut members = Tally::new(Kind::Members { room: "lobby".into() }, 2);
        assert!(absorb(&mut members, Outcome::Members(vec![3, 9, 1])).is_none());
        assert_eq!(
            json(absorb(&mut members, Outcome::Members(vec![9, 2, 3]))),
            serde_json::json!({"room": "lobby", "members": [1, 2, 3, 9], "count": 4})
        );
        let empty = Tally::new(Kind::Members { room: "#r".into() }, 0).finished();
        assert_eq!(json(empty), serde_json::json!({"room": "#r", "members": [], "count": 0}));
        let mut failed = Tally::new(Kind::Members { room: "r".into() }, 2);
        assert_eq!(absorb(&mut failed, Outcome::Failed(WaitError::ShuttingDown)).unwrap().status, 503);
        let mut odd = Tally::new(Kind::Members { room: "r".into() }, 1);
        assert_eq!(absorb(&mut odd, Outcome::Delivered(1)).unwrap().status, 500);
        let mut published = Tally::new(Kind::Sum, 2);
        assert!(absorb(&mut published, Outcome::Delivered(3)).is_none());
        assert_eq!(json(absorb(&mut published, Outcome::Delivered(0))), serde_json::json!({"delivered": 3}));
    }

    #[test]
    fn user_queries_ask_connections_and_presence() {
        let call = call(Route::User(5), b"").unwrap();
        let (tally, ops) = started(&call, 1);
        assert_eq!(ops, ["Query { user: 5 }", "Presence { user: 5 }"]);
        assert_eq!((tally.left, tally.finished()), (2, None));

        // The presence may come first; the context is forwarded as the user set it.
        let mut busy = Tally::new(Kind::Query { user: 5 }, 2);
        let set = presence(5, "busy", Some(r#"{"doc": [1, 2]}"#), 1_700_000_000_123);
        assert!(absorb(&mut busy, Outcome::Presence(set)).is_none());
        let conns = vec![ConnInfo { shard: 0, seq: 1 }, ConnInfo { shard: 1, seq: 2 }];
        let reply = absorb(&mut busy, Outcome::User(conns)).unwrap();
        assert_eq!(
            reply.body,
            concat!(
                r#"{"userId":5,"online":true,"connections":2,"presence":"#,
                r#"{"status":"busy","context":{"doc": [1, 2]},"since":"2023-11-14T22:13:20.123Z"}}"#
            )
        );

        let mut offline = Tally::new(Kind::Query { user: 6 }, 2);
        assert!(absorb(&mut offline, Outcome::User(Vec::new())).is_none());
        let reply = absorb(&mut offline, Outcome::Presence(presence(6, "offline", None, 1_000))).unwrap();
        assert_eq!(
            json(Some(reply)),
            serde_json::json!({"userId": 6, "online": false, "connections": 0, "presence": {
                "status": "offline", "context": null, "since": "1970-01-01T00:00:01.000Z"}})
        );

        let mut failed = Tally::new(Kind::Query { user: 6 }, 2);
        assert_eq!(absorb(&mut failed, Outcome::Failed(WaitError::ShuttingDown)).unwrap().status, 503);
        let mut twice = Tally::new(Kind::Query { user: 6 }, 2);
        assert!(absorb(&mut twice, Outcome::User(Vec::new())).is_none());
        assert_eq!(absorb(&mut twice, Outcome::User(Vec::new())).unwrap().status, 500);
    }

    #[test]
    fn room_presence_lists_members_then_asks_each_presence() {
        let call = call(Route::RoomPresence("lobby".into()), b"").unwrap();
        let (mut tally, ops) = started(&call, 2);
        assert_eq!(ops, [r#"RoomMembers { room: "lobby" }"#]);
        assert_eq!(tally.left, 2);

        // Step one: every shard's members, merged; step two starts only once all are in.
        let mut asked = Vec::new();
        let mut submit = |op: Op<'_>| {
            let Op::Presence { user } = op else { panic!("{op:?}") };
            asked.push(user);
            1
        };
        assert!(tally.absorb(Outcome::Members(vec![30, 7]), &mut submit).is_none());
        assert!(tally.absorb(Outcome::Members(vec![12, 30]), &mut submit).is_none());
        assert_eq!(asked, [7, 12, 30], "each member once, by user id");
        assert_eq!(tally.left, 3);

        // Step two: presences in any order; the list is by user id.
        assert!(absorb(&mut tally, Outcome::Presence(presence(30, "online", None, 0))).is_none());
        let busy = presence(7, "busy", Some(r#"{"doc":1}"#), 1_700_000_000_123);
        assert!(absorb(&mut tally, Outcome::Presence(busy)).is_none());
        let reply = absorb(&mut tally, Outcome::Presence(presence(12, "away", Some("\"x\""), 5)));
        assert_eq!(
            reply.unwrap().body,
            concat!(
                r#"{"room":"lobby","members":["#,
                r#"{"userId":7,"status":"busy","context":{"doc":1},"since":"2023-11-14T22:13:20.123Z"},"#,
                r#"{"userId":12,"status":"away","context":"x","since":"1970-01-01T00:00:00.005Z"},"#,
                r#"{"userId":30,"status":"online","context":null,"since":"1970-01-01T00:00:00.000Z"}]}"#
            )
        );
    }

    #[test]
    fn room_presence_of_an_empty_room_and_failures() {
        let mut empty = Tally::new(Kind::RoomPresence { room: "#r".into() }, 2);
        assert!(absorb(&mut empty, Outcome::Members(Vec::new())).is_none());
        let reply = absorb(&mut empty, Outcome::Members(Vec::new()));
        assert_eq!(json(reply), serde_json::json!({"room": "#r", "members": []}));
        let none = Tally::new(Kind::RoomPresence { room: "r".into() }, 0).finished();
        assert_eq!(json(none), serde_json::json!({"room": "r", "members": []}));

        let mut asked = 0;
        let mut count = |_: Op<'_>| {
            asked += 1;
            1
        };
        let mut failed = Tally::new(Kind::RoomPresence { room: "r".into() }, 1);
        assert!(failed.absorb(Outcome::Members(vec![1, 2]), &mut count).is_none());
        assert_eq!(absorb(&mut failed, Outcome::Failed(WaitError::ShuttingDown)).unwrap().status, 503);
        assert_eq!(asked, 2);

        // Outcomes of the wrong step are a server error, not a wrong answer.
        let mut early = Tally::new(Kind::RoomPresence { room: "r".into() }, 2);
        assert_eq!(
            absorb(&mut early, Outcome::Presence(presence(1, "online", None, 0))).unwrap().status,
            500
        );
        let mut late = Tally::new(Kind::RoomPresence { room: "r".into() }, 1);
        assert!(late.absorb(Outcome::Members(vec![1]), &mut |_| 1).is_none());
        assert_eq!(absorb(&mut late, Outcome::Members(vec![1])).unwrap().status, 500);

        // A stored context that is not JSON is shown as null rather than breaking the reply.
        let mut odd = Tally::new(Kind::RoomPresence { room: "r".into() }, 1);
        assert!(odd.absorb(Outcome::Members(vec![4]), &mut |_| 1).is_none());
        let reply = absorb(&mut odd, Outcome::Presence(presence(4, "busy", Some("{nope"), 0)));
        assert_eq!(json(reply)["members"][0]["context"], serde_json::Value::Null);
    }
}

//! The admin page (`GET /admin/clients`) and the JSON it reads: a paged connection listing,
//! the rooms with their member counts, and a stream of metric snapshots.
//!
//! The page is one self-contained HTML file embedded in the binary; it loads without the key
//! and shows nothing until the operator enters it (kept in `sessionStorage`, sent as the
//! `Authorization` header). Every data route needs the key like any other API route.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use super::reply::Reply;
use super::routes::Call;
use crate::route::{ConnSummary, RoomCount};
use crate::shard::Shared;

/// The page, embedded at build time.
const PAGE: &str = include_str!("admin.html");
/// Where it is served.
pub(super) const PAGE_PATH: &str = "/admin/clients";
/// Security headers of the page: nothing framed, nothing loaded from elsewhere, no caching.
const PAGE_HEADERS: &str = "Cache-Control: no-store\r\nX-Frame-Options: DENY\r\nX-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\nContent-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n";

/// Connections per page unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 50;
/// Most connections per page.
const MAX_LIMIT: usize = 1000;
/// Rooms listed unless `limit` says otherwise, and at most.
const DEFAULT_ROOMS: usize = 200;
const MAX_ROOMS: usize = 10_000;
/// Period of the event stream's snapshots.
pub(super) const SNAPSHOT_PERIOD: Duration = Duration::from_secs(1);
/// A stream whose client has not taken this much is skipped until it does: a slow reader
/// costs at most this much memory.
pub(super) const STREAM_BACKLOG: usize = 64 * 1024;

/// The answer to a request that needs no key, if it is one: the page's HTML shell.
pub(super) fn public(method: &str, path: &str) -> Option<Reply> {
    if path != PAGE_PATH {
        return None;
    }
    Some(match method {
        "GET" => Reply::html(PAGE.to_string(), PAGE_HEADERS),
        _ => Reply::method_not_allowed("GET"),
    })
}

/// The value of `name` in a query string (no percent-decoding: every admin parameter is a
/// number).
fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name && !value.is_empty()).then_some(value)
    })
}

fn number<T: std::str::FromStr>(query: &str, name: &str) -> Result<Option<T>, Reply> {
    param(query, name)
        .map(|v| {
            v.parse().map_err(|_| Reply::error(400, &format!("query parameter {name} must be a number")))
        })
        .transpose()
}

/// `GET /api/v1/connections?cursor=&limit=&user=`.
pub(super) fn connections_call(query: &str) -> Result<Call, Reply> {
    let after = number::<u64>(query, "cursor")?.unwrap_or(0);
    let user = number::<i64>(query, "user")?;
    let limit = number::<usize>(query, "limit")?.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(Reply::error(400, &format!("limit must be between 1 and {MAX_LIMIT}")));
    }
    Ok(Call::Connections { after, user, limit })
}

/// `GET /api/v1/rooms?limit=`.
pub(super) fn rooms_call(query: &str) -> Result<Call, Reply> {
    let limit = number::<usize>(query, "limit")?.unwrap_or(DEFAULT_ROOMS);
    if !(1..=MAX_ROOMS).contains(&limit) {
        return Err(Reply::error(400, &format!("limit must be between 1 and {MAX_ROOMS}")));
    }
    Ok(Call::Rooms { limit })
}

/// Every shard's page of a connection listing, merged.
#[derive(Debug, Default)]
pub(super) struct Gather {
    page: Vec<ConnSummary>,
    more: bool,
}

impl Gather {
    /// Adds one shard's page.
    pub(super) fn add(&mut self, page: Vec<ConnSummary>, more: bool) {
        self.page.extend(page);
        self.more |= more;
    }

    /// The `limit` lowest open orders of all shards' pages (each shard sent its own `limit`
    /// lowest, so these are the lowest overall), and the cursor after them when any are left.
    pub(super) fn reply(&mut self, limit: usize) -> Reply {
        let mut page = std::mem::take(&mut self.page);
        page.sort_unstable_by_key(|c| c.seq);
        let more = self.more || page.len() > limit;
        page.truncate(limit);
        let next = if more { page.last().map(|c| c.seq.to_string()) } else { None };
        let connections: Vec<ConnOut<'_>> = page.iter().map(ConnOut::of).collect();
        json(&ConnectionsOut { connections, next_cursor: next })
    }
}

/// `{"rooms": [{"room", "members"}…], "total"}`, largest first.
pub(super) fn rooms_reply(rooms: &[RoomCount], total: usize) -> Reply {
    let rooms: Vec<RoomOut<'_>> =
        rooms.iter().map(|r| RoomOut { room: &r.room, members: r.members }).collect();
    json(&RoomsOut { rooms, total })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionsOut<'a> {
    connections: Vec<ConnOut<'a>>,
    next_cursor: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnOut<'a> {
    user_id: i64,
    shard: usize,
    ip: String,
    connected_at: String,
    rooms: &'a [String],
    queued: usize,
    messages_in: u32,
    messages_out: u32,
    last_active: String,
}

impl<'a> ConnOut<'a> {
    fn of(c: &'a ConnSummary) -> Self {
        ConnOut {
            user_id: c.user,
            shard: c.shard,
            ip: c.ip.to_string(),
            connected_at: rfc3339(c.connected_ms),
            rooms: &c.rooms,
            queued: c.queued,
            messages_in: c.messages_in,
            messages_out: c.messages_out,
            last_active: rfc3339(c.last_active_ms),
        }
    }
}

#[derive(Serialize)]
struct RoomsOut<'a> {
    rooms: Vec<RoomOut<'a>>,
    total: usize,
}

#[derive(Serialize)]
struct RoomOut<'a> {
    room: &'a str,
    members: usize,
}

fn rfc3339(unix_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

fn json(out: &impl Serialize) -> Reply {
    match serde_json::to_string(out) {
        Ok(body) => Reply::ok(body),
        Err(e) => {
            log::error!("API: cannot encode a reply: {e}");
            Reply::error(500, "cannot encode the reply")
        }
    }
}

/// The head of `GET /api/v1/events`: a server-sent event stream that ends when either side
/// closes.
pub(super) const STREAM_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nX-Accel-Buffering: no\r\nConnection: close\r\n\r\n";

/// One event of the stream: `data: {…}` with the headline counters (cumulative: the reader
/// takes differences for rates) and the gauges.
pub(super) fn snapshot(shared: &Shared) -> Vec<u8> {
    let m = &shared.metrics;
    let now = std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let shards: Vec<u64> = m.shards.iter().map(|s| s.connections_current.load(Relaxed)).collect();
    let event = serde_json::json!({
        "ts": now,
        "connections": m.sum(|s| &s.connections_current),
        "users": m.sum(|s| &s.users_current),
        "shards": shards,
        "connectionsOpened": m.sum(|s| &s.connections_total),
        "messagesIn": m.sum(|s| &s.messages_in),
        "messagesOut": m.sum(|s| &s.messages_out),
        "errors": m.sum(|s| &s.errors),
        "slowConsumerCloses": m.sum(|s| &s.slow_consumer_closes),
        "rateLimited": m.sum(|s| &s.rate_limited),
        "admissionRefusals": m.sum(|s| &s.admission_refusals),
        "handshakeFailures": m.sum(|s| &s.handshake_failures),
        "draining": shared.draining.load(Relaxed),
    });
    format!("data: {event}\n\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(user: i64, seq: u64) -> ConnSummary {
        ConnSummary {
            user,
            shard: (seq % 2) as usize,
            seq,
            ip: [10, 0, 0, 1].into(),
            connected_ms: 1_000,
            rooms: vec!["lobby".into()],
            queued: 0,
            messages_in: 3,
            messages_out: 4,
            last_active_ms: 2_000,
        }
    }

    fn body(reply: Reply) -> serde_json::Value {
        assert_eq!(reply.status, 200, "{}", reply.body);
        serde_json::from_str(&reply.body).unwrap()
    }

    #[test]
    fn pages_merge_by_open_order_with_a_cursor() {
        let mut gather = Gather::default();
        gather.add(vec![summary(1, 2), summary(3, 6)], true);
        gather.add(vec![summary(2, 3), summary(4, 5)], false);
        let out = body(gather.reply(3));
        let users: Vec<i64> =
            out["connections"].as_array().unwrap().iter().map(|c| c["userId"].as_i64().unwrap()).collect();
        assert_eq!(users, [1, 2, 4]);
        assert_eq!(out["nextCursor"], "5");
        let first = &out["connections"][0];
        assert_eq!(first["ip"], "10.0.0.1");
        assert_eq!(first["connectedAt"], "1970-01-01T00:00:01.000Z");
        assert_eq!(first["lastActive"], "1970-01-01T00:00:02.000Z");
        assert_eq!((first["messagesIn"].as_u64(), first["messagesOut"].as_u64()), (Some(3), Some(4)));
        let mut last = Gather::default();
        last.add(vec![summary(9, 9)], false);
        assert_eq!(body(last.reply(3))["nextCursor"], serde_json::Value::Null);
    }

    #[test]
    fn query_parameters() {
        assert!(matches!(
            connections_call("cursor=17&limit=5&user=-3"),
            Ok(Call::Connections { after: 17, user: Some(-3), limit: 5 })
        ));
        assert!(matches!(
            connections_call("user=&cursor="),
            Ok(Call::Connections { after: 0, user: None, limit: DEFAULT_LIMIT })
        ));
        assert_eq!(connections_call("limit=0").unwrap_err().status, 400);
        assert_eq!(connections_call("limit=x").unwrap_err().status, 400);
        assert_eq!(connections_call("user=1%200").unwrap_err().status, 400);
        assert!(matches!(rooms_call(""), Ok(Call::Rooms { limit: DEFAULT_ROOMS })));
        assert_eq!(rooms_call("limit=100000").unwrap_err().status, 400);
    }

    #[test]
    fn the_page_is_public_and_self_contained() {
        let page = public("GET", PAGE_PATH).unwrap();
        assert_eq!((page.status, page.content_type), (200, "text/html; charset=utf-8"));
        for outside in ["<script src", "<link", "@import", "url(", "src=\"http"] {
            assert!(!page.body.contains(outside), "the page loads nothing from elsewhere: {outside}");
        }
        assert_eq!(public("POST", PAGE_PATH).unwrap().status, 405);
        assert!(public("GET", "/api/v1/connections").is_none());
    }
}

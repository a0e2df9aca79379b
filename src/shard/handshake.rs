//! The HTTP phase of a connection: request head → gate decision → 101 or a plain response.

use bytes::Bytes;

use super::Shard;
use super::conn::{Phase, Session};
use crate::app::application::{Admission, Authentication, Defer, Rejection};
use crate::core::occupancy::client_ip;
use crate::core::presence::claim_info;
use crate::core::{ConnKey, Directory};
use crate::http::Decision;
use crate::http::auth::{AuthError, Identity};
use crate::http::request::Request;
use crate::http::request::{Parsed, parse};
use crate::http::response::{json_error, response, switching_protocols};
use crate::metrics::{Format, ShardMetrics};
use crate::route::msg::{AuthAnswer, DirMsg};

/// A handshake waiting for the application's deferred authentication: what its upgrade
/// needs once the answer comes.
#[derive(Debug)]
pub(super) struct AwaitedAuth {
    ws_key: Box<str>,
    subprotocol: Option<&'static str>,
    greet: bool,
    client_ip: std::net::IpAddr,
}

impl Shard {
    /// More bytes of the request head arrived.
    pub(super) fn on_http_bytes(&mut self, key: ConnKey) {
        if self.auth_pending.contains_key(&key) {
            return self.early_bytes(key);
        }
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        match parse(conn.inbuf()) {
            Parsed::Partial => {}
            Parsed::Invalid(status, message) => self.refuse(key, status, message, None),
            Parsed::Complete(request, len) => {
                // Bytes after the head are the client's first frames, sent without waiting.
                let rest = conn.inbuf_mut().split_off(len);
                conn.set_inbuf(rest);
                let ip = self.client_ip(key, request.forwarded_for.as_deref());
                match self.shared.gate.decide(&request) {
                    Decision::UpgradeThenClose { reason } => {
                        let ws_key = request.ws_key.as_deref().unwrap_or("");
                        self.upgrade_then_close(key, ws_key, reason);
                    }
                    Decision::Upgrade { jwt, subprotocol, insecure_user_id } => {
                        match self.call_authenticate(key, &request, jwt) {
                            Authentication::Now(Ok(admission)) => {
                                let ws_key = request.ws_key.as_deref().unwrap_or("");
                                self.upgrade(key, admission, subprotocol, ws_key, insecure_user_id, ip);
                            }
                            Authentication::Now(Err(rejection)) => {
                                self.refuse(key, rejection.status, &rejection.message, Some(ip))
                            }
                            Authentication::Later => {
                                let awaited = AwaitedAuth {
                                    ws_key: request.ws_key.as_deref().unwrap_or("").into(),
                                    subprotocol,
                                    greet: insecure_user_id,
                                    client_ip: ip,
                                };
                                self.await_auth(key, awaited);
                            }
                        }
                    }
                    Decision::Echo => self.upgrade_echo(key, request.ws_key.as_deref().unwrap_or("")),
                    Decision::Health => {
                        let health = self.shared.health_json();
                        self.respond(key, 200, "application/json", health.as_bytes());
                    }
                    Decision::Ready => {
                        let (status, body) = self.shared.readiness();
                        self.respond(key, status, "application/json", body.as_bytes());
                    }
                    Decision::Metrics => {
                        let format = Format::negotiate(request.accept.as_deref());
                        let text = self.shared.metrics.render_as(self.shared.counters(), format);
                        self.respond(key, 200, format.content_type(), text.as_bytes());
                    }
                    Decision::Page(page) => self.respond(key, page.status, page.content_type, &page.body),
                    Decision::Refuse { status, message } => self.refuse(key, status, &message, Some(ip)),
                }
            }
        }
    }

    /// Answers `status` and closes. The first refusal of a status in an interval is logged
    /// (naming the client: behind a trusted proxy, its `X-Forwarded-For` address), the rest
    /// are counted into one summary line (see [`crate::logfmt::RefusalLog`]).
    fn refuse(&mut self, key: ConnKey, status: u16, message: &str, client: Option<std::net::IpAddr>) {
        ShardMetrics::inc(&self.metrics().handshake_failures);
        let now = self.now;
        let mut summaries = Vec::new();
        let full = self.refusals.refused(status, now, &mut summaries);
        self.log_summaries(&summaries);
        if let Some(conn) = self.conn_mut(key) {
            let (peer, client) = (conn.peer, client.unwrap_or(conn.peer.ip()));
            if full {
                log::info!(status, client:% = client, peer:% = peer, reason = message; "handshake refused");
            } else {
                log::debug!(status, client:% = client, peer:% = peer, reason = message; "handshake refused");
            }
        }
        let body = json_error(status, message);
        self.send_last(key, Bytes::from(body));
    }

    /// Logs the refusal summaries whose interval ended (all of them when `all`, at exit).
    pub(super) fn summarise_refusals(&mut self, all: bool) {
        let mut summaries = Vec::new();
        if all {
            self.refusals.flush(&mut summaries);
        } else if self.refusals.next_deadline().is_some_and(|at| at <= self.now) {
            self.refusals.expire(self.now, &mut summaries);
        }
        self.log_summaries(&summaries);
    }

    fn log_summaries(&self, summaries: &[crate::logfmt::Summary]) {
        let secs = crate::logfmt::REFUSAL_INTERVAL_MS / 1000;
        for s in summaries {
            log::info!(
                status = s.status, suppressed = s.suppressed, shard = self.id;
                "{} more {} refusals in the last {secs} s", s.suppressed, s.status
            );
        }
    }

    fn respond(&mut self, key: ConnKey, status: u16, content_type: &str, body: &[u8]) {
        let bytes = response(status, content_type, "", body);
        self.send_last(key, Bytes::from(bytes));
    }

    /// Queues the final bytes of a non-WebSocket exchange and starts closing.
    fn send_last(&mut self, key: ConnKey, bytes: Bytes) {
        let deadline = self.close_deadline();
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        conn.set_inbuf(Vec::new());
        conn.out.push(bytes);
        conn.phase = Phase::Closing { peer_done: false };
        conn.deadline = deadline;
        self.mark_dirty(key);
        self.schedule_before(key, deadline);
    }

    /// The conformance echo endpoint: an open WebSocket with no user.
    fn upgrade_echo(&mut self, key: ConnKey, ws_key: &str) {
        let (now, limits) = (self.now, self.limits);
        let Some(conn) = self.conn_mut(key) else { return };
        conn.out.push(Bytes::from(switching_protocols(ws_key, None)));
        conn.phase = Phase::Open;
        conn.echo = true;
        conn.read_deadline = now + limits.pong_wait_ms;
        conn.deadline = now + limits.ping_period_ms; // the next ping
        let pending = conn.take_inbuf();
        self.mark_dirty(key);
        self.schedule_before(key, now + limits.ping_period_ms.min(limits.pong_wait_ms));
        if !pending.is_empty() {
            self.resume_frames(key, pending);
        }
    }

    /// Seed 004: a bad `?userId=` still gets its WebSocket, then close 1002.
    fn upgrade_then_close(&mut self, key: ConnKey, ws_key: &str, reason: &str) {
        ShardMetrics::inc(&self.metrics().handshake_failures);
        let Some(conn) = self.conn_mut(key) else { return };
        log::info!(peer:% = conn.peer, reason; "handshake without a valid userId");
        conn.set_inbuf(Vec::new());
        conn.out.push(Bytes::from(switching_protocols(ws_key, None)));
        conn.phase = Phase::Open;
        // The ordinary close keeps what is queued: the 101 goes out before the 1002.
        self.close(key, crate::ws::close::PROTOCOL_ERROR, reason);
    }

    /// The client's address for admission limits (see [`client_ip`]).
    fn client_ip(&mut self, key: ConnKey, forwarded_for: Option<&str>) -> std::net::IpAddr {
        let peer = self.conn_mut(key).map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.peer.ip());
        client_ip(peer, forwarded_for, &self.shared.trusted_proxies)
    }

    /// The application's authentication, shielded from its panics.
    fn call_authenticate(
        &self,
        key: ConnKey,
        request: &Request,
        jwt: Result<Identity, AuthError>,
    ) -> Authentication {
        let app = &self.shared.app;
        let taken = std::cell::Cell::new(false);
        let defer = Defer {
            conn: crate::app::application::ConnId(self.addr(key)),
            handle: &self.handle,
            taken: &taken,
        };
        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            app.authenticate_deferred(request, jwt, defer)
        }))
        .unwrap_or_else(|_| {
            log::error!("application authenticate() panicked");
            Authentication::Now(Err(Rejection { status: 500, message: "authentication failed".into() }))
        });
        if matches!(answer, Authentication::Later) && !taken.get() {
            log::error!("application answered Authentication::Later without taking Defer::later()");
            return Authentication::Now(Err(Rejection {
                status: 500,
                message: "authentication failed".into(),
            }));
        }
        answer
    }

    /// The application will answer later: the connection waits in its handshake, within
    /// `auth_max_pending` per shard and its `handshake_timeout` (already running).
    fn await_auth(&mut self, key: ConnKey, awaited: AwaitedAuth) {
        let max = self.shared.config.auth_max_pending;
        if self.auth_pending.len() >= max {
            ShardMetrics::inc(&self.metrics().admission_refusals);
            log::warn!(
                shard = self.id, client:% = awaited.client_ip, auth_max_pending = max;
                "too many authentications pending; handshake refused 503"
            );
            self.refuse(key, 503, "server busy: too many pending authentications", Some(awaited.client_ip));
            return;
        }
        self.auth_pending.insert(key, awaited);
    }

    /// Bytes from a client whose authentication is pending: kept for after the upgrade (they
    /// are its first frames), up to one largest message; beyond, the connection is dropped.
    fn early_bytes(&mut self, key: ConnKey) {
        let bound = (self.limits.max_message + 14).max(8 * 1024);
        if self.conn_mut(key).is_some_and(|c| c.inbuf().len() > bound) {
            self.drop_conn(key, "sent too much before its authentication completed");
        }
    }

    /// The application's deferred answer for `key`; ignored when the connection is gone (it
    /// disconnected, or its handshake timed out) or was refused meanwhile.
    pub(super) fn authenticated(&mut self, key: ConnKey, answer: AuthAnswer) {
        let Some(awaited) = self.auth_pending.remove(&key) else {
            return;
        };
        if !self.conn_mut(key).is_some_and(|c| c.phase == Phase::Http) {
            return;
        }
        match answer {
            Ok((identity, user_data)) => {
                let admission = Admission { identity, user_data };
                let AwaitedAuth { ws_key, subprotocol, greet, client_ip } = awaited;
                self.upgrade(key, admission, subprotocol, &ws_key, greet, client_ip);
            }
            Err((status, message)) => self.refuse(key, status, &message, Some(awaited.client_ip)),
        }
    }

    /// Opens the WebSocket: the 101 (and seed 004's `CONNECT` when `greet`) are the first
    /// frames, before any event the new connection causes.
    fn upgrade(
        &mut self,
        key: ConnKey,
        admission: Admission,
        subprotocol: Option<&'static str>,
        ws_key: &str,
        greet: bool,
        client_ip: std::net::IpAddr,
    ) {
        let Admission { identity, user_data } = admission;
        let expires_deadline = self.expiry_deadline(identity.expires_at);
        let user_bucket = match self.shared.admit(client_ip, identity.user_id) {
            Ok(bucket) => bucket,
            Err(refusal) => {
                ShardMetrics::inc(&self.metrics().admission_refusals);
                self.refuse(key, refusal.status, refusal.message, Some(client_ip));
                return;
            }
        };
        let accept = Bytes::from(switching_protocols(ws_key, subprotocol));
        let seq = self.shared.next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let user = identity.user_id;
        let info = self
            .shared
            .config
            .presence_info_claim
            .as_deref()
            .and_then(|name| claim_info(&identity.claims, name));
        let now = self.now;
        let limits = self.limits;
        let clustered = self.shared.fabric.cluster.is_some();
        let claims = self.kept_claims(identity.claims);
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        conn.out.push(accept);
        if greet {
            conn.out.push(connect_greeting(user, Self::wall_ms()));
        }
        conn.phase = Phase::Open;
        // With a cluster, the 101 waits until the broker reaches the user here: from then on
        // no other node answers 404 for a user its client may already see connected.
        conn.held = u8::from(clustered);
        conn.read_deadline = now + limits.pong_wait_ms;
        conn.deadline = now + limits.ping_period_ms; // the next ping
        let peer = conn.peer;
        let mut session = Session::new(user, seq, identity.roles, now);
        session.expires_deadline = expires_deadline;
        session.user_bucket = user_bucket;
        session.set_claims(claims);
        session.set_user_data(user_data);
        session.set_client_ip(client_ip, peer.ip());
        conn.session = Some(Box::new(session));
        conn.last_active_s = (now / 1000) as u32;
        let pending = conn.take_inbuf();
        let metrics = self.metrics();
        ShardMetrics::inc(&metrics.connections_total);
        ShardMetrics::inc(&metrics.connections_current);
        log::debug!(user, client:% = client_ip, peer:% = peer, shard = self.id; "connect");
        self.mark_dirty(key);
        self.schedule_before(
            key,
            (now + limits.ping_period_ms.min(limits.pong_wait_ms)).min(expires_deadline),
        );
        if self.directory.add_local(user, key) {
            self.announce_replica(user, true);
        }
        let home = Directory::home_of(user, self.shards());
        let addr = self.addr(key);
        if let Some(cluster) = &self.shared.fabric.cluster {
            let on = crate::route::cluster::Reach::User(user);
            cluster.send_state(crate::route::cluster::LinkMsg::Ready { on, conn: addr });
        }
        self.send_to(home, DirMsg::HomeOpened { user, seq, addr, info });
        self.call_app(key, |app, conn| app.on_connect(conn));
        if !pending.is_empty() {
            self.resume_frames(key, pending);
        }
    }
}

/// Seed 004's greeting: `{"type":"CONNECT","userId":…,"timestamp":…}`.
fn connect_greeting(user: i64, unix_ms: u64) -> Bytes {
    let text = format!(r#"{{"type":"CONNECT","userId":{user},"timestamp":"{}"}}"#, rfc3339(unix_ms));
    crate::ws::FrameEncoder::frame(crate::ws::OutKind::Text, text.as_bytes())
}

/// RFC 3339 UTC timestamp with milliseconds.
pub(super) fn rfc3339(unix_ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(time).to_string()
}

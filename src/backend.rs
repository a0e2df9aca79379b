//! Backend forwarding: `generic_request` and unknown client message types go to an HTTP backend.
//!
//! When `backend_url` is configured, the binary runs [`BackendApp`] as its application. For
//! every `generic_request` and every message type the built-in router does not know, the shard
//! only copies what the call needs (user id, claims, the message's JSON text, the pid) into a
//! job and hands it to a bounded [`Workers`] pool; it never waits for the backend. A worker
//! POSTs
//!
//! ```json
//! {"userId": 7, "claims": {…the token's claims…}, "message": {…the client's whole message…}}
//! ```
//!
//! to `backend_url` (`content-type: application/json`, bounded by `backend_timeout`) and sends
//! the answer to the connection through its shard's channel:
//!
//! | backend outcome | the client gets |
//! |---|---|
//! | 2xx, JSON body, message had a `pid` | `{"pid": pid, "type": "generic_response", "payload": <body>}` |
//! | 2xx, empty body (e.g. 204), message had a `pid` | `generic_response` with the pid and no payload |
//! | 2xx, message without a `pid` (fire-and-forget unknown type) | the body itself when it is a JSON object with a `type` field (a complete server envelope chosen by the backend), else nothing |
//! | 4xx/5xx | `error_notification` with the backend's status; the message quotes the backend's `{"error": …}` (a string, or an object's `message`) when there is one |
//! | other statuses (1xx/3xx; redirects are not followed) | `error_notification` 502 |
//! | 2xx whose body is not JSON, or larger than 1 MiB | `error_notification` 502 |
//! | connection refused, DNS failure, connection reset | `error_notification` 502 |
//! | no complete answer within `backend_timeout` | `error_notification` 504 |
//! | queue full (`backend_concurrency` calls in flight and `backend_queue` waiting) | `error_notification` 503 `backend busy`, at once, from the shard |
//!
//! Every `error_notification` carries `originalPid` when the message had a pid, and is sent
//! even when it had none (as the built-in 400 for unknown types is). A client that is gone by
//! the time the answer arrives simply does not get it.
//!
//! The backend is called directly: proxy environment variables (`HTTP_PROXY`, …) are ignored,
//! since a backend is an internal service. Each failed call logs one `warn` line naming the
//! URL, the user and the reason, at most [`WARN_LINES_PER_SECOND`] per second (the others are
//! counted and reported with the next line). [`BackendApp::stats`] gives running counters.
//!
//! ## Presence webhook
//!
//! With `presence_webhook_url` (with or without `backend_url`), each user's first connection
//! and last disconnect ([`Application::on_user_online`] / [`Application::on_user_offline`],
//! decided once at the user's home shard) are POSTed as
//!
//! ```json
//! {"event": "online", "userId": 7, "at": "2026-11-27T14:00:00.000Z"}
//! ```
//!
//! (`at`: the connect time, or the disconnect time, i.e. the user's last seen) on the same
//! worker pool, within `backend_timeout`. Calls for one user are made one after the other, in
//! the order of the transitions (a user's next event waits behind its call in flight, on no
//! thread); different users' calls run in parallel. A failed call (transport error, non-2xx) is
//! not retried: it logs a `warn` line (rate-limited as above) and counts
//! `customws_presence_webhook_failures_total`. Events that find the pool's queue full, or more
//! than `backend_queue` events already waiting behind calls in flight, are dropped, logged
//! and counted (`customws_presence_webhook_dropped_total`): the shard never waits.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::app::Handle;
use crate::app::application::{Application, Conn, ConnId, Handled, Workers};
use crate::config::Config;
use crate::protocol::ClientMessage;
use crate::protocol::envelope::{Envelope, error_notification};
use crate::ws::{FrameEncoder, OutKind};

/// Largest backend response body accepted by default (1 MiB); a larger one answers 502.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 1 << 20;

/// Largest error-response body read to quote its `error` field; beyond it the body is ignored.
const MAX_ERROR_BODY_BYTES: u64 = 64 * 1024;

/// Longest quote of a backend's `error` text in an `error_notification` message, in bytes.
const MAX_ERROR_QUOTE: usize = 200;

/// At most this many backend-failure `warn` lines per second; the rest are counted.
pub const WARN_LINES_PER_SECOND: u64 = 10;

/// The backend configuration is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// `backend_url` is not an absolute `http://` or `https://` URL.
    #[error("backend_url {url:?} is not an absolute http:// or https:// URL")]
    InvalidUrl {
        /// The configured value.
        url: String,
    },
    /// [`BackendApp::new`] was called without a `backend_url`.
    #[error("backend_url is not set")]
    NoUrl,
}

/// How [`BackendApp`] calls its backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendOptions {
    /// Where to POST (`backend_url`).
    pub url: String,
    /// Bound on one call, connect to last body byte (`backend_timeout`).
    pub timeout: Duration,
    /// Calls in flight at once, one worker thread each (`backend_concurrency`).
    pub concurrency: usize,
    /// Calls waiting for a worker; beyond it the client gets 503 (`backend_queue`).
    pub queue: usize,
    /// Largest accepted 2xx body; beyond it the client gets 502.
    pub max_response_bytes: u64,
}

impl BackendOptions {
    /// The options of `config`, or `None` when `backend_url` is not set.
    pub fn from_config(config: &Config) -> Option<Self> {
        let url = config.backend_url.as_deref()?.trim();
        Some(BackendOptions {
            url: url.to_owned(),
            timeout: config.backend_timeout,
            concurrency: config.backend_concurrency,
            queue: config.backend_queue,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        })
    }
}

/// Running counters of a [`BackendApp`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Messages queued for the backend.
    pub forwarded: u64,
    /// Calls answered 2xx with a usable body.
    pub answered: u64,
    /// Calls answered with a 4xx/5xx (or other non-2xx) status.
    pub status_errors: u64,
    /// Calls that hit `backend_timeout` (answered 504).
    pub timeouts: u64,
    /// Calls that found no backend or got an unusable answer (answered 502).
    pub failures: u64,
    /// Messages refused because the queue was full (answered 503).
    pub busy: u64,
}

#[derive(Debug, Default)]
struct Counters {
    forwarded: AtomicU64,
    answered: AtomicU64,
    status_errors: AtomicU64,
    timeouts: AtomicU64,
    failures: AtomicU64,
    busy: AtomicU64,
}

/// The application that forwards `generic_request` and unknown message types to an HTTP
/// backend (see the [module documentation](self) for the exchange and every outcome).
#[derive(Clone)]
pub struct BackendApp {
    /// The HTTP client of the forwarder and the webhook.
    agent: ureq::Agent,
    workers: Workers,
    /// `None` when only the presence webhook is configured (no `backend_url`): messages get
    /// the built-in behaviour.
    forwarder: Option<Arc<Forwarder>>,
    webhook: Option<Arc<Webhook>>,
}

impl std::fmt::Debug for BackendApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendApp")
            .field("url", &self.url())
            .field("webhook", &self.webhook.as_ref().map(|w| &w.url))
            .finish_non_exhaustive()
    }
}

struct Forwarder {
    agent: ureq::Agent,
    url: String,
    max_response_bytes: u64,
    counters: Counters,
    warnings: WarnLimiter,
}

/// One forwarded message, built on the shard thread without I/O.
struct Job {
    conn: ConnId,
    handle: Handle,
    user: i64,
    claims: Box<str>,
    message: Box<str>,
    pid: Option<Box<str>>,
}

/// Why a call produced no usable answer.
#[derive(Debug)]
struct Failure {
    /// The `error_notification` code.
    code: u16,
    /// The `error_notification` message.
    message: String,
    kind: FailureKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    Status,
    Timeout,
    Unusable,
}

impl BackendApp {
    /// Forwards to `config.backend_url` with the configuration's timeout, concurrency and
    /// queue; starts the worker threads.
    pub fn new(config: &Config) -> Result<Self, BackendError> {
        let options = BackendOptions::from_config(config).ok_or(BackendError::NoUrl)?;
        Self::with_options(options)
    }

    /// A `BackendApp` when `backend_url` or `presence_webhook_url` is set, `None` otherwise.
    pub fn from_config(config: &Config) -> Result<Option<Self>, BackendError> {
        let webhook = config.presence_webhook_url.as_deref().map(str::trim);
        let app = match BackendOptions::from_config(config) {
            Some(options) => Self::with_options(options)?,
            // Only the webhook: its pool and client, no message forwarding.
            None if webhook.is_some() => {
                Self::pool(config.backend_timeout, config.backend_concurrency, config.backend_queue)
            }
            None => return Ok(None),
        };
        match webhook {
            Some(url) => app.with_presence_webhook(url, config.backend_queue).map(Some),
            None => Ok(Some(app)),
        }
    }

    /// POSTs users' online/offline transitions to `url` (see the module documentation), on
    /// this application's worker pool; at most `max_waiting` events wait behind calls in
    /// flight.
    pub fn with_presence_webhook(mut self, url: &str, max_waiting: usize) -> Result<Self, BackendError> {
        check_url(url)?;
        let webhook = Webhook {
            agent: self.agent.clone(),
            url: url.to_owned(),
            lanes: Mutex::new(Lanes::default()),
            max_waiting,
            sent: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            warnings: WarnLimiter::new(WARN_LINES_PER_SECOND),
        };
        self.webhook = Some(Arc::new(webhook));
        Ok(self)
    }

    /// Forwards as `options` say; starts `options.concurrency` worker threads.
    pub fn with_options(options: BackendOptions) -> Result<Self, BackendError> {
        check_url(&options.url)?;
        let mut app = Self::pool(options.timeout, options.concurrency, options.queue);
        app.forwarder = Some(Arc::new(Forwarder {
            agent: app.agent.clone(),
            url: options.url,
            max_response_bytes: options.max_response_bytes,
            counters: Counters::default(),
            warnings: WarnLimiter::new(WARN_LINES_PER_SECOND),
        }));
        Ok(app)
    }

    /// The worker pool and HTTP client, forwarding nothing yet.
    fn pool(timeout: Duration, concurrency: usize, queue: usize) -> Self {
        let concurrency = concurrency.max(1);
        BackendApp {
            agent: http_agent(timeout, concurrency),
            workers: Workers::new(concurrency, queue),
            forwarder: None,
            webhook: None,
        }
    }

    /// The backend URL messages are forwarded to; `None` when only the presence webhook is
    /// configured.
    pub fn url(&self) -> Option<&str> {
        self.forwarder.as_deref().map(|f| f.url.as_str())
    }

    /// A snapshot of the counters (all zero without forwarding).
    pub fn stats(&self) -> BackendStats {
        let Some(forwarder) = &self.forwarder else { return BackendStats::default() };
        let c = &forwarder.counters;
        BackendStats {
            forwarded: c.forwarded.load(Ordering::Relaxed),
            answered: c.answered.load(Ordering::Relaxed),
            status_errors: c.status_errors.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            busy: c.busy.load(Ordering::Relaxed),
        }
    }
}

impl Application for BackendApp {
    fn on_message(&self, conn: &mut Conn<'_>, msg: &ClientMessage<'_>, raw: &[u8]) -> Handled {
        let Some(forwarder) = &self.forwarder else { return Handled::No };
        let job = Job {
            conn: conn.id(),
            handle: conn.handle().clone(),
            user: conn.user_id(),
            claims: conn.claims().into(),
            message: String::from_utf8_lossy(raw).into(),
            pid: msg.pid.as_deref().map(Into::into),
        };
        let worker = Arc::clone(forwarder);
        match self.workers.spawn(move || worker.run(job)) {
            Ok(()) => {
                forwarder.counters.forwarded.fetch_add(1, Ordering::Relaxed);
            }
            Err(_busy) => {
                forwarder.counters.busy.fetch_add(1, Ordering::Relaxed);
                forwarder.warn(conn.user_id(), "queue full, answered 503");
                conn.error(msg.pid.as_deref(), 503, "backend busy");
            }
        }
        Handled::Yes
    }

    fn on_user_online(&self, user_id: i64, at_ms: u64, _handle: &Handle) {
        if let Some(webhook) = &self.webhook {
            webhook.submit(&self.workers, Transition { user: user_id, online: true, at_ms });
        }
    }

    fn on_user_offline(&self, user_id: i64, last_seen_ms: u64, _handle: &Handle) {
        if let Some(webhook) = &self.webhook {
            webhook.submit(&self.workers, Transition { user: user_id, online: false, at_ms: last_seen_ms });
        }
    }

    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut list = if self.forwarder.is_some() { self.backend_counters() } else { Vec::new() };
        if let Some(w) = &self.webhook {
            list.extend([
                (
                    "customws_presence_webhook_sent",
                    "Presence webhook calls answered 2xx.",
                    w.sent.load(Ordering::Relaxed),
                ),
                (
                    "customws_presence_webhook_failures",
                    "Presence webhook calls that failed (transport error or non-2xx); not retried.",
                    w.failures.load(Ordering::Relaxed),
                ),
                (
                    "customws_presence_webhook_dropped",
                    "Presence transitions dropped because the worker queue was full.",
                    w.dropped.load(Ordering::Relaxed),
                ),
            ]);
        }
        list
    }
}

impl BackendApp {
    fn backend_counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let s = self.stats();
        vec![
            ("customws_backend_forwarded", "Messages queued for the backend.", s.forwarded),
            ("customws_backend_answered", "Backend calls answered 2xx with a usable body.", s.answered),
            (
                "customws_backend_status_errors",
                "Backend calls answered with an error status.",
                s.status_errors,
            ),
            ("customws_backend_timeouts", "Backend calls past backend_timeout (504).", s.timeouts),
            ("customws_backend_failures", "Backend unreachable or unusable answers (502).", s.failures),
            ("customws_backend_busy", "Messages refused because the backend queue was full (503).", s.busy),
        ]
    }
}

impl Forwarder {
    /// Runs on a worker thread: one call, one answer to the connection.
    fn run(&self, job: Job) {
        let body = request_body(job.user, &job.claims, &job.message);
        let pid = job.pid.as_deref();
        let frame = match self.call(&body) {
            Ok(answer) => {
                self.counters.answered.fetch_add(1, Ordering::Relaxed);
                answer_frame(pid, answer.as_deref())
            }
            Err(failure) => {
                let counter = match failure.kind {
                    FailureKind::Status => &self.counters.status_errors,
                    FailureKind::Timeout => &self.counters.timeouts,
                    FailureKind::Unusable => &self.counters.failures,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                self.warn(job.user, &format!("{} ({})", failure.message, failure.code));
                Some(error_notification(pid, failure.code, &failure.message))
            }
        };
        if let Some(frame) = frame {
            job.handle.send_frame_to_conn(job.conn, frame);
        }
    }

    /// POSTs `body`; the 2xx body's JSON text (`None` when empty), or why there is none.
    fn call(&self, body: &str) -> Result<Option<String>, Failure> {
        let answer = post_json(&self.agent, &self.url, body, self.max_response_bytes)
            .map_err(|e| transport_failure(&e))?;
        if !answer.is_success() {
            return Err(status_failure(answer.status, answer.body.ok().as_deref()));
        }
        let bytes = answer.body.map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(limit) => Failure {
                code: 502,
                message: format!("backend response larger than {limit} bytes"),
                kind: FailureKind::Unusable,
            },
            other => transport_failure(&other),
        })?;
        json_body(bytes)
    }

    fn warn(&self, user: i64, what: &str) {
        if let Some(suppressed) = self.warnings.admit() {
            if suppressed > 0 {
                log::warn!(
                    "backend {} for user {user}: {what} ({suppressed} similar lines suppressed)",
                    self.url
                );
            } else {
                log::warn!("backend {} for user {user}: {what}", self.url);
            }
        }
    }
}

/// One user transition for the presence webhook.
#[derive(Debug, Clone, Copy)]
struct Transition {
    user: i64,
    online: bool,
    at_ms: u64,
}

impl Transition {
    /// `{"event":"online"|"offline","userId":…,"at":"<RFC 3339>"}`.
    fn body(&self) -> String {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(self.at_ms);
        let event = if self.online { "online" } else { "offline" };
        format!(
            r#"{{"event":"{event}","userId":{},"at":"{}"}}"#,
            self.user,
            humantime::format_rfc3339_millis(at)
        )
    }
}

/// Users with a webhook call in flight, and the transitions waiting behind it.
#[derive(Debug, Default)]
struct Lanes {
    waiting: HashMap<i64, VecDeque<Transition>>,
    /// Transitions in all queues.
    count: usize,
}

/// The presence webhook: posts each user's transitions in order, one call at a time per user.
struct Webhook {
    agent: ureq::Agent,
    url: String,
    lanes: Mutex<Lanes>,
    max_waiting: usize,
    sent: AtomicU64,
    failures: AtomicU64,
    dropped: AtomicU64,
    warnings: WarnLimiter,
}

impl Webhook {
    /// On the user's home shard (so one thread per user): starts a call for `event`, or
    /// queues it behind the user's call in flight. Never blocks on I/O.
    fn submit(self: &Arc<Self>, workers: &Workers, event: Transition) {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if lanes.waiting.contains_key(&event.user) {
            if lanes.count >= self.max_waiting {
                drop(lanes);
                return self.drop_event(event, "too many transitions waiting");
            }
            lanes.count += 1;
            if let Some(queue) = lanes.waiting.get_mut(&event.user) {
                queue.push_back(event);
            }
            return;
        }
        lanes.waiting.insert(event.user, VecDeque::new());
        drop(lanes);
        let webhook = Arc::clone(self);
        if workers.spawn(move || webhook.run(event)).is_err() {
            // Nothing can be queued behind it meanwhile: this thread is the user's only one.
            self.lanes.lock().unwrap_or_else(|e| e.into_inner()).waiting.remove(&event.user);
            self.drop_event(event, "worker queue full");
        }
    }

    /// On a worker: posts `event`, then whatever queued behind it for the same user.
    fn run(&self, mut event: Transition) {
        loop {
            self.post(event);
            let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
            match lanes.waiting.get_mut(&event.user).and_then(VecDeque::pop_front) {
                Some(next) => {
                    lanes.count -= 1;
                    event = next;
                }
                None => {
                    lanes.waiting.remove(&event.user);
                    return;
                }
            }
        }
    }

    fn post(&self, event: Transition) {
        // The answer's body is read (bounded) and ignored.
        let failure = match post_json(&self.agent, &self.url, &event.body(), MAX_ERROR_BODY_BYTES) {
            Ok(answer) if answer.is_success() => {
                self.sent.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(answer) => format!("answered {}", answer.status),
            Err(e) => transport_failure(&e).message,
        };
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.warn(event, &failure);
    }

    fn drop_event(&self, event: Transition, why: &str) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.warn(event, &format!("{why}, event dropped"));
    }

    fn warn(&self, event: Transition, what: &str) {
        if let Some(suppressed) = self.warnings.admit() {
            let kind = if event.online { "online" } else { "offline" };
            log::warn!(
                user = event.user, event = kind, suppressed;
                "presence webhook {}: {what}", self.url
            );
        }
    }
}

/// A backend's answer to [`post_json`].
struct Answer {
    status: u16,
    /// The body, or why it could not be read within its limit.
    body: Result<Vec<u8>, ureq::Error>,
}

impl Answer {
    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The one backend call (forwarding, presence webhook, authorization): POSTs `body` as
/// `application/json` to `url` and reads the answer's body, up to `success_limit` bytes for a
/// 2xx and [`MAX_ERROR_BODY_BYTES`] for anything else (read so the connection goes back to
/// the pool). `Err` when no status line came back.
fn post_json(agent: &ureq::Agent, url: &str, body: &str, success_limit: u64) -> Result<Answer, ureq::Error> {
    let mut response = agent
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .send(body.as_bytes())?;
    let status = response.status().as_u16();
    let limit = if (200..300).contains(&status) { success_limit } else { MAX_ERROR_BODY_BYTES };
    let body = response.body_mut().with_config().limit(limit).read_to_vec();
    Ok(Answer { status, body })
}

/// The HTTP client every backend call uses: `timeout` for the whole call, statuses as answers
/// (not errors), no redirects, no proxy, and as many idle connections as worker threads.
fn http_agent(timeout: Duration, concurrency: usize) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .max_idle_connections(concurrency)
        .max_idle_connections_per_host(concurrency)
        .user_agent(concat!("customws/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// `{"userId": user, "claims": claims, "message": message}`; claims that are not JSON text
/// (an application's own identity) become `null`. `message` was parsed by the shard already.
fn request_body(user: i64, claims: &str, message: &str) -> String {
    let claims = match serde_json::from_str::<&RawValue>(claims) {
        Ok(raw) => raw.get(),
        Err(_) => "null",
    };
    let mut body = String::with_capacity(40 + claims.len() + message.len());
    body.push_str("{\"userId\":");
    body.push_str(&user.to_string());
    body.push_str(",\"claims\":");
    body.push_str(claims);
    body.push_str(",\"message\":");
    body.push_str(message.trim());
    body.push('}');
    body
}

/// A 2xx body: empty, or one JSON value (returned trimmed).
fn json_body(bytes: Vec<u8>) -> Result<Option<String>, Failure> {
    let invalid = |why: String| Failure {
        code: 502,
        message: format!("backend answered invalid JSON: {why}"),
        kind: FailureKind::Unusable,
    };
    let text = String::from_utf8(bytes).map_err(|e| invalid(e.to_string()))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    serde_json::from_str::<&RawValue>(trimmed).map_err(|e| invalid(e.to_string()))?;
    Ok(Some(if trimmed.len() == text.len() { text } else { trimmed.to_owned() }))
}

/// The message for the client after a 2xx: a `generic_response` when there is a pid, else the
/// backend's own envelope (a JSON object with a `type`), else nothing.
fn answer_frame(pid: Option<&str>, body: Option<&str>) -> Option<Bytes> {
    match pid {
        Some(pid) => Some(
            Envelope::new("generic_response").pid(Some(pid)).raw_payload(body.map(str::as_bytes)).frame(),
        ),
        None => {
            let body = body?;
            is_envelope(body).then(|| FrameEncoder::frame(OutKind::Text, body.as_bytes()))
        }
    }
}

/// Whether `json` is an object with a string `type`.
fn is_envelope(json: &str) -> bool {
    #[derive(Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        _kind: Cow<'a, str>,
    }
    json.starts_with('{') && serde_json::from_str::<Typed<'_>>(json).is_ok()
}

/// A non-2xx answer: 4xx/5xx keep their status, anything else is a 502.
fn status_failure(status: u16, body: Option<&[u8]>) -> Failure {
    let quote = body.and_then(error_quote);
    let code = if (400..600).contains(&status) { status } else { 502 };
    let message = match quote {
        Some(quote) => format!("backend error {status}: {quote}"),
        None => format!("backend error {status}"),
    };
    Failure { code, message, kind: FailureKind::Status }
}

/// The `error` of a `{"error": "…"}` or `{"error": {"message": "…"}}` body, shortened.
fn error_quote(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?;
    let text = match error {
        serde_json::Value::String(s) => s.as_str(),
        other => other.get("message")?.as_str()?,
    };
    let mut end = text.len().min(MAX_ERROR_QUOTE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(text[..end].to_owned())
}

/// A call that got no status line (or died reading the body).
fn transport_failure(error: &ureq::Error) -> Failure {
    let timeout = match error {
        ureq::Error::Timeout(_) => true,
        ureq::Error::Io(io) => matches!(io.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
        _ => false,
    };
    if timeout {
        return Failure { code: 504, message: "backend timed out".into(), kind: FailureKind::Timeout };
    }
    let message = match error {
        ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
            format!("backend unreachable: {error}")
        }
        _ => format!("backend call failed: {error}"),
    };
    Failure { code: 502, message, kind: FailureKind::Unusable }
}

fn check_url(url: &str) -> Result<(), BackendError> {
    let invalid = || BackendError::InvalidUrl { url: url.to_owned() };
    let uri: http::Uri = url.parse().map_err(|_| invalid())?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok || uri.host().is_none_or(str::is_empty) {
        return Err(invalid());
    }
    Ok(())
}

/// Admits at most `per_second` lines per one-second window; counts the others.
struct WarnLimiter {
    epoch: Instant,
    per_second: u64,
    /// Current window (seconds since `epoch`) in the high 32 bits, lines in it in the low 32.
    window: AtomicU64,
    suppressed: AtomicU64,
}

impl WarnLimiter {
    fn new(per_second: u64) -> Self {
        WarnLimiter {
            epoch: Instant::now(),
            per_second,
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last admitted one)` when a line may be logged now.
    fn admit(&self) -> Option<u64> {
        let second = self.epoch.elapsed().as_secs() & 0xffff_ffff;
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let (window, count) = (current >> 32, current & 0xffff_ffff);
            let next = if window == second {
                if count >= self.per_second {
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                current + 1
            } else {
                (second << 32) | 1
            };
            match self.window.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(seen) => current = seen,
            }
        }
    }
}

/// The authorization backend (`authorize_url`, `authorize_ops`): for a listed built-in
/// client operation the shard builds
///
/// ```json
/// {"op": "join", "userId": 7, "claims": {…}, "targets": ["dm:7:9"]}
/// ```
///
/// (`targets`: user ids for `data_request`, `presence_subscribe` and a targeted
/// `presence_update`; the room name for `join`, `room_broadcast` and `room_presence`; empty
/// otherwise) and hands it with a [`Decision`](crate::app::authorize::Decision) to this pool
/// (`backend_concurrency` threads, `backend_queue` waiting; full → 503 `authorization busy`).
/// The pool is its own, not [`BackendApp`]'s: a slow `backend_url` filling that queue must
/// not turn authorization into 503s.
/// A worker POSTs it; a 2xx `{"allow": true}` runs the operation, `{"allow": false}` refuses
/// it 403 `not authorized`. Anything else — a timeout (`backend_timeout`), a connection
/// error, another status, a body that is not that object — refuses it 403 `authorization
/// failed` (fail closed), with a rate-limited `warn` line and
/// `customws_authorize_backend_failures_total`. The Rust callback runs first; the backend is
/// asked only about what it allowed.
pub struct Authorizer {
    agent: ureq::Agent,
    url: String,
    ops: crate::protocol::router::OpSet,
    workers: Workers,
    warnings: WarnLimiter,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Authorizer {
    /// The authorizer of `config` (`authorize_url` set), starting its worker threads.
    pub fn from_config(config: &Config) -> Option<Arc<Authorizer>> {
        let url = config.authorize_url.as_deref()?.trim().to_owned();
        let concurrency = config.backend_concurrency.max(1);
        let agent = http_agent(config.backend_timeout, concurrency);
        // Validated with the configuration: an unknown name cannot get here.
        let ops = crate::protocol::router::OpSet::from_names(&config.authorize_ops).unwrap_or_default();
        let workers = Workers::new(concurrency, config.backend_queue);
        Some(Arc::new(Authorizer {
            agent,
            url,
            ops,
            workers,
            warnings: WarnLimiter::new(WARN_LINES_PER_SECOND),
        }))
    }

    /// Whether `authorize_ops` lists `op`.
    pub fn covers(&self, op: crate::protocol::router::BuiltinOp) -> bool {
        self.ops.contains(op)
    }

    /// Queues the call for `body`; `decision` carries the answer back to the shard.
    pub(crate) fn ask(
        self: &Arc<Self>,
        decision: crate::app::authorize::Decision,
        body: String,
        user: i64,
    ) -> Result<(), crate::app::application::Busy> {
        let me = Arc::clone(self);
        let spawned = self.workers.spawn(move || match me.call(&body) {
            Ok(allowed) => decision.answer(allowed),
            Err(why) => {
                crate::app::authorize::count(crate::app::authorize::Count::BackendFailed);
                me.warn(user, &why);
                decision.refuse(403, "authorization failed");
            }
        });
        if spawned.is_err() {
            self.warn(user, "queue full, refused 503");
        }
        spawned
    }

    /// POSTs `body`; the answer's `allow`, or why there is none.
    fn call(&self, body: &str) -> Result<bool, String> {
        #[derive(Deserialize)]
        struct Allow {
            allow: bool,
        }
        let answer = post_json(&self.agent, &self.url, body, MAX_ERROR_BODY_BYTES)
            .map_err(|e| transport_failure(&e).message)?;
        if !answer.is_success() {
            return Err(format!("answered status {}", answer.status));
        }
        let bytes = answer.body.map_err(|e| transport_failure(&e).message)?;
        let answer: Allow =
            serde_json::from_slice(&bytes).map_err(|e| format!("answer is not {{\"allow\": bool}}: {e}"))?;
        Ok(answer.allow)
    }

    fn warn(&self, user: i64, what: &str) {
        if let Some(suppressed) = self.warnings.admit() {
            log::warn!(
                "authorize_url {} for user {user}: {what}, refused ({suppressed} similar lines suppressed)",
                self.url
            );
        }
    }
}

/// `{"op", "userId", "claims", "targets"}` for `authorize_url`; claims that are not JSON text
/// become `null`.
pub(crate) fn authorize_body(
    op: crate::protocol::router::BuiltinOp,
    user: i64,
    claims: &str,
    targets: crate::app::authorize::Targets<'_>,
) -> String {
    use crate::app::authorize::Targets;
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Listed<'a> {
        Users(&'a [i64]),
        Room([&'a str; 1]),
        None([(); 0]),
    }
    #[derive(serde::Serialize)]
    struct Body<'a> {
        op: &'static str,
        #[serde(rename = "userId")]
        user_id: i64,
        claims: Option<&'a RawValue>,
        targets: Listed<'a>,
    }
    let targets = match targets {
        Targets::Users(ids) => Listed::Users(ids),
        Targets::Room(room) => Listed::Room([room]),
        Targets::None => Listed::None([]),
    };
    let claims = serde_json::from_str::<&RawValue>(claims).ok();
    let body = Body { op: op.name(), user_id: user, claims, targets };
    serde_json::to_string(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ws::frame::frame_text as text;

    #[test]
    fn authorize_body_names_op_user_claims_and_targets() {
        use crate::app::authorize::Targets;
        use crate::protocol::router::BuiltinOp;
        let body = authorize_body(BuiltinOp::Join, 7, r#"{"sub":"7"}"#, Targets::Room("dm:7:9"));
        assert_eq!(body, r#"{"op":"join","userId":7,"claims":{"sub":"7"},"targets":["dm:7:9"]}"#);
        let body = authorize_body(BuiltinOp::PresenceSubscribe, 1, "", Targets::Users(&[2, 3]));
        assert_eq!(body, r#"{"op":"presence_subscribe","userId":1,"claims":null,"targets":[2,3]}"#);
        let body = authorize_body(BuiltinOp::Broadcast, 1, "{}", Targets::None);
        assert_eq!(body, r#"{"op":"broadcast","userId":1,"claims":{},"targets":[]}"#);
    }

    #[test]
    fn request_body_splices_claims_and_message() {
        let body = request_body(7, r#"{"user_id":7}"#, r#" {"type":"x","pid":"p"} "#);
        assert_eq!(body, r#"{"userId":7,"claims":{"user_id":7},"message":{"type":"x","pid":"p"}}"#);
        let body = request_body(-3, "", r#"{"type":"x"}"#);
        assert_eq!(body, r#"{"userId":-3,"claims":null,"message":{"type":"x"}}"#);
        serde_json::from_str::<serde_json::Value>(&body).unwrap();
    }

    #[test]
    fn bodies_must_be_json() {
        assert_eq!(json_body(b" {\"a\":1}\n".to_vec()).unwrap().as_deref(), Some("{\"a\":1}"));
        assert_eq!(json_body(b"  ".to_vec()).unwrap(), None);
        assert_eq!(json_body(b"{nope".to_vec()).unwrap_err().code, 502);
        assert_eq!(json_body(vec![0xff, 0xfe]).unwrap_err().code, 502);
    }

    #[test]
    fn answers_with_and_without_pid() {
        let frame = answer_frame(Some("p1"), Some(r#"{"ok":true}"#)).unwrap();
        assert_eq!(text(&frame), r#"{"pid":"p1","type":"generic_response","payload":{"ok":true}}"#);
        let frame = answer_frame(Some("p2"), None).unwrap();
        assert_eq!(text(&frame), r#"{"pid":"p2","type":"generic_response"}"#);
        let envelope = r#"{"type":"custom_event","payload":1}"#;
        assert_eq!(text(&answer_frame(None, Some(envelope)).unwrap()), envelope);
        assert!(answer_frame(None, Some(r#"{"payload":1}"#)).is_none());
        assert!(answer_frame(None, Some(r#"["custom_event"]"#)).is_none());
        assert!(answer_frame(None, None).is_none());
    }

    #[test]
    fn status_failures_quote_the_backend() {
        let f = status_failure(422, Some(br#"{"error":"nope"}"#));
        assert_eq!((f.code, f.message.as_str()), (422, "backend error 422: nope"));
        let f = status_failure(500, Some(br#"{"error":{"message":"db down"}}"#));
        assert_eq!((f.code, f.message.as_str()), (500, "backend error 500: db down"));
        let f = status_failure(404, Some(b"<html>"));
        assert_eq!((f.code, f.message.as_str()), (404, "backend error 404"));
        assert_eq!(status_failure(302, None).code, 502);
        let long = format!(r#"{{"error":"{}"}}"#, "é".repeat(300));
        assert!(status_failure(400, Some(long.as_bytes())).message.len() <= 40 + MAX_ERROR_QUOTE);
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(check_url("https://backend.internal/api").is_ok());
        for bad in ["", "backend:9000", "ftp://x/y", "/relative", "http://"] {
            assert!(check_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_presence_webhook_alone_makes_an_app_that_forwards_nothing() {
        let mut config = Config::default();
        assert!(BackendApp::from_config(&config).unwrap().is_none());
        config.presence_webhook_url = Some("http://127.0.0.1:9/presence".into());
        let app = BackendApp::from_config(&config).unwrap().expect("an app for the webhook");
        assert!(app.forwarder.is_none() && app.webhook.is_some());
        assert_eq!(app.url(), None);
        config.backend_url = Some("http://127.0.0.1:9/backend".into());
        let app = BackendApp::from_config(&config).unwrap().expect("an app");
        assert!(app.forwarder.is_some() && app.webhook.is_some());
        assert_eq!(app.url(), Some("http://127.0.0.1:9/backend"));
        config.presence_webhook_url = Some("not a url".into());
        assert!(BackendApp::from_config(&config).is_err());
    }

    #[test]
    fn transitions_are_posted_as_json() {
        let body = Transition { user: -4, online: false, at_ms: 1_700_000_000_123 }.body();
        assert_eq!(body, r#"{"event":"offline","userId":-4,"at":"2023-11-14T22:13:20.123Z"}"#);
    }

    #[test]
    fn warn_limiter_caps_lines_per_second() {
        let limiter = WarnLimiter::new(3);
        let admitted = (0..10).filter(|_| limiter.admit().is_some()).count();
        // All ten calls fall in one or two windows.
        assert!((3..=6).contains(&admitted), "{admitted}");
    }
}

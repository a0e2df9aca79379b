//! Seed 002's chat server, built on the customws library: contacts, one-to-one messages with
//! sent → delivered → read receipts, profiles with CVs, notifications and presence for
//! contacts, stored in SQLite (default) or MariaDB/MySQL. See `apps/chat/README.md`.
//!
//! Layout: `app` (the tier's callbacks and the message handlers), `auth` (session tokens),
//! `presence` (online/offline), `delivery` (acknowledged delivery), `serial` (per-user
//! ordering on the worker pool), `db` / `schema` / `store` (the two backends, the schema, the
//! queries), `model` (payloads), `seed` (demo data).

pub mod app;
pub mod auth;
pub mod db;
pub mod delivery;
pub mod model;
pub mod presence;
pub mod schema;
pub mod seed;
pub mod serial;
pub mod store;

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

pub use app::{Chat, ChatApp};
pub use db::{Db, DbError, SlowQuery};

/// The chat server's own settings (the tier's come from `customws::Config`).
#[derive(Debug, Clone)]
pub struct ChatOptions {
    /// `sqlite://PATH` or `mysql://user:pass@host:port/db`.
    pub database: String,
    /// Worker threads for database work.
    pub workers: usize,
    /// Users with work waiting for a worker, at most.
    pub queue: usize,
    /// How often the session cache is reloaded from the database.
    pub session_refresh: Duration,
    /// Test hook: one message type's requests first run a slow query.
    pub slow_query: Option<SlowQuery>,
}

impl Default for ChatOptions {
    fn default() -> Self {
        ChatOptions {
            database: "sqlite://chat.db".into(),
            workers: 16,
            queue: 65_536,
            session_refresh: Duration::from_secs(30),
            slow_query: None,
        }
    }
}

/// A running chat server.
#[derive(Debug)]
pub struct ChatServer {
    /// `Some` until [`ChatServer::wait`] takes it.
    server: Option<customws::ServerHandle>,
    app: ChatApp,
}

/// Why the server did not start.
#[derive(Debug)]
pub enum StartError {
    /// The database could not be opened or migrated.
    Db(DbError),
    /// The tier could not start.
    Tier(customws::StartError),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Db(e) => write!(f, "database: {e}"),
            StartError::Tier(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Opens the database (creating or migrating the schema), loads the session cache, and starts
/// the tier with the chat application.
pub fn start(mut config: customws::Config, options: &ChatOptions) -> Result<ChatServer, StartError> {
    // Contacts-only messaging, presence and typing are this application's rules, enforced by
    // its own message types: the tier's built-in operations would bypass them (a `data_request`
    // to any user, a `presence_subscribe` to anyone, open rooms), so they are all turned off.
    config.disabled_ops =
        customws::protocol::router::BuiltinOp::ALL.iter().map(|op| op.name().to_string()).collect();
    let db = Db::open(&options.database, options.workers + 2).map_err(StartError::Db)?;
    let app = ChatApp::new(db, options.workers, options.queue, options.slow_query.clone());
    // Before the listeners open, so no valid token is refused during start-up; this thread is
    // not a shard thread. Later reloads run on a worker.
    let sessions = app.chat().sessions.reload(&app.chat().db).map_err(StartError::Db)?;
    log::info!("{sessions} live sessions loaded from {}", db::redact(&options.database));
    let server = customws::start_with(config, Arc::new(app.clone())).map_err(StartError::Tier)?;
    app.chat().set_handle(&server.handle());
    start_refresher(Arc::downgrade(app.chat()), options.session_refresh);
    Ok(ChatServer { server: Some(server), app })
}

/// Reloads the session cache every `period` on a worker, until the chat is gone.
fn start_refresher(chat: Weak<Chat>, period: Duration) {
    let spawned = std::thread::Builder::new().name("chat-sessions".into()).spawn(move || {
        loop {
            std::thread::sleep(period);
            let Some(strong) = chat.upgrade() else {
                return;
            };
            let job_chat = Arc::clone(&strong);
            let job = move || {
                if let Err(e) = job_chat.sessions.reload(&job_chat.db) {
                    log::error!("session reload: {e}");
                }
            };
            // Key -1: no user has it, so the reload never waits behind a user's requests.
            if strong.serial.submit_internal(-1, job).is_err() {
                log::warn!("worker queue full: session reload skipped");
            }
        }
    });
    if let Err(e) = spawned {
        log::error!("cannot start the session refresher: {e}");
    }
}

impl ChatServer {
    fn tier(&self) -> &customws::ServerHandle {
        self.server.as_ref().expect("the server is present until wait() consumes the ChatServer")
    }

    /// The WebSocket listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.tier().local_addr()
    }

    /// The shared state (database, sessions, presence).
    pub fn chat(&self) -> &Arc<Chat> {
        self.app.chat()
    }

    /// The tier's handle.
    pub fn handle(&self) -> customws::Handle {
        self.tier().handle()
    }

    /// Prometheus text, including the chat's counters.
    pub fn metrics_text(&self) -> String {
        self.tier().metrics_text()
    }

    /// Begins graceful shutdown.
    pub fn shutdown(&self) {
        self.tier().shutdown();
    }

    /// Waits for the tier to stop.
    pub fn wait(mut self) {
        if let Some(server) = self.server.take() {
            server.wait();
        }
    }
}

impl Drop for ChatServer {
    /// Stops the tier (as dropping its handle does) and lets the application go: its workers,
    /// delivery thread and session refresher end.
    fn drop(&mut self) {
        // The tier first (its drop joins the shards, so no callback sets the handle again).
        drop(self.server.take());
        self.app.chat().clear_handle();
    }
}

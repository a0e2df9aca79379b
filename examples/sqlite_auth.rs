//! Authentication that needs I/O: session tokens in an on-disk SQLite table (seed 002's
//! `Session` table, looked up as `GetUserBySessionToken` does), checked on worker threads.
//!
//! `authenticate` runs on the shard thread, where a database query would stall every
//! connection of the shard. This application overrides `authenticate_deferred` instead: a
//! valid JWT is still admitted at once (the fast path), anything else takes the connection's
//! [`PendingAuth`] and hands it, with the token, to a [`Workers`] pool whose threads each keep
//! their own SQLite connection ([`Workers::with_init`]). The worker admits or rejects; the
//! connection waits in its handshake meanwhile (bounded by `handshake_timeout` and
//! `auth_max_pending`), and the shard keeps serving everyone else.
//!
//! Run: `cargo run --example sqlite_auth -- --listen 127.0.0.1:8082 --jwt-secret S`, then
//! connect to `ws://127.0.0.1:8082/ws?token=demo-session` (the token it prints). The database
//! file is `SESSIONS_DB` (default `sessions.db`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use customws::http::auth::find_token;
use customws::prelude::*;
use rusqlite::{Connection, OptionalExtension};

/// Seed 002's session table: a token per login, with its user and expiry (Unix seconds).
pub(crate) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS Session (
    Id INTEGER PRIMARY KEY, UserId BIGINT NOT NULL, Tk TEXT NOT NULL UNIQUE, ExpiresAt BIGINT NOT NULL)";

/// Opens the database at `path` (creating the table) as a worker keeps it: a reader waits up
/// to 5 s for a writer's lock instead of failing at once.
pub(crate) fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// Stores a session token for `user_id`, valid until `expires_at` (Unix seconds).
pub(crate) fn add_session(
    conn: &Connection,
    user_id: i64,
    token: &str,
    expires_at: u64,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO Session (UserId, Tk, ExpiresAt) VALUES (?1, ?2, ?3)",
        rusqlite::params![user_id, token, expires_at as i64],
    )?;
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Admits JWTs at once and session tokens after a lookup on a worker thread.
pub(crate) struct SessionAuth {
    /// One SQLite connection per thread (an `Err` when the file could not be opened).
    lookups: Workers<Result<Connection, String>>,
}

impl SessionAuth {
    /// `threads` lookup workers on the database at `path`, at most `queue` lookups waiting.
    pub(crate) fn new(path: PathBuf, threads: usize, queue: usize) -> Self {
        let lookups = Workers::with_init(threads, queue, move || open(&path).map_err(|e| e.to_string()));
        SessionAuth { lookups }
    }
}

/// The worker's side: one query, one answer.
fn lookup(db: &Result<Connection, String>, token: &str) -> Result<Admission, Rejection> {
    let unavailable = |e: &dyn std::fmt::Display| {
        log::warn!("session lookup failed: {e}");
        Rejection { status: 503, message: "session store unavailable".into() }
    };
    let db = db.as_ref().map_err(|e| unavailable(e))?;
    let row = db
        .query_row("SELECT UserId, ExpiresAt FROM Session WHERE Tk = ?1 LIMIT 1", [token], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
        })
        .optional()
        .map_err(|e| unavailable(&e))?;
    let refuse = |message: &str| Rejection { status: 401, message: message.into() };
    let (user_id, expires_at) = row.ok_or_else(|| refuse("unknown session token"))?;
    let expires_at = u64::try_from(expires_at).unwrap_or(0);
    if expires_at <= unix_now() {
        return Err(refuse("session expired"));
    }
    let identity = Identity {
        user_id,
        roles: Roles::default(),
        claims: format!(r#"{{"user_id":{user_id},"session":true}}"#).into(),
        // The connection is closed when the session expires, as for a JWT's `exp`.
        expires_at,
    };
    Ok(Admission { identity, user_data: None })
}

impl Application for SessionAuth {
    fn authenticate_deferred(
        &self,
        request: &Request,
        jwt: Result<Identity, AuthError>,
        defer: Defer<'_>,
    ) -> Authentication {
        // The fast path: a valid JWT needs no I/O.
        if let Ok(identity) = jwt {
            return Authentication::Now(Ok(Admission { identity, user_data: None }));
        }
        let Some((token, _source)) = find_token(request) else {
            return Authentication::Now(Err(Rejection { status: 401, message: "missing token".into() }));
        };
        let token = token.strip_prefix("Bearer ").map(str::to_owned).unwrap_or(token);
        let pending = defer.later();
        match self.lookups.spawn_with(move |db| pending.complete(lookup(db, &token))) {
            Ok(()) => Authentication::Later,
            // The refused job drops its PendingAuth, whose late refusal the shard ignores:
            // this answer is the one the client gets.
            Err(_busy) => {
                Authentication::Now(Err(Rejection { status: 503, message: "authentication busy".into() }))
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let config = match Config::from_process() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let path = PathBuf::from(std::env::var_os("SESSIONS_DB").unwrap_or_else(|| "sessions.db".into()));
    let seeded = open(&path).and_then(|db| add_session(&db, 1, "demo-session", unix_now() + 86_400));
    if let Err(e) = seeded {
        eprintln!("cannot prepare {}: {e}", path.display());
        return std::process::ExitCode::from(2);
    }
    println!("session token for user 1: demo-session (in {})", path.display());
    run_until_signal(config, Arc::new(SessionAuth::new(path, 4, 1024)))
}

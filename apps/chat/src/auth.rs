//! Authentication by the seed's session tokens (§4), without a database call on the shard.
//!
//! `Application::authenticate` runs on the shard thread and must not block, so it cannot run
//! the seed's `SELECT … FROM Session WHERE Tk = ?`. Until the tier lets a worker complete a
//! handshake (issue #10: asynchronous authentication), tokens are looked up in this in-memory
//! cache instead: loaded by a worker at start, updated when the server itself creates or
//! deletes a session, and reloaded from the database every `session_refresh` by a worker, so
//! sessions created by another process (a login service, `customws-chat seed`) are accepted
//! within that period. When the tier offers worker-completed authentication, `authenticate`
//! moves to a worker running the seed's query directly and this cache goes away.

use std::collections::HashMap;
use std::sync::RwLock;

use customws::app::application::{Admission, Rejection};
use customws::http::auth::{Identity, Roles};
use customws::http::request::Request;

use crate::db::{Db, DbError};
use crate::model::WsUserData;
use crate::store::{self, SessionRow, now_ms};

/// Longest token accepted (longer ones are refused without a lookup).
pub const MAX_TOKEN_LEN: usize = 256;

/// The session cache.
#[derive(Debug, Default)]
pub struct Sessions {
    by_token: RwLock<HashMap<String, SessionRow>>,
}

impl Sessions {
    /// Replaces the cache with the database's live sessions (a worker calls this).
    pub fn reload(&self, db: &Db) -> Result<usize, DbError> {
        let rows = store::live_sessions(&mut db.conn()?, now_ms())?;
        let map: HashMap<String, SessionRow> = rows.into_iter().map(|r| (r.token.clone(), r)).collect();
        let n = map.len();
        *self.by_token.write().unwrap_or_else(|e| e.into_inner()) = map;
        Ok(n)
    }

    /// Creates a session in the database and the cache (blocking: workers only).
    pub fn create(&self, db: &Db, user: WsUserData, ttl_ms: i64) -> Result<String, DbError> {
        let token = new_token()?;
        let expires_at = now_ms() + ttl_ms;
        store::create_session(&mut db.conn()?, user.id, &token, expires_at)?;
        let row = SessionRow { token: token.clone(), expires_at, user };
        self.by_token.write().unwrap_or_else(|e| e.into_inner()).insert(token.clone(), row);
        Ok(token)
    }

    /// Deletes a session from the database and the cache (blocking: workers only).
    pub fn delete(&self, db: &Db, token: &str) -> Result<bool, DbError> {
        self.by_token.write().unwrap_or_else(|e| e.into_inner()).remove(token);
        store::delete_session(&mut db.conn()?, token)
    }

    /// Number of cached sessions.
    pub fn len(&self) -> usize {
        self.by_token.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The handshake decision (seed §4.2): `?token=` (with or without `Bearer `) or
    /// `Authorization: Bearer`, looked up in the cache. Never blocks.
    pub fn authenticate(&self, request: &Request) -> Result<Admission, Rejection> {
        let token = token_of(request).ok_or_else(|| reject("token no proporcionado (missing token)"))?;
        if token.len() > MAX_TOKEN_LEN {
            return Err(reject("token inválido o expirado (invalid or expired token)"));
        }
        let row = self.by_token.read().unwrap_or_else(|e| e.into_inner()).get(&token).cloned();
        let row = row
            .filter(|r| r.expires_at > now_ms())
            .ok_or_else(|| reject("token inválido o expirado (invalid or expired token)"))?;
        let claims = serde_json::to_string(&row.user).unwrap_or_else(|_| "{}".into()).into_boxed_str();
        let identity = Identity {
            user_id: row.user.id,
            roles: Roles::default(),
            claims,
            // The tier closes the connection (1008) when the session expires.
            expires_at: (row.expires_at / 1000).max(0) as u64,
        };
        Ok(Admission { identity, user_data: Some(Box::new(row.user)) })
    }
}

fn reject(message: &str) -> Rejection {
    Rejection { status: 401, message: message.into() }
}

fn token_of(request: &Request) -> Option<String> {
    let from_query = request.query_param("token").filter(|t| !t.is_empty());
    let raw = from_query.or_else(|| request.authorization.clone())?;
    let token = raw.strip_prefix("Bearer ").unwrap_or(&raw).trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// A new random session token: 32 hex digits from the OS generator (never a guessable one:
/// without OS randomness this fails).
pub fn new_token() -> Result<String, DbError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| DbError(format!("no OS random source for session tokens: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

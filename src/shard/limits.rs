//! Abuse limits on open connections: message and byte rates (per connection, and per user
//! across every shard and reconnect), closing sustained abusers, token expiry and `auth_refresh`.

use super::Shard;
use crate::core::ConnKey;
use crate::core::ratelimit::Rate;
use crate::metrics::ShardMetrics;
use crate::protocol::envelope::{error_notification, server_ack};
use crate::ws::close;

/// Refusals are counted in windows of this length for `rate_limit_close_after`.
const STRIKE_WINDOW_MS: u64 = 10_000;

/// The configured rates, in bucket units, and the built-in operations turned off.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rates {
    pub(super) messages: Rate,
    pub(super) bytes: Rate,
    pub(super) close_after: u32,
    /// `disabled_ops` (validated with the configuration).
    pub(super) disabled_ops: crate::protocol::router::OpSet,
}

impl Rates {
    pub(super) fn from(config: &crate::config::Config) -> Self {
        let messages =
            Rate { per_second: config.rate_limit as u64, burst: config.rate_limit_burst.max(1) as u64 };
        let per_second = config.rate_limit_bytes as u64;
        Rates {
            messages,
            bytes: Rate { per_second, burst: per_second },
            close_after: config.rate_limit_close_after.min(u32::MAX as usize) as u32,
            disabled_ops: crate::protocol::router::OpSet::from_names(&config.disabled_ops)
                .unwrap_or_default(),
        }
    }
}

impl Shard {
    /// Charges one client message of `len` bytes; false (after answering 429, or closing 1008
    /// on sustained abuse) when it must be dropped.
    pub(super) fn admit_message(&mut self, key: ConnKey, len: usize) -> bool {
        let (now, rates) = (self.now, self.rates);
        // The users' buckets are shared across shards: charged on the process-wide clock.
        let shared_now_ms =
            self.epoch.saturating_duration_since(self.shared.started).as_millis() as u64 + now;
        let Some(session) = self
            .conns
            .get_mut(key.index as usize)
            .filter(|c| c.generation == key.generation)
            .and_then(|c| c.session.as_deref_mut())
        else {
            return true; // echo endpoint: conformance runs are not rate limited
        };
        // With both per-connection rates off the connection's own buckets are never made.
        let own = rates.messages.per_second > 0 || rates.bytes.per_second > 0;
        let allowed = (!own || {
            let state = session.rate_state(rates.messages, rates.bytes);
            state.messages.take(rates.messages, 1, now) && state.bytes.take(rates.bytes, len as u64, now)
        }) && session
            .user_bucket
            .as_deref()
            .is_none_or(|b| b.take(shared_now_ms.saturating_mul(1_000_000)));
        if allowed {
            return true;
        }
        let abusive = session.rate_state(rates.messages, rates.bytes).strikes.strike(
            now,
            STRIKE_WINDOW_MS,
            rates.close_after,
        );
        let user = session.user;
        let conn = &self.conns[key.index as usize];
        let (client, peer) = (conn.client_ip(), conn.peer);
        ShardMetrics::inc(&self.metrics().rate_limited);
        if abusive {
            ShardMetrics::inc(&self.metrics().policy_closes);
            log::warn!(user, client:%, peer:%; "rate limit: closing after repeated refusals (1008)");
            self.close(key, close::POLICY, "rate limit exceeded");
        } else {
            let frame = error_notification(None, 429, "rate limit exceeded; message dropped");
            self.sink.push(&mut self.conns, key, frame);
        }
        false
    }

    /// What a session keeps of a token's claims: all of them when the application reads them,
    /// `presence_info_claim` takes one or `authorize_url` is sent them, else nothing (no
    /// allocation on idle connections).
    pub(super) fn kept_claims(&self, claims: Box<str>) -> Box<str> {
        let shared = &self.shared;
        #[cfg(feature = "backend")]
        let authorizer = shared.authorizer.is_some();
        #[cfg(not(feature = "backend"))]
        let authorizer = false;
        if shared.app.reads_claims() || shared.config.presence_info_claim.is_some() || authorizer {
            claims
        } else {
            Box::default()
        }
    }

    /// Shard-time deadline for a token expiring at `exp` (Unix seconds), leeway included.
    pub(super) fn expiry_deadline(&self, exp: u64) -> u64 {
        if exp == u64::MAX {
            return u64::MAX;
        }
        let leeway_ms = self.shared.config.jwt_leeway.as_millis() as u64;
        let exp_ms = exp.saturating_mul(1000).saturating_add(leeway_ms);
        self.now.saturating_add(exp_ms.saturating_sub(Self::wall_ms()))
    }

    /// `auth_refresh` `{token}`: a valid token of the same user replaces the session's
    /// identity data — roles, claims (what the application and the backend see) and expiry —
    /// so a refresh can take permissions away as well as extend the session.
    pub(super) fn refresh_token(&mut self, key: ConnKey, user: i64, token: &str, pid: Option<&str>) {
        let answer = match self.shared.gate.verify(token) {
            Err(e) => error_notification(pid, 401, &format!("refresh refused: {e}")),
            Ok(identity) if identity.user_id != user => {
                error_notification(pid, 403, "refresh token belongs to another user")
            }
            Ok(identity) => {
                let deadline = self.expiry_deadline(identity.expires_at);
                let claims = self.kept_claims(identity.claims);
                if let Some(session) = self.conn_mut(key).and_then(|c| c.session.as_deref_mut()) {
                    session.expires_deadline = deadline;
                    session.roles = identity.roles;
                    session.set_claims(claims);
                }
                self.schedule_before(key, deadline);
                match pid {
                    Some(pid) => server_ack(pid, "refreshed"),
                    None => return,
                }
            }
        };
        self.sink.push(&mut self.conns, key, answer);
    }

    /// The token expired without a refresh: tell the client, close 1008.
    pub(super) fn expire_session(&mut self, key: ConnKey) {
        if let Some(conn) = self.conn_mut(key) {
            let (user, client, peer) = (conn.user(), conn.client_ip(), conn.peer);
            log::debug!(user, client:%, peer:%; "token expired");
        }
        let notice = error_notification(None, 401, "token expired; send auth_refresh before exp");
        self.sink.push(&mut self.conns, key, notice);
        ShardMetrics::inc(&self.metrics().policy_closes);
        self.close(key, close::POLICY, "token expired");
    }
}

//! What operators look at: `/health` and `/ready` (answered from [`Shared`], on the public port
//! or on `internal_listen`), and the shard side of the admin listings (a page of this shard's
//! connections, every room's member count) that the backend API's admin page asks for.

use std::sync::atomic::Ordering;

use super::Shard;
use super::Shared;
use super::handshake::rfc3339;
use crate::route::msg::AdminMsg;
use crate::route::{Completion, ConnSummary, Outcome, RoomCount};

impl Shared {
    /// The `/health` body: status, time, uptime and open connections. Cheap: a few atomics.
    pub fn health_json(&self) -> String {
        let mut health = serde_json::json!({
            "status": "OK",
            "timestamp": rfc3339(Shard::wall_ms()),
            "uptime": self.started.elapsed().as_secs(),
            "connections": self.metrics.sum(|s| &s.connections_current),
        });
        // With a cluster: `"cluster": {"node", "broker": "up"|"down", "nodes"}`; while the
        // broker is down the node serves local traffic only and `status` is "DEGRADED".
        if let Some(cluster) = &self.fabric.cluster {
            let state = &cluster.state;
            let up = state.is_up();
            health["cluster"] = serde_json::json!({
                "node": state.node,
                "broker": if up { "up" } else { "down" },
                "nodes": state.nodes.load(Ordering::Relaxed) + 1,
            });
            if state.duplicate.load(Ordering::Relaxed) {
                health["cluster"]["duplicateNodeId"] = true.into();
            }
            if !up || state.duplicate.load(Ordering::Relaxed) {
                health["status"] = "DEGRADED".into();
            }
        }
        health.to_string()
    }

    /// The application's counters, plus the cluster's when `cluster` is set (for `/metrics`).
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut counters = self.app.counters();
        if let Some(cluster) = &self.fabric.cluster {
            counters.extend(cluster.state.counters());
        }
        counters
    }

    /// The `/ready` answer: `200 {"ready":true}`, or `503 {"ready":false}` once a shutdown has
    /// begun (load balancers stop sending new clients before the drain closes anyone).
    pub fn readiness(&self) -> (u16, &'static str) {
        if self.draining.load(Ordering::SeqCst) {
            (503, r#"{"ready":false}"#)
        } else {
            (200, r#"{"ready":true}"#)
        }
    }
}

impl Shard {
    /// Handles the admin messages.
    pub(super) fn on_admin(&mut self, msg: AdminMsg) {
        match msg {
            AdminMsg::Connections { after, user, limit, done } => {
                self.list_connections(after, user, limit, done)
            }
            AdminMsg::Rooms { limit, done } => self.list_rooms(limit, done),
        }
    }

    /// Up to `limit` open connections with an open order (`seq`) above `after`, lowest first,
    /// of `user` when given; `more` when this shard has others past them.
    fn list_connections(&self, after: u64, user: Option<i64>, limit: usize, done: Completion) {
        let now = self.now;
        let wall = Self::wall_ms();
        let mut page: Vec<ConnSummary> = self
            .conns
            .iter()
            .filter_map(|(_, conn)| {
                let session = conn.session.as_deref()?;
                if session.seq <= after || user.is_some_and(|u| u != session.user) {
                    return None;
                }
                let idle_ms = now.saturating_sub(u64::from(conn.last_active_s) * 1000);
                Some(ConnSummary {
                    user: session.user,
                    shard: self.id,
                    seq: session.seq,
                    ip: conn.client_ip(),
                    connected_ms: wall.saturating_sub(now.saturating_sub(session.opened_at)),
                    rooms: session.rooms.iter().map(|r| r.to_string()).collect(),
                    queued: conn.out.len(),
                    messages_in: conn.messages_in,
                    messages_out: conn.messages_out,
                    last_active_ms: wall.saturating_sub(idle_ms),
                })
            })
            .collect();
        let more = page.len() > limit;
        if more {
            page.select_nth_unstable_by_key(limit, |c| c.seq);
            page.truncate(limit);
        }
        page.sort_unstable_by_key(|c| c.seq);
        done.complete(Outcome::Connections { page, more });
    }

    /// Every room with members anywhere and its total, from this shard's replica of the counts
    /// (every shard announces its own); the `limit` largest.
    fn list_rooms(&self, limit: usize, done: Completion) {
        let mut rooms: Vec<RoomCount> = self
            .rooms
            .totals()
            .map(|(room, members)| RoomCount { room: room.to_string(), members })
            .collect();
        let total = rooms.len();
        rooms.sort_unstable_by(|a, b| b.members.cmp(&a.members).then_with(|| a.room.cmp(&b.room)));
        rooms.truncate(limit);
        done.complete(Outcome::Rooms { rooms, total });
    }
}

//! An application that does blocking work per message without stalling its shard.
//!
//! A `lookup` message (`{"pid":"q1","type":"lookup","payload":{"key":"k"}}`) needs a slow
//! call (here a sleep standing in for a database query). The callback runs on the shard thread,
//! so it only hands the job to a bounded [`Workers`] pool and returns; the worker answers the
//! connection later through the [`Handle`], whose message reaches the shard via its channel.
//! Every other connection of the shard keeps its latency meanwhile.
//!
//! Run: `cargo run --example blocking_app -- --listen 127.0.0.1:8082 --jwt-secret S`

use std::sync::Arc;
use std::time::Duration;

use customws::prelude::*;

/// Answers `lookup` messages from a slow source, on worker threads.
pub(crate) struct Lookup {
    workers: Workers,
    delay: Duration,
}

impl Lookup {
    /// `threads` workers, at most `queue` waiting lookups, each taking `delay`.
    pub(crate) fn new(threads: usize, queue: usize, delay: Duration) -> Self {
        Lookup { workers: Workers::new(threads, queue), delay }
    }
}

impl Application for Lookup {
    fn on_connect(&self, conn: &mut Conn<'_>) {
        let welcome = serde_json::json!({ "userId": conn.user_id() });
        if let Ok(msg) = OutMessage::json("welcome", &welcome) {
            conn.send(&msg);
        }
    }

    fn on_message(&self, conn: &mut Conn<'_>, msg: &ClientMessage<'_>, _raw: &[u8]) -> Handled {
        if msg.kind != "lookup" {
            return Handled::No;
        }
        // Owned, so the job can keep it after the callback returns.
        let Some(pid) = msg.pid_owned() else {
            conn.error(None, 400, "lookup needs a pid");
            return Handled::Yes;
        };
        let key = msg.payload.map(|p| p.get().to_owned()).unwrap_or_else(|| "null".into());
        let (id, handle, delay) = (conn.id(), conn.handle().clone(), self.delay);
        let job = move || {
            std::thread::sleep(delay); // the blocking call: a worker waits, not the shard
            let answer = format!(r#"{{"key":{key},"value":"found"}}"#);
            handle.respond(id, &pid, "lookup_result", &answer);
        };
        if self.workers.spawn(job).is_err() {
            conn.error(msg.pid.as_deref(), 503, "lookup queue full, retry later");
        }
        Handled::Yes
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
    // Logging from the configuration, SIGTERM/SIGINT drain, SIGHUP reloads the keys.
    run_until_signal(config, Arc::new(Lookup::new(8, 1024, Duration::from_millis(200))))
}

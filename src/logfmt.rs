//! Log line formats and the refusal summary: `log_format = "json"` writes one JSON object per
//! line (`ts`, `level`, `target`, `msg`, `fields`), and [`RefusalLog`] turns a flood of
//! refused handshakes into one line per kind per interval.

use std::time::SystemTime;

use log::kv::{Key, Value, VisitSource};
use serde_json::{Map, json};

/// One log record as a JSON line (without the newline): `ts` (RFC 3339 UTC, milliseconds),
/// `level`, `target`, `msg`, and `fields` holding the record's key-values (numbers and
/// booleans as such, the rest as text).
pub fn json_line(now: SystemTime, record: &log::Record<'_>) -> String {
    let mut fields = Fields(Map::new());
    let _ = record.key_values().visit(&mut fields);
    json!({
        "ts": humantime::format_rfc3339_millis(now).to_string(),
        "level": record.level().as_str(),
        "target": record.target(),
        "msg": record.args().to_string(),
        "fields": fields.0,
    })
    .to_string()
}

struct Fields(Map<String, serde_json::Value>);

impl<'kvs> VisitSource<'kvs> for Fields {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let value = if let Some(n) = value.to_i64() {
            json!(n)
        } else if let Some(n) = value.to_u64() {
            json!(n)
        } else if let Some(b) = value.to_bool() {
            json!(b)
        } else {
            json!(value.to_string())
        };
        self.0.insert(key.as_str().to_string(), value);
        Ok(())
    }
}

/// Length of one refusal-summary interval.
pub const REFUSAL_INTERVAL_MS: u64 = 10_000;

/// Refused handshakes, summarised: the first refusal of a status in an interval is logged in
/// full, the rest only counted; when the interval ends, one line says how many more there
/// were. Memory is one entry per distinct status (a handful of HTTP codes), bounded by
/// [`RefusalLog::MAX_KINDS`].
#[derive(Debug, Default)]
pub struct RefusalLog {
    kinds: Vec<Kind>,
}

#[derive(Debug)]
struct Kind {
    status: u16,
    /// When the interval began (the first refusal logged in full).
    since: u64,
    /// Refusals counted but not logged since then.
    suppressed: u64,
}

/// One interval's summary: `suppressed` more refusals with `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// The HTTP status.
    pub status: u16,
    /// Refusals not logged one by one.
    pub suppressed: u64,
}

impl RefusalLog {
    /// Distinct statuses tracked at once; beyond, refusals are counted under the last one.
    pub const MAX_KINDS: usize = 16;

    /// A refusal with `status` at `now` (ms): true when it should be logged in full.
    /// Ended intervals are summarised into `out` first.
    pub fn refused(&mut self, status: u16, now: u64, out: &mut Vec<Summary>) -> bool {
        self.expire(now, out);
        if let Some(kind) = self.kinds.iter_mut().find(|k| k.status == status) {
            kind.suppressed += 1;
            return false;
        }
        if self.kinds.len() >= Self::MAX_KINDS {
            if let Some(last) = self.kinds.last_mut() {
                last.suppressed += 1;
            }
            return false;
        }
        self.kinds.push(Kind { status, since: now, suppressed: 0 });
        true
    }

    /// Ends the intervals that are over at `now`, pushing a summary for those with
    /// suppressed refusals.
    pub fn expire(&mut self, now: u64, out: &mut Vec<Summary>) {
        self.kinds.retain(|kind| {
            let over = now >= kind.since + REFUSAL_INTERVAL_MS;
            if over && kind.suppressed > 0 {
                out.push(Summary { status: kind.status, suppressed: kind.suppressed });
            }
            !over
        });
    }

    /// Summaries of every open interval (at shutdown).
    pub fn flush(&mut self, out: &mut Vec<Summary>) {
        self.expire(u64::MAX / 2, out);
    }

    /// When the earliest open interval ends.
    pub fn next_deadline(&self) -> Option<u64> {
        self.kinds.iter().map(|k| k.since + REFUSAL_INTERVAL_MS).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_refusal_logged_rest_summarised() {
        let mut log = RefusalLog::default();
        let mut out = Vec::new();
        assert!(log.refused(401, 0, &mut out));
        assert!((1..50).all(|i| !log.refused(401, i, &mut out)));
        assert!(log.refused(429, 5, &mut out));
        assert!(out.is_empty());
        assert_eq!(log.next_deadline(), Some(REFUSAL_INTERVAL_MS));
        assert!(log.refused(401, REFUSAL_INTERVAL_MS + 1, &mut out));
        assert_eq!(out, vec![Summary { status: 401, suppressed: 49 }]);
        out.clear();
        log.flush(&mut out);
        assert!(out.is_empty(), "no suppressed refusal since: nothing to say");
    }

    #[test]
    fn kinds_are_bounded() {
        let mut log = RefusalLog::default();
        let mut out = Vec::new();
        for status in 0..1000 {
            log.refused(status, 0, &mut out);
        }
        assert_eq!(log.kinds.len(), RefusalLog::MAX_KINDS);
    }

    #[test]
    fn json_line_has_fields() {
        let record = log::Record::builder()
            .args(format_args!("connect \"quoted\""))
            .level(log::Level::Info)
            .target("customws::shard")
            .key_values(&[("user", 7i64)])
            .build();
        let line: serde_json::Value =
            serde_json::from_str(&json_line(SystemTime::UNIX_EPOCH, &record)).unwrap();
        assert_eq!(line["msg"], "connect \"quoted\"");
        assert_eq!(line["fields"]["user"], 7);
        assert_eq!(line["ts"], "1970-01-01T00:00:00.000Z");
    }
}

//! Counters kept per shard (written by that shard only, relaxed atomics on their own cache
//! lines) and summed at scrape time into OpenMetrics text by `prometheus-client`, or into the
//! Prometheus text format 0.0.4 for scrapers that do not ask for OpenMetrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

pub use crate::route::link::{InboxDepth, ShedKind};

/// Upper bounds of the `ws_message_size_bytes` buckets.
pub const SIZE_BUCKETS: [f64; 7] = [64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 1048576.0];
/// Upper bounds of the `ws_latency_seconds` buckets.
pub const LATENCY_BUCKETS: [f64; 7] = [0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.025, 0.1];

/// A fixed-bucket histogram with a single writer. Each bucket counts the observations that
/// fall in it (not cumulative), `overflow` those above every bound, so the count is their sum
/// and the `+Inf` bucket always equals it. `sum` is kept as an integer in the observed unit ×
/// `scale` (bytes × 1, or nanoseconds for seconds × 1e9).
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds: &'static [f64; N],
    buckets: [AtomicU64; N],
    overflow: AtomicU64,
    scale: f64,
    sum_scaled: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    /// An empty histogram over `bounds`, whose sum is kept in units of `1 / scale`.
    pub fn new(bounds: &'static [f64; N], scale: f64) -> Self {
        Histogram {
            bounds,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            overflow: AtomicU64::new(0),
            scale,
            sum_scaled: AtomicU64::new(0),
        }
    }

    /// Records `n` observations of `value`.
    pub fn observe_n(&self, value: f64, n: u64) {
        let bucket =
            self.bounds.iter().position(|&b| value <= b).map_or(&self.overflow, |i| &self.buckets[i]);
        ShardMetrics::add(bucket, n);
        // `as` saturates: a negative or NaN value adds nothing.
        let scaled = (value * self.scale).round() as u64;
        ShardMetrics::add(&self.sum_scaled, scaled.saturating_mul(n));
    }

    /// Observations per bucket (the last entry is the `+Inf` overflow) and their sum, in the
    /// observed unit.
    fn snapshot(&self) -> ([u64; N], u64, f64) {
        let buckets = std::array::from_fn(|i| self.buckets[i].load(Relaxed));
        let sum = self.sum_scaled.load(Relaxed) as f64 / self.scale;
        (buckets, self.overflow.load(Relaxed), sum)
    }
}

/// One shard's counters.
#[derive(Debug)]
#[repr(align(128))]
pub struct ShardMetrics {
    /// WebSocket connections opened.
    pub connections_total: AtomicU64,
    /// WebSocket connections open now.
    pub connections_current: AtomicU64,
    /// Users whose home is this shard and who have a connection.
    pub users_current: AtomicU64,
    /// Client messages received.
    pub messages_in: AtomicU64,
    /// Frames queued to clients.
    pub messages_out: AtomicU64,
    /// Protocol errors and refused messages.
    pub errors: AtomicU64,
    /// Handshakes refused (401/403/404/400…).
    pub handshake_failures: AtomicU64,
    /// Connections closed 1013 because their queue overflowed.
    pub slow_consumer_closes: AtomicU64,
    /// Frames discarded (queue overflow or closing connection).
    pub frames_dropped: AtomicU64,
    /// Connections closed for missing pongs.
    pub pong_timeouts: AtomicU64,
    /// Client messages refused by a rate limit (answered 429).
    pub rate_limited: AtomicU64,
    /// Connections closed 1008 (sustained rate-limit abuse, token expiry).
    pub policy_closes: AtomicU64,
    /// Handshakes refused by an admission limit (503/429).
    pub admission_refusals: AtomicU64,
    /// Sizes of received client messages.
    pub sizes: Histogram<7>,
    /// Time from a loop iteration's wake-up to its deliveries being written, per message.
    pub latency: Histogram<7>,
    /// Client-originated messages this shard did not send because the receiving shard's
    /// inbox was over `inbox_max_bytes`, by [`ShedKind`].
    pub inbox_shed: [AtomicU64; ShedKind::ALL.len()],
    /// `room_presence` / `presence_subscribe` refused by the presence budget or because one
    /// was in flight (429).
    pub presence_refused: AtomicU64,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            connections_total: AtomicU64::new(0),
            connections_current: AtomicU64::new(0),
            users_current: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
            slow_consumer_closes: AtomicU64::new(0),
            frames_dropped: AtomicU64::new(0),
            pong_timeouts: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            policy_closes: AtomicU64::new(0),
            admission_refusals: AtomicU64::new(0),
            sizes: Histogram::new(&SIZE_BUCKETS, 1.0),
            latency: Histogram::new(&LATENCY_BUCKETS, 1e9),
            inbox_shed: std::array::from_fn(|_| AtomicU64::new(0)),
            presence_refused: AtomicU64::new(0),
        }
    }
}

impl ShardMetrics {
    /// Adds one to a counter (single writer, so load+store beats a locked add).
    pub fn inc(counter: &AtomicU64) {
        counter.store(counter.load(Relaxed) + 1, Relaxed);
    }

    /// Adds `n` to a counter (wrapping, as Prometheus counters may reset).
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Subtracts one from a gauge.
    pub fn dec(gauge: &AtomicU64) {
        gauge.store(gauge.load(Relaxed).saturating_sub(1), Relaxed);
    }

    /// Records a received message's size.
    pub fn observe_size(&self, len: usize) {
        self.sizes.observe_n(len as f64, 1);
    }
}

/// All shards' counters.
#[derive(Debug)]
pub struct Metrics {
    /// Index = shard id.
    pub shards: Vec<ShardMetrics>,
    /// Backend API connections refused at `api_max_connections` (written by the API thread).
    pub api_refused: AtomicU64,
    /// Each shard's inbox depth (index = shard id), set once when the shards start.
    pub inboxes: std::sync::OnceLock<Vec<Arc<InboxDepth>>>,
}

impl Metrics {
    /// Counters for `n` shards.
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Metrics {
            shards: (0..n).map(|_| ShardMetrics::default()).collect(),
            api_refused: AtomicU64::new(0),
            inboxes: std::sync::OnceLock::new(),
        })
    }

    /// Sum of one counter over all shards.
    pub fn sum(&self, pick: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| pick(s).load(Relaxed)).sum()
    }

    /// The OpenMetrics text exposition.
    pub fn render(self: &Arc<Self>) -> String {
        self.render_with(Vec::new())
    }

    /// The OpenMetrics exposition plus extra counters `(name, help, value)` (the
    /// application's); see [`Metrics::render_as`] for the text format 0.0.4.
    pub fn render_with(self: &Arc<Self>, mut extra: Vec<(&'static str, &'static str, u64)>) -> String {
        let panics = crate::app::application::worker_panics_total();
        extra.push((
            "customws_worker_panics",
            "Jobs on Workers pools that panicked (the thread lives on).",
            panics,
        ));
        extra.extend(crate::app::authorize::counters());
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Arc::clone(self)));
        registry.register_collector(Box::new(ExtraCounters(extra)));
        let mut out = String::with_capacity(4096);
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

type Pick = fn(&ShardMetrics) -> &AtomicU64;
type PickDepth = fn(&InboxDepth) -> &AtomicU64;

/// Counters handed over at scrape time (the application's own).
#[derive(Debug)]
struct ExtraCounters(Vec<(&'static str, &'static str, u64)>);

impl Collector for ExtraCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for &(name, help, value) in &self.0 {
            ConstCounter::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        Ok(())
    }
}

const COUNTERS: [(&str, &str, Pick); 11] = [
    ("ws_connections", "WebSocket connections opened.", |s| &s.connections_total),
    ("ws_messages", "Client messages received.", |s| &s.messages_in),
    ("ws_errors", "Protocol errors and refused messages.", |s| &s.errors),
    ("customws_messages_sent", "Frames queued to clients.", |s| &s.messages_out),
    ("customws_handshake_failures", "Handshakes refused before the upgrade.", |s| &s.handshake_failures),
    ("customws_slow_consumer_closes", "Connections closed 1013 because their send queue overflowed.", |s| {
        &s.slow_consumer_closes
    }),
    ("customws_frames_dropped", "Frames discarded on overflow or close.", |s| &s.frames_dropped),
    ("customws_pong_timeouts", "Connections closed for a missing pong.", |s| &s.pong_timeouts),
    ("customws_rate_limited", "Client messages refused by a rate limit (429).", |s| &s.rate_limited),
    ("customws_policy_closes", "Connections closed 1008: sustained rate abuse or token expiry.", |s| {
        &s.policy_closes
    }),
    ("customws_admission_refusals", "Handshakes refused by an admission limit (503/429).", |s| {
        &s.admission_refusals
    }),
];

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, pick) in COUNTERS {
            let metric = ConstCounter::new(self.sum(pick));
            metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        let gauges: [(&str, &str, Pick); 2] = [
            ("ws_connections_current", "WebSocket connections open now.", |s| &s.connections_current),
            ("ws_clients_current", "Distinct users connected now.", |s| &s.users_current),
        ];
        for (name, help, pick) in gauges {
            let metric = ConstGauge::new(self.sum(pick) as i64);
            metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        let help = "Backend API connections refused because api_max_connections were open.";
        let refused = ConstCounter::new(self.api_refused.load(Relaxed));
        refused.encode(encoder.encode_descriptor(
            "customws_api_refused_connections",
            help,
            None,
            MetricType::Counter,
        )?)?;
        self.encode_shards(&mut encoder)?;
        self.encode_inboxes(&mut encoder)?;
        self.encode_sizes(&mut encoder)
    }
}

impl Metrics {
    /// Inbox sheds by kind, presence refusals, and each shard's inbox depth.
    fn encode_inboxes(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let help = "Client-originated messages shed because the receiving shard's inbox was full.";
        let mut family = encoder.encode_descriptor("customws_inbox_shed", help, None, MetricType::Counter)?;
        for (i, kind) in ShedKind::ALL.iter().enumerate() {
            let total: u64 = self.shards.iter().map(|s| s.inbox_shed[i].load(Relaxed)).sum();
            ConstCounter::new(total).encode(family.encode_family(&[("kind", kind.label())])?)?;
        }
        let help = "room_presence / presence_subscribe refused 429 by the presence budget or one in flight.";
        ConstCounter::new(self.sum(|s| &s.presence_refused)).encode(encoder.encode_descriptor(
            "customws_presence_refused",
            help,
            None,
            MetricType::Counter,
        )?)?;
        let Some(inboxes) = self.inboxes.get() else { return Ok(()) };
        let gauges: [(&str, &str, PickDepth); 2] = [
            ("customws_inbox_bytes", "Estimated bytes queued in each shard's inbox.", |d| &d.bytes),
            ("customws_inbox_messages", "Messages queued in each shard's inbox.", |d| &d.messages),
        ];
        for (name, help, pick) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (i, depth) in inboxes.iter().enumerate() {
                let gauge = ConstGauge::new(pick(depth).load(Relaxed) as i64);
                gauge.encode(family.encode_family(&[("shard", i.to_string())])?)?;
            }
        }
        Ok(())
    }
}

impl Metrics {
    fn encode_shards(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let help = "WebSocket connections open now, per shard.";
        let mut family =
            encoder.encode_descriptor("customws_shard_connections", help, None, MetricType::Gauge)?;
        for (i, shard) in self.shards.iter().enumerate() {
            let labels = [("shard", i.to_string())];
            let gauge = ConstGauge::new(shard.connections_current.load(Relaxed) as i64);
            gauge.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn encode_sizes(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_histogram(encoder, "ws_message_size_bytes", "Size of received client messages.", |s| {
            &s.sizes
        })?;
        let help = "Per client message: from the loop wake-up that read it to its deliveries being written.";
        self.encode_histogram(encoder, "ws_latency_seconds", help, |s| &s.latency)
    }

    fn encode_histogram(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        pick: fn(&ShardMetrics) -> &Histogram<7>,
    ) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
        let bounds = pick(&self.shards[0]).bounds;
        let (mut per_bucket, mut overflow, mut sum) = ([0u64; 7], 0u64, 0.0);
        for shard in &self.shards {
            let (buckets, over, s) = pick(shard).snapshot();
            for (total, n) in per_bucket.iter_mut().zip(buckets) {
                *total += n;
            }
            overflow += over;
            sum += s;
        }
        // The encoder takes per-bucket counts and accumulates them itself.
        let mut buckets: Vec<(f64, u64)> = bounds.iter().copied().zip(per_bucket).collect();
        buckets.push((f64::INFINITY, overflow));
        let count = per_bucket.iter().sum::<u64>() + overflow;
        metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }
}

/// The exposition formats `/metrics` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text, as `prometheus-client` encodes it.
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (`text/plain`), for scrapers that do not ask for
    /// OpenMetrics.
    Text,
}

impl Format {
    /// OpenMetrics when the `Accept` header asks for it (as Prometheus does), else the text
    /// format 0.0.4 — the rule of Prometheus' own client libraries.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let wants_openmetrics = accept.is_some_and(|accept| {
            accept.split(',').any(|range| {
                let mut params = range.split(';').map(str::trim);
                let media = params.next().unwrap_or("");
                let refused =
                    params.any(|p| p.strip_prefix("q=").and_then(|q| q.parse::<f64>().ok()) == Some(0.0));
                media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
            })
        });
        if wants_openmetrics { Format::OpenMetrics } else { Format::Text }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

impl Metrics {
    /// The exposition plus the application's counters, in `format`.
    pub fn render_as(
        self: &Arc<Self>,
        extra: Vec<(&'static str, &'static str, u64)>,
        format: Format,
    ) -> String {
        let openmetrics = self.render_with(extra);
        match format {
            Format::OpenMetrics => openmetrics,
            Format::Text => openmetrics_to_text(&openmetrics),
        }
    }
}

/// The text format 0.0.4 of an OpenMetrics exposition encoded by `prometheus-client` (which
/// encodes only OpenMetrics). For what is exposed here — counters, gauges and histograms,
/// without units, exemplars or `_created` — the two formats differ only in that a counter's
/// `# HELP`/`# TYPE` lines name the family (`x`) in OpenMetrics but the sample (`x_total`) in
/// 0.0.4, and that OpenMetrics ends with `# EOF`. The samples are the same.
fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then_some((prefix, name, tail))
        });
        match meta {
            Some((prefix, name, tail)) => {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_seed_series_and_shard_gauges() {
        let metrics = Metrics::new(2);
        ShardMetrics::inc(&metrics.shards[1].connections_current);
        ShardMetrics::inc(&metrics.shards[0].connections_total);
        metrics.shards[0].observe_size(100);
        let text = metrics.render();
        for needle in [
            "ws_connections_total 1",
            "ws_connections_current 1",
            "ws_messages_total 0",
            "ws_errors_total 0",
            "ws_clients_current 0",
            "customws_shard_connections{shard=\"1\"} 1",
            "ws_message_size_bytes_bucket{le=\"256.0\"} 1",
            "ws_message_size_bytes_count 1",
            "ws_message_size_bytes_sum 100",
            "ws_latency_seconds_count 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_once_and_keep_the_overflow() {
        let metrics = Metrics::new(2);
        for (shard, size) in [(0, 10), (1, 100), (0, 100), (1, 5000), (0, 2 << 20), (1, 3 << 20)] {
            metrics.shards[shard].observe_size(size);
        }
        metrics.shards[0].latency.observe_n(0.0002, 3);
        metrics.shards[1].latency.observe_n(2.5, 1);
        let text = metrics.render();
        for needle in [
            "ws_message_size_bytes_bucket{le=\"64.0\"} 1\n",
            "ws_message_size_bytes_bucket{le=\"256.0\"} 3\n",
            "ws_message_size_bytes_bucket{le=\"16384.0\"} 4\n",
            "ws_message_size_bytes_bucket{le=\"1048576.0\"} 4\n",
            "ws_message_size_bytes_bucket{le=\"+Inf\"} 6\n",
            "ws_message_size_bytes_count 6\n",
            "ws_message_size_bytes_sum 5248090.0\n",
            "ws_latency_seconds_bucket{le=\"0.00025\"} 3\n",
            "ws_latency_seconds_bucket{le=\"0.1\"} 3\n",
            "ws_latency_seconds_bucket{le=\"+Inf\"} 4\n",
            "ws_latency_seconds_count 4\n",
            "ws_latency_seconds_sum 2.5006\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn text_format_names_counters_by_their_sample() {
        let metrics = Metrics::new(1);
        let text = metrics.render_as(vec![("app_things", "Things.", 2)], Format::Text);
        assert!(text.contains("# HELP ws_connections_total WebSocket connections opened.\n"), "{text}");
        assert!(text.contains("# TYPE ws_connections_total counter\nws_connections_total 0\n"), "{text}");
        assert!(text.contains("# TYPE app_things_total counter\napp_things_total 2\n"), "{text}");
        assert!(text.contains("# TYPE ws_connections_current gauge\n"), "{text}");
        assert!(text.contains("# TYPE ws_latency_seconds histogram\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn negotiation_follows_accept() {
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(Format::negotiate(Some("text/plain;version=0.0.4")), Format::Text);
        let prometheus =
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("Application/OpenMetrics-Text; q=0")), Format::Text);
    }
}

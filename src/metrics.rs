//! Counters kept per shard (written by that shard only, relaxed atomics on their own cache
//! lines) and summed at scrape time into Prometheus text by `prometheus-client`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Upper bounds of the `ws_message_size_bytes` buckets.
pub const SIZE_BUCKETS: [f64; 7] = [64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 1048576.0];
/// Upper bounds of the `ws_latency_seconds` buckets.
pub const LATENCY_BUCKETS: [f64; 7] = [0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.025, 0.1];

/// A fixed-bucket histogram with a single writer; `sum` is kept in the observed unit × 1e6
/// (bytes × 1e6 or microseconds) so it stays an integer.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds: &'static [f64; N],
    buckets: [AtomicU64; N],
    sum_micro: AtomicU64,
    count: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: &'static [f64; N]) -> Self {
        Histogram {
            bounds,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micro: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records `n` observations of `value`.
    pub fn observe_n(&self, value: f64, n: u64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            ShardMetrics::add(&self.buckets[i], n);
        }
        ShardMetrics::add(&self.sum_micro, (value * 1e6) as u64 * n);
        ShardMetrics::add(&self.count, n);
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
            sizes: Histogram::new(&SIZE_BUCKETS),
            latency: Histogram::new(&LATENCY_BUCKETS),
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

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.store(counter.load(Relaxed) + n, Relaxed);
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

/// What a shed message was, for `customws_inbox_shed_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedKind {
    /// `data_request` to a user (P2P) or a targeted presence event.
    Deliver,
    /// `data_request` broadcast, or presence with `presence_scope = "all"`.
    Broadcast,
    /// A room publish, or a join/left event to a room.
    Room,
    /// A presence update to its home shard, or its fan-out to watchers and rooms.
    Presence,
    /// `presence_subscribe` / `presence_unsubscribe` to the watcher's home shard.
    Watch,
    /// `room_presence` gathering members and their presences.
    Roster,
}

impl ShedKind {
    /// Every kind, in label order.
    pub const ALL: [ShedKind; 6] = [
        ShedKind::Deliver,
        ShedKind::Broadcast,
        ShedKind::Room,
        ShedKind::Presence,
        ShedKind::Watch,
        ShedKind::Roster,
    ];

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            ShedKind::Deliver => "deliver",
            ShedKind::Broadcast => "broadcast",
            ShedKind::Room => "room",
            ShedKind::Presence => "presence",
            ShedKind::Watch => "watch",
            ShedKind::Roster => "roster",
        }
    }
}

/// What one shard's inbox holds now: written by every sender (add) and the shard (subtract).
#[derive(Debug, Default)]
pub struct InboxDepth {
    /// Estimated bytes held by queued messages.
    pub bytes: AtomicU64,
    /// Queued messages.
    pub messages: AtomicU64,
}

/// All shards' counters.
#[derive(Debug)]
pub struct Metrics {
    /// Index = shard id.
    pub shards: Vec<ShardMetrics>,
    /// Each shard's inbox depth (index = shard id), set once when the shards start.
    pub inboxes: std::sync::OnceLock<Vec<Arc<InboxDepth>>>,
}

impl Metrics {
    /// Counters for `n` shards.
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Metrics {
            shards: (0..n).map(|_| ShardMetrics::default()).collect(),
            inboxes: std::sync::OnceLock::new(),
        })
    }

    /// Sum of one counter over all shards.
    pub fn sum(&self, pick: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| pick(s).load(Relaxed)).sum()
    }

    /// The Prometheus text exposition.
    pub fn render(self: &Arc<Self>) -> String {
        self.render_with(Vec::new())
    }

    /// The exposition plus extra counters `(name, help, value)` (the application's).
    pub fn render_with(self: &Arc<Self>, extra: Vec<(&'static str, &'static str, u64)>) -> String {
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
        let first = pick(&self.shards[0]);
        let mut cumulative = 0;
        let mut buckets: Vec<(f64, u64)> = first
            .bounds
            .iter()
            .enumerate()
            .map(|(i, &bound)| {
                cumulative += self.shards.iter().map(|s| pick(s).buckets[i].load(Relaxed)).sum::<u64>();
                (bound, cumulative)
            })
            .collect();
        let count: u64 = self.shards.iter().map(|s| pick(s).count.load(Relaxed)).sum();
        buckets.push((f64::INFINITY, count));
        let sum = self.shards.iter().map(|s| pick(s).sum_micro.load(Relaxed)).sum::<u64>() as f64 / 1e6;
        metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }
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
}

//! The cluster (issue #11): several customws nodes joined through Redis or NATS into one tier.
//!
//! - [`subjects`]: subject names under the configured prefix.
//! - [`wire`]: the inter-node message encoding (postcard header, raw frame body).
//! - [`broker`]: the [`broker::Broker`] abstraction; [`memory`] an in-process hub for
//!   tests; `redis` and `nats` the engines (cargo features `cluster-redis`, `cluster-nats`).
//! - [`view`], [`core`]: the sans-IO node: replicated per-node records, heartbeats,
//!   online/offline transitions, node expiry, and the delivered/404/503 decision.
//! - [`link`]: the node's link thread, between the shards (through the route layer's
//!   `ClusterTx` and inboxes) and the broker.

pub mod broker;
pub mod core;
pub mod link;
pub mod memory;
#[cfg(feature = "cluster-nats")]
pub mod nats;
#[cfg(feature = "cluster-redis")]
pub mod redis;
pub mod subjects;
pub mod view;
pub mod wire;

use crossbeam_channel::Sender;

use broker::{Broker, BrokerConfig, BrokerError, Event};

/// Connects to the broker named by `config.url` (the engine is chosen by its scheme) and starts
/// its IO thread(s). Returns at once: the connection is made in the background and reported as
/// [`Event::Up`] (or kept retrying with backoff).
pub fn connect(config: &BrokerConfig, events: Sender<Event>) -> Result<Box<dyn Broker>, BrokerError> {
    let scheme = config.url.split("://").next().unwrap_or_default();
    match scheme {
        #[cfg(feature = "cluster-redis")]
        "redis" => Ok(Box::new(redis::RedisBroker::start(config, events)?)),
        #[cfg(feature = "cluster-nats")]
        "nats" => Ok(Box::new(nats::NatsBroker::start(config, events)?)),
        _ => {
            let _ = events;
            Err(BrokerError::Config(format!("no cluster engine for {:?} in this build", config.url)))
        }
    }
}

/// The default `node_id`: `{hostname}-{pid}-{random}`, reduced to `[A-Za-z0-9_-]`, at most 64.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "node".to_string());
    let host: String = host
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(40)
        .collect();
    let mut random = [0u8; 4];
    let _ = getrandom::fill(&mut random);
    let host = if host.is_empty() { "node".to_string() } else { host };
    format!("{host}-{}-{:08x}", std::process::id(), u32::from_le_bytes(random))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_node_ids_are_valid_and_unique() {
        let (a, b) = (default_node_id(), default_node_id());
        assert!(crate::config::valid_cluster_name(&a), "{a}");
        assert_ne!(a, b);
        assert!(a.contains(&format!("-{}-", std::process::id())));
    }

    #[test]
    fn unknown_schemes_are_refused() {
        let (tx, _rx) = crossbeam_channel::unbounded();
        let error = connect(&BrokerConfig::new("kafka://x:1", "t"), tx).err().expect("refused");
        assert!(matches!(error, BrokerError::Config(_)));
    }
}

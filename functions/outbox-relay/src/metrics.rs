//! The relay's own metrics, registered next to the common HTTP ones.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tandem_http::worker::Role;

pub struct RelayMetrics {
    pub published: Counter,
    pub publish_errors: Counter,
    /// Heartbeats acknowledged by the broker (one per partition per second).
    pub heartbeats: Counter,
    /// Rows moved to `relay_dead_letters` (too large, refused by the broker as invalid).
    pub dead_lettered: Counter,
    /// The largest batch fetched so far, in payload bytes (bounded by `RELAY_BATCH_BYTES`
    /// unless one event alone is larger).
    pub largest_batch_bytes: Gauge,
    pub batch_size: Histogram,
    pub publish_seconds: Histogram,
    pub backlog: Gauge,
    /// Shares of the outbox this process publishes (`RELAY_SHARES` > 1; else 1 while leader).
    pub shares_held: Gauge,
    /// `RELAY_SHARES`: how many shares the outbox is split into (1: unpartitioned).
    pub shares: Gauge,
    pub role: Arc<Role>,
}

impl RelayMetrics {
    pub fn new() -> Self {
        Self {
            published: Counter::default(),
            publish_errors: Counter::default(),
            heartbeats: Counter::default(),
            dead_lettered: Counter::default(),
            largest_batch_bytes: Gauge::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 4.0, 8)),
            publish_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            backlog: Gauge::default(),
            shares_held: Gauge::default(),
            shares: Gauge::default(),
            role: Arc::default(),
        }
    }

    /// Adds these metrics to a service registry.
    pub fn register(&self, metrics: &tandem_runtime::metrics::Metrics) {
        metrics.register(
            "relay_events_published",
            "Outbox events acknowledged by the broker",
            self.published.clone(),
        );
        metrics.register(
            "relay_publish_errors",
            "Batches that failed to publish completely",
            self.publish_errors.clone(),
        );
        metrics.register(
            "relay_heartbeats",
            "Heartbeats acknowledged by the broker (one per partition per second)",
            self.heartbeats.clone(),
        );
        metrics.register(
            "relay_dead_lettered",
            "Outbox rows moved to relay_dead_letters because retrying cannot publish them",
            self.dead_lettered.clone(),
        );
        metrics.register(
            "relay_largest_batch_bytes",
            "The largest batch fetched since start, in payload bytes",
            self.largest_batch_bytes.clone(),
        );
        metrics.register(
            "relay_batch_size",
            "Events per published batch",
            self.batch_size.clone(),
        );
        metrics.register(
            "relay_publish_seconds",
            "Time to publish one batch",
            self.publish_seconds.clone(),
        );
        metrics.register(
            "relay_outbox_backlog",
            "Unpublished outbox rows: counted every 5 s while a backlog lasts, 0 once a batch comes back short",
            self.backlog.clone(),
        );
        metrics.register(
            "relay_shares_held",
            "Shares of the outbox this replica publishes (RELAY_SHARES)",
            self.shares_held.clone(),
        );
        metrics.register(
            "relay_shares",
            "How many shares the outbox is split into (RELAY_SHARES; 1 when unpartitioned)",
            self.shares.clone(),
        );
        metrics.register(
            "relay_leader",
            "1 when this replica is the active relay",
            self.role.gauge(),
        );
    }
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

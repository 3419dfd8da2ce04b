//! The consumer's own metrics, registered next to the common HTTP ones.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tandem_http::worker::Role;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub partition: i32,
}

pub struct ConsumerMetrics {
    pub events: Family<OutcomeLabels, Counter>,
    /// Region 1 commit → Region 2 apply.
    pub replication_lag: Histogram,
    pub last_lag_ms: Gauge,
    pub partition_lag: Family<PartitionLabels, Gauge>,
    pub backlog: Gauge,
    /// Events per applied transaction.
    pub batch_size: Histogram,
    /// Dead letters that could not be written (the event stays unapplied and is retried).
    pub dead_letter_failures: Counter,
    /// The largest batch received so far, in bytes.
    pub largest_batch_bytes: Gauge,
    /// Partitions read again from the beginning because the topic was recreated.
    pub partition_rereads: Counter,
    /// Partitions held back at an event of a newer schema version (the pod: until restarted
    /// by an upgrade; the Lambda function: in its last invocation).
    pub held_partitions: Gauge,
    pub role: Arc<Role>,
}

impl ConsumerMetrics {
    pub fn new() -> Self {
        Self {
            events: Family::default(),
            replication_lag: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            last_lag_ms: Gauge::default(),
            partition_lag: Family::default(),
            backlog: Gauge::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            dead_letter_failures: Counter::default(),
            largest_batch_bytes: Gauge::default(),
            partition_rereads: Counter::default(),
            held_partitions: Gauge::default(),
            role: Arc::default(),
        }
    }

    pub fn record(&self, outcome: &'static str) {
        self.events.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn observe_lag(&self, seconds: f64) {
        self.replication_lag.observe(seconds);
        self.last_lag_ms.set((seconds * 1000.0) as i64);
    }

    pub fn set_partition_lag(&self, partition: i32, lag: i64) {
        self.partition_lag
            .get_or_create(&PartitionLabels { partition })
            .set(lag);
    }

    pub fn register(&self, metrics: &tandem_runtime::metrics::Metrics) {
        metrics.register(
            "consumer_dead_letter_failures",
            "Dead letters that could not be written; the event is held and retried",
            self.dead_letter_failures.clone(),
        );
        metrics.register(
            "consumer_largest_batch_bytes",
            "The largest batch received since start, in bytes",
            self.largest_batch_bytes.clone(),
        );
        metrics.register(
            "consumer_partition_rereads",
            "Partitions read again from the beginning because the topic was deleted and recreated",
            self.partition_rereads.clone(),
        );
        metrics.register(
            "consumer_held_partitions",
            "Partitions held back at an event of a newer schema version than this consumer reads",
            self.held_partitions.clone(),
        );
        metrics.register(
            "consumer_events",
            "Events processed by outcome",
            self.events.clone(),
        );
        metrics.register(
            "replication_lag_seconds",
            "Time from an event's commit in Region 1 to its apply in Region 2",
            self.replication_lag.clone(),
        );
        metrics.register(
            "replication_last_lag_milliseconds",
            "Replication lag of the last applied event",
            self.last_lag_ms.clone(),
        );
        metrics.register(
            "consumer_partition_lag",
            "Messages behind the high watermark, per partition",
            self.partition_lag.clone(),
        );
        metrics.register(
            "consumer_lag",
            "Messages behind the high watermarks, all partitions",
            self.backlog.clone(),
        );
        metrics.register(
            "consumer_batch_size",
            "Events applied per transaction",
            self.batch_size.clone(),
        );
        metrics.register(
            "consumer_leader",
            "1 when this replica is the active consumer",
            self.role.gauge(),
        );
    }
}

impl Default for ConsumerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

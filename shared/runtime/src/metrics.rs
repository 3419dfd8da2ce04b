//! Prometheus metrics, one registry per service instance (so several services can live in one
//! test process), rendered in the text exposition format at `/metrics`.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `hit`, `miss` or `bypass` (Redis unavailable: served from PostgreSQL).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// `max`, `open`, `idle` or `waiting`.
    pub state: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ])
}

/// The metrics every HTTP service exposes, plus room for service-specific ones.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_latency: Family<HttpLabels, Histogram, fn() -> Histogram>,
    pub cache_requests: Family<CacheLabels, Counter>,
    pub db_pool: Family<PoolLabels, Gauge>,
}

impl Metrics {
    pub fn new(service: &str) -> Self {
        let mut registry = Registry::with_prefix("tandem");
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_latency = Family::<HttpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let cache_requests = Family::<CacheLabels, Counter>::default();
        let db_pool = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route, method and status",
            http_latency.clone(),
        );
        registry.register(
            "cache_requests",
            "Document cache lookups: hit, miss, or bypass when Redis is unavailable",
            cache_requests.clone(),
        );
        registry.register(
            "db_pool_connections",
            "Database pool connections by state",
            db_pool.clone(),
        );
        let info = Family::<Vec<(String, String)>, Gauge>::default();
        info.get_or_create(&vec![
            ("service".to_owned(), service.to_owned()),
            ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ])
        .set(1);
        registry.register("build_info", "Service name and version", info);
        Self {
            registry: Mutex::new(registry),
            http_requests,
            http_latency,
            cache_requests,
            db_pool,
        }
    }

    /// Registers a service-specific metric.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.register(name, help, metric);
        }
    }

    pub fn cache(&self, result: &'static str) {
        self.cache_requests
            .get_or_create(&CacheLabels { result })
            .inc();
    }

    pub fn set_pool_usage(&self, usage: PoolUsage) {
        for (state, value) in [
            ("max", usage.max),
            ("open", usage.open),
            ("idle", usage.idle),
            ("waiting", usage.waiting),
        ] {
            self.db_pool
                .get_or_create(&PoolLabels { state })
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        }
        out
    }
}

/// A point-in-time view of the pool for `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct PoolUsage {
    pub max: usize,
    pub open: usize,
    pub idle: usize,
    pub waiting: usize,
}

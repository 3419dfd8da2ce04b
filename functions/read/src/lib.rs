//! The Read API (both regions): `GET`/`HEAD` of a document and keyset-paginated listing,
//! read through the version-guarded Redis cache and falling back to PostgreSQL.
//!
//! `router(state)` is the whole service; `main.rs` hands it to Lambda or to an HTTP server.

pub mod replica;
mod routes;

use std::sync::Arc;

use anyhow::Context;
use tandem_http::auth::{AuthSettings, Authenticator};
use tandem_runtime::config::{ConfigError, ServiceSettings};
use tandem_runtime::metrics::Metrics;
use tandem_store::cache::{Cache, CacheSettings};
use tandem_store::db::DatabaseSettings;
use tandem_store::documents::Store;

pub use replica::{Replica, ReplicaSettings};
pub use routes::router;

/// Everything the Read API is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub service: ServiceSettings,
    pub database: DatabaseSettings,
    pub cache: CacheSettings,
    pub auth: AuthSettings,
    /// Apply pending migrations at start-up (`TANDEM_MIGRATE_ON_START`, default true).
    pub migrate_on_start: bool,
    /// Replica mode (Region 2), on when `TANDEM_PRIMARY_READ_URL` is set.
    pub replica: Option<ReplicaSettings>,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            service: ServiceSettings::from_env()?,
            database: DatabaseSettings::from_env()?,
            cache: CacheSettings::from_env()?,
            auth: AuthSettings::from_env()?,
            migrate_on_start: tandem_runtime::config::flag("TANDEM_MIGRATE_ON_START", true)?,
            replica: ReplicaSettings::from_env()?,
        })
    }
}

/// Shared state, built once at start-up (outside any Lambda invocation).
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub cache: Cache,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    pub region: String,
    /// `TANDEM_REQUEST_TIMEOUT_MS`.
    pub request_timeout: std::time::Duration,
    pub replica: Option<Replica>,
    /// `tandem_replication_lag_milliseconds` (replicas), set on every scrape.
    pub lag_gauge: prometheus_client::metrics::gauge::Gauge,
    /// `tandem_near_cache_bytes`: what the near cache holds, set on every scrape.
    pub near_cache_gauge: prometheus_client::metrics::gauge::Gauge,
}

/// The router's state ([`tandem_http::extract::Shared`]).
pub type RouterState = tandem_http::extract::Shared<AppState>;

impl AsRef<Authenticator> for AppState {
    fn as_ref(&self) -> &Authenticator {
        &self.auth
    }
}

impl AppState {
    /// The replica state while this region is a replica (another region writes).
    pub fn active_replica(&self) -> Option<&Replica> {
        self.replica.as_ref().filter(|r| r.is_active())
    }

    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let auth = Authenticator::new(&settings.auth)?;
        anyhow::ensure!(
            !settings.auth.read_requires_auth || auth.is_configured(),
            "TANDEM_READ_REQUIRES_AUTH=true needs TANDEM_JWKS_URL or TANDEM_JWT_HS256_SECRET"
        );
        let pool = tandem_store::db::connect_pool(&settings.database).await?;
        if settings.migrate_on_start {
            tandem_store::migrations::run(&pool)
                .await
                .context("Failed to migrate the database at start-up")?;
        }
        let metrics = Arc::new(Metrics::new("read"));
        let lag_gauge = prometheus_client::metrics::gauge::Gauge::default();
        let replica = settings.replica.clone().map(Replica::new);
        if replica.is_some() {
            metrics.register(
                "replication_lag_milliseconds",
                "Age of the oldest partition's newest relay heartbeat applied in this region",
                lag_gauge.clone(),
            );
        }
        let near_cache_gauge = prometheus_client::metrics::gauge::Gauge::default();
        metrics.register(
            "near_cache_bytes",
            "Bytes the near cache holds, as counted against REDIS_NEAR_CACHE_BYTES (0 when off)",
            near_cache_gauge.clone(),
        );
        let store =
            Store::new(pool).with_probe(tandem_store::db::connect_probe(&settings.database).await?);
        if let Some(replica) = &replica {
            replica.refresh_role(&store).await;
            replica.spawn_refresh(store.clone());
        }
        Ok(Self {
            store,
            lag_gauge,
            near_cache_gauge,
            cache: {
                let mut cache = settings.cache.clone();
                cache.resolve_auth().await?;
                Cache::new(cache)?
            },
            auth,
            metrics,
            region: settings.service.region.clone(),
            request_timeout: settings.service.request_timeout,
            replica,
        })
    }
}

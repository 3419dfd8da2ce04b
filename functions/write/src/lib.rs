//! The Write API: `PUT`, `POST`, `PATCH` and `DELETE` on `/v1`, each committing
//! the document and its outbox event in one transaction, then refreshing the region's cache.
//! A region that is not the write region forwards them to the one that is ([`forward`]).
//!
//! `router(state)` is the whole service; `main.rs` hands it to Lambda or to an HTTP server.

mod body;
pub mod forward;
mod routes;

use std::sync::Arc;

use anyhow::Context;
use tandem_http::auth::{AuthSettings, Authenticator};
use tandem_runtime::config::{ConfigError, ServiceSettings};
use tandem_runtime::metrics::Metrics;
use tandem_store::cache::{Cache, CacheSettings};
use tandem_store::db::DatabaseSettings;
use tandem_store::documents::{Store, StoreError};
use tandem_store::roles::RoleError;

pub use routes::router;

/// Everything the Write API is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub service: ServiceSettings,
    pub database: DatabaseSettings,
    pub cache: CacheSettings,
    pub auth: AuthSettings,
    /// Apply pending migrations at start-up (`TANDEM_MIGRATE_ON_START`, default true).
    pub migrate_on_start: bool,
    /// The write region when the database has no role yet, at its first start
    /// (`TANDEM_INITIAL_WRITE_REGION`, default `region1`); afterwards the database's role
    /// decides.
    pub initial_write_region: String,
    /// The other region's Write API (`TANDEM_WRITE_FORWARD_URL`): while this region is not the
    /// write region, writes are forwarded there ([`forward`]); unset, they are refused with
    /// 503 `not-write-region`.
    pub forward_url: Option<String>,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            service: ServiceSettings::from_env()?,
            database: DatabaseSettings::from_env()?,
            cache: CacheSettings::from_env()?,
            auth: AuthSettings::from_env()?,
            migrate_on_start: tandem_runtime::config::flag("TANDEM_MIGRATE_ON_START", true)?,
            initial_write_region: tandem_runtime::config::optional("TANDEM_INITIAL_WRITE_REGION")
                .unwrap_or_else(|| "region1".to_owned()),
            forward_url: match tandem_runtime::config::optional("TANDEM_WRITE_FORWARD_URL") {
                Some(url) if url.starts_with("http://") || url.starts_with("https://") => Some(url),
                Some(url) => {
                    return Err(ConfigError::Invalid {
                        name: "TANDEM_WRITE_FORWARD_URL",
                        value: url,
                        reason: "not an http:// or https:// URL".to_owned(),
                    });
                }
                None => None,
            },
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
    /// This region's role, as last read from its database.
    pub role: forward::RoleView,
    /// Where writes go while this region is not the write region.
    pub forwarder: Option<forward::Forwarder>,
}

/// The router's state ([`tandem_http::extract::Shared`]).
pub type RouterState = tandem_http::extract::Shared<AppState>;

impl AsRef<Authenticator> for AppState {
    fn as_ref(&self) -> &Authenticator {
        &self.auth
    }
}

impl AppState {
    /// Connects (lazily), optionally migrates, and refuses to start without a way to
    /// authenticate writers.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let auth = Authenticator::new(&settings.auth)?;
        anyhow::ensure!(
            auth.is_configured(),
            "writes need authentication: set TANDEM_JWKS_URL (production) or TANDEM_JWT_HS256_SECRET (local)"
        );
        let pool = tandem_store::db::connect_pool(&settings.database).await?;
        if settings.migrate_on_start {
            tandem_store::migrations::run(&pool)
                .await
                .context("Failed to migrate the database at start-up")?;
        }
        // The database's role decides whether this region's writes commit (its outbox
        // trigger refuses them otherwise); record it at the first start.
        match tandem_store::roles::ensure(
            &pool,
            &settings.service.region,
            &settings.initial_write_region,
        )
        .await
        {
            Ok(role) => tracing::info!(
                region = role.region,
                write_region = role.write_region,
                write_epoch = role.write_epoch,
                writable = role.writable,
                "region role"
            ),
            // Migrated by someone else and unreachable now: writes report it when they come.
            Err(RoleError::Store(StoreError::Unavailable(cause))) if !settings.migrate_on_start => {
                tracing::warn!(
                    error = format!("{cause:#}"),
                    "cannot read the region role at start-up"
                );
            }
            Err(e) => return Err(e).context("Failed to record the region role at start-up"),
        }
        let metrics = Arc::new(Metrics::new("write"));
        let forwarder = match &settings.forward_url {
            Some(url) => Some(forward::Forwarder::new(
                url,
                &settings.service.region,
                settings.service.request_timeout,
                &metrics,
            )?),
            None => None,
        };
        // Each commit wakes the relay after the fact, never inside the transaction.
        let store = Store::new(pool)
            .with_probe(tandem_store::db::connect_probe(&settings.database).await?)
            .with_relay_wake();
        let role = forward::RoleView::default();
        if let Some(forwarder) = &forwarder {
            // A write region deposed while this process was down learns it before serving,
            // when the other region answers (bounded), and keeps asking while it runs.
            forwarder
                .learn_from_peer(&store, &role, std::time::Duration::from_secs(2))
                .await;
            forwarder.spawn_peer_watch(store.clone(), role.clone());
        }
        Ok(Self {
            store,
            cache: {
                let mut cache = settings.cache.clone();
                cache.resolve_auth().await?;
                let cache = Cache::new(cache)?;
                // A predecessor killed between a commit and its cache update left the
                // replaced version cached: nothing cached before this process is trusted.
                cache.invalidate_all().await;
                cache
            },
            auth,
            metrics,
            region: settings.service.region.clone(),
            request_timeout: settings.service.request_timeout,
            role,
            forwarder,
        })
    }
}

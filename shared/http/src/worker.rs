//! What the two long-running workers, the outbox relay and the Region 2 consumer, share: one
//! active replica at a time, elected with a PostgreSQL advisory lock ([`tandem_store::leader`]); its
//! role, reported on `/readyz` and as a `*_leader` gauge; and the operations server that runs
//! beside the work.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use futures_util::FutureExt;
use prometheus_client::metrics::gauge::Gauge;

use crate::http::{Readiness, ReadyCheck, ScrapeHook};
use tandem_runtime::config::ServiceSettings;
use tandem_runtime::metrics::Metrics;
use tandem_runtime::shutdown::CancellationToken;
use tandem_store::db::DatabaseSettings;
use tandem_store::leader::Leadership;

/// Whether this replica is the active one.
#[derive(Debug, Default)]
pub struct Role {
    gauge: Gauge,
    leader: AtomicBool,
}

impl Role {
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
        self.gauge.set(i64::from(leader));
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// The role as a 0/1 gauge, to register under the worker's own metric name.
    pub fn gauge(&self) -> Gauge {
        self.gauge.clone()
    }
}

/// `/readyz` of a worker: ready when its database answers, leader and standby alike (a standby
/// is exactly what a rollout needs); the role is reported beside it.
pub fn ready_check(pool: Pool, role: Arc<Role>) -> ReadyCheck {
    Arc::new(move || {
        let pool = pool.clone();
        let role = role.clone();
        async move {
            let mut checks = std::collections::BTreeMap::new();
            let db = match pool.get().await {
                Ok(client) => client
                    .simple_query("SELECT 1")
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let ready = db.is_ok();
            checks.insert("postgres", db.map_or_else(|e| e, |()| "ok".to_owned()));
            let role = if role.is_leader() {
                "leader"
            } else {
                "standby"
            };
            checks.insert("role", role.to_owned());
            Readiness { ready, checks }
        }
        .boxed()
    })
}

/// Runs `work` whenever this process holds the advisory lock `lock`, until shutdown. `work`
/// returns `Ok` on shutdown and `Err` when it lost its leadership or something it needs; the
/// process then stands by and competes for the lock again.
pub async fn run_elected(
    database: &DatabaseSettings,
    lock: i64,
    role: &Role,
    shutdown: &CancellationToken,
    mut work: impl AsyncFnMut(&mut Leadership, &CancellationToken) -> anyhow::Result<()>,
) {
    loop {
        let Some(mut leadership) =
            Leadership::acquire(database, lock, Duration::from_secs(1), shutdown, || {
                role.set_leader(false)
            })
            .await
        else {
            break;
        };
        role.set_leader(true);
        tracing::info!("this replica is now the active one");
        let result = work(&mut leadership, shutdown).await;
        role.set_leader(false);
        // Closing the session releases the lock for a standby.
        drop(leadership);
        match result {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "stopped working; standing by");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = shutdown.cancelled() => break,
                }
            }
        }
    }
    tracing::info!("stopped");
}

/// Serves `/healthz`, `/readyz` and `/metrics` on the service's port while `work` runs, and
/// stops both on SIGTERM or Ctrl-C (`work` gets the shutdown token).
pub async fn serve_beside<F>(
    service: &ServiceSettings,
    metrics: Arc<Metrics>,
    ready: ReadyCheck,
    on_scrape: ScrapeHook,
    work: impl FnOnce(CancellationToken) -> F,
) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let ops = crate::http::finish(
        crate::http::ops_router(metrics.clone(), ready, on_scrape),
        metrics,
        &service.region,
        service.request_timeout,
    );
    let shutdown = tandem_runtime::shutdown::on_signal();
    let listener = tokio::net::TcpListener::bind((service.bind_address, service.port))
        .await
        .with_context(|| format!("Failed to bind port {}", service.port))?;
    let ops_shutdown = shutdown.clone();
    let server = tokio::spawn(crate::serve::serve(listener, ops, async move {
        ops_shutdown.cancelled().await;
    }));
    work(shutdown).await?;
    server.await.context("ops server task failed")??;
    Ok(())
}

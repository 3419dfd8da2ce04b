//! Entry point of the Region 2 consumer.
//!
//! * `tandem-region2-consumer` — run (active or standby) with `/healthz`, `/readyz`, `/metrics` on `PORT`.
//! * `tandem-region2-consumer redrive [--id N]` — re-apply dead-lettered events.
//! * `tandem-region2-consumer migrate` — apply database migrations and exit.

use std::sync::Arc;

use anyhow::Context;
use tandem_region2_consumer::{Region2Consumer, Settings};
use tandem_shared::leader::{shutdown_channel, trigger_on_signal};
use tandem_shared::metrics::Metrics;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tandem_shared::telemetry::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let settings = Settings::from_env().context("Invalid configuration")?;
    match args.first().map(String::as_str) {
        Some("migrate") => {
            let pool = tandem_shared::db::connect_pool(&settings.database).await?;
            tandem_shared::migrations::run(&pool).await
        }
        Some("redrive") => {
            let only = match args.get(1..3) {
                Some([flag, id]) if flag == "--id" => {
                    Some(id.parse::<i64>().context("--id needs a number")?)
                }
                None | Some([]) => None,
                _ => anyhow::bail!("usage: tandem-region2-consumer redrive [--id N]"),
            };
            let consumer = Region2Consumer::build(settings).await?;
            for (id, result) in consumer.applier.redrive(only).await? {
                tracing::info!(id, result, "dead letter redriven");
            }
            Ok(())
        }
        Some(other) => {
            anyhow::bail!("unknown command {other:?}; expected nothing, redrive or migrate")
        }
        None => run(settings).await,
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let consumer = Region2Consumer::build(settings.clone()).await?;
    let metrics = Arc::new(Metrics::new("region2-consumer"));
    consumer.metrics().register(&metrics);
    let ops = tandem_shared::http::finish(
        tandem_shared::http::ops_router(
            metrics.clone(),
            consumer.ready_check(),
            consumer.scrape_hook(),
        ),
        metrics,
        &settings.service.region,
    );
    let (sender, shutdown) = shutdown_channel();
    trigger_on_signal(sender);
    let listener =
        tokio::net::TcpListener::bind((settings.service.bind_address, settings.service.port))
            .await
            .with_context(|| format!("Failed to bind port {}", settings.service.port))?;
    let mut ops_shutdown = shutdown.clone();
    let server = tokio::spawn(tandem_shared::serve::serve(listener, ops, async move {
        let _ = ops_shutdown.wait_for(|stop| *stop).await;
    }));
    consumer.run(shutdown).await?;
    server.await.context("ops server task failed")??;
    Ok(())
}

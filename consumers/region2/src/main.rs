//! Entry point of the Region 2 consumer.
//!
//! * `tandem-region2-consumer` — run (active or standby) with `/healthz`, `/readyz`, `/metrics` on `PORT`.
//! * `tandem-region2-consumer redrive [--id N]` — re-apply dead-lettered events (an alias of
//!   `tandem redrive`, kept for one release; both call `tandem_store::replica::redrive`).
//! * `tandem-region2-consumer migrate` — apply database migrations and exit.

use std::sync::Arc;

use anyhow::Context;
use tandem_http::worker::serve_beside;
use tandem_region2_consumer::{Region2Consumer, Settings};
use tandem_runtime::metrics::Metrics;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tandem_runtime::telemetry::init(env!("CARGO_BIN_NAME")).context("Invalid configuration")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("migrate") {
        return tandem_store::migrations::run_from_env().await;
    }
    let settings = Settings::from_env().context("Invalid configuration")?;
    match args.first().map(String::as_str) {
        Some("redrive") => {
            let only = match &args[1..] {
                [] => None,
                [flag, id] if flag == "--id" => Some(
                    id.parse::<i64>()
                        .with_context(|| format!("--id needs a number, not {id:?}"))?,
                ),
                [flag] if flag == "--id" => anyhow::bail!("--id needs a number"),
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
    let ready = consumer.ready_check();
    let on_scrape = consumer.scrape_hook();
    let served = serve_beside(&settings.service, metrics, ready, on_scrape, |shutdown| {
        consumer.run(shutdown)
    })
    .await;
    // The last applies' spans.
    tandem_runtime::telemetry::shutdown().await;
    served
}

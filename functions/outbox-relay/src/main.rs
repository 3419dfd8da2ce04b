//! Entry point of the outbox relay.
//!
//! * `tandem-outbox-relay` — run (leader or standby) with `/healthz`, `/readyz`, `/metrics` on `PORT`.
//! * `tandem-outbox-relay replay --since <RFC 3339 time>` — republish retained events from that time
//!   (an alias of `tandem replay`, kept for one release; both call `tandem_store::outbox::replay_since`).
//! * `tandem-outbox-relay migrate` — apply database migrations and exit.

use std::sync::Arc;

use anyhow::Context;
use tandem_http::worker::serve_beside;
use tandem_outbox_relay::{Relay, Settings};
use tandem_runtime::metrics::Metrics;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tandem_runtime::telemetry::init(env!("CARGO_BIN_NAME")).context("Invalid configuration")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("migrate") {
        return tandem_store::migrations::run_from_env().await;
    }
    let settings = Settings::from_env().context("Invalid configuration")?;
    match args.first().map(String::as_str) {
        Some("replay") => {
            let since = match args.get(1..3) {
                Some([flag, value]) if flag == "--since" => OffsetDateTime::parse(value, &Rfc3339)
                    .with_context(|| format!("--since {value:?} is not an RFC 3339 time"))?,
                _ => anyhow::bail!("usage: tandem-outbox-relay replay --since <RFC 3339 time>"),
            };
            let pool = tandem_store::db::connect_pool(&settings.database).await?;
            let n = tandem_store::outbox::replay_since(&pool, since).await?;
            tracing::info!(rows = n, %since, "events marked for replay; the active relay publishes them now");
            Ok(())
        }
        Some(other) => {
            anyhow::bail!("unknown command {other:?}; expected nothing, replay or migrate")
        }
        None => run(settings).await,
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let pool = tandem_store::db::connect_pool(&settings.database).await?;
    tandem_store::migrations::run(&pool).await?;
    let relay = Relay::build(settings.clone()).await?;
    let metrics = Arc::new(Metrics::new("outbox-relay"));
    relay.metrics.register(&metrics);
    let ready = relay.ready_check();
    let on_scrape = relay.scrape_hook();
    let served = serve_beside(&settings.service, metrics, ready, on_scrape, |shutdown| {
        relay.run(shutdown)
    })
    .await;
    // The last publishes' spans.
    tandem_runtime::telemetry::shutdown().await;
    served
}

//! Entry point of the Write API: `tandem-write` serves (Lambda or HTTP);
//! `tandem-write migrate` applies database migrations and exits.

use anyhow::Context;
use tandem_write::{AppState, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tandem_runtime::telemetry::init(env!("CARGO_BIN_NAME")).context("Invalid configuration")?;
    if std::env::args().nth(1).as_deref() == Some("migrate") {
        return tandem_store::migrations::run_from_env().await;
    }
    // Under Lambda, a start that fails is reported to the Runtime API: the invoker gets the
    // reason instead of waiting (tandem_runtime::lambda).
    let started = async {
        let settings = Settings::from_env().context("Invalid configuration")?;
        let state = AppState::build(&settings).await?;
        anyhow::Ok((settings, state))
    };
    let (settings, state) = match started.await {
        Ok(started) => started,
        Err(e) => return Err(tandem_runtime::lambda::report_init_error(e).await),
    };
    let served = tandem_http::serve::run(tandem_write::router(state), &settings.service).await;
    tandem_runtime::telemetry::shutdown().await;
    served
}

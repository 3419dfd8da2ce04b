//! `tandem-region2-apply-lambda`: Region 2's apply as a Lambda function behind a Kafka event
//! source mapping (`tandem_region2_apply::lambda`). It serves Lambda invocations only (it needs
//! `AWS_LAMBDA_RUNTIME_API`, as Lambda and `cargo lambda watch` set it); the consumer pod,
//! `tandem-region2-consumer`, is the long-running alternative.

use anyhow::Context;
use tandem_region2_apply::lambda::{KafkaApply, Settings};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    tandem_runtime::telemetry::init(env!("CARGO_BIN_NAME")).context("Invalid configuration")?;
    // A start that fails is reported to the Runtime API: the invoker gets the reason instead
    // of waiting (tandem_runtime::lambda).
    let started = async {
        let settings = Settings::from_env().context("Invalid configuration")?;
        KafkaApply::build(&settings).await
    };
    let apply = match started.await {
        Ok(apply) => apply,
        Err(e) => return Err(tandem_runtime::lambda::report_init_error(e).await.into()),
    };
    // Concurrent only when AWS_LAMBDA_MAX_CONCURRENCY asks for it: the event source mapping
    // never hands two batches of one partition out at once, and each batch is its own
    // transaction, so invocations in parallel keep the per-partition order.
    lambda_runtime::run_concurrent(apply.service()).await
}

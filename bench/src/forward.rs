//! Measurement 8, write forwarding: the write measurement's `PUT`s at concurrency 16, sent to
//! Region 1's Write API directly and then to Region 2's Write API, which forwards each of them
//! to Region 1's (`TANDEM_WRITE_FORWARD_URL`). On loopback the difference is what forwarding
//! itself costs (one more HTTP hop through a process); between AWS regions a forwarded write
//! also pays one inter-region round trip, which no local run can show.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tandem_http::http::FORWARDED_TO_HEADER;

use crate::Sizes;
use crate::cpu::{CpuSplit, Meter, Probe};
use crate::load::{Amount, Outcome};
use crate::stack::{Kind, Probes, Service, Stack};
use crate::write::{COLLECTION, puts};

/// The write measurement's lower concurrency.
pub const CONCURRENCY: usize = 16;

/// What every forwarded answer must name: the region whose Write API committed the write.
const WRITE_REGION: &str = "region1";

#[derive(Debug)]
pub struct ForwardFigures {
    /// `PUT`s to Region 1's Write API.
    pub direct: Outcome,
    /// The same `PUT`s to Region 2's Write API, forwarded to Region 1's.
    pub forwarded: Outcome,
    pub direct_cpu: CpuSplit,
    pub forwarded_cpu: CpuSplit,
    /// Answers from Region 2's Write API checked for `x-tandem-forwarded-to: region1`, warm-up
    /// included (the measurement fails unless all of them carried it).
    pub checked: u64,
    /// `TANDEM_BENCH_PROFILE` statement statistics of both runs (Region 1's database).
    pub profile: Vec<String>,
}

impl ForwardFigures {
    /// Forwarded latency minus direct latency at quantile `q`, ms.
    pub fn added_ms(&self, q: f64) -> f64 {
        self.forwarded.ms(q) - self.direct.ms(q)
    }
}

/// Runs both passes against the running Region 1 Write API (`write1`) and Region 2's
/// forwarding one (`write2`); the documents of [`crate::write::prepare`] must exist.
pub async fn run(
    stack: &Stack,
    sizes: &Sizes,
    write1: &Service,
    write2: &Service,
    probes: &Probes,
) -> anyhow::Result<ForwardFigures> {
    check_forwarding(stack, write2).await?;
    // One meter for both passes, so each process's share reads side by side.
    let meter = Meter::default()
        .with("forwarding Write API (Region 2)", write2.probe())
        .with("Write API (Region 1)", write1.probe())
        .with("PostgreSQL 1", probes.pg1)
        .with("PostgreSQL 2", probes.pg2)
        .with("Redis 1", probes.redis1)
        .with("Redis 2", probes.redis2)
        .with("load generator", Some(Probe::LoadGenerator));
    let amount = sizes.write_amount;
    let keys = sizes.write_keys;

    let direct_url = stack.url(Kind::Write);
    // A direct answer naming a forward would mean the baseline is not direct.
    let not_forwarded =
        |headers: &reqwest::header::HeaderMap| headers.get(FORWARDED_TO_HEADER).is_none();
    if let Amount::For(_) = amount {
        // Warm-up, as in the write measurement: connection pools, prepared statements, caches.
        puts(
            stack,
            &direct_url,
            CONCURRENCY,
            warm_up(),
            keys,
            not_forwarded,
        )
        .await;
    }
    crate::profile::reset(&stack.db1).await?;
    let cpu = meter.start();
    let direct = puts(stack, &direct_url, CONCURRENCY, amount, keys, not_forwarded)
        .await
        .checked("direct PUT to Region 1's Write API")?;
    let direct_cpu = cpu.stop();
    let mut profile = crate::profile::top(
        &stack.db1,
        &format!("direct writes, concurrency {CONCURRENCY}"),
    )
    .await?;

    let forwarded_url = stack.url(Kind::Write2);
    let checked = Arc::new(AtomicU64::new(0));
    let unmarked = Arc::new(AtomicU64::new(0));
    let forwarded_to_region1 = {
        let (checked, unmarked) = (checked.clone(), unmarked.clone());
        move |headers: &reqwest::header::HeaderMap| {
            checked.fetch_add(1, Ordering::Relaxed);
            let marked = headers
                .get(FORWARDED_TO_HEADER)
                .is_some_and(|v| v.as_bytes() == WRITE_REGION.as_bytes());
            if !marked {
                unmarked.fetch_add(1, Ordering::Relaxed);
            }
            marked
        }
    };
    if let Amount::For(_) = amount {
        let accept = forwarded_to_region1.clone();
        puts(stack, &forwarded_url, CONCURRENCY, warm_up(), keys, accept).await;
    }
    crate::profile::reset(&stack.db1).await?;
    let cpu = meter.start();
    let forwarded = puts(
        stack,
        &forwarded_url,
        CONCURRENCY,
        amount,
        keys,
        forwarded_to_region1,
    )
    .await;
    let forwarded_cpu = cpu.stop();
    let unmarked = unmarked.load(Ordering::Relaxed);
    anyhow::ensure!(
        unmarked == 0,
        "{unmarked} answers of Region 2's Write API (200 OK) lacked `{FORWARDED_TO_HEADER}: \
         {WRITE_REGION}`: they were not forwarded to Region 1\n{}",
        write2.process.log_tail()
    );
    let forwarded = forwarded.checked("PUT forwarded by Region 2's Write API")?;
    profile.extend(
        crate::profile::top(
            &stack.db1,
            &format!("forwarded writes, concurrency {CONCURRENCY}"),
        )
        .await?,
    );
    Ok(ForwardFigures {
        direct,
        forwarded,
        direct_cpu,
        forwarded_cpu,
        checked: checked.load(Ordering::Relaxed),
        profile,
    })
}

fn warm_up() -> Amount {
    Amount::For(Duration::from_secs(2))
}

/// One forwarded `PUT`, with a clear error when Region 2's Write API does not forward it.
async fn check_forwarding(stack: &Stack, write2: &Service) -> anyhow::Result<()> {
    let response = stack
        .http
        .put(format!("{}/v1/{COLLECTION}/d1", write2.url))
        .bearer_auth(&stack.token)
        .header("content-type", "application/json")
        .body(crate::document_json())
        .send()
        .await?;
    let status = response.status();
    let forwarded_to = response.headers().get(FORWARDED_TO_HEADER).cloned();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(
        status == 200 && forwarded_to.as_ref().is_some_and(|v| v == WRITE_REGION),
        "Region 2's Write API did not forward a PUT to Region 1: {status}, \
         {FORWARDED_TO_HEADER}: {forwarded_to:?}, body {body}\n{}",
        write2.process.log_tail()
    );
    Ok(())
}

//! `tandem switchover --to R`: moves the write region with no acknowledged write lost.
//!
//! 1. Fence the current write region's writes in its database (`tandem_fence_writes`): it
//!    returns once the writes in flight have ended, and no later write commits there.
//! 2. Wait until region R has applied, on every partition of the write region's stream, a
//!    heartbeat newer than the fence (the relay sends one only when everything committed before
//!    its time is published, and the consumer applies in order): R then holds every write.
//! 3. Record R as the write region of the next write epoch, first in R's database (its writes
//!    commit from then on), then in the old write region's (which becomes a follower: its
//!    Write API forwards writes to R, its Read API serves as a replica).
//!
//! Writes arriving between 1 and 3 are refused with 503 and `Retry-After` (the Write APIs'
//! answer to a fenced database); none commits in either region. When R does not catch up in
//! time the fence is lifted again and nothing changed. Every step is idempotent, so a switchover
//! interrupted half-way (the CLI killed) is finished by running it again; until then the old
//! write region stays fenced, never two writers.
//!
//! `tandem failover --to R --allow-data-loss` ([`failover`]) promotes R without the old write
//! region: what that region committed and R never applied is its lost tail, quarantined by R's
//! consumer when it arrives (`tandem_region2_apply`).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use deadpool_postgres::Pool;
use serde::Serialize;
use tandem_store::roles::{self, Role};

use crate::output::{self, good, warn};

/// How much later than the fence a heartbeat must be to prove the catch-up.
const HEARTBEAT_MARGIN: time::Duration = time::Duration::milliseconds(100);

/// What a switchover did.
#[derive(Debug, Serialize)]
pub struct Report {
    pub from: String,
    pub to: String,
    /// The write epoch `to` writes in now.
    pub write_epoch: i64,
    /// `switched`, `already` (nothing to do) or `finished` (an interrupted switchover completed).
    pub outcome: &'static str,
    /// From the fence to the promotion: how long neither region took writes.
    pub unavailable_ms: Option<u64>,
    /// From the fence until `to` had applied everything committed before it.
    pub catch_up_ms: Option<u64>,
}

fn role_of(role: Option<Role>, region: &str) -> anyhow::Result<Role> {
    role.with_context(|| {
        format!(
            "{region}'s database records no region role: start its Write API once (it records the role) before a switchover"
        )
    })
}

/// Moves the write region to `to_pool`'s region. `from_pool` is the other region's database.
pub async fn run(
    from_pool: &Pool,
    to_pool: &Pool,
    from_name: &str,
    to_name: &str,
    catch_up_timeout: Duration,
) -> anyhow::Result<Report> {
    let from = role_of(roles::current(from_pool).await?, from_name)?;
    let to = role_of(roles::current(to_pool).await?, to_name)?;
    anyhow::ensure!(
        from.region == from_name && to.region == to_name,
        "the databases record regions {} and {}, not {from_name} and {to_name}: check the database URLs",
        from.region,
        to.region
    );
    let report = |outcome, write_epoch, unavailable_ms, catch_up_ms| Report {
        from: from_name.to_owned(),
        to: to_name.to_owned(),
        write_epoch,
        outcome,
        unavailable_ms,
        catch_up_ms,
    };

    // Already done, or done in the target's database only (interrupted after step 3's first
    // half): finish the old write region's record.
    if to.write_region == to_name {
        if to.write_epoch < from.write_epoch {
            bail!(
                "{to_name} records itself as the write region of write epoch {}, but {from_name} is at write epoch {}: \
                 the regions disagree; inspect both (`tandem status`) before moving the write region",
                to.write_epoch,
                from.write_epoch
            );
        }
        if !to.writable {
            roles::unfence(to_pool).await?;
        }
        if from.write_region == to_name && from.write_epoch == to.write_epoch {
            return Ok(report("already", to.write_epoch, None, None));
        }
        roles::promote(from_pool, to_name, to.write_epoch).await?;
        return Ok(report("finished", to.write_epoch, None, None));
    }
    if from.write_region != from_name || to.write_epoch != from.write_epoch {
        bail!(
            "{from_name} is not the write region the two databases agree on ({from_name}: write region {} at write epoch {}; \
             {to_name}: write region {} at write epoch {})",
            from.write_region,
            from.write_epoch,
            to.write_region,
            to.write_epoch
        );
    }

    let started = Instant::now();
    let fenced = roles::fence(from_pool)
        .await
        .with_context(|| format!("Failed to fence {from_name}'s writes"))?;
    // Every write of `from` committed before the fence's time (the fence waited for the ones
    // in flight); a heartbeat later than it is sent only once they are all published. The
    // margin covers the heartbeat's own statement: its snapshot is taken a moment before the
    // clock it reports is read.
    let fence_time = fenced.changed_at + HEARTBEAT_MARGIN;
    let deadline = started + catch_up_timeout;
    loop {
        let reached = tandem_store::lag::caught_up_to(to_pool).await?;
        if reached.is_some_and(|r| r > fence_time) {
            break;
        }
        if Instant::now() > deadline {
            roles::unfence(from_pool)
                .await
                .with_context(|| format!("{to_name} did not catch up, and lifting {from_name}'s fence failed: its writes stay refused until `tandem switchover` is run again"))?;
            bail!(
                "{to_name} did not apply {from_name}'s writes up to the fence within {catch_up_timeout:?} \
                 (it has applied up to {reached:?}): are {from_name}'s relay and {to_name}'s consumer running? \
                 Nothing changed: {from_name} takes writes again"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let catch_up = started.elapsed();
    let epoch = from.write_epoch + 1;
    roles::promote(to_pool, to_name, epoch)
        .await
        .with_context(|| format!("Failed to make {to_name} the write region: {from_name} stays fenced; run the switchover again"))?;
    let unavailable = started.elapsed();
    roles::promote(from_pool, to_name, epoch)
        .await
        .with_context(|| format!("{to_name} writes now, but recording it in {from_name}'s database failed (it stays fenced): run the switchover again"))?;
    Ok(report(
        "switched",
        epoch,
        Some(u64::try_from(unavailable.as_millis()).unwrap_or(u64::MAX)),
        Some(u64::try_from(catch_up.as_millis()).unwrap_or(u64::MAX)),
    ))
}

pub fn print(report: &Report) {
    match report.outcome {
        "already" => output::line(&warn(&format!(
            "{} is already the write region (write epoch {}); nothing to do",
            report.to, report.write_epoch
        ))),
        "finished" => output::line(&good(&format!(
            "finished an interrupted switchover: {} is the write region of write epoch {}, {} its follower",
            report.to, report.write_epoch, report.from
        ))),
        _ => output::line(&good(&format!(
            "{} is the write region of write epoch {} ({} follows); writes were refused for {} ms, {} of them waiting for {} to catch up",
            report.to,
            report.write_epoch,
            report.from,
            report.unavailable_ms.unwrap_or(0),
            report.catch_up_ms.unwrap_or(0),
            report.to
        ))),
    }
}

/// What a failover did.
#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub from: String,
    pub to: String,
    pub write_epoch: i64,
    /// `failed_over` or `already`.
    pub outcome: &'static str,
    /// Whether the old write region's database answered (and was fenced and told).
    pub old_write_region_reached: bool,
    /// The newest heartbeat `to` had applied from the old write region: every write committed
    /// there before it is in `to`; writes after it may be lost (they arrive later, and are
    /// quarantined: `tandem lost-writes`).
    #[serde(with = "time::serde::rfc3339::option")]
    pub caught_up_to: Option<time::OffsetDateTime>,
    /// How far `caught_up_to` was behind the promotion, in milliseconds: the window of writes
    /// that may be lost (the RPO bound known at promotion).
    pub lag_ms: Option<i64>,
}

/// Promotes `to_pool`'s region without waiting for the old write region, which may be gone.
/// When its database answers within `reach`, it is fenced first (no write commits there after)
/// and told the new write epoch afterwards; otherwise it learns the epoch from `to`'s stream
/// when it comes back, and everything it wrote that `to` never applied is quarantined there.
pub async fn failover(
    from_pool: Option<&Pool>,
    to_pool: &Pool,
    from_name: &str,
    to_name: &str,
    reach: Duration,
) -> anyhow::Result<FailoverReport> {
    let to = role_of(roles::current(to_pool).await?, to_name)?;
    anyhow::ensure!(
        to.region == to_name,
        "the database records region {}, not {to_name}: check the database URL",
        to.region
    );
    // The old write region, if it answers at all (bounded: it may be unreachable).
    let from = match from_pool {
        Some(pool) => tokio::time::timeout(reach, async {
            let role = roles::current(pool).await.ok().flatten()?;
            let fenced = roles::fence(pool).await.ok()?;
            Some((role, fenced))
        })
        .await
        .ok()
        .flatten(),
        None => None,
    };
    let caught_up_to = tandem_store::lag::caught_up_to(to_pool).await?;
    if to.write_region == to_name && to.writable {
        if let (Some(pool), Some(_)) = (from_pool, &from) {
            roles::promote(pool, to_name, to.write_epoch).await?;
        }
        return Ok(FailoverReport {
            from: from_name.to_owned(),
            to: to_name.to_owned(),
            write_epoch: to.write_epoch,
            outcome: "already",
            old_write_region_reached: from.is_some(),
            caught_up_to,
            lag_ms: None,
        });
    }
    let epoch = to
        .write_epoch
        .max(from.as_ref().map_or(0, |(role, _)| role.write_epoch))
        + 1;
    let promoted = roles::promote(to_pool, to_name, epoch)
        .await
        .with_context(|| format!("Failed to make {to_name} the write region"))?;
    if let (Some(pool), Some(_)) = (from_pool, &from) {
        // Best effort: it also learns the epoch from the stream.
        if let Err(e) = roles::promote(pool, to_name, epoch).await {
            tracing::warn!(error = %e, "could not record the new write epoch in {from_name}'s database");
        }
    }
    Ok(FailoverReport {
        from: from_name.to_owned(),
        to: to_name.to_owned(),
        write_epoch: epoch,
        outcome: "failed_over",
        old_write_region_reached: from.is_some(),
        caught_up_to,
        lag_ms: caught_up_to.map(|t| (promoted.changed_at - t).whole_milliseconds() as i64),
    })
}

pub fn print_failover(report: &FailoverReport) {
    if report.outcome == "already" {
        output::line(&warn(&format!(
            "{} is already the write region (write epoch {}); nothing to do",
            report.to, report.write_epoch
        )));
        return;
    }
    output::line(&good(&format!(
        "{} is the write region of write epoch {}",
        report.to, report.write_epoch
    )));
    let reached = if report.old_write_region_reached {
        format!(
            "{}'s database answered: it was fenced and told",
            report.from
        )
    } else {
        format!(
            "{}'s database did not answer: it learns the new write epoch from {}'s stream when it returns",
            report.from, report.to
        )
    };
    output::line(&reached);
    match (report.caught_up_to, report.lag_ms) {
        (Some(t), Some(lag)) => output::line(&warn(&format!(
            "writes {} committed after {t} ({lag} ms before the promotion) may be lost: they are quarantined as they arrive (`tandem lost-writes`)",
            report.from
        ))),
        _ => output::line(&warn(&format!(
            "{} never applied a heartbeat of {}: what it lost is unknown until its writes arrive (`tandem lost-writes`)",
            report.to, report.from
        ))),
    }
}

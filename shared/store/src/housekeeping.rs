//! Housekeeping: what each region's tables shed over time, in one place and on one schedule
//! ([`INTERVAL`]), run by that region's elected worker and never by a request-serving
//! function: Region 1's relay runs [`region1`] (published outbox rows past
//! `RELAY_OUTBOX_RETENTION_HOURS`, expired idempotency keys), Region 2's consumer (or, when
//! Region 2 applies through Lambda, its apply function) runs [`region2`] (applied event ids past
//! [`crate::replica::APPLIED_EVENTS_RETENTION_DAYS`]). Every deletion goes in rounds of at most 10,000 rows, so
//! no statement holds many locks.
//!
//! Each round records itself in `housekeeping_runs` in the same statement ([`prune_in_rounds`]):
//! per target, when the last pass ran and how many rows it removed, which `tandem status` shows
//! per region ([`last_runs`]).

use std::time::Duration;

use deadpool_postgres::{Client, Pool};
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;

use crate::documents::StoreError;

/// How often the elected workers prune.
pub const INTERVAL: Duration = Duration::from_secs(60);

/// One round of expired idempotency keys.
const PRUNE_IDEMPOTENCY_KEYS: &str = "DELETE FROM idempotency_keys WHERE (principal, key) IN \
     (SELECT principal, key FROM idempotency_keys WHERE expires_at < now() LIMIT 10000)";
/// The `LIMIT` of every pruning round: a round that removes fewer was the last.
pub(crate) const ROUND: u64 = 10_000;

/// What one housekeeping pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub outbox_rows: u64,
    pub idempotency_keys: u64,
    pub applied_events: u64,
}

impl Pruned {
    /// Logs what was removed (nothing when nothing was).
    pub fn log(&self) {
        if *self != Self::default() {
            tracing::info!(
                outbox_rows = self.outbox_rows,
                idempotency_keys = self.idempotency_keys,
                applied_events = self.applied_events,
                "housekeeping removed rows past their retention"
            );
        }
    }
}

/// Region 1: published outbox rows older than `outbox_retention`, and expired idempotency
/// keys.
pub async fn region1(pool: &Pool, outbox_retention: Duration) -> anyhow::Result<Pruned> {
    let pass = OffsetDateTime::now_utc();
    let outbox_rows = crate::outbox::prune_published(pool, outbox_retention, pass).await?;
    let client = pool.get().await?;
    let idempotency_keys = prune_in_rounds(
        &client,
        "idempotency_keys",
        PRUNE_IDEMPOTENCY_KEYS,
        &[],
        pass,
    )
    .await?;
    Ok(Pruned {
        outbox_rows,
        idempotency_keys,
        applied_events: 0,
    })
}

/// Region 2: applied event ids past their retention.
pub async fn region2(pool: &Pool) -> anyhow::Result<Pruned> {
    let pass = OffsetDateTime::now_utc();
    Ok(Pruned {
        applied_events: crate::replica::prune_applied_events(pool, pass).await?,
        ..Pruned::default()
    })
}

/// One round of `delete` (a `DELETE` of at most [`ROUND`] rows, its parameters `params`), with
/// its record in `housekeeping_runs`, in one statement: the target's row says the pass that
/// started at `pass` removed this round's rows too (a new pass starts the count again).
fn recorded_round(delete: &str, params: usize) -> String {
    format!(
        "WITH gone AS ({delete} RETURNING 1), counted AS (SELECT count(*) AS n FROM gone), \
         recorded AS (INSERT INTO housekeeping_runs AS h (target, ran_at, rows_removed, total_removed) \
           SELECT ${target}::text, ${pass}::timestamptz, n, n FROM counted \
           ON CONFLICT (target) DO UPDATE SET \
             rows_removed = CASE WHEN h.ran_at = EXCLUDED.ran_at \
               THEN h.rows_removed + EXCLUDED.rows_removed ELSE EXCLUDED.rows_removed END, \
             ran_at = EXCLUDED.ran_at, \
             total_removed = h.total_removed + EXCLUDED.total_removed) \
         SELECT n FROM counted",
        target = params + 1,
        pass = params + 2,
    )
}

/// Runs `delete` in rounds until one removes fewer than [`ROUND`] rows, each round recorded
/// under `target` for the pass that started at `pass`. Returns the rows removed.
pub(crate) async fn prune_in_rounds(
    client: &Client,
    target: &str,
    delete: &str,
    params: &[&(dyn ToSql + Sync)],
    pass: OffsetDateTime,
) -> Result<u64, tokio_postgres::Error> {
    let statement = recorded_round(delete, params.len());
    let mut all: Vec<&(dyn ToSql + Sync)> = params.to_vec();
    all.push(&target);
    all.push(&pass);
    let mut total = 0;
    loop {
        let n: i64 = client.query_one(&statement, &all).await?.try_get(0)?;
        let n = u64::try_from(n).unwrap_or(0);
        total += n;
        if n < ROUND {
            return Ok(total);
        }
    }
}

/// What housekeeping last did to one kind of row (`target`), as `housekeeping_runs` holds it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastRun {
    pub target: String,
    /// When that pass started.
    #[serde(with = "time::serde::rfc3339")]
    pub ran_at: OffsetDateTime,
    /// Rows that pass removed.
    pub rows_removed: i64,
    /// Rows removed since the table exists (schema version 5).
    pub total_removed: i64,
}

/// Every target's last pass in this region's database, by target; empty before the first pass
/// (or on a schema older than the table).
pub async fn last_runs(pool: &Pool) -> Result<Vec<LastRun>, StoreError> {
    let client = pool.get().await?;
    let exists: bool = client
        .query_one("SELECT to_regclass('housekeeping_runs') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT target, ran_at, rows_removed, total_removed FROM housekeeping_runs \
             ORDER BY target",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(LastRun {
                target: r.try_get(0)?,
                ran_at: r.try_get(1)?,
                rows_removed: r.try_get(2)?,
                total_removed: r.try_get(3)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_round_is_as_large_as_its_limit() {
        assert!(super::PRUNE_IDEMPOTENCY_KEYS.ends_with(&format!("LIMIT {})", super::ROUND)));
    }

    #[test]
    fn a_recorded_round_numbers_its_own_parameters_after_the_deletes() {
        let round = super::recorded_round("DELETE FROM t WHERE a < $1", 1);
        assert!(
            round.contains("SELECT $2::text, $3::timestamptz"),
            "{round}"
        );
    }
}

//! Housekeeping: what each region's tables shed over time, in one place and on one schedule
//! ([`INTERVAL`]), run by that region's elected worker and never by a request-serving
//! function: Region 1's relay runs [`region1`] (published outbox rows past
//! `RELAY_OUTBOX_RETENTION_HOURS`, expired idempotency keys), Region 2's consumer (or, when
//! Region 2 applies through Lambda, its apply function) runs [`region2`] (applied event ids past
//! [`crate::replica::APPLIED_EVENTS_RETENTION_DAYS`]). Every deletion goes in rounds of at most 10,000 rows, so
//! no statement holds many locks.

use std::time::Duration;

use deadpool_postgres::Pool;

/// How often the elected workers prune.
pub const INTERVAL: Duration = Duration::from_secs(60);

/// One round of expired idempotency keys.
const PRUNE_IDEMPOTENCY_KEYS: &str = "DELETE FROM idempotency_keys WHERE (principal, key) IN \
     (SELECT principal, key FROM idempotency_keys WHERE expires_at < now() LIMIT 10000)";
const ROUND: u64 = 10_000;

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
    let outbox_rows = crate::outbox::prune_published(pool, outbox_retention).await?;
    let client = pool.get().await?;
    let mut idempotency_keys = 0;
    loop {
        let n = client.execute(PRUNE_IDEMPOTENCY_KEYS, &[]).await?;
        idempotency_keys += n;
        if n < ROUND {
            break;
        }
    }
    Ok(Pruned {
        outbox_rows,
        idempotency_keys,
        applied_events: 0,
    })
}

/// Region 2: applied event ids past their retention.
pub async fn region2(pool: &Pool) -> anyhow::Result<Pruned> {
    Ok(Pruned {
        applied_events: crate::replica::prune_applied_events(pool).await?,
        ..Pruned::default()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_round_is_as_large_as_its_limit() {
        assert!(super::PRUNE_IDEMPOTENCY_KEYS.ends_with(&format!("LIMIT {})", super::ROUND)));
    }
}

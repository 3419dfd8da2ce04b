//! Region 2's replication lag, as the Read API's replica mode reads it from Region 2's
//! database: the read side of `replication_heartbeats`.
//!
//! Region 2's apply writes those rows, each in the same transaction as the events before its
//! heartbeat ([`crate::replica`]); this module only reads them. How the lag is defined, and
//! why it is the truth: the Read API's `replica` module.

use deadpool_postgres::Pool;

use crate::documents::StoreError;

/// Region 2's database clock minus the oldest partition's newest heartbeat time.
const HEARTBEAT_AGE: &str = "SELECT (extract(epoch FROM clock_timestamp() - min(origin_time)) \
     * 1000)::float8 FROM replication_heartbeats";

/// The age of the oldest partition's newest heartbeat, in milliseconds by Region 2's database
/// clock (0 when Region 1's clock runs ahead); `None` before any heartbeat was applied.
pub async fn heartbeat_age_ms(pool: &Pool) -> Result<Option<i64>, StoreError> {
    let client = pool.get().await?;
    let age: Option<f64> = client.query_one(HEARTBEAT_AGE, &[]).await?.try_get(0)?;
    Ok(age.map(|ms| ms.max(0.0) as i64))
}

/// The oldest partition's newest heartbeat time (Region 1's commit clock): every write Region 1
/// committed before it has been applied in Region 2. `None` before any heartbeat.
pub async fn caught_up_to(pool: &Pool) -> Result<Option<time::OffsetDateTime>, StoreError> {
    let client = pool.get().await?;
    Ok(client
        .query_one("SELECT min(origin_time) FROM replication_heartbeats", &[])
        .await?
        .try_get(0)?)
}

/// What Region 2's consumer last reported in `replication_status`: its backlog (messages
/// waiting in Kafka), its liveness and when it last applied an event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConsumerReport {
    pub backlog: i64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub heartbeat_at: Option<time::OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_applied_at: Option<time::OffsetDateTime>,
}

/// Region 2's `replication_status` row.
pub async fn consumer_report(pool: &Pool) -> Result<ConsumerReport, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT backlog, heartbeat_at, last_applied_at FROM replication_status WHERE id = 1",
            &[],
        )
        .await?;
    Ok(ConsumerReport {
        backlog: row.try_get(0)?,
        heartbeat_at: row.try_get(1)?,
        last_applied_at: row.try_get(2)?,
    })
}

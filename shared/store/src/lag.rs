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

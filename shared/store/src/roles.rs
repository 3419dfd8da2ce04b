//! Region roles (`region_role`, one row per database): which region this database serves,
//! which region is the write region in the current write epoch, and whether this region's
//! writes are fenced.
//!
//! The fence lives in the database, not in the services: a trigger on `outbox` (every write
//! inserts one outbox row in its transaction) refuses the row unless this region is the write
//! region and is writable, and stamps the row with its region and write epoch, which the relay
//! puts on the event.
//! [`fence`] waits for the writes already past that check, so once it returns no write of
//! this region can commit (see the migration `V6__region_role_and_write_fence.sql`).

use deadpool_postgres::Pool;
use serde::Serialize;

use crate::documents::StoreError;

/// SQLSTATE of a write refused because this region is not the write region or is fenced.
pub const NOT_WRITABLE: &str = "TD001";

/// A database's `region_role` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Role {
    /// The region this database serves.
    pub region: String,
    /// The write region of `write_epoch`.
    pub write_region: String,
    /// The write epoch: the number of the write region's term (a failover bumps it).
    pub write_epoch: i64,
    /// Whether this region's writes commit now (false while fenced).
    pub writable: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub changed_at: time::OffsetDateTime,
}

impl Role {
    /// Whether this region accepts writes now.
    pub fn accepts_writes(&self) -> bool {
        self.write_region == self.region && self.writable
    }

    fn from_row(row: &tokio_postgres::Row) -> Result<Self, StoreError> {
        Ok(Self {
            region: row.try_get("region")?,
            write_region: row.try_get("write_region")?,
            write_epoch: row.try_get("write_epoch")?,
            writable: row.try_get("writable")?,
            changed_at: row.try_get("changed_at")?,
        })
    }
}

/// Why a service cannot start on this database.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error(
        "this database serves {recorded}, not {configured} (TANDEM_REGION): is DATABASE_URL the right region's?"
    )]
    OtherRegion {
        recorded: String,
        configured: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Records this database's role at the first start (`region`, with `initial_write_region` as
/// the write region of write epoch 1) and returns the role as stored: an existing row is never changed here, but one
/// that names another region is refused (a service pointed at the other region's database).
pub async fn ensure(
    pool: &Pool,
    region: &str,
    initial_write_region: &str,
) -> Result<Role, RoleError> {
    let client = pool.get().await.map_err(StoreError::from)?;
    client
        .execute(
            "INSERT INTO region_role (region, write_region, write_epoch) VALUES ($1, $2, 1) \
             ON CONFLICT (singleton) DO NOTHING",
            &[&region, &initial_write_region],
        )
        .await
        .map_err(StoreError::from)?;
    let role = current(pool)
        .await?
        .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("region_role has no row")))?;
    if role.region != region {
        return Err(RoleError::OtherRegion {
            recorded: role.region,
            configured: region.to_owned(),
        });
    }
    Ok(role)
}

/// The role as stored (`None` before the first [`ensure`]).
pub async fn current(pool: &Pool) -> Result<Option<Role>, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT region, write_region, write_epoch, writable, changed_at FROM region_role",
            &[],
        )
        .await?;
    row.as_ref().map(Role::from_row).transpose()
}

/// Fences this region's writes; returns once none can commit any more (the writes in flight
/// have ended). Idempotent.
pub async fn fence(pool: &Pool) -> Result<Role, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT region, write_region, write_epoch, writable, changed_at FROM tandem_fence_writes()",
            &[],
        )
        .await?;
    Role::from_row(&row)
}

/// Lifts the fence. Idempotent.
pub async fn unfence(pool: &Pool) -> Result<Role, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT region, write_region, write_epoch, writable, changed_at FROM tandem_unfence_writes()",
            &[],
        )
        .await?;
    Role::from_row(&row)
}

/// SQLSTATE of a promotion refused because the database is already at a later write epoch (or
/// at that epoch with another write region).
pub const STALE_EPOCH: &str = "TD003";

/// Records `write_region` as the write region of write epoch `epoch` in this database, writable
/// (`tandem_promote_write_region`, migration V7): waits for this database's writes in flight.
/// The recorded epoch with the same write region changes nothing; an older epoch, or the same
/// with another write region, is refused ([`STALE_EPOCH`]).
pub async fn promote(pool: &Pool, write_region: &str, epoch: i64) -> Result<Role, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT region, write_region, write_epoch, writable, changed_at \
             FROM tandem_promote_write_region($1, $2)",
            &[&write_region, &epoch],
        )
        .await?;
    Role::from_row(&row)
}

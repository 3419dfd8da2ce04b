//! Leader election for the long-running workers: exactly one relay (and one consumer) is active
//! at a time. The active one holds a session-level PostgreSQL advisory lock on a dedicated
//! connection; if its process dies or its connection breaks, PostgreSQL releases the lock and a
//! standby, retrying every second, takes over.
//!
//! The lock alone does not stop a deposed leader that has not noticed yet (its session was
//! terminated while a batch was in flight on a pooled connection). So each election also
//! increments the role's **epoch** (`leader_epochs`), and every transaction a leader commits
//! first checks, under a share lock, that the epoch is still its own ([`FENCE_CHECK`]): the
//! new leader's increment waits for in-flight transactions of the old one and fences off the
//! ones after it.

use std::time::Duration;

use anyhow::Context;
use tandem_runtime::shutdown::CancellationToken;

use crate::db::{DatabaseSettings, SessionConnection, connect_session};
use crate::documents::StoreError;

/// Advisory lock of the outbox relay (Region 1 database).
pub const RELAY_LOCK: i64 = 0x7461_6e64_656d_0001;
/// Advisory lock of the Region 2 consumer (Region 2 database).
pub const CONSUMER_LOCK: i64 = 0x7461_6e64_656d_0002;

/// The role of an advisory lock in `leader_epochs`.
pub fn role_of(lock: i64) -> &'static str {
    match lock {
        RELAY_LOCK => "relay",
        CONSUMER_LOCK => "consumer",
        _ => "worker",
    }
}

/// One role's current leadership term, as `leader_epochs` records it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Epoch {
    pub role: String,
    pub epoch: i64,
    pub holder: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub elected_at: Option<time::OffsetDateTime>,
}

/// Every role's current epoch in this database (the relay's in Region 1, the consumer's in
/// Region 2), by role.
pub async fn epochs(pool: &deadpool_postgres::Pool) -> Result<Vec<Epoch>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT role, epoch, holder, elected_at FROM leader_epochs ORDER BY role",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Epoch {
                role: r.try_get(0)?,
                epoch: r.try_get(1)?,
                holder: r.try_get(2)?,
                elected_at: r.try_get(3)?,
            })
        })
        .collect()
}

/// Takes the next epoch of a role: run by a newly elected leader on its session.
const NEXT_EPOCH: &str = "INSERT INTO leader_epochs (role, epoch, holder, elected_at) \
     VALUES ($1, 1, $2, clock_timestamp()) \
     ON CONFLICT (role) DO UPDATE SET epoch = leader_epochs.epoch + 1, holder = EXCLUDED.holder, \
       elected_at = EXCLUDED.elected_at \
     RETURNING epoch";

/// The fence every leader transaction starts with: `$1` role, `$2` the leader's epoch. Returns
/// one row when the epoch is still current; the share lock makes a concurrent election wait
/// for this transaction.
pub const FENCE_CHECK: &str =
    "SELECT 1 FROM leader_epochs WHERE role = $1 AND epoch = $2 FOR SHARE";

/// A leader's identity in its transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub role: &'static str,
    pub epoch: i64,
}

/// Checks inside `tx`, first thing, that `fence` is still the current epoch of its role
/// ([`FENCE_CHECK`]): [`StoreError::Fenced`] when a newer leader was elected, and the
/// transaction must not commit.
pub async fn check_fence(
    tx: &deadpool_postgres::Transaction<'_>,
    fence: Fence,
) -> Result<(), StoreError> {
    let stmt = tx.prepare_cached(FENCE_CHECK).await?;
    if tx
        .query_opt(&stmt, &[&fence.role, &fence.epoch])
        .await?
        .is_none()
    {
        return Err(StoreError::Fenced { epoch: fence.epoch });
    }
    Ok(())
}

/// A held leadership: the session holding the lock. Dropping it closes the session, which
/// releases the lock.
pub struct Leadership {
    pub session: SessionConnection,
    /// This term's epoch.
    pub fence: Fence,
}

impl Leadership {
    /// Waits until this process holds `lock`, or returns `None` on shutdown.
    pub async fn acquire(
        settings: &DatabaseSettings,
        lock: i64,
        retry_every: Duration,
        shutdown: &CancellationToken,
        on_standby: impl Fn(),
    ) -> Option<Self> {
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            match try_acquire(settings, lock).await {
                Ok(Some(leadership)) => return Some(leadership),
                Ok(None) => on_standby(),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "leader election failed; retrying")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(retry_every) => {}
                () = shutdown.cancelled() => return None,
            }
        }
    }

    /// Whether the session (and so the lock) is still alive.
    pub async fn is_held(&self) -> bool {
        !self.session.client.is_closed()
            && self.session.client.simple_query("SELECT 1").await.is_ok()
    }
}

async fn try_acquire(settings: &DatabaseSettings, lock: i64) -> anyhow::Result<Option<Leadership>> {
    let session = connect_session(settings).await?;
    let held: bool = session
        .client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&lock])
        .await
        .context("Failed to try the advisory lock")?
        .get(0);
    if !held {
        return Ok(None);
    }
    let role = role_of(lock);
    // Informational (who leads, for operators): the host (the pod's name on EKS) and pid.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let holder = format!("{host}:{}", std::process::id());
    let epoch: i64 = session
        .client
        .query_one(NEXT_EPOCH, &[&role, &holder])
        .await
        .context("Failed to take the next leader epoch")?
        .get(0);
    tracing::info!(role, epoch, "elected");
    Ok(Some(Leadership {
        session,
        fence: Fence { role, epoch },
    }))
}

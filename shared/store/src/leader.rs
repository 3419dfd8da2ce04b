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

/// The most shares the outbox can be split into (`RELAY_SHARES`).
pub const MAX_SHARES: u32 = 64;
/// The advisory locks of the outbox's shares: share `i` of `n` is `RELAY_SHARE_LOCKS + n * 64 + i`.
const RELAY_SHARE_LOCKS: i64 = 0x7461_6e64_656d_1000;
/// The two-key advisory locks (`pg_advisory_lock_shared(int, int)`) of partitioned relays'
/// membership: every relay process of `RELAY_SHARES=n` holds `(RELAY_MEMBERS, n)` shared.
const RELAY_MEMBERS: i32 = 0x7461_6e64;

/// One share of the outbox: the documents whose slot (their key hashed into
/// [`crate::outbox::SLOTS`], `crate::outbox::SLOT_OF`) is `index` modulo `count`. Every event
/// of a document is in the same share, so the one relay holding a share publishes them in
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Share {
    pub index: u32,
    pub count: u32,
}

impl Share {
    /// Its slots.
    pub fn slots(self) -> Vec<i32> {
        (0..crate::outbox::SLOTS)
            .filter(|slot| slot % self.count.max(1) == self.index)
            .map(|slot| slot as i32)
            .collect()
    }

    fn lock(self) -> i64 {
        RELAY_SHARE_LOCKS + i64::from(self.count) * i64::from(MAX_SHARES) + i64::from(self.index)
    }

    /// Its role in `leader_epochs` (and its fence): `relay-share-<index>-of-<count>`.
    pub fn role(self) -> &'static str {
        static ROLES: std::sync::Mutex<Vec<((u32, u32), &'static str)>> =
            std::sync::Mutex::new(Vec::new());
        let mut roles = ROLES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, role)) = roles.iter().find(|(k, _)| *k == (self.index, self.count)) {
            return role;
        }
        // At most MAX_SHARES² names, each made once.
        let role: &'static str =
            Box::leak(format!("relay-share-{}-of-{}", self.index, self.count).into_boxed_str());
        roles.push(((self.index, self.count), role));
        role
    }
}

/// A relay process's membership among the partitioned relays: a session holding
/// `(RELAY_MEMBERS, n)` shared (its count is how many relays share the outbox) and
/// [`RELAY_LOCK`] shared (so a relay running unpartitioned, which holds it exclusively,
/// cannot run beside them). Dropping it ends the session.
pub struct Membership {
    session: SessionConnection,
    count: u32,
}

/// How many relay processes of each share count hold a membership in this database.
const MEMBERS: &str = "SELECT objid::bigint, count(*) FROM pg_locks \
     WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid::bigint = $1 \
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     GROUP BY objid";

impl Membership {
    /// Joins the relays that split the outbox into `count` shares. `None` while a relay runs
    /// unpartitioned or relays of another share count are members (stop them first: two share
    /// counts would give one document two relays).
    pub async fn join(settings: &DatabaseSettings, count: u32) -> anyhow::Result<Option<Self>> {
        let session = connect_session(settings).await?;
        let row = session
            .client
            .query_one(
                "SELECT pg_try_advisory_lock_shared($1), pg_try_advisory_lock_shared($2, $3)",
                &[&RELAY_LOCK, &RELAY_MEMBERS, &(count as i32)],
            )
            .await
            .context("Failed to take the membership locks")?;
        let (unpartitioned_free, joined): (bool, bool) = (row.get(0), row.get(1));
        if !unpartitioned_free || !joined {
            tracing::warn!("a relay runs unpartitioned (RELAY_SHARES=1); waiting for it to stop");
            return Ok(None);
        }
        let membership = Self { session, count };
        let others: Vec<(i64, i64)> = membership
            .members()
            .await?
            .into_iter()
            .filter(|(n, _)| *n != i64::from(count))
            .collect();
        if !others.is_empty() {
            tracing::warn!(
                ?others,
                shares = count,
                "relays splitting the outbox into another number of shares are running; waiting for them to stop"
            );
            return Ok(None);
        }
        Ok(Some(membership))
    }

    /// `(share count, relay processes)` of every membership in this database.
    async fn members(&self) -> anyhow::Result<Vec<(i64, i64)>> {
        let rows = self
            .session
            .client
            .query(MEMBERS, &[&i64::from(RELAY_MEMBERS)])
            .await
            .context("Failed to count the relays")?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Whether the session (and so the membership) is still alive.
    pub async fn is_held(&self) -> bool {
        !self.session.client.is_closed()
            && self.session.client.simple_query("SELECT 1").await.is_ok()
    }

    /// How many relays (this one included) split the outbox into this many shares.
    pub async fn relays(&self) -> anyhow::Result<u32> {
        let count = i64::from(self.count);
        Ok(self
            .members()
            .await?
            .into_iter()
            .find(|(n, _)| *n == count)
            .map_or(1, |(_, relays)| {
                u32::try_from(relays).unwrap_or(u32::MAX).max(1)
            }))
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

impl Leadership {
    /// Takes `share` if no other relay holds it (`None` then): a term of its own, with its own
    /// epoch and fence.
    pub async fn try_share(
        settings: &DatabaseSettings,
        share: Share,
    ) -> anyhow::Result<Option<Self>> {
        try_lock(settings, share.lock(), share.role()).await
    }
}

async fn try_acquire(settings: &DatabaseSettings, lock: i64) -> anyhow::Result<Option<Leadership>> {
    try_lock(settings, lock, role_of(lock)).await
}

async fn try_lock(
    settings: &DatabaseSettings,
    lock: i64,
    role: &'static str,
) -> anyhow::Result<Option<Leadership>> {
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

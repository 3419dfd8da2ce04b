//! Replica mode (Region 2): replication lag reporting and read-your-writes through consistency
//! tokens. A Read API can be a replica when `TANDEM_PRIMARY_READ_URL` is set, and is one while
//! its database's role names another write region ([`Replica::is_active`]).
//!
//! **Lag is the truth.** The relay sends a heartbeat through every partition every second,
//! carrying Region 1's commit clock ("every write committed before this time is published
//! before me"); the consumer records the newest one per partition in the same transaction as
//! the events before it. The lag is the age of the oldest partition's newest heartbeat, so it
//! grows whatever stalls between Region 1's commits and Region 2's applies: the relay down or
//! wedged, the broker down or unreachable, the consumer paused, blocked on a lock or stuck on
//! a record. Its resolution is the heartbeat interval (an idle system reports up to ~1 s).
//!
//! It compares two database clocks (Region 2's now against Region 1's heartbeat time): a skew
//! between them adds to or hides from the lag as much. Amazon Time Sync keeps RDS hosts within
//! about a millisecond; locally both clusters share one clock.
//!
//! The value is refreshed in the background every 250 ms and read without a lock; when the
//! refresh fails (Region 2's PostgreSQL down), the last known heartbeat keeps ageing, so the
//! reported lag grows rather than freezing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tandem_core::consistency::ConsistencyToken;
use tandem_runtime::config::{self, ConfigError};
use tandem_store::documents::{Store, StoreError};
use tandem_store::lag;

/// Why a read with a consistency token is not served here.
#[derive(Debug)]
pub enum TokenWait {
    /// This region did not hold the write within the bound: read it from Region 1, here.
    Lagging { primary_read_url: String },
    /// Region 2's database failed.
    Store(StoreError),
}

impl From<StoreError> for TokenWait {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Replica settings, read from the environment.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// The primary region's Read API base URL (`TANDEM_PRIMARY_READ_URL`), given to clients
    /// when this region cannot yet honour their consistency token.
    pub primary_read_url: String,
    /// How long a read with a consistency token waits for replication
    /// (`TANDEM_CONSISTENCY_WAIT_MS`, default 1000).
    pub consistency_wait: Duration,
    /// `/readyz` fails above this lag (`TANDEM_MAX_REPLICATION_LAG_MS`, default 5000), so
    /// Route 53 steers reads away from a lagging region.
    pub max_lag: Duration,
}

impl ReplicaSettings {
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        let Some(primary_read_url) = config::optional("TANDEM_PRIMARY_READ_URL") else {
            return Ok(None);
        };
        Ok(Some(Self {
            primary_read_url: primary_read_url.trim_end_matches('/').to_owned(),
            consistency_wait: config::millis_or(
                "TANDEM_CONSISTENCY_WAIT_MS",
                Duration::from_secs(1),
            )?,
            max_lag: config::millis_or("TANDEM_MAX_REPLICATION_LAG_MS", Duration::from_secs(5))?,
        }))
    }
}

/// Replica state: settings plus the lag, refreshed in the background.
///
/// Configured in both regions of a deployment that can move its write region, a Read API acts
/// as the replica only while its database's role names another write region
/// (`tandem_store::roles`, re-read every second); in the write region it serves as the
/// primary. A database without a role is a replica whenever configured as one.
#[derive(Clone)]
pub struct Replica {
    pub settings: ReplicaSettings,
    lag: Arc<Lag>,
    active: Arc<AtomicBool>,
}

/// The oldest partition's newest heartbeat, as an instant of this process: lock-free.
struct Lag {
    started: Instant,
    /// Milliseconds since `started` at which Region 1 committed what the oldest partition's
    /// newest heartbeat covers; [`UNKNOWN`] before the first reading.
    origin_ms: AtomicI64,
}

const UNKNOWN: i64 = i64::MIN;
/// How often the lag is re-read from Region 2's database.
const LAG_REFRESH: Duration = Duration::from_millis(250);
/// The role is re-read every this many lag refreshes (each second).
const ROLE_REFRESH_EVERY: u32 = 4;

impl Replica {
    pub fn new(settings: ReplicaSettings) -> Self {
        Self {
            settings,
            lag: Arc::new(Lag {
                started: Instant::now(),
                origin_ms: AtomicI64::new(UNKNOWN),
            }),
            active: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Whether this region is a replica now (another region writes).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Re-reads this region's role; a failed read keeps the last answer.
    pub async fn refresh_role(&self, store: &Store) {
        match tandem_store::roles::current(store.pool()).await {
            Ok(Some(role)) => {
                let replica = role.write_region != role.region;
                if self.active.swap(replica, Ordering::Relaxed) != replica {
                    tracing::info!(
                        write_region = role.write_region,
                        write_epoch = role.write_epoch,
                        "this region's Read API now serves as {}",
                        if replica { "a replica" } else { "the primary" }
                    );
                }
            }
            Ok(None) => self.active.store(true, Ordering::Relaxed),
            Err(e) => tracing::debug!(error = %e, "role refresh failed"),
        }
    }

    fn now_ms(&self) -> i64 {
        i64::try_from(self.lag.started.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// Keeps the lag fresh for as long as the process runs (needs a Tokio runtime).
    pub fn spawn_refresh(&self, store: Store) {
        let replica = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(LAG_REFRESH);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut ticks = 0u32;
            loop {
                every.tick().await;
                ticks = ticks.wrapping_add(1);
                if ticks % ROLE_REFRESH_EVERY == 0 {
                    replica.refresh_role(&store).await;
                }
                match lag::heartbeat_age_ms(store.pool()).await {
                    Ok(Some(age_ms)) => replica
                        .lag
                        .origin_ms
                        .store(replica.now_ms() - age_ms, Ordering::Relaxed),
                    Ok(None) => replica.lag.origin_ms.store(UNKNOWN, Ordering::Relaxed),
                    // The last heartbeat keeps ageing: the lag grows while we cannot look.
                    Err(e) => tracing::debug!(error = %e, "lag refresh failed"),
                }
            }
        });
    }

    /// The replication lag in milliseconds; `None` before any heartbeat was applied.
    pub fn lag_ms(&self) -> Option<u64> {
        let origin = self.lag.origin_ms.load(Ordering::Relaxed);
        (origin != UNKNOWN).then(|| u64::try_from((self.now_ms() - origin).max(0)).unwrap_or(0))
    }

    /// Waits until this region holds the token's write (or newer); refuses with a pointer to
    /// the primary when it does not within the configured bound.
    pub async fn await_token(
        &self,
        store: &Store,
        token: &ConsistencyToken,
        path: &str,
    ) -> Result<(), TokenWait> {
        let deadline = Instant::now() + self.settings.consistency_wait;
        let mut pause = Duration::from_millis(2);
        loop {
            // The version alone: waiting costs one index lookup per poll, whatever the
            // document's size.
            let current = store.version(&token.key).await?;
            if current.is_some_and(|v| v >= token.version) {
                return Ok(());
            }
            if Instant::now() + pause > deadline {
                return Err(TokenWait::Lagging {
                    primary_read_url: format!("{}{path}", self.settings.primary_read_url),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

//! Replica mode (Region 2): replication lag reporting and read-your-writes through consistency
//! tokens. A Read API becomes a replica when `TANDEM_PRIMARY_READ_URL` is set.
//!
//! Lag is estimated from what the consumer records in `replication_status` every second: how
//! long the consumer has been silent beyond its heartbeat interval, plus, while messages are
//! waiting in Kafka, the replication delay of the last applied event. It is an estimate meant
//! for steering (headers, `/readyz`), not an SLA measurement: the consumer's
//! `tandem_replication_lag_seconds` histogram is the exact figure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_shared::config::{self, ConfigError};
use tandem_shared::consistency::ConsistencyToken;
use tandem_shared::problem::ApiError;
use tandem_shared::store::{Store, StoreError};
use time::OffsetDateTime;
use tokio::sync::Mutex;

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

/// The last lag estimate and when it was made.
type LagCache = Arc<Mutex<Option<(Instant, Option<u64>)>>>;

/// Replica state: settings plus a short-lived cache of the lag estimate.
#[derive(Clone)]
pub struct Replica {
    pub settings: ReplicaSettings,
    lag: LagCache,
}

/// How long a lag estimate is reused: the consumer refreshes its status once a second.
const LAG_CACHE: Duration = Duration::from_millis(200);
/// The consumer's heartbeat period plus slack.
const HEARTBEAT_GRACE_MS: i64 = 2000;

impl Replica {
    pub fn new(settings: ReplicaSettings) -> Self {
        Self {
            settings,
            lag: Arc::new(Mutex::new(None)),
        }
    }

    /// The estimated replication lag in milliseconds; `None` when the consumer never reported.
    pub async fn lag_ms(&self, store: &Store) -> Result<Option<u64>, StoreError> {
        let mut cached = self.lag.lock().await;
        if let Some((at, lag)) = *cached {
            if at.elapsed() < LAG_CACHE {
                return Ok(lag);
            }
        }
        let client = store.pool().get().await?;
        let row = client
            .query_one(
                "SELECT heartbeat_at, backlog, last_event_time, last_applied_at FROM replication_status WHERE id = 1",
                &[],
            )
            .await?;
        let heartbeat: Option<OffsetDateTime> = row.try_get(0)?;
        let backlog: i64 = row.try_get(1)?;
        let last_event: Option<OffsetDateTime> = row.try_get(2)?;
        let last_applied: Option<OffsetDateTime> = row.try_get(3)?;
        let now = OffsetDateTime::now_utc();
        let lag = heartbeat.map(|heartbeat| {
            let silent =
                ((now - heartbeat).whole_milliseconds() as i64 - HEARTBEAT_GRACE_MS).max(0);
            let delay = match (backlog > 0, last_event, last_applied) {
                (true, Some(event), Some(applied)) => {
                    ((applied - event).whole_milliseconds() as i64).max(0)
                }
                _ => 0,
            };
            (silent + delay).unsigned_abs()
        });
        *cached = Some((Instant::now(), lag));
        Ok(lag)
    }

    /// Waits until this region holds the token's write (or newer); refuses with a pointer to
    /// the primary when it does not within the configured bound.
    pub async fn await_token(
        &self,
        store: &Store,
        token: &ConsistencyToken,
        path: &str,
    ) -> Result<(), ApiError> {
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
                return Err(ApiError::Lagging {
                    primary_read_url: Some(format!("{}{path}", self.settings.primary_read_url)),
                    retry_after_seconds: 1,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

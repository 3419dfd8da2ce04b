//! The Redis read cache: document bodies by key, version-guarded.
//!
//! Each entry is a hash `{v: version, s: "L" | "D", b: body}`. Every fill goes through one Lua
//! script that writes only when the cached version is older (or absent), so an older version can
//! never replace a newer one: not when two readers race, not when a slow reader races a writer
//! (writers store the version they committed right after commit), and not when Region 2's
//! consumer applies events. Deletes are cached as `"D"` entries carrying their version, which
//! fences off a late fill of the last live version.
//!
//! Redis is an optimisation, never a dependency: every failure is reported to the caller, who
//! falls back to PostgreSQL, and after a failure the cache stays bypassed for a short cool-down
//! so an outage costs one timeout per cool-down rather than one per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use crate::config::{self, ConfigError};
use crate::document::DocumentKey;

/// Cache settings, read from the environment.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// `REDIS_URL` (`redis://` or `rediss://` for TLS, credentials in the URL).
    pub url: String,
    /// Entry lifetime (`CACHE_TTL_SECONDS`, default 300).
    pub ttl: Duration,
    /// Per-command and connect timeout (`REDIS_TIMEOUT_MS`, default 250).
    pub timeout: Duration,
    /// How long to bypass Redis after a failure (`REDIS_COOLDOWN_MS`, default 1000).
    pub cooldown: Duration,
    /// Prefix of every key (`REDIS_KEY_PREFIX`, default `tandem`), so several deployments or
    /// test runs can share one Redis.
    pub key_prefix: String,
    /// A Secrets Manager secret holding the Redis AUTH token as a plain string
    /// (`REDIS_AUTH_SECRET_ID`); read once at start-up by [`CacheSettings::resolve_auth`].
    pub auth_secret_id: Option<String>,
}

impl CacheSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            url: config::required("REDIS_URL", "redis://host:6379 (rediss:// for TLS)")?,
            ttl: Duration::from_secs(config::parsed_or("CACHE_TTL_SECONDS", 300)?),
            timeout: config::millis_or("REDIS_TIMEOUT_MS", Duration::from_millis(250))?,
            cooldown: config::millis_or("REDIS_COOLDOWN_MS", Duration::from_millis(1000))?,
            key_prefix: config::optional("REDIS_KEY_PREFIX").unwrap_or_else(|| "tandem".to_owned()),
            auth_secret_id: config::optional("REDIS_AUTH_SECRET_ID"),
        })
    }

    pub fn from_url(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            ttl: Duration::from_secs(300),
            timeout: Duration::from_millis(250),
            cooldown: Duration::from_millis(1000),
            key_prefix: "tandem".to_owned(),
            auth_secret_id: None,
        }
    }

    /// Puts the AUTH token from `REDIS_AUTH_SECRET_ID` into the URL (ElastiCache with
    /// transit encryption and AUTH). A no-op when no secret is configured.
    pub async fn resolve_auth(&mut self) -> anyhow::Result<()> {
        let Some(secret_id) = &self.auth_secret_id else {
            return Ok(());
        };
        let token = crate::secrets::read_string(secret_id, "the Redis AUTH token").await?;
        let mut url =
            url::Url::parse(&self.url).map_err(|e| anyhow::anyhow!("REDIS_URL is invalid: {e}"))?;
        url.set_password(Some(token.trim()))
            .map_err(|()| anyhow::anyhow!("REDIS_URL cannot carry a password"))?;
        self.url = url.to_string();
        Ok(())
    }
}

/// A cached document state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A live document: its version and the exact response body.
    Live { version: i64, body: Bytes },
    /// A tombstone at this version.
    Deleted { version: i64 },
}

impl Entry {
    pub fn version(&self) -> i64 {
        match self {
            Self::Live { version, .. } | Self::Deleted { version } => *version,
        }
    }
}

/// Why the cache could not answer.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis is in its failure cool-down")]
    CoolingDown,
    #[error("redis error")]
    Redis(#[from] redis::RedisError),
    #[error("malformed cache entry")]
    Malformed,
}

/// Fills any number of entries in one round trip: `KEYS` are the entries' keys, `ARGV[1]` the
/// TTL in milliseconds, then `version, state, body` per key. Returns how many were written.
/// A script touching several keys needs them on one node: Tandem uses a non-clustered Redis
/// (one primary with replicas), as its Terraform provisions.
const FILL_SCRIPT: &str = r"
local written = 0
for i, key in ipairs(KEYS) do
  local at = 2 + (i - 1) * 3
  local current = redis.call('HGET', key, 'v')
  if not current or tonumber(current) < tonumber(ARGV[at]) then
    redis.call('HSET', key, 'v', ARGV[at], 's', ARGV[at + 1], 'b', ARGV[at + 2])
    redis.call('PEXPIRE', key, ARGV[1])
    written = written + 1
  end
end
return written
";

/// A version-guarded document cache over one multiplexed Redis connection.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    settings: CacheSettings,
    fill: redis::Script,
    epoch: Instant,
    /// Milliseconds since `epoch` until which Redis is bypassed.
    down_until_ms: AtomicU64,
}

impl Cache {
    /// Validates the URL; connects lazily, so a Redis that is down at start-up delays nothing.
    pub fn new(settings: CacheSettings) -> anyhow::Result<Self> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| anyhow::anyhow!("REDIS_URL is invalid: {e}"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                connection: OnceCell::new(),
                settings,
                fill: redis::Script::new(FILL_SCRIPT),
                epoch: Instant::now(),
                down_until_ms: AtomicU64::new(0),
            }),
        })
    }

    fn key(&self, key: &DocumentKey) -> String {
        format!(
            "{}:doc:{}/{}",
            self.inner.settings.key_prefix, key.collection, key.id
        )
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        if self.now_ms() < self.inner.down_until_ms.load(Ordering::Relaxed) {
            return Err(CacheError::CoolingDown);
        }
        let settings = &self.inner.settings;
        let result = self
            .inner
            .connection
            .get_or_try_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(settings.timeout)
                    .set_response_timeout(settings.timeout)
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.inner.client.clone(), config)
            })
            .await;
        match result {
            Ok(connection) => Ok(connection.clone()),
            Err(e) => Err(self.failed(e.into())),
        }
    }

    fn failed(&self, error: CacheError) -> CacheError {
        let until =
            self.now_ms() + u64::try_from(self.inner.settings.cooldown.as_millis()).unwrap_or(1000);
        self.inner.down_until_ms.store(until, Ordering::Relaxed);
        error
    }

    /// Looks a document up. `Ok(None)` is a miss.
    pub async fn get(&self, key: &DocumentKey) -> Result<Option<Entry>, CacheError> {
        let mut connection = self.connection().await?;
        let (version, state, body): (Option<i64>, Option<String>, Option<Vec<u8>>) =
            redis::cmd("HMGET")
                .arg(self.key(key))
                .arg("v")
                .arg("s")
                .arg("b")
                .query_async(&mut connection)
                .await
                .map_err(|e| self.failed(e.into()))?;
        match (version, state.as_deref()) {
            (None, _) => Ok(None),
            (Some(version), Some("L")) => Ok(Some(Entry::Live {
                version,
                body: Bytes::from(body.ok_or(CacheError::Malformed)?),
            })),
            (Some(version), Some("D")) => Ok(Some(Entry::Deleted { version })),
            _ => Err(CacheError::Malformed),
        }
    }

    /// Stores an entry unless the cache already holds this or a newer version.
    /// Returns whether the entry was written.
    pub async fn put(&self, key: &DocumentKey, entry: &Entry) -> Result<bool, CacheError> {
        Ok(self.put_many([(key, entry)]).await? == 1)
    }

    /// Stores several entries in one round trip, each unless the cache already holds this or
    /// a newer version of it. Returns how many were written.
    pub async fn put_many<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a DocumentKey, &'a Entry)>,
    ) -> Result<usize, CacheError> {
        let mut invocation = self.inner.fill.prepare_invoke();
        invocation.arg(u64::try_from(self.inner.settings.ttl.as_millis()).unwrap_or(u64::MAX));
        let mut count = 0;
        for (key, entry) in entries {
            let (state, body): (&str, &[u8]) = match entry {
                Entry::Live { body, .. } => ("L", body),
                Entry::Deleted { .. } => ("D", b""),
            };
            invocation
                .key(self.key(key))
                .arg(entry.version())
                .arg(state)
                .arg(body);
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        let mut connection = self.connection().await?;
        let written: usize = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| self.failed(e.into()))?;
        Ok(written)
    }

    /// Checks that Redis answers (for `/readyz` details; Redis is never required).
    pub async fn ping(&self) -> Result<(), CacheError> {
        let mut connection = self.connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map_err(|e| self.failed(e.into()))?;
        Ok(())
    }
}

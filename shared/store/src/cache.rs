//! The Redis read cache: document bodies by key, version-guarded, in generations.
//!
//! Each entry is a hash `{v: version, s: "L" | "D", b: body}`. Every fill goes through one Lua
//! script that writes only when the cached version is older (or absent), so an older version can
//! never replace a newer one: not when two readers race, not when a slow reader races a writer
//! (writers store the version they committed right after commit), and not when Region 2's
//! consumer applies events. Deletes are cached as `"D"` entries carrying their version, which
//! fences off a late fill of the last live version.
//!
//! **No stale entry survives a Redis fault.** Entries live under a generation
//! (`{prefix}:gen`, a counter in Redis; entry keys are `{prefix}:g{n}:doc:{collection}/{id}`).
//! Whenever a process cannot confirm a Redis command (a timeout, a refused connection, an
//! error: an update may or may not have landed), it stops using the cache and, as soon as
//! Redis answers again, its first command increments the generation: every entry written
//! before is then a miss and is refilled from PostgreSQL. Only after its own increment
//! succeeded does the process use the cache again. A reader's fill carries the generation
//! its lookup saw and is refused if the generation moved meanwhile, so a fill of what a reader
//! read before the fault cannot land in the new generation; writers' updates likewise name the
//! generation this process last saw, so an update Redis executes late (after a pause) cannot
//! land in a newer generation either. A writer whose update could not be confirmed bumps the
//! generation itself before it acknowledges, and a writer that starts (or a consumer that
//! begins a leadership term) bumps it once ([`Cache::invalidate_all`]): its predecessor may have
//! been killed between a commit and the update that should have followed. A changed Redis `run_id` (a
//! restart, a failover to a replica that may have missed writes) is treated the same way: each
//! process checks it every second. Old generations expire with their entries' TTL.
//!
//! Redis is an optimisation, never a dependency: every failure is reported to the caller, who
//! falls back to PostgreSQL; while a process distrusts the cache it bypasses it at once, so an
//! outage costs no timeout per request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use tandem_core::document::DocumentKey;

use crate::near::Near;
use tandem_runtime::config::{self, ConfigError};

/// Cache settings, read from the environment.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// `REDIS_URL` (`redis://` or `rediss://` for TLS, credentials in the URL).
    pub url: String,
    /// Entry lifetime (`REDIS_TTL_SECONDS`, default 300).
    pub ttl: Duration,
    /// Per-command and connect timeout (`REDIS_TIMEOUT_MS`, default 250).
    pub timeout: Duration,
    /// How often a process that distrusts the cache tries to bump the generation
    /// (`REDIS_COOLDOWN_MS`, default 100).
    pub cooldown: Duration,
    /// Prefix of every key (`REDIS_KEY_PREFIX`, default `tandem`), so several deployments or
    /// test runs can share one Redis.
    pub key_prefix: String,
    /// A Secrets Manager secret holding the Redis AUTH token as a plain string
    /// (`REDIS_AUTH_SECRET_ID`); read once at start-up by [`CacheSettings::resolve_auth`].
    pub auth_secret_id: Option<String>,
    /// The memory bound of the Read API's near cache (`REDIS_NEAR_CACHE_BYTES`, default
    /// 64 MiB; 0 turns it off). See [`crate::near`].
    pub near_cache_bytes: usize,
}

/// The near cache's default memory bound.
const NEAR_CACHE_BYTES: usize = 64 << 20;

impl CacheSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            url: config::required("REDIS_URL", "redis://host:6379 (rediss:// for TLS)")?,
            ttl: Duration::from_secs(config::parsed_or("REDIS_TTL_SECONDS", 300)?),
            timeout: config::millis_or("REDIS_TIMEOUT_MS", Duration::from_millis(250))?,
            cooldown: config::millis_or("REDIS_COOLDOWN_MS", Duration::from_millis(100))?,
            key_prefix: config::optional("REDIS_KEY_PREFIX").unwrap_or_else(|| "tandem".to_owned()),
            auth_secret_id: config::optional("REDIS_AUTH_SECRET_ID"),
            near_cache_bytes: config::parsed_or("REDIS_NEAR_CACHE_BYTES", NEAR_CACHE_BYTES)?,
        })
    }

    pub fn from_url(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            ttl: Duration::from_secs(300),
            timeout: Duration::from_millis(250),
            cooldown: Duration::from_millis(100),
            key_prefix: "tandem".to_owned(),
            auth_secret_id: None,
            near_cache_bytes: NEAR_CACHE_BYTES,
        }
    }

    /// Puts the AUTH token from `REDIS_AUTH_SECRET_ID` into the URL (ElastiCache with
    /// transit encryption and AUTH). A no-op when no secret is configured.
    pub async fn resolve_auth(&mut self) -> anyhow::Result<()> {
        let Some(secret_id) = &self.auth_secret_id else {
            return Ok(());
        };
        let token = tandem_runtime::secrets::read_string(secret_id, "the Redis AUTH token").await?;
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

/// A lookup's answer: the entry (`None` on a miss) and the generation it was looked up in,
/// which a fill after a miss must present ([`Cache::fill`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub entry: Option<Entry>,
    pub generation: String,
    /// Answered from the near cache (a replica's memory), without asking Redis.
    pub from_memory: bool,
}

/// Why the cache could not answer.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "the cache is not trusted since a Redis fault; bypassed until its generation is bumped"
    )]
    Distrusted,
    #[error("redis error")]
    Redis(#[from] redis::RedisError),
    #[error("malformed cache entry")]
    Malformed,
}

/// Looks one entry up in the current generation: `KEYS[1]` is the generation counter,
/// `ARGV[1]` the key prefix, `ARGV[2]` the entry's suffix. Returns
/// `{generation, version, state, body}`. The entry's key is built inside the script (it
/// depends on the generation), which needs a non-clustered Redis (one primary with replicas),
/// as Tandem's Terraform provisions.
const LOOKUP_SCRIPT: &str = r"
local g = redis.call('GET', KEYS[1]) or '0'
local e = redis.call('HMGET', ARGV[1] .. ':g' .. g .. ':' .. ARGV[2], 'v', 's', 'b')
return {g, e[1], e[2], e[3]}
";

/// Fills any number of entries of the expected generation in one round trip: `KEYS[1]` is
/// the generation counter, `ARGV[1]` the key prefix, `ARGV[2]` the TTL in milliseconds,
/// `ARGV[3]` the generation the caller expects, then `suffix, version, state, body` per
/// entry. Returns `{written, current generation}`, `written` being -1 when the generation is
/// not the expected one: a command delayed past a bump (a Redis pause delivers it late) can
/// never land in the new generation.
const FILL_SCRIPT: &str = r"
local g = redis.call('GET', KEYS[1]) or '0'
if ARGV[3] ~= g then
  return {-1, g}
end
local written = 0
for i = 4, #ARGV, 4 do
  local key = ARGV[1] .. ':g' .. g .. ':' .. ARGV[i]
  local current = redis.call('HGET', key, 'v')
  if not current or tonumber(current) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', key, 'v', ARGV[i + 1], 's', ARGV[i + 2], 'b', ARGV[i + 3])
    redis.call('PEXPIRE', key, ARGV[2])
    written = written + 1
  end
end
return {written, g}
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
    lookup: redis::Script,
    fill: redis::Script,
    /// Whether this process may use the cache: false from a fault until its own generation
    /// bump succeeded.
    trusted: AtomicBool,
    /// The guardian task (generation bumps, `run_id` checks) runs.
    guarding: AtomicBool,
    /// The Redis `run_id` this process last saw: a new one means a restart or a failover.
    run_id: Mutex<Option<String>>,
    /// Generation bumps this process made.
    bumps: AtomicU64,
    /// One bump at a time, and how many were attempted.
    bump_lock: tokio::sync::Mutex<()>,
    bump_attempts: AtomicU64,
    /// The generation this process last saw: writers' updates must name it.
    known_generation: Mutex<Option<String>>,
    /// Wakes the guardian when the cache stops being trusted.
    wake: Arc<tokio::sync::Notify>,
    /// The near cache ([`Cache::lookup_replica`]), unless turned off.
    near: Option<Near>,
}

impl Cache {
    /// Validates the URL; connects lazily, so a Redis that is down at start-up delays nothing.
    pub fn new(settings: CacheSettings) -> anyhow::Result<Self> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| anyhow::anyhow!("REDIS_URL is invalid: {e}"))?;
        let near = (settings.near_cache_bytes > 0)
            .then(|| {
                Near::new(
                    &client,
                    settings.near_cache_bytes,
                    settings.timeout,
                    &settings.key_prefix,
                    format!("{}:gen", settings.key_prefix),
                )
            })
            .transpose()
            .map_err(|e| anyhow::anyhow!("REDIS_URL is invalid: {e}"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                connection: OnceCell::new(),
                settings,
                lookup: redis::Script::new(LOOKUP_SCRIPT),
                fill: redis::Script::new(FILL_SCRIPT),
                trusted: AtomicBool::new(true),
                guarding: AtomicBool::new(false),
                run_id: Mutex::new(None),
                bumps: AtomicU64::new(0),
                bump_lock: tokio::sync::Mutex::new(()),
                bump_attempts: AtomicU64::new(0),
                known_generation: Mutex::new(None),
                wake: Arc::new(tokio::sync::Notify::new()),
                near,
            }),
        })
    }

    fn generation_key(&self) -> String {
        format!("{}:gen", self.inner.settings.key_prefix)
    }

    fn suffix(key: &DocumentKey) -> String {
        format!("doc:{}/{}", key.collection, key.id)
    }

    /// The connection, when the cache may be used.
    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        self.guard();
        if !self.inner.trusted.load(Ordering::Acquire) {
            return Err(CacheError::Distrusted);
        }
        self.raw_connection().await.map_err(|e| self.failed(e))
    }

    async fn raw_connection(&self) -> Result<ConnectionManager, CacheError> {
        let settings = &self.inner.settings;
        let connection = self
            .inner
            .connection
            .get_or_try_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(settings.timeout)
                    .set_response_timeout(settings.timeout)
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.inner.client.clone(), config)
            })
            .await?;
        Ok(connection.clone())
    }

    /// A command could not be confirmed: stop trusting the cache until this process has
    /// bumped the generation.
    fn failed(&self, error: CacheError) -> CacheError {
        if let Some(near) = &self.inner.near {
            near.reset();
        }
        if self.inner.trusted.swap(false, Ordering::AcqRel) {
            tracing::warn!(error = %error, "Redis fault: bypassing the cache until its generation is bumped");
            self.inner.wake.notify_one();
        }
        error
    }

    /// Starts the guardian task once (it needs a Tokio runtime, which every caller has).
    fn guard(&self) {
        if self.inner.guarding.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.inner.guarding.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let wake = self.inner.wake.clone();
        runtime.spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let cache = Cache { inner };
                let pause = if cache.inner.trusted.load(Ordering::Acquire) {
                    cache.check_run_id().await;
                    RUN_ID_CHECK_INTERVAL
                } else {
                    cache.bump_now().await;
                    cache.inner.settings.cooldown
                };
                drop(cache);
                // A fault wakes it at once: the bump must not wait for the next check.
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = wake.notified() => {}
                }
            }
        });
    }

    /// Increments the generation; on success the cache is trusted again.
    async fn bump(&self) {
        let result = async {
            let mut connection = self.raw_connection().await?;
            let generation: i64 = redis::cmd("INCR")
                .arg(self.generation_key())
                .query_async(&mut connection)
                .await?;
            let run_id = run_id(&mut connection).await?;
            Ok::<_, CacheError>((generation, run_id))
        }
        .await;
        match result {
            Ok((generation, run_id)) => {
                if let Ok(mut seen) = self.inner.run_id.lock() {
                    *seen = Some(run_id);
                }
                self.remember_generation(&generation.to_string());
                self.inner.bumps.fetch_add(1, Ordering::Relaxed);
                self.inner.trusted.store(true, Ordering::Release);
                tracing::info!(
                    generation,
                    "cache generation bumped; older entries are misses now"
                );
            }
            Err(e) => {
                tracing::debug!(error = %e, "Redis still unavailable; the cache stays bypassed")
            }
        }
    }

    /// Distrusts the cache when Redis is not the server it was (a restart or a failover).
    async fn check_run_id(&self) {
        let current = async {
            let mut connection = self.raw_connection().await?;
            run_id(&mut connection).await
        }
        .await;
        match current {
            Ok(current) => {
                let Ok(mut seen) = self.inner.run_id.lock() else {
                    return;
                };
                match seen.as_deref() {
                    Some(previous) if previous != current => {
                        drop(seen);
                        self.failed(CacheError::Malformed);
                        tracing::warn!(
                            "Redis run_id changed (restart or failover): bumping the cache generation"
                        );
                    }
                    Some(_) => {}
                    None => *seen = Some(current),
                }
            }
            Err(e) => {
                self.failed(e);
            }
        }
    }

    /// Makes every entry written before this call a miss, by bumping the generation.
    ///
    /// For a writer that starts (a Write API process, the apply function's cold start) or
    /// begins a leadership term (the consumer): it cannot know whether its predecessor was
    /// killed between a commit and the cache update that should have followed, which would
    /// leave the version that commit replaced cached until its TTL. One attempt is made now;
    /// if Redis does not answer, the cache stays bypassed by this process and the bump lands
    /// as soon as Redis answers, as after any fault.
    pub async fn invalidate_all(&self) {
        self.guard();
        self.inner.trusted.store(false, Ordering::Release);
        self.bump_now().await;
        if !self.is_trusted() {
            tracing::warn!(
                "Redis did not answer the start-up generation bump; the cache is bypassed until it does"
            );
            self.inner.wake.notify_one();
        }
    }

    /// The near cache's entries and bytes (`None` when it is off).
    pub fn near_cache_usage(&self) -> Option<(usize, usize)> {
        self.inner.near.as_ref().map(Near::usage)
    }

    /// How many times this process bumped the generation (for tests and metrics).
    pub fn generation_bumps(&self) -> u64 {
        self.inner.bumps.load(Ordering::Relaxed)
    }

    /// Whether the cache is in use (false from a Redis fault until the generation bump).
    pub fn is_trusted(&self) -> bool {
        self.inner.trusted.load(Ordering::Acquire)
    }

    /// Looks a document up in the current generation.
    pub async fn lookup(&self, key: &DocumentKey) -> Result<Lookup, CacheError> {
        let mut connection = self.connection().await?;
        let (generation, version, state, body): (
            String,
            Option<i64>,
            Option<String>,
            Option<Vec<u8>>,
        ) = self
            .inner
            .lookup
            .key(self.generation_key())
            .arg(&self.inner.settings.key_prefix)
            .arg(Self::suffix(key))
            .invoke_async(&mut connection)
            .await
            .map_err(|e| self.failed(e.into()))?;
        self.found(generation, entry_from(version, state.as_deref(), body)?)
    }

    /// What Redis answered: remembered, as a lookup's result.
    fn found(&self, generation: String, entry: Option<Entry>) -> Result<Lookup, CacheError> {
        self.remember_generation(&generation);
        Ok(Lookup {
            entry,
            generation,
            from_memory: false,
        })
    }

    /// The Read API's lookup: as [`Cache::lookup`], through the near cache ([`crate::near`])
    /// when it is on. Answers what Redis would have answered when the call began.
    pub async fn lookup_near(&self, key: &DocumentKey) -> Result<Lookup, CacheError> {
        let Some(near) = self.inner.near.as_ref().filter(|n| n.usable()) else {
            return self.lookup(key).await;
        };
        self.guard();
        if !self.inner.trusted.load(Ordering::Acquire) {
            near.reset();
            return Err(CacheError::Distrusted);
        }
        let suffix = Self::suffix(key);
        if let Some((generation, entry)) =
            near.get(&suffix).await.map_err(|e| self.failed(e.into()))?
        {
            return Ok(Lookup {
                entry: Some(entry),
                generation,
                from_memory: true,
            });
        }
        let (generation, entry) = near
            .fetch(&suffix, self.known_generation())
            .await
            .map_err(|e| self.failed(e.into()))?;
        self.found(generation, entry?)
    }

    fn remember_generation(&self, generation: &str) {
        if let Ok(mut known) = self.inner.known_generation.lock() {
            if known.as_deref() != Some(generation) {
                *known = Some(generation.to_owned());
            }
        }
    }

    fn known_generation(&self) -> Option<String> {
        self.inner
            .known_generation
            .lock()
            .ok()
            .and_then(|g| g.clone())
    }

    /// The current generation, read from Redis.
    async fn current_generation(&self) -> Result<String, CacheError> {
        let mut connection = self.connection().await?;
        let generation: Option<String> = redis::cmd("GET")
            .arg(self.generation_key())
            .query_async(&mut connection)
            .await
            .map_err(|e| self.failed(e.into()))?;
        let generation = generation.unwrap_or_else(|| "0".to_owned());
        self.remember_generation(&generation);
        Ok(generation)
    }

    /// Looks a document up. `Ok(None)` is a miss.
    pub async fn get(&self, key: &DocumentKey) -> Result<Option<Entry>, CacheError> {
        Ok(self.lookup(key).await?.entry)
    }

    /// A reader's fill after a miss: stores the entry unless the cache holds this or a newer
    /// version, or the generation is no longer the one the lookup saw. Returns whether the
    /// entry was written.
    pub async fn fill(
        &self,
        key: &DocumentKey,
        entry: &Entry,
        generation: &str,
    ) -> Result<bool, CacheError> {
        Ok(matches!(
            self.write([(key, entry)], generation).await?,
            Written::Entries(1)
        ))
    }

    /// Stores an entry (a committed version: the writers' write-through) in the current
    /// generation unless the cache already holds this or a newer version. Returns whether the
    /// entry was written.
    pub async fn put(&self, key: &DocumentKey, entry: &Entry) -> Result<bool, CacheError> {
        Ok(self.put_many([(key, entry)]).await? == 1)
    }

    /// Stores several committed entries in one round trip, each unless the cache already
    /// holds this or a newer version of it. Returns how many were written.
    ///
    /// A writer calls this before it acknowledges (or records) the versions it committed. When
    /// the update cannot be confirmed (or the cache is distrusted since an earlier fault), the
    /// generation is bumped right away, before this returns: so once the caller acknowledges,
    /// no reader in the region can be served the version the update replaced, unless Redis was
    /// unreachable from this process at that moment (then the bump follows as soon as it
    /// answers). The error is still returned: the entries were not written.
    pub async fn put_many<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a DocumentKey, &'a Entry)> + Clone,
    ) -> Result<usize, CacheError> {
        let result = async {
            let generation = match self.known_generation() {
                Some(generation) => generation,
                None => self.current_generation().await?,
            };
            match self.write(entries.clone(), &generation).await? {
                Written::Entries(written) => Ok(written),
                // Bumped since this process last looked: write into the new generation.
                Written::GenerationMoved(current) => match self.write(entries, &current).await? {
                    Written::Entries(written) => Ok(written),
                    Written::GenerationMoved(_) => Ok(0),
                },
            }
        }
        .await;
        if result.is_err() {
            self.bump_now().await;
        }
        result
    }

    /// Bumps the generation now unless the cache is trusted again; one attempt at a time (the
    /// writers waiting meanwhile share its outcome).
    async fn bump_now(&self) {
        let seen = self.inner.bump_attempts.load(Ordering::Acquire);
        let _single_flight = self.inner.bump_lock.lock().await;
        // An attempt made while this caller waited is its answer too.
        if self.inner.bump_attempts.load(Ordering::Acquire) != seen
            || self.inner.trusted.load(Ordering::Acquire)
        {
            return;
        }
        self.bump().await;
        self.inner.bump_attempts.fetch_add(1, Ordering::AcqRel);
    }

    async fn write<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a DocumentKey, &'a Entry)>,
        generation: &str,
    ) -> Result<Written, CacheError> {
        let mut invocation = self.inner.fill.prepare_invoke();
        invocation
            .key(self.generation_key())
            .arg(&self.inner.settings.key_prefix)
            .arg(u64::try_from(self.inner.settings.ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(generation);
        let mut count = 0;
        for (key, entry) in entries {
            let (state, body): (&str, &[u8]) = match entry {
                Entry::Live { body, .. } => ("L", body),
                Entry::Deleted { .. } => ("D", b""),
            };
            invocation
                .arg(Self::suffix(key))
                .arg(entry.version())
                .arg(state)
                .arg(body);
            count += 1;
        }
        if count == 0 {
            return Ok(Written::Entries(0));
        }
        let mut connection = self.connection().await?;
        let (written, current): (i64, String) = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| self.failed(e.into()))?;
        self.remember_generation(&current);
        Ok(match usize::try_from(written) {
            Ok(written) => Written::Entries(written),
            Err(_) => Written::GenerationMoved(current),
        })
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

/// The entry a cache hash's fields `v`, `s`, `b` describe (`None`: no entry).
pub(crate) fn entry_from(
    version: Option<i64>,
    state: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<Option<Entry>, CacheError> {
    Ok(match (version, state) {
        (None, _) => None,
        (Some(version), Some("L")) => Some(Entry::Live {
            version,
            body: Bytes::from(body.ok_or(CacheError::Malformed)?),
        }),
        (Some(version), Some("D")) => Some(Entry::Deleted { version }),
        _ => return Err(CacheError::Malformed),
    })
}

/// What an update did: wrote this many entries, or nothing because the generation is not the
/// one it named (the current one given).
enum Written {
    Entries(usize),
    GenerationMoved(String),
}

/// How often a trusting process checks that Redis is still the same server.
const RUN_ID_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The server's `run_id` (`INFO server`).
async fn run_id(connection: &mut ConnectionManager) -> Result<String, CacheError> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(connection)
        .await?;
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned())
        .ok_or(CacheError::Malformed)
}

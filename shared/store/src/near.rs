//! The near cache: a replica's Read API keeps in memory the cache entries it read from Redis,
//! and forgets each one as soon as Redis says it changed (RESP3 client tracking), so a hot
//! document is answered without a Redis round trip.
//!
//! **It answers only what Redis would have answered a moment ago.** Every lookup and every
//! `PING` goes over one tracking connection, and Redis sends the invalidation of a key on that
//! connection before any reply to a command it runs after the change. The invalidations are
//! applied by the connection's reader itself, before it hands over the replies that follow
//! them. So a reply to a command sent at `t` proves that every change Redis made before `t` has
//! been applied here, and memory may answer until `t + staleness` (`REDIS_NEAR_CACHE_STALENESS_MS`,
//! 50 ms by default); after that, the next lookup asks Redis again. While requests keep coming,
//! a `PING` every half of that keeps the proof fresh. Redis paused, slow or cut off: no reply, so
//! memory stops answering within `staleness`, and the lookup fails as any Redis fault does (the
//! read goes to PostgreSQL and the generation is bumped, as without a near cache).
//!
//! - A reply that raced an invalidation is not kept: each is stored only if no invalidation was
//!   applied between the command's sending and its reply.
//! - The generation key is read (so tracked) with every lookup: a bump empties memory.
//! - A lost connection (its invalidations lost with it), `FLUSHALL`, a distrusted cache
//!   (any fault, a new Redis `run_id`) empty memory too; a new connection starts empty.
//! - Consistency tokens are unaffected: an entry older than a token is a miss, wherever it is.
//!
//! Only replicas use it: in the write region, a reader's invalidation may still be unread when
//! a writer's acknowledgement reaches the client, and Region 1 promises read-after-write
//! without a token. In Region 2, reads are eventually consistent and tokens give
//! read-your-writes; the near cache adds at most `staleness` behind Redis, and only while Redis
//! does not answer. Memory is bounded (`REDIS_NEAR_CACHE_BYTES`, 64 MiB by default; 0 turns
//! it off).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, RedisError, Value};

use crate::cache::Entry;

/// A Redis entry's fields as read: version, state, body.
pub(crate) type Fields = (Option<i64>, Option<String>, Option<Vec<u8>>);

pub(crate) struct Near {
    shared: Arc<Shared>,
    client: redis::Client,
    timeout: Duration,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
}

struct Shared {
    max_bytes: usize,
    staleness: Duration,
    prefix: String,
    generation_key: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The tracking connection and its number (pushes of an older one are ignored).
    connection: Option<(u64, MultiplexedConnection)>,
    connections: u64,
    /// The generation the entries belong to, read on the current connection.
    generation: Option<String>,
    /// Entries by their Redis key.
    entries: HashMap<String, Entry>,
    bytes: usize,
    /// Invalidations (and resets) applied: a reply that raced one is not kept.
    invalidations: u64,
    /// Until when memory may answer (see the module's documentation).
    fresh_until: Option<Instant>,
    /// The last lookup: the pings stop when nobody reads.
    last_used: Option<Instant>,
    /// Redis refused client tracking: the near cache is off for this process.
    unsupported: bool,
}

impl State {
    fn reset(&mut self) {
        self.entries.clear();
        self.bytes = 0;
        self.generation = None;
        self.invalidations += 1;
        self.fresh_until = None;
    }

    /// Whether connection `id` is the current one.
    fn is_current(&self, id: u64) -> bool {
        self.connection
            .as_ref()
            .is_some_and(|(current, _)| *current == id)
    }

    fn drop_connection(&mut self, id: u64) {
        if self.is_current(id) {
            self.connection = None;
            self.reset();
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key) {
            self.bytes -= size(key, &entry);
        }
    }

    fn proven(&mut self, sent: Instant, staleness: Duration) {
        let until = sent + staleness;
        self.fresh_until = Some(self.fresh_until.map_or(until, |t| t.max(until)));
    }
}

fn size(key: &str, entry: &Entry) -> usize {
    let body = match entry {
        Entry::Live { body, .. } => body.len(),
        Entry::Deleted { .. } => 0,
    };
    // The key twice (the map's and Redis'), the body, and the map's own overhead.
    key.len() + body + 64
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn entry_key(&self, generation: &str, suffix: &str) -> String {
        format!("{}:g{generation}:{suffix}", self.prefix)
    }

    /// Applies what Redis pushed on connection `id` (called by its reader, in order).
    fn on_push(&self, id: u64, info: PushInfo) {
        let mut state = self.state();
        if !state.is_current(id) {
            return;
        }
        match info.kind {
            PushKind::Disconnection => state.drop_connection(id),
            PushKind::Invalidate => {
                state.invalidations += 1;
                match info.data.first() {
                    Some(Value::Array(keys)) => {
                        for key in keys {
                            let key = match key {
                                Value::BulkString(bytes) => String::from_utf8_lossy(bytes),
                                Value::SimpleString(s) => s.as_str().into(),
                                _ => continue,
                            };
                            if key == self.generation_key {
                                state.reset();
                            } else {
                                state.remove(&key);
                            }
                        }
                    }
                    // A null: everything (FLUSHALL, FLUSHDB).
                    _ => state.reset(),
                }
            }
            _ => {}
        }
    }
}

impl Near {
    pub(crate) fn new(
        client: &redis::Client,
        max_bytes: usize,
        staleness: Duration,
        timeout: Duration,
        prefix: &str,
        generation_key: String,
    ) -> Result<Self, RedisError> {
        let mut info = client.get_connection_info().clone();
        info.redis.protocol = redis::ProtocolVersion::RESP3;
        Ok(Self {
            shared: Arc::new(Shared {
                max_bytes,
                staleness,
                prefix: prefix.to_owned(),
                generation_key,
                state: Mutex::new(State::default()),
            }),
            client: redis::Client::open(info)?,
            timeout,
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// Forgets everything (the cache is distrusted: a fault, a new Redis).
    pub(crate) fn reset(&self) {
        self.shared.state().reset();
    }

    /// How many entries memory holds, and their bytes as counted against the bound.
    pub(crate) fn usage(&self) -> (usize, usize) {
        let state = self.shared.state();
        (state.entries.len(), state.bytes)
    }

    /// Whether this process can use a near cache (false once Redis refused client tracking).
    pub(crate) fn usable(&self) -> bool {
        !self.shared.state().unsupported
    }

    /// The reader answered `version` of `suffix` from elsewhere (PostgreSQL): memory forgets
    /// any older version, and a read still in flight keeps nothing (it may carry the older
    /// version Redis held before this reader's fill). So this process never answers older
    /// than it answered, even before the fill's invalidation reaches it.
    pub(crate) fn answered(&self, suffix: &str, version: i64) {
        let mut state = self.shared.state();
        state.invalidations += 1;
        let Some(generation) = state.generation.clone() else {
            return;
        };
        let key = self.shared.entry_key(&generation, suffix);
        if state
            .entries
            .get(&key)
            .is_some_and(|e| e.version() < version)
        {
            state.remove(&key);
        }
    }

    /// The entry of `suffix` from memory, with its generation, while memory may answer.
    pub(crate) fn get(&self, suffix: &str) -> Option<(String, Entry)> {
        let mut state = self.shared.state();
        let now = Instant::now();
        state.last_used = Some(now);
        if state.fresh_until.is_none_or(|until| until <= now) {
            return None;
        }
        let generation = state.generation.clone()?;
        let entry = state
            .entries
            .get(&self.shared.entry_key(&generation, suffix))?;
        Some((generation, entry.clone()))
    }

    /// Reads the generation and the entry of `suffix` from Redis on the tracking connection
    /// (`guess` is the generation to look in when memory knows none), keeping the entry unless
    /// an invalidation raced the read. Returns the generation and the fields read.
    pub(crate) async fn fetch(
        &self,
        suffix: &str,
        guess: Option<String>,
    ) -> Result<(String, Fields), RedisError> {
        let (id, mut connection) = self.connection().await?;
        let (seen, known) = {
            let state = self.shared.state();
            (state.invalidations, state.generation.clone())
        };
        let mut generation = known.or(guess).unwrap_or_else(|| "0".to_owned());
        let sent = Instant::now();
        let mut answer = None;
        // A generation moved since it was last read: once more in the current one.
        for _ in 0..2 {
            let result: Result<(Option<String>, Fields), RedisError> = redis::pipe()
                .cmd("GET")
                .arg(&self.shared.generation_key)
                .cmd("HMGET")
                .arg(self.shared.entry_key(&generation, suffix))
                .arg("v")
                .arg("s")
                .arg("b")
                .query_async(&mut connection)
                .await;
            let (current, fields) = match result {
                Ok(read) => read,
                Err(e) => {
                    self.shared.state().drop_connection(id);
                    return Err(e);
                }
            };
            let current = current.unwrap_or_else(|| "0".to_owned());
            if current == generation {
                answer = Some(fields);
                break;
            }
            generation = current;
        }
        let mut state = self.shared.state();
        if !state.is_current(id) {
            // The connection was lost meanwhile: the answer stands, memory keeps nothing.
            return Ok((generation, answer.unwrap_or((None, None, None))));
        }
        state.proven(sent, self.shared.staleness);
        let Some(fields) = answer else {
            return Ok((generation, (None, None, None)));
        };
        if state.invalidations == seen {
            if state.generation.as_deref() != Some(generation.as_str()) {
                state.entries.clear();
                state.bytes = 0;
                state.generation = Some(generation.clone());
            }
            if let Some(entry) = decode(&fields) {
                self.keep(
                    &mut state,
                    self.shared.entry_key(&generation, suffix),
                    entry,
                );
            }
        }
        Ok((generation, fields))
    }

    fn keep(&self, state: &mut State, key: String, entry: Entry) {
        let bytes = size(&key, &entry);
        if bytes > self.shared.max_bytes {
            return;
        }
        state.remove(&key);
        while state.bytes + bytes > self.shared.max_bytes {
            let Some(victim) = state.entries.keys().next().cloned() else {
                break;
            };
            state.remove(&victim);
        }
        state.bytes += bytes;
        state.entries.insert(key, entry);
    }

    /// The tracking connection, connecting (and enabling tracking) when there is none.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection), RedisError> {
        if let Some(current) = self.shared.state().connection.clone() {
            return Ok(current);
        }
        let _one = self.connecting.lock().await;
        if let Some(current) = self.shared.state().connection.clone() {
            return Ok(current);
        }
        let id = {
            let mut state = self.shared.state();
            state.connections += 1;
            state.connections
        };
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_push_sender(move |info: PushInfo| {
                if let Some(shared) = weak.upgrade() {
                    shared.on_push(id, info);
                }
                Ok::<(), std::convert::Infallible>(())
            });
        let mut connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let tracking: Result<(), RedisError> = redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .query_async(&mut connection)
            .await;
        if let Err(e) = tracking {
            if e.kind() == redis::ErrorKind::ResponseError {
                tracing::warn!(error = %e, "Redis refused client tracking: the near cache is off");
                self.shared.state().unsupported = true;
            }
            return Err(e);
        }
        {
            let mut state = self.shared.state();
            state.reset();
            state.connection = Some((id, connection.clone()));
        }
        tokio::spawn(keep_proving(
            Arc::downgrade(&self.shared),
            id,
            connection.clone(),
        ));
        Ok((id, connection))
    }
}

/// Pings connection `id` every half staleness while it is current and lookups come, so a
/// busy reader's memory stays provably fresh; a failed ping drops the connection.
async fn keep_proving(shared: Weak<Shared>, id: u64, mut connection: MultiplexedConnection) {
    loop {
        let Some(pause) = shared.upgrade().map(|s| s.staleness / 2) else {
            return;
        };
        tokio::time::sleep(pause).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        {
            let state = shared.state();
            if !state.is_current(id) {
                return;
            }
            if state
                .last_used
                .is_none_or(|used| used.elapsed() > Duration::from_secs(1))
            {
                continue;
            }
        }
        let sent = Instant::now();
        let pong: Result<String, RedisError> =
            redis::cmd("PING").query_async(&mut connection).await;
        let mut state = shared.state();
        match pong {
            Ok(_) => {
                if state.is_current(id) {
                    state.proven(sent, shared.staleness);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "near cache ping failed; its memory is dropped");
                state.drop_connection(id);
                return;
            }
        }
    }
}

/// The entry the fields describe (`None` when absent or malformed).
pub(crate) fn decode(fields: &Fields) -> Option<Entry> {
    match fields {
        (Some(version), Some(state), Some(body)) if state == "L" => Some(Entry::Live {
            version: *version,
            body: bytes::Bytes::from(body.clone()),
        }),
        (Some(version), Some(state), _) if state == "D" => {
            Some(Entry::Deleted { version: *version })
        }
        _ => None,
    }
}

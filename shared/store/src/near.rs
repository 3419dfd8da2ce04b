//! The near cache: the Read API keeps in memory the cache entries it read from Redis, and
//! forgets each one as soon as Redis says it changed (RESP3 client tracking), so a hot
//! document is answered without asking Redis for it.
//!
//! **It answers exactly what Redis would have answered when the request arrived.** Lookups and
//! `PING`s share one tracking connection, and Redis queues the invalidation of a changed key on
//! that connection before the reply to any command it runs after the change. The connection's
//! reader applies each invalidation before it hands over the replies that follow it. So a
//! request served from memory first waits for the reply to a `PING` sent after it arrived (a
//! read barrier): every change Redis made before the request arrived, including the write-through
//! of a write acknowledged to the client, has then been applied here. One `PING` at a time
//! serves every request that arrived before it was sent, so under load a hit costs a share of a
//! `PING` instead of a lookup script each. Redis paused, slow or cut off: the barrier times out
//! (`REDIS_TIMEOUT_MS`) and the lookup fails as any Redis fault does (the read goes to
//! PostgreSQL and the generation is bumped), so memory never answers on its own.
//!
//! - A reply that raced an invalidation is not kept: an entry is stored only if no
//!   invalidation was applied between the command's sending and its reply.
//! - The generation key is read (so tracked) with every lookup: a bump empties memory.
//! - A lost connection (its invalidations lost with it), `FLUSHALL`, a distrusted cache (any
//!   fault, a new Redis `run_id`) empty memory; a new connection starts empty.
//! - Consistency tokens are unaffected: an entry older than a token is a miss, wherever it is.
//!
//! Memory is bounded (`REDIS_NEAR_CACHE_BYTES`, 64 MiB by default; 0 turns it off).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, RedisError, Value};
use tokio::sync::watch;

use crate::cache::{CacheError, Entry, entry_from};

/// A Redis entry's fields as read: version, state, body.
type Fields = (Option<i64>, Option<String>, Option<Vec<u8>>);

pub(crate) struct Near {
    shared: Arc<Shared>,
    client: redis::Client,
    timeout: Duration,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
}

struct Shared {
    max_bytes: usize,
    prefix: String,
    generation_key: String,
    state: Mutex<State>,
    /// The number of the last barrier `PING` sent.
    pings_sent: AtomicU64,
    /// The connection and number of the last barrier `PING` answered.
    pings_answered: watch::Sender<(u64, u64)>,
    /// A task sends barrier `PING`s while requests wait for one.
    pinging: AtomicBool,
    waiting: AtomicUsize,
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
    /// Redis refused client tracking: the near cache is off for this process.
    unsupported: bool,
}

impl State {
    fn reset(&mut self) {
        self.entries.clear();
        self.bytes = 0;
        self.generation = None;
        self.invalidations += 1;
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
}

fn size(key: &str, entry: &Entry) -> usize {
    let body = match entry {
        Entry::Live { body, .. } => body.len(),
        Entry::Deleted { .. } => 0,
    };
    // The key, the body, and the map's own overhead.
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

/// Why memory could not answer: Redis did not answer the read barrier in time.
fn barrier_timeout() -> RedisError {
    RedisError::from((
        redis::ErrorKind::IoError,
        "Redis did not answer the near cache's read barrier in time",
    ))
}

impl Near {
    pub(crate) fn new(
        client: &redis::Client,
        max_bytes: usize,
        timeout: Duration,
        prefix: &str,
        generation_key: String,
    ) -> Result<Self, RedisError> {
        let mut info = client.get_connection_info().clone();
        info.redis.protocol = redis::ProtocolVersion::RESP3;
        Ok(Self {
            shared: Arc::new(Shared {
                max_bytes,
                prefix: prefix.to_owned(),
                generation_key,
                state: Mutex::new(State::default()),
                pings_sent: AtomicU64::new(0),
                pings_answered: watch::Sender::new((0, 0)),
                pinging: AtomicBool::new(false),
                waiting: AtomicUsize::new(0),
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

    /// The entry of `suffix` from memory, with its generation, once a read barrier proved
    /// memory holds what Redis holds now. `Ok(None)`: not in memory (ask Redis).
    pub(crate) async fn get(&self, suffix: &str) -> Result<Option<(String, Entry)>, RedisError> {
        let (id, generation, key) = {
            let state = self.shared.state();
            let (Some((id, _)), Some(generation)) = (&state.connection, &state.generation) else {
                return Ok(None);
            };
            let key = self.shared.entry_key(generation, suffix);
            if !state.entries.contains_key(&key) {
                return Ok(None);
            }
            (*id, generation.clone(), key)
        };
        self.barrier(id).await?;
        // Whatever the barrier's invalidations left (a bump empties memory and forgets the
        // generation, a new connection starts empty).
        let state = self.shared.state();
        if !state.is_current(id) || state.generation.as_ref() != Some(&generation) {
            return Ok(None);
        }
        Ok(state
            .entries
            .get(&key)
            .cloned()
            .map(|entry| (generation, entry)))
    }

    /// Waits for the reply to a `PING` sent on connection `id` after this call began.
    async fn barrier(&self, id: u64) -> Result<(), RedisError> {
        let shared = &self.shared;
        // Counted while waiting, also when the request is dropped mid-wait (a client gone, a
        // request timeout): the pinger stops once nobody waits.
        let _waiting = Waiting::new(&shared.waiting);
        let target = shared.pings_sent.load(Ordering::SeqCst) + 1;
        let mut answered = shared.pings_answered.subscribe();
        if !shared.pinging.swap(true, Ordering::SeqCst) {
            tokio::spawn(ping_while_waited(shared.clone()));
        }
        let waited = tokio::time::timeout(
            self.timeout,
            answered.wait_for(|&(on, number)| on == id && number >= target),
        )
        .await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => Err(barrier_timeout()),
        }
    }

    /// Reads the generation and the entry of `suffix` from Redis on the tracking connection
    /// (`guess` is the generation to look in when memory knows none), keeping the entry unless
    /// an invalidation raced the read. Returns the generation and the entry (an error when
    /// Redis holds a malformed one).
    pub(crate) async fn fetch(
        &self,
        suffix: &str,
        guess: Option<String>,
    ) -> Result<(String, Result<Option<Entry>, CacheError>), RedisError> {
        let (id, mut connection) = self.connection().await?;
        let (seen, known) = {
            let state = self.shared.state();
            (state.invalidations, state.generation.clone())
        };
        let mut generation = known.or(guess).unwrap_or_else(|| "0".to_owned());
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
        let Some((version, state, body)) = answer else {
            return Ok((generation, Ok(None)));
        };
        let entry = entry_from(version, state.as_deref(), body);
        let mut state = self.shared.state();
        if state.is_current(id) && state.invalidations == seen {
            if state.generation.as_deref() != Some(generation.as_str()) {
                state.entries.clear();
                state.bytes = 0;
                state.generation = Some(generation.clone());
            }
            if let Ok(Some(entry)) = &entry {
                self.keep(
                    &mut state,
                    self.shared.entry_key(&generation, suffix),
                    entry.clone(),
                );
            }
        }
        Ok((generation, entry))
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
        let weak = Arc::downgrade(&self.shared);
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
        let mut state = self.shared.state();
        state.reset();
        state.connection = Some((id, connection.clone()));
        Ok((id, connection))
    }
}

/// One request waiting for a barrier, for as long as it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::SeqCst);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sends barrier `PING`s on the current tracking connection, one at a time, while requests
/// wait for one; a failed one drops the connection (its waiters time out).
async fn ping_while_waited(shared: Arc<Shared>) {
    loop {
        let Some((id, mut connection)) = shared.state().connection.clone() else {
            shared.pinging.store(false, Ordering::SeqCst);
            return;
        };
        let number = shared.pings_sent.fetch_add(1, Ordering::SeqCst) + 1;
        let pong: Result<String, RedisError> =
            redis::cmd("PING").query_async(&mut connection).await;
        if let Err(e) = pong {
            tracing::debug!(error = %e, "near cache barrier failed; its memory is dropped");
            shared.state().drop_connection(id);
            shared.pinging.store(false, Ordering::SeqCst);
            return;
        }
        shared
            .pings_answered
            .send_modify(|answered| *answered = (id, number));
        if shared.waiting.load(Ordering::SeqCst) == 0 {
            shared.pinging.store(false, Ordering::SeqCst);
            // A request that began waiting meanwhile may have seen the flag still set.
            if shared.waiting.load(Ordering::SeqCst) == 0
                || shared.pinging.swap(true, Ordering::SeqCst)
            {
                return;
            }
        }
    }
}

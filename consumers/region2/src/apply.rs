//! Applying one Kafka message to Region 2: the transaction, the cache update, the dead-letter
//! path and the retry policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Pool, Transaction};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use tandem_shared::cache::{Cache, Entry};
use tandem_shared::event::{ChangeEvent, DocumentState};
use tandem_shared::store::{StoreError, Stored};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_postgres::types::Json;

use crate::metrics::ConsumerMetrics;

/// How long applied event ids are remembered: longer than the relay's default replay window
/// (`OUTBOX_RETENTION_HOURS`, 72 h), so a replay is recognised as duplicates.
pub const APPLIED_EVENTS_RETENTION_DAYS: i32 = 7;

/// A message as received, detached from the Kafka client.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: serde_json::Value,
}

/// What applying a message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Region 2 now holds this version.
    Applied,
    /// Region 2 already held this or a newer version.
    Stale,
    /// This event id was applied before (a redelivery).
    Duplicate,
    /// Poison: stored in `dead_letters` with the reason.
    DeadLettered(String),
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Stale => "stale",
            Self::Duplicate => "duplicate",
            Self::DeadLettered(_) => "dead_lettered",
        }
    }
}

const RECORD_EVENT: &str = "INSERT INTO applied_events \
     (event_id, collection, document_id, version, outcome, event_time) \
     VALUES ($1, $2, $3, $4, 'applied', $5) ON CONFLICT (event_id) DO NOTHING RETURNING 1";
const MARK_STALE: &str = "UPDATE applied_events SET outcome = 'stale' WHERE event_id = $1";
const UPSERT_DOCUMENT: &str = "INSERT INTO documents \
     (collection, id, version, data, deleted, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (collection, id) DO UPDATE SET \
       version = EXCLUDED.version, data = EXCLUDED.data, deleted = EXCLUDED.deleted, \
       created_at = CASE WHEN EXCLUDED.deleted THEN documents.created_at ELSE EXCLUDED.created_at END, \
       updated_at = EXCLUDED.updated_at \
     WHERE documents.version < EXCLUDED.version \
     RETURNING 1";
const STORE_OFFSET: &str = "INSERT INTO consumer_offsets (topic, partition, next_offset, last_event_id, updated_at) \
     VALUES ($1, $2, $3, $4, clock_timestamp()) \
     ON CONFLICT (topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, \
       last_event_id = EXCLUDED.last_event_id, updated_at = EXCLUDED.updated_at";
const RECORD_PROGRESS: &str = "UPDATE replication_status SET \
     last_event_time = GREATEST(last_event_time, $1), last_applied_at = clock_timestamp() WHERE id = 1";
const DEAD_LETTER: &str = "INSERT INTO dead_letters (topic, partition, \"offset\", message_key, payload, headers, reason) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (topic, partition, \"offset\") DO NOTHING";

/// Applies events; cheap to clone.
#[derive(Clone)]
pub struct Applier {
    pub pool: Pool,
    pub cache: Cache,
    pub metrics: Arc<ConsumerMetrics>,
}

impl Applier {
    pub fn new(pool: Pool, cache: Cache, metrics: Arc<ConsumerMetrics>) -> Self {
        Self {
            pool,
            cache,
            metrics,
        }
    }

    /// The next offset to read per partition, as committed with the effects.
    pub async fn stored_offsets(&self, topic: &str) -> anyhow::Result<HashMap<i32, i64>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1",
                &[&topic],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// `(partition, next_offset, last_event_id)` per partition.
    pub async fn stored_positions(
        &self,
        topic: &str,
    ) -> anyhow::Result<Vec<(i32, i64, Option<uuid::Uuid>)>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT partition, next_offset, last_event_id FROM consumer_offsets WHERE topic = $1 AND next_offset > 0",
                &[&topic],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Applies one message; retries while the database is unavailable (nothing is skipped),
    /// and dead-letters a message that keeps failing for a non-transient reason.
    pub async fn apply_with_retry(
        &self,
        incoming: &Incoming,
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(50);
        let mut internal_failures = 0;
        loop {
            let attempt = self.apply(incoming).await;
            let error = match attempt {
                Ok(outcome) => {
                    self.metrics.record(outcome.label());
                    if let Outcome::DeadLettered(reason) = &outcome {
                        tracing::warn!(topic = %incoming.topic, partition = incoming.partition, offset = incoming.offset, reason, "poison event dead-lettered");
                    }
                    return Ok(());
                }
                Err(error) => error,
            };
            match &error {
                StoreError::Internal(cause) => {
                    internal_failures += 1;
                    tracing::error!(
                        error = format!("{cause:#}"),
                        offset = incoming.offset,
                        attempt = internal_failures,
                        "failed to apply an event"
                    );
                    if internal_failures >= 5 {
                        let reason = format!("could not be applied: {cause:#}");
                        if self.dead_letter(incoming, &reason).await.is_ok() {
                            self.metrics.record("dead_lettered");
                            return Ok(());
                        }
                    }
                }
                StoreError::Unavailable(cause) => {
                    tracing::warn!(
                        error = format!("{cause:#}"),
                        "database unavailable; retrying the event"
                    );
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => anyhow::bail!("shutting down before the event was applied"),
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// One transaction: the effect, the event id, the Kafka position, the progress.
    pub async fn apply(&self, incoming: &Incoming) -> Result<Outcome, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let (outcome, event) = match ChangeEvent::decode(&incoming.payload) {
            Ok(event) => {
                let outcome = self.apply_event(&tx, &event).await?;
                (outcome, Some(event))
            }
            Err(reason) => {
                let reason = reason.to_string();
                insert_dead_letter(&tx, incoming, &reason).await?;
                (Outcome::DeadLettered(reason), None)
            }
        };
        let stmt = tx.prepare_cached(STORE_OFFSET).await?;
        tx.execute(
            &stmt,
            &[
                &incoming.topic,
                &incoming.partition,
                &(incoming.offset + 1),
                &event.as_ref().map(|e| e.id),
            ],
        )
        .await?;
        if let Some(event) = &event {
            let stmt = tx.prepare_cached(RECORD_PROGRESS).await?;
            tx.execute(&stmt, &[&event.time]).await?;
        }
        tx.commit().await?;
        if let (Outcome::Applied, Some(event)) = (&outcome, &event) {
            let lag = (OffsetDateTime::now_utc() - event.time)
                .as_seconds_f64()
                .max(0.0);
            self.metrics.observe_lag(lag);
        }
        Ok(outcome)
    }

    async fn apply_event(
        &self,
        tx: &Transaction<'_>,
        event: &ChangeEvent,
    ) -> Result<Outcome, StoreError> {
        let state = &event.data;
        let stmt = tx.prepare_cached(RECORD_EVENT).await?;
        let fresh = tx
            .query_opt(
                &stmt,
                &[
                    &event.id,
                    &state.collection.as_str(),
                    &state.id.as_str(),
                    &state.version,
                    &event.time,
                ],
            )
            .await?;
        if fresh.is_none() {
            return Ok(Outcome::Duplicate);
        }
        if !upsert_document(tx, state).await? {
            let stmt = tx.prepare_cached(MARK_STALE).await?;
            tx.execute(&stmt, &[&event.id]).await?;
            return Ok(Outcome::Stale);
        }
        // The database accepted this version; the cache may now hold it (guarded), even a few
        // milliseconds before the commit: the write is already committed in Region 1.
        let entry = match state.to_stored() {
            Stored::Live(document) => Entry::Live {
                version: document.version,
                body: document.to_body(),
            },
            Stored::Deleted { version } => Entry::Deleted { version },
        };
        if let Err(e) = self.cache.put(&state.key(), &entry).await {
            self.metrics.record("cache_update_failed");
            tracing::warn!(error = %e, "cache update failed; the entry expires with its TTL");
        }
        Ok(Outcome::Applied)
    }

    async fn dead_letter(&self, incoming: &Incoming, reason: &str) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        insert_dead_letter(&tx, incoming, reason).await?;
        let stmt = tx.prepare_cached(STORE_OFFSET).await?;
        tx.execute(
            &stmt,
            &[
                &incoming.topic,
                &incoming.partition,
                &(incoming.offset + 1),
                &None::<uuid::Uuid>,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Liveness and backlog, for the Read API's lag report.
    pub async fn record_heartbeat(&self, backlog: i64) {
        self.metrics.backlog.set(backlog);
        let Ok(client) = self.pool.get().await else {
            return;
        };
        let _ = client
            .execute(
                "UPDATE replication_status SET heartbeat_at = clock_timestamp(), backlog = $1 WHERE id = 1",
                &[&backlog],
            )
            .await;
    }

    /// Forgets applied event ids older than [`APPLIED_EVENTS_RETENTION_DAYS`], in chunks, so
    /// the table does not grow without bound. Past that window a redelivered event is still
    /// harmless: the version guard records it as `stale`.
    pub async fn prune_applied_events(&self) -> Result<u64, StoreError> {
        let client = self.pool.get().await?;
        let mut total = 0;
        loop {
            let n = client
                .execute(
                    "DELETE FROM applied_events WHERE event_id IN (SELECT event_id FROM applied_events \
                     WHERE applied_at < now() - make_interval(days => $1) LIMIT 10000)",
                    &[&APPLIED_EVENTS_RETENTION_DAYS],
                )
                .await?;
            total += n;
            if n < 10_000 {
                return Ok(total);
            }
        }
    }

    /// Re-applies dead letters (one, or all not yet redriven). Events that still fail stay
    /// dead-lettered with the new reason. Returns `(id, result)` per letter.
    pub async fn redrive(&self, only: Option<i64>) -> anyhow::Result<Vec<(i64, String)>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id, payload FROM dead_letters WHERE redriven_at IS NULL AND ($1::bigint IS NULL OR id = $1) ORDER BY id",
                &[&only],
            )
            .await?;
        let mut results = Vec::new();
        for row in rows {
            let id: i64 = row.get(0);
            let payload: Option<Vec<u8>> = row.get(1);
            let result = match ChangeEvent::decode(payload.as_deref().unwrap_or_default()) {
                Err(reason) => format!("still poison: {reason}"),
                Ok(event) => {
                    let mut client = self.pool.get().await?;
                    let tx = client.transaction().await?;
                    let outcome = self.apply_event(&tx, &event).await?;
                    tx.commit().await?;
                    outcome.label().to_owned()
                }
            };
            client
                .execute(
                    "UPDATE dead_letters SET redriven_at = CASE WHEN $2 LIKE 'still poison%' THEN NULL ELSE clock_timestamp() END, redrive_result = $2 WHERE id = $1",
                    &[&id, &result],
                )
                .await?;
            results.push((id, result));
        }
        Ok(results)
    }
}

async fn upsert_document(tx: &Transaction<'_>, state: &DocumentState) -> Result<bool, StoreError> {
    let stmt = tx.prepare_cached(UPSERT_DOCUMENT).await?;
    let created_at = state.created_at.unwrap_or(state.updated_at);
    let row = tx
        .query_opt(
            &stmt,
            &[
                &state.collection.as_str(),
                &state.id.as_str(),
                &state.version,
                &state.data.as_ref().map(Json),
                &state.deleted,
                &created_at,
                &state.updated_at,
            ],
        )
        .await?;
    Ok(row.is_some())
}

async fn insert_dead_letter(
    tx: &Transaction<'_>,
    incoming: &Incoming,
    reason: &str,
) -> Result<(), StoreError> {
    let stmt = tx.prepare_cached(DEAD_LETTER).await?;
    tx.execute(
        &stmt,
        &[
            &incoming.topic,
            &incoming.partition,
            &incoming.offset,
            &incoming.key,
            &incoming.payload,
            &incoming.headers,
            &reason,
        ],
    )
    .await?;
    Ok(())
}

/// One header's value as text.
pub fn header<M: Message>(message: &M, name: &str) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Message headers as a JSON object (values as UTF-8 text, lossy), for the dead-letter store.
pub fn headers_json(message: &BorrowedMessage<'_>) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned());
            map.insert(
                header.key.to_owned(),
                value.map_or(serde_json::Value::Null, serde_json::Value::from),
            );
        }
    }
    serde_json::Value::Object(map)
}

//! Region 2's tables, as its apply writes them (the consumer pod and the Lambda function alike):
//! the replicated `documents` (version-guarded upserts), `applied_events` (the ids that make
//! redelivery harmless), `consumer_offsets` (positions with the proof of the record before
//! them), `replication_heartbeats` and `replication_status` (what the lag is computed from),
//! and `dead_letters`. Everything a batch writes goes through [`ApplyTx`], inside the batch's
//! one transaction.
//!
//! The Region 1 side of `documents` (and the outbox rows its writes enqueue) is in
//! [`crate::documents`].

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use deadpool_postgres::{Pool, Transaction};
use tandem_core::event::{DocumentState, Repair};
use time::OffsetDateTime;
use tokio_postgres::types::{Json, ToSql};

use crate::documents::StoreError;
use crate::leader::Fence;

/// How long applied event ids are remembered: longer than the relay's default replay window
/// (`RELAY_OUTBOX_RETENTION_HOURS`, 72 h), so a replay is recognised as duplicates.
pub const APPLIED_EVENTS_RETENTION_DAYS: i32 = 7;

const RECORD_EVENTS: &str = "INSERT INTO applied_events \
     (event_id, collection, document_id, version, outcome, event_time) \
     SELECT e, c, d, v, 'applied', t \
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::timestamptz[]) AS u (e, c, d, v, t) \
     ON CONFLICT (event_id) DO NOTHING RETURNING event_id";
/// The stored versions of the batch's documents, read before the batch writes them.
const VERSIONS_BEFORE: &str = "SELECT d.collection, d.id, d.version FROM documents d \
     JOIN unnest($1::text[], $2::text[]) AS k (collection, id) \
       ON d.collection = k.collection COLLATE \"C\" AND d.id = k.id COLLATE \"C\"";
const MARK_STALE: &str = "UPDATE applied_events SET outcome = 'stale' WHERE event_id = ANY($1)";
/// One row per document (the batch's newest version of it): `ON CONFLICT DO UPDATE` cannot
/// touch a row twice in one statement.
const UPSERT_DOCUMENTS: &str = "INSERT INTO documents \
     (collection, id, version, data, deleted, created_at, updated_at) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::jsonb[], $5::bool[], \
       $6::timestamptz[], $7::timestamptz[]) \
     ON CONFLICT (collection, id) DO UPDATE SET \
       version = EXCLUDED.version, data = EXCLUDED.data, deleted = EXCLUDED.deleted, \
       created_at = CASE WHEN EXCLUDED.deleted THEN documents.created_at ELSE EXCLUDED.created_at END, \
       updated_at = EXCLUDED.updated_at \
     WHERE documents.version < EXCLUDED.version \
     RETURNING collection, id";
/// The repairs' upsert (`tandem repair`, [`Repair`]): a fresh repair's state is written over
/// an older version as ordinary states are, and also over the same version or over exactly
/// the version it `replaces` (the sixth column). A separate statement, so ordinary batches run
/// [`UPSERT_DOCUMENTS`] and its plan unchanged.
const UPSERT_REPAIRS: &str = "WITH r AS (SELECT * FROM unnest($1::text[], $2::text[], \
       $3::bigint[], $4::jsonb[], $5::bool[], $6::bigint[], $7::timestamptz[], $8::timestamptz[]) \
       AS u (collection, id, version, data, deleted, replaces, created_at, updated_at)), \
     updated AS ( \
       UPDATE documents d SET version = r.version, data = r.data, deleted = r.deleted, \
         created_at = CASE WHEN r.deleted THEN d.created_at ELSE r.created_at END, \
         updated_at = r.updated_at \
       FROM r WHERE d.collection = r.collection AND d.id = r.id \
         AND (d.version <= r.version OR d.version = r.replaces) \
       RETURNING d.collection, d.id), \
     inserted AS ( \
       INSERT INTO documents (collection, id, version, data, deleted, created_at, updated_at) \
       SELECT r.collection, r.id, r.version, r.data, r.deleted, r.created_at, r.updated_at \
       FROM r WHERE NOT EXISTS (SELECT 1 FROM documents d \
         WHERE d.collection = r.collection AND d.id = r.id) \
       ON CONFLICT (collection, id) DO NOTHING RETURNING collection, id) \
     SELECT collection, id FROM updated UNION ALL SELECT collection, id FROM inserted";
/// The purges (`tandem repair` of a document Region 1 does not have): Region 2's row goes
/// only while it holds exactly the version verify saw.
const PURGE_DOCUMENTS: &str = "DELETE FROM documents d \
     USING unnest($1::text[], $2::text[], $3::bigint[]) AS p (collection, id, replaces) \
     WHERE d.collection = p.collection AND d.id = p.id AND d.version = p.replaces \
     RETURNING d.collection, d.id";
/// The next position per partition, with the proof of the record before it: its event id (when
/// it had one) and the SHA-256 of its key and payload (always).
const STORE_OFFSETS: &str = "INSERT INTO consumer_offsets \
       (topic, partition, next_offset, last_event_id, last_record_hash, updated_at) \
     SELECT $1::text, p, n, e, h, clock_timestamp() \
     FROM unnest($2::int[], $3::bigint[], $4::uuid[], $5::bytea[]) AS u (p, n, e, h) \
     ON CONFLICT (topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, \
       last_event_id = EXCLUDED.last_event_id, last_record_hash = EXCLUDED.last_record_hash, \
       updated_at = EXCLUDED.updated_at";
/// The newest heartbeat per partition (its origin time only moves forward).
const RECORD_HEARTBEATS: &str = "INSERT INTO replication_heartbeats (topic, partition, origin_time, applied_at) \
     SELECT $1::text, p, t, clock_timestamp() FROM unnest($2::int[], $3::timestamptz[]) AS u (p, t) \
     ON CONFLICT (topic, partition) DO UPDATE SET \
       origin_time = GREATEST(replication_heartbeats.origin_time, EXCLUDED.origin_time), \
       applied_at = EXCLUDED.applied_at";
const RECORD_PROGRESS: &str = "UPDATE replication_status SET \
     last_event_time = GREATEST(last_event_time, $1), last_applied_at = clock_timestamp() WHERE id = 1";
const DEAD_LETTER: &str = "INSERT INTO dead_letters (topic, partition, \"offset\", message_key, payload, \
       header_names, header_values, reason) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (topic, partition, \"offset\") DO NOTHING";
/// A partition starts counting in the lag from now when it has no heartbeat yet.
const TRACK_PARTITIONS: &str = "INSERT INTO replication_heartbeats (topic, partition, origin_time) \
     SELECT $1, p, clock_timestamp() FROM unnest($2::int[]) AS p \
     ON CONFLICT (topic, partition) DO NOTHING";

/// What proves that a stored position belongs to the partition it is read from: the record
/// before it: its hash (every record since the proof was introduced) or, for positions stored
/// before, its event id.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Proof {
    pub event_id: Option<uuid::Uuid>,
    pub record_hash: Option<Vec<u8>>,
}

/// The next position of one partition, and the proof of the record before it.
#[derive(Debug, Clone)]
pub struct Position {
    pub partition: i32,
    pub next_offset: i64,
    pub last_event_id: Option<uuid::Uuid>,
    pub last_record_hash: Vec<u8>,
}

/// One record set aside, byte for byte, but for header names: those a Kafka client cannot read
/// are `None`, and a NUL in one (a Lambda event's names are JSON strings, which may hold one;
/// PostgreSQL text cannot) is stored as `\0`.
#[derive(Debug)]
pub struct DeadLetter<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub header_names: Vec<Option<&'a str>>,
    pub header_values: Vec<Option<&'a [u8]>>,
    pub reason: &'a str,
}

/// An event of a superseded write epoch, kept unapplied ([`ApplyTx::quarantine`]).
pub struct Quarantined<'a> {
    pub event_id: uuid::Uuid,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub origin: &'a str,
    pub write_epoch: i64,
    pub superseded_by: i64,
    pub collection: &'a str,
    pub document_id: &'a str,
    pub version: i64,
    pub event_time: OffsetDateTime,
    pub payload: &'a [u8],
}

/// A quarantined event, for the operator (`tandem lost-writes`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LostWrite {
    pub event_id: uuid::Uuid,
    pub origin: String,
    pub write_epoch: i64,
    pub superseded_by: i64,
    pub collection: String,
    pub document_id: String,
    pub version: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub event_time: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub quarantined_at: OffsetDateTime,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The original event, as the relay published it.
    pub payload: serde_json::Value,
}

/// Every quarantined event, oldest write first.
pub async fn lost_writes(pool: &Pool) -> Result<Vec<LostWrite>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT event_id, origin, write_epoch, superseded_by, collection, document_id, version, \
             event_time, quarantined_at, topic, kafka_partition, kafka_offset, payload \
             FROM quarantined_events ORDER BY event_time, event_id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let payload: Vec<u8> = r.get(12);
            LostWrite {
                event_id: r.get(0),
                origin: r.get(1),
                write_epoch: r.get(2),
                superseded_by: r.get(3),
                collection: r.get(4),
                document_id: r.get(5),
                version: r.get(6),
                event_time: r.get(7),
                quarantined_at: r.get(8),
                topic: r.get(9),
                partition: r.get(10),
                offset: r.get(11),
                payload: serde_json::from_slice(&payload).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&payload).into_owned())
                }),
            }
        })
        .collect())
}

/// `text` with each NUL written `\0`: PostgreSQL text cannot hold NUL.
fn without_nul(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\\0"))
    } else {
        Cow::Borrowed(text)
    }
}

/// The events of a batch, as columns.
#[derive(Debug, Default)]
pub struct EventColumns<'a> {
    pub ids: Vec<uuid::Uuid>,
    pub collections: Vec<&'a str>,
    pub document_ids: Vec<&'a str>,
    pub versions: Vec<i64>,
    pub times: Vec<OffsetDateTime>,
}

/// A state to write, and how it is guarded.
#[derive(Debug, Clone, Copy)]
pub struct Planned<'a> {
    pub state: &'a DocumentState,
    /// The repair rule this state is written under, and the id of the repair event it came
    /// from (the batch's newest state of a document carries an earlier repair's rule). The
    /// rule counts only when that event is fresh: a redelivered repair could otherwise undo
    /// later writes (its `replaces` may be a version Region 2 legitimately holds again). A
    /// `purge` removes the row instead of writing the state.
    pub repair: Option<(uuid::Uuid, Repair)>,
}

impl<'a> Planned<'a> {
    /// An ordinary state: the strict `stored < version` guard.
    pub fn ordinary(state: &'a DocumentState) -> Self {
        Self {
            state,
            repair: None,
        }
    }

    fn purge(&self) -> Option<i64> {
        self.repair
            .filter(|(_, r)| r.purge)
            .map(|(_, r)| r.replaces.unwrap_or(self.state.version))
    }
}

/// What [`ApplyTx::apply_states`] found and did.
#[derive(Debug, Default)]
pub struct StatesApplied {
    /// The event ids recorded for the first time (the others were applied before).
    pub fresh: HashSet<uuid::Uuid>,
    /// The version each document had before the batch (after its purges).
    pub held_before: HashMap<(String, String), i64>,
    /// The documents whose state the batch changed.
    pub written: HashSet<(String, String)>,
    /// The documents a repair wrote or purged: not necessarily forward in version, so the
    /// cache's version guard cannot take them (the caller invalidates the cache instead).
    pub repaired: HashSet<(String, String)>,
    /// The documents purged (their rows deleted).
    pub purged: HashSet<(String, String)>,
}

/// The writes of one apply transaction.
pub struct ApplyTx<'a, 'b> {
    tx: &'a Transaction<'b>,
}

impl<'a, 'b> ApplyTx<'a, 'b> {
    pub fn new(tx: &'a Transaction<'b>) -> Self {
        Self { tx }
    }

    /// This database's region, write region and write epoch, share-locked until the
    /// transaction ends (a promotion waits for it); `None` without a recorded role.
    pub async fn write_role(&self) -> Result<Option<(String, String, i64)>, StoreError> {
        let row = self
            .tx
            .query_opt(
                "SELECT region, write_region, write_epoch FROM region_role FOR SHARE",
                &[],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
    }

    /// Records `write_region` as the write region of the newer `write_epoch` learned from the
    /// other region's stream: waits for this region's writes in flight, and no later one
    /// commits here (`tandem_promote_write_region`).
    pub async fn learn_write_role(
        &self,
        write_region: &str,
        write_epoch: i64,
    ) -> Result<(), StoreError> {
        self.tx
            .query_one(
                "SELECT 1 FROM tandem_promote_write_region($1, $2)",
                &[&write_region, &write_epoch],
            )
            .await?;
        Ok(())
    }

    /// Which of `ids` were applied before.
    pub async fn applied_before(
        &self,
        ids: &[uuid::Uuid],
    ) -> Result<HashSet<uuid::Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let rows = self
            .tx
            .query(
                "SELECT event_id FROM applied_events WHERE event_id = ANY($1)",
                &[&ids],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Keeps events of a superseded write epoch (`quarantined_events`); one already kept is
    /// left as it is. Returns how many were new.
    pub async fn quarantine(&self, events: &[Quarantined<'_>]) -> Result<u64, StoreError> {
        let mut inserted = 0;
        let stmt = self
            .tx
            .prepare_cached(
                "INSERT INTO quarantined_events (event_id, topic, kafka_partition, kafka_offset, \
                 origin, write_epoch, superseded_by, collection, document_id, version, event_time, \
                 payload) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                 ON CONFLICT (event_id) DO NOTHING",
            )
            .await?;
        for e in events {
            inserted += self
                .tx
                .execute(
                    &stmt,
                    &[
                        &e.event_id,
                        &e.topic,
                        &e.partition,
                        &e.offset,
                        &e.origin,
                        &e.write_epoch,
                        &e.superseded_by,
                        &e.collection,
                        &e.document_id,
                        &e.version,
                        &e.event_time,
                        &e.payload,
                    ],
                )
                .await?;
        }
        Ok(inserted)
    }

    /// Fails with [`StoreError::Fenced`] unless `fence`'s epoch still leads (`None`: unfenced).
    pub async fn check_fence(&self, fence: Option<Fence>) -> Result<(), StoreError> {
        match fence {
            Some(fence) => crate::leader::check_fence(self.tx, fence).await,
            None => Ok(()),
        }
    }

    /// Records the events' ids, reads the documents' versions before the batch and upserts
    /// `states` (at most one per document, the batch's newest, plus a purge before it) where
    /// they are newer than the stored version, or, for a fresh repair, where its rule allows
    /// ([`Repair`]). Without repairs the three statements are pipelined, in that order, so the
    /// versions are read before the upsert changes them; with repairs the ids are recorded
    /// first, since only fresh repairs may use their rule, then the purges run, then the rest.
    pub async fn apply_states(
        &self,
        events: &EventColumns<'_>,
        states: &[Planned<'_>],
    ) -> Result<StatesApplied, StoreError> {
        let tx = self.tx;
        let upserts: Vec<&Planned<'_>> = states.iter().filter(|p| p.purge().is_none()).collect();
        let keys: (Vec<&str>, Vec<&str>) = upserts
            .iter()
            .map(|p| (p.state.collection.as_str(), p.state.id.as_str()))
            .unzip();
        // Prepared first, so that the statements go out in this order.
        let record = tx.prepare_cached(RECORD_EVENTS).await?;
        let before = tx.prepare_cached(VERSIONS_BEFORE).await?;
        let upsert = tx.prepare_cached(UPSERT_DOCUMENTS).await?;
        let record_params: [&(dyn ToSql + Sync); 5] = [
            &events.ids,
            &events.collections,
            &events.document_ids,
            &events.versions,
            &events.times,
        ];
        let before_params: [&(dyn ToSql + Sync); 2] = [&keys.0, &keys.1];
        if states.iter().all(|p| p.repair.is_none()) {
            let ordinary: Vec<&DocumentState> = upserts.iter().map(|p| p.state).collect();
            let (fresh, before, written) = tokio::join!(
                tx.query(&record, &record_params),
                tx.query(&before, &before_params),
                upsert_documents(tx, &upsert, &ordinary),
            );
            return Ok(StatesApplied {
                fresh: fresh?.iter().map(|row| row.get(0)).collect(),
                held_before: before?
                    .iter()
                    .map(|row| ((row.get(0), row.get(1)), row.get(2)))
                    .collect(),
                written: written?,
                ..StatesApplied::default()
            });
        }

        let fresh: HashSet<uuid::Uuid> = tx
            .query(&record, &record_params)
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let is_fresh = |p: &Planned<'_>| p.repair.is_some_and(|(id, _)| fresh.contains(&id));
        let purges: Vec<(&str, &str, i64)> = states
            .iter()
            .filter(|p| is_fresh(p))
            .filter_map(|p| {
                p.purge()
                    .map(|v| (p.state.collection.as_str(), p.state.id.as_str(), v))
            })
            .collect();
        let mut purged = HashSet::new();
        if !purges.is_empty() {
            let stmt = tx.prepare_cached(PURGE_DOCUMENTS).await?;
            let collections: Vec<&str> = purges.iter().map(|p| p.0).collect();
            let ids: Vec<&str> = purges.iter().map(|p| p.1).collect();
            let replaces: Vec<i64> = purges.iter().map(|p| p.2).collect();
            purged = tx
                .query(&stmt, &[&collections, &ids, &replaces])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
        }
        let (repairs, ordinary): (Vec<&Planned<'_>>, Vec<&Planned<'_>>) =
            upserts.iter().partition(|p| is_fresh(p));
        let ordinary: Vec<&DocumentState> = ordinary.iter().map(|p| p.state).collect();
        let repair_stmt = tx.prepare_cached(UPSERT_REPAIRS).await?;
        let (before, written, repaired) = tokio::join!(
            tx.query(&before, &before_params),
            upsert_documents(tx, &upsert, &ordinary),
            upsert_repairs(tx, &repair_stmt, &repairs),
        );
        let repaired = repaired?;
        let mut written = written?;
        written.extend(repaired.iter().cloned());
        let mut repaired_or_purged = repaired;
        repaired_or_purged.extend(purged.iter().cloned());
        Ok(StatesApplied {
            fresh,
            held_before: before?
                .iter()
                .map(|row| ((row.get(0), row.get(1)), row.get(2)))
                .collect(),
            written,
            repaired: repaired_or_purged,
            purged,
        })
    }

    /// Marks recorded events as stale (they arrived after a newer version).
    pub async fn mark_stale(&self, ids: &[uuid::Uuid]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let stmt = self.tx.prepare_cached(MARK_STALE).await?;
        self.tx.execute(&stmt, &[&ids]).await?;
        Ok(())
    }

    /// Stores the partitions' positions, the newest event time applied and the partitions'
    /// newest heartbeats, pipelined.
    pub async fn record_progress(
        &self,
        topic: &str,
        positions: &[Position],
        newest_event: Option<OffsetDateTime>,
        heartbeats: &[(i32, OffsetDateTime)],
    ) -> Result<(), StoreError> {
        let tx = self.tx;
        let partitions: Vec<i32> = positions.iter().map(|p| p.partition).collect();
        let next_offsets: Vec<i64> = positions.iter().map(|p| p.next_offset).collect();
        let last_ids: Vec<Option<uuid::Uuid>> = positions.iter().map(|p| p.last_event_id).collect();
        let hashes: Vec<&[u8]> = positions
            .iter()
            .map(|p| p.last_record_hash.as_slice())
            .collect();
        let store = tx.prepare_cached(STORE_OFFSETS).await?;
        let progress = tx.prepare_cached(RECORD_PROGRESS).await?;
        let beats = tx.prepare_cached(RECORD_HEARTBEATS).await?;
        let store_params: [&(dyn ToSql + Sync); 5] =
            [&topic, &partitions, &next_offsets, &last_ids, &hashes];
        let beat_partitions: Vec<i32> = heartbeats.iter().map(|h| h.0).collect();
        let beat_times: Vec<OffsetDateTime> = heartbeats.iter().map(|h| h.1).collect();
        let (stored, recorded, beaten) = tokio::join!(
            tx.execute(&store, &store_params),
            async {
                match &newest_event {
                    Some(newest) => tx.execute(&progress, &[newest]).await.map(|_| ()),
                    None => Ok(()),
                }
            },
            async {
                if beat_partitions.is_empty() {
                    return Ok(());
                }
                tx.execute(&beats, &[&topic, &beat_partitions, &beat_times])
                    .await
                    .map(|_| ())
            }
        );
        stored?;
        recorded?;
        beaten?;
        Ok(())
    }

    /// Sets a record aside (once per position).
    pub async fn insert_dead_letter(&self, letter: &DeadLetter<'_>) -> Result<(), StoreError> {
        let stmt = self.tx.prepare_cached(DEAD_LETTER).await?;
        // text columns cannot hold NUL: the reason quotes payloads, and header names come as
        // they were sent, so a NUL there is written `\0`.
        let reason = without_nul(letter.reason);
        let header_names: Vec<Option<Cow<'_, str>>> = letter
            .header_names
            .iter()
            .map(|name| name.map(without_nul))
            .collect();
        self.tx
            .execute(
                &stmt,
                &[
                    &letter.topic,
                    &letter.partition,
                    &letter.offset,
                    &letter.key,
                    &letter.payload,
                    &header_names,
                    &letter.header_values,
                    &reason,
                ],
            )
            .await?;
        Ok(())
    }
}

/// Upserts the states (at most one per document) where they are newer than the stored
/// version; returns the `(collection, id)` of the documents that changed.
async fn upsert_documents(
    tx: &Transaction<'_>,
    stmt: &tokio_postgres::Statement,
    states: &[&DocumentState],
) -> Result<HashSet<(String, String)>, StoreError> {
    if states.is_empty() {
        return Ok(HashSet::new());
    }
    let collections: Vec<&str> = states.iter().map(|s| s.collection.as_str()).collect();
    let ids: Vec<&str> = states.iter().map(|s| s.id.as_str()).collect();
    let versions: Vec<i64> = states.iter().map(|s| s.version).collect();
    let data: Vec<Option<Json<&serde_json::Map<String, serde_json::Value>>>> =
        states.iter().map(|s| s.data.as_ref().map(Json)).collect();
    let deleted: Vec<bool> = states.iter().map(|s| s.deleted).collect();
    let created_at: Vec<OffsetDateTime> = states
        .iter()
        .map(|s| s.created_at.unwrap_or(s.updated_at))
        .collect();
    let updated_at: Vec<OffsetDateTime> = states.iter().map(|s| s.updated_at).collect();
    let rows = tx
        .query(
            stmt,
            &[
                &collections,
                &ids,
                &versions,
                &data,
                &deleted,
                &created_at,
                &updated_at,
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Upserts fresh repairs' states under their rule ([`UPSERT_REPAIRS`]); returns the
/// `(collection, id)` of the documents written.
async fn upsert_repairs(
    tx: &Transaction<'_>,
    stmt: &tokio_postgres::Statement,
    states: &[&Planned<'_>],
) -> Result<HashSet<(String, String)>, StoreError> {
    if states.is_empty() {
        return Ok(HashSet::new());
    }
    let collections: Vec<&str> = states.iter().map(|p| p.state.collection.as_str()).collect();
    let ids: Vec<&str> = states.iter().map(|p| p.state.id.as_str()).collect();
    let versions: Vec<i64> = states.iter().map(|p| p.state.version).collect();
    let data: Vec<Option<Json<&serde_json::Map<String, serde_json::Value>>>> = states
        .iter()
        .map(|p| p.state.data.as_ref().map(Json))
        .collect();
    let deleted: Vec<bool> = states.iter().map(|p| p.state.deleted).collect();
    let replaces: Vec<Option<i64>> = states
        .iter()
        .map(|p| p.repair.and_then(|(_, r)| r.replaces))
        .collect();
    let created_at: Vec<OffsetDateTime> = states
        .iter()
        .map(|p| p.state.created_at.unwrap_or(p.state.updated_at))
        .collect();
    let updated_at: Vec<OffsetDateTime> = states.iter().map(|p| p.state.updated_at).collect();
    let rows = tx
        .query(
            stmt,
            &[
                &collections,
                &ids,
                &versions,
                &data,
                &deleted,
                &replaces,
                &created_at,
                &updated_at,
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// `(partition, next_offset, proof of the record before it)` of every partition of `topic`
/// with a position.
pub async fn stored_positions(
    pool: &Pool,
    topic: &str,
) -> Result<Vec<(i32, i64, Proof)>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT partition, next_offset, last_event_id, last_record_hash FROM consumer_offsets \
             WHERE topic = $1 AND next_offset > 0",
            &[&topic],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                Proof {
                    event_id: r.get(2),
                    record_hash: r.get(3),
                },
            )
        })
        .collect())
}

/// Forgets a partition's stored position: it is read from its beginning next time.
pub async fn forget_position(pool: &Pool, topic: &str, partition: i32) -> Result<(), StoreError> {
    let client = pool.get().await?;
    client
        .execute(
            "UPDATE consumer_offsets SET next_offset = 0, last_event_id = NULL, \
               last_record_hash = NULL, updated_at = clock_timestamp() \
             WHERE topic = $1 AND partition = $2",
            &[&topic, &partition],
        )
        .await?;
    Ok(())
}

/// Counts exactly these partitions of `topic` in the lag: one heartbeat row each (a partition
/// without one yet counts from now), and none for other partitions or topics.
pub async fn track_partitions(
    pool: &Pool,
    topic: &str,
    partitions: &[i32],
) -> Result<(), StoreError> {
    let client = pool.get().await?;
    client
        .execute(TRACK_PARTITIONS, &[&topic, &partitions])
        .await?;
    client
        .execute(
            "DELETE FROM replication_heartbeats WHERE topic <> $1 OR NOT partition = ANY($2)",
            &[&topic, &partitions],
        )
        .await?;
    Ok(())
}

/// Counts these partitions in the lag when they are not counted yet, forgetting none. Returns
/// how many were added.
pub async fn count_partitions_in_lag(
    pool: &Pool,
    topic: &str,
    partitions: &[i32],
) -> Result<u64, StoreError> {
    let client = pool.get().await?;
    Ok(client
        .execute(TRACK_PARTITIONS, &[&topic, &partitions])
        .await?)
}

/// The consumer's liveness and backlog, for the Read API's lag report; with `applied`, also
/// the progress its apply transactions left to it (the newest event time applied since the
/// last heartbeat: `last_applied_at` then says when the heartbeat recorded it).
pub async fn record_heartbeat(
    pool: &Pool,
    backlog: i64,
    applied: Option<OffsetDateTime>,
) -> Result<(), StoreError> {
    let client = pool.get().await?;
    client
        .execute(
            "UPDATE replication_status SET heartbeat_at = clock_timestamp(), backlog = $1, \
               last_event_time = GREATEST(last_event_time, $2), \
               last_applied_at = CASE WHEN $2::timestamptz IS NULL THEN last_applied_at \
                 ELSE clock_timestamp() END \
             WHERE id = 1",
            &[&backlog, &applied],
        )
        .await?;
    Ok(())
}

/// Forgets applied event ids older than [`APPLIED_EVENTS_RETENTION_DAYS`], in chunks of
/// 10,000, each recorded as the housekeeping pass that started at `pass` did it. Returns how
/// many were removed.
pub async fn prune_applied_events(pool: &Pool, pass: OffsetDateTime) -> Result<u64, StoreError> {
    let client = pool.get().await?;
    Ok(crate::housekeeping::prune_in_rounds(
        &client,
        "applied_events",
        "DELETE FROM applied_events WHERE event_id IN (SELECT event_id FROM applied_events \
         WHERE applied_at < now() - make_interval(days => $1) LIMIT 10000)",
        &[&APPLIED_EVENTS_RETENTION_DAYS],
        pass,
    )
    .await?)
}

/// The dead letters not yet redriven (or only `only`): `(id, payload)`, oldest first.
pub async fn pending_dead_letters(
    pool: &Pool,
    only: Option<i64>,
) -> Result<Vec<(i64, Option<Vec<u8>>)>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT id, payload FROM dead_letters WHERE redriven_at IS NULL \
             AND ($1::bigint IS NULL OR id = $1) ORDER BY id",
            &[&only],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// A pending dead letter of Region 2's apply, for the operator (without its payload).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PendingDeadLetter {
    pub id: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
}

/// The dead letters not yet redriven, oldest first.
pub async fn list_pending_dead_letters(pool: &Pool) -> Result<Vec<PendingDeadLetter>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT id, topic, partition, \"offset\", reason, received_at FROM dead_letters \
             WHERE redriven_at IS NULL ORDER BY id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(PendingDeadLetter {
                id: r.try_get(0)?,
                topic: r.try_get(1)?,
                partition: r.try_get(2)?,
                offset: r.try_get(3)?,
                reason: r.try_get(4)?,
                received_at: r.try_get(5)?,
            })
        })
        .collect()
}

/// The consumer's stored position of one partition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionPosition {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// Every stored position (`consumer_offsets`), by topic and partition.
pub async fn positions(pool: &Pool) -> Result<Vec<PartitionPosition>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT topic, partition, next_offset, updated_at FROM consumer_offsets \
             ORDER BY topic, partition",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(PartitionPosition {
                topic: r.try_get(0)?,
                partition: r.try_get(1)?,
                next_offset: r.try_get(2)?,
                updated_at: r.try_get(3)?,
            })
        })
        .collect()
}

/// Re-applies dead letters (one, or all not yet redriven) through the apply's own statements
/// ([`ApplyTx::apply_states`], under the usual guards), then writes the states it changed
/// into Region 2's cache (when one is given). Events that still fail stay dead-lettered with
/// the new reason. Returns `(id, result)` per letter: `applied`, `stale`, `duplicate` or
/// `still poison: …`. The consumer's `redrive` command and `tandem redrive` both run this.
pub async fn redrive(
    pool: &Pool,
    cache: Option<&crate::cache::Cache>,
    only: Option<i64>,
) -> Result<Vec<(i64, String)>, StoreError> {
    let letters = pending_dead_letters(pool, only).await?;
    let mut results = Vec::new();
    for (id, payload) in letters {
        // One letter failing (the database refusing it, say) does not stop the others.
        let result = match redrive_one(pool, cache, payload.as_deref().unwrap_or_default()).await {
            Ok(result) => result,
            Err(e) => format!("still poison: could not be applied: {e:#}"),
        };
        if let Err(e) = record_redrive(pool, id, &result).await {
            tracing::error!(id, error = %e, "failed to record a redrive result");
        }
        results.push((id, result));
    }
    Ok(results)
}

/// One event, alone in its transaction: a duplicate when its id was recorded before, applied
/// when the guarded upsert wrote it, else stale.
async fn redrive_one(
    pool: &Pool,
    cache: Option<&crate::cache::Cache>,
    payload: &[u8],
) -> anyhow::Result<String> {
    use tandem_core::document::Stored;
    use tandem_core::event::ChangeEvent;

    let event = match ChangeEvent::decode(payload) {
        Err(reason) => return Ok(format!("still poison: {reason}")),
        Ok(event) => event,
    };
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let writes = ApplyTx::new(&tx);
    let columns = EventColumns {
        ids: vec![event.id],
        collections: vec![event.data.collection.as_str()],
        document_ids: vec![event.data.id.as_str()],
        versions: vec![event.data.version],
        times: vec![event.time],
    };
    let planned = Planned {
        state: &event.data,
        repair: event.data.repair.map(|r| (event.id, r)),
    };
    let applied = writes.apply_states(&columns, &[planned]).await?;
    let outcome = if !applied.fresh.contains(&event.id) {
        "duplicate"
    } else if applied.written.is_empty() && applied.purged.is_empty() {
        writes.mark_stale(&[event.id]).await?;
        "stale"
    } else {
        "applied"
    };
    tx.commit().await?;
    if let (Some(cache), "applied", false) = (cache, outcome, applied.repaired.is_empty()) {
        // Not necessarily forward in version: the cache's guard cannot take it.
        cache.invalidate_all().await;
    } else if let (Some(cache), "applied") = (cache, outcome) {
        let entry = match event.data.to_stored() {
            Stored::Live(document) => crate::cache::Entry::Live {
                version: document.version,
                body: document.to_body(),
            },
            Stored::Deleted { version } => crate::cache::Entry::Deleted { version },
        };
        if let Err(e) = cache.put(&event.data.key(), &entry).await {
            tracing::warn!(error = %e, "cache update after a redrive failed");
        }
    }
    Ok(outcome.to_owned())
}

/// Records a redrive's result: a letter that is `still poison` stays pending.
pub async fn record_redrive(pool: &Pool, id: i64, result: &str) -> Result<(), StoreError> {
    let client = pool.get().await?;
    client
        .execute(
            "UPDATE dead_letters SET redriven_at = CASE WHEN $2 LIKE 'still poison%' THEN NULL \
             ELSE clock_timestamp() END, redrive_result = $2 WHERE id = $1",
            &[&id, &result],
        )
        .await?;
    Ok(())
}

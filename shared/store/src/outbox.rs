//! The relay's side of the outbox (Region 1): every statement the outbox relay runs on the
//! `outbox` and `relay_dead_letters` tables. The relay keeps the Kafka side; it fetches the
//! oldest unpublished rows here ([`fetch_unpublished`]), publishes them, and records the
//! outcome here ([`settle`]): published rows marked, unpublishable ones moved aside.
//!
//! Rows are *enqueued* elsewhere: the write that changes a document inserts its outbox row in
//! the same transaction, so that statement lives with the document's
//! ([`crate::documents::Store::write`]). Published rows stay for `OUTBOX_RETENTION_HOURS`
//! ([`prune_published`]), which is what makes [`replay_since`] possible.
//!
//! Payloads pass through as the text PostgreSQL renders from the `jsonb` column: never parsed
//! here, so a batch costs no JSON tree per row.

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Client, Pool};
use time::OffsetDateTime;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::leader::{Fence, Share, check_fence};

/// The oldest unpublished rows, at most `$1` of them and no more than `$2` payload bytes (the
/// first row always comes). The payload comes as the text PostgreSQL renders, passed through
/// to Kafka unparsed.
macro_rules! fetch_unpublished {
    ($candidates:expr) => {
        concat!(
            "WITH head AS ( \
               SELECT seq, payload_bytes, \
                 sum(payload_bytes) OVER (ORDER BY seq) - payload_bytes AS before \
               FROM ",
            $candidates,
            " ORDER BY seq LIMIT $1) \
             SELECT o.seq, o.event_id, o.collection, o.document_id, o.operation, \
               o.payload::text, o.traceparent, o.created_at, head.payload_bytes, o.origin, \
               o.write_epoch \
             FROM head CROSS JOIN LATERAL (SELECT * FROM outbox WHERE outbox.seq = head.seq \
               OFFSET 0) o \
             WHERE head.before = 0 OR head.before + head.payload_bytes <= $2 ORDER BY head.seq"
        )
    };
}
/// (Each kept row is then read by its primary key: `OFFSET 0` keeps the planner from turning
/// that into a join, which it planned as a scan of the whole table, published rows included,
/// once per batch: 17 ms instead of 2 for a batch from a 100k-row outbox.)
const FETCH_UNPUBLISHED: &str =
    fetch_unpublished!("(SELECT seq, payload_bytes FROM outbox WHERE published_at IS NULL) u");
/// How many slots the documents are hashed into; a share of the outbox is a set of slots.
pub const SLOTS: u32 = 64;
/// A row's slot: its document key hashed by PostgreSQL (so every relay computes the same), in
/// `0..SLOTS`. [`SLOT_INDEX`] indexes it.
macro_rules! slot_of {
    () => {
        "(mod(hashtext(collection || '/' || document_id)::bigint + 2147483648, 64)::int)"
    };
}
/// The expression that puts a document in its slot.
pub const SLOT_OF: &str = slot_of!();
/// The unpublished rows by slot, in `seq` order, for the partitioned relays
/// ([`prepare_shares`]): created when a relay first runs with `RELAY_SHARES` > 1, so that
/// deployments which never partition pay nothing for it on their writes.
const SLOT_INDEX: &str = concat!(
    "CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_unpublished_slot ON outbox (",
    slot_of!(),
    ", seq) WHERE published_at IS NULL"
);
/// A share's oldest unpublished rows: for each of its slots (`$3`) the oldest `$4`, of those
/// the oldest `$1`. Every row taken comes with the older rows of its slot (they are older, and
/// among the slot's oldest), so each document's rows still go out in order; each slot is one
/// index range scan.
const FETCH_UNPUBLISHED_SHARE: &str = fetch_unpublished!(concat!(
    "unnest($3::int[]) AS s (slot) CROSS JOIN LATERAL (SELECT seq, payload_bytes FROM outbox \
       WHERE published_at IS NULL AND ",
    slot_of!(),
    " = s.slot ORDER BY seq LIMIT $4) u"
));
const MARK_PUBLISHED: &str =
    "UPDATE outbox SET published_at = clock_timestamp() WHERE seq = ANY($1)";
/// [`MARK_PUBLISHED`] behind the fence ([`crate::leader::FENCE_CHECK`], `$2` role, `$3` epoch)
/// as one statement, so one round trip: it marks nothing unless the epoch is still current,
/// and its share lock makes a concurrent election wait for it, as in a transaction. Returns
/// whether the fence held (PostgreSQL runs a data-modifying `WITH` whether or not it is read).
const MARK_PUBLISHED_FENCED: &str = "WITH fence AS ( \
       SELECT 1 FROM leader_epochs WHERE role = $2 AND epoch = $3 FOR SHARE), \
     mark AS ( \
       UPDATE outbox SET published_at = clock_timestamp() \
       WHERE seq = ANY($1) AND EXISTS (SELECT 1 FROM fence)) \
     SELECT EXISTS (SELECT 1 FROM fence)";
/// Moves rows that cannot be published aside, with their reasons, in one statement.
const DEAD_LETTER_ROWS: &str = "WITH moved AS ( \
       DELETE FROM outbox WHERE seq = ANY($1) AND published_at IS NULL RETURNING *) \
     INSERT INTO relay_dead_letters (seq, event_id, collection, document_id, version, \
       operation, payload, traceparent, created_at, reason) \
     SELECT m.seq, m.event_id, m.collection, m.document_id, m.version, m.operation, m.payload, \
       m.traceparent, m.created_at, r.reason \
     FROM moved m JOIN unnest($1::bigint[], $2::text[]) AS r (seq, reason) ON r.seq = m.seq";
/// One round of pruning: at most [`crate::housekeeping::ROUND`] rows, so no statement holds
/// many locks.
const PRUNE_PUBLISHED: &str = "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox \
     WHERE published_at < now() - make_interval(secs => $1) LIMIT 10000)";
const COUNT_UNPUBLISHED: &str = "SELECT count(*) FROM outbox WHERE published_at IS NULL";
/// A heartbeat's time: the commit time of the oldest unpublished row (everything before it is
/// published), or now when there is none. A transaction still in flight when this is read can
/// commit a row older than it: the heartbeat then understates the lag by that transaction's
/// remaining duration (milliseconds).
const HEARTBEAT_TIME: &str = "SELECT coalesce((SELECT created_at FROM outbox \
     WHERE published_at IS NULL ORDER BY seq LIMIT 1), clock_timestamp())";
const OLDEST_RETAINED: &str = "SELECT min(created_at) FROM outbox";
const MARK_FOR_REPLAY: &str =
    "UPDATE outbox SET published_at = NULL WHERE created_at >= $1 AND published_at IS NOT NULL";
/// The channel the relay's leader listens on ([`listen`]): the Write API notifies it after its
/// commits ([`RelayWake`]); a replay or a repair wakes it the same way.
const LISTEN: &str = "LISTEN tandem_outbox";
const NOTIFY: &str = "NOTIFY tandem_outbox";
/// The notification as a transaction of its own that does not wait for its WAL flush: a
/// notifying commit holds a database-wide lock until its commit record is flushed, and nothing
/// about a wake-up needs to survive a crash (the relay also polls).
const NOTIFY_UNFLUSHED: &str =
    "BEGIN; SET LOCAL synchronous_commit = off; NOTIFY tandem_outbox; COMMIT";

/// Subscribes `session` (the leader's own connection, outside the pool) to the outbox's
/// notifications (`LISTEN tandem_outbox`): each says that rows were enqueued (or marked for
/// replay).
pub async fn listen(session: &tokio_postgres::Client) -> anyhow::Result<()> {
    session
        .batch_execute(LISTEN)
        .await
        .context("Failed to LISTEN")
}

/// Wakes the relay after outbox rows were committed, off the commit path.
///
/// Until migration V9 a statement trigger ran `pg_notify` inside every write transaction.
/// PostgreSQL serialises the commits of notifying transactions on one database-wide lock held
/// across each commit's WAL flush, so durable commits stopped grouping (pgbench running the
/// write's transaction loses 40–50 % with the `NOTIFY` added; more where a flush takes longer,
/// as on multi-AZ RDS). Now [`wake`](Self::wake) only flags that rows were committed, and a
/// background task sends the notification as its own transaction ([`NOTIFY_UNFLUSHED`]). The
/// flags coalesce: one notification at a time per process, and the commits that happen while
/// it is sent ask for one more, never one each. A notification that fails (the pool
/// exhausted, the database gone) is dropped: the relay's poll (`RELAY_POLL_INTERVAL_MS`)
/// bounds what that costs, as it bounded a lost notification before.
#[derive(Clone)]
pub struct RelayWake {
    pending: tokio::sync::mpsc::Sender<()>,
}

impl RelayWake {
    /// Starts the task that sends the notifications over `pool`; it ends when the last handle
    /// is dropped. Needs a Tokio runtime.
    pub fn spawn(pool: Pool) -> Self {
        let (pending, mut requests) = tokio::sync::mpsc::channel::<()>(1);
        tokio::spawn(async move {
            while requests.recv().await.is_some() {
                if let Err(e) = notify(&pool).await {
                    tracing::debug!(error = format!("{e:#}"), "relay wake-up not sent");
                }
            }
        });
        Self { pending }
    }

    /// Says that outbox rows were committed: returns at once; the notification follows unless
    /// one is already waiting to be sent.
    pub fn wake(&self) {
        // Full: a notification not yet sent will cover these rows too.
        let _ = self.pending.try_send(());
    }
}

/// Sends one notification on the outbox channel (a transaction of its own, not flushed).
pub async fn notify(pool: &Pool) -> anyhow::Result<()> {
    let client = pool
        .get()
        .await
        .context("Failed to get a database connection")?;
    client
        .batch_execute(NOTIFY_UNFLUSHED)
        .await
        .context("Failed to notify the relay")
}

/// One unpublished outbox row, borrowed from its batch ([`Unpublished`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutboxRow<'a> {
    /// Insertion order; the relay publishes in this order.
    pub seq: i64,
    pub event_id: Uuid,
    pub collection: &'a str,
    pub document_id: &'a str,
    /// `upsert` or `delete` (the table's CHECK constraint).
    pub operation: &'a str,
    /// The change event's payload as JSON text, as PostgreSQL rendered it.
    pub payload: &'a str,
    pub traceparent: Option<&'a str>,
    /// When the writing transaction inserted the row (Region 1's commit clock).
    pub created_at: OffsetDateTime,
    /// The stored payload's size, counted against the batch's byte budget.
    pub payload_bytes: i32,
    /// The region and write epoch the row was written in (stamped by the database's
    /// write fence); `None` on rows written before that existed.
    pub origin: Option<&'a str>,
    pub write_epoch: Option<i64>,
}

/// A fetched row whose columns could not be decoded: the relay sets it aside by its `seq`.
#[derive(Debug)]
pub struct Undecodable {
    pub seq: i64,
    pub payload_bytes: i32,
    pub error: tokio_postgres::Error,
}

/// One batch of unpublished rows, oldest first ([`fetch_unpublished`]). It holds the rows as
/// they arrived; [`Unpublished::rows`] lends them out without copying their payloads, so drop
/// the batch once its rows are encoded.
#[derive(Debug)]
pub struct Unpublished {
    rows: Vec<Row>,
    /// Each row's `seq` and `payload_bytes`, decoded when the batch arrived.
    heads: Vec<(i64, i32)>,
}

impl Unpublished {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows in `seq` order; a row whose other columns cannot be decoded comes as
    /// [`Undecodable`], in its place.
    pub fn rows(&self) -> impl Iterator<Item = Result<OutboxRow<'_>, Undecodable>> {
        self.rows
            .iter()
            .zip(&self.heads)
            .map(|(row, &(seq, payload_bytes))| {
                outbox_row(row, seq, payload_bytes).map_err(|error| Undecodable {
                    seq,
                    payload_bytes,
                    error,
                })
            })
    }
}

/// The columns of one [`FETCH_UNPUBLISHED`] row besides its `seq` and `payload_bytes`.
fn outbox_row(
    row: &Row,
    seq: i64,
    payload_bytes: i32,
) -> Result<OutboxRow<'_>, tokio_postgres::Error> {
    Ok(OutboxRow {
        seq,
        event_id: row.try_get(1)?,
        collection: row.try_get(2)?,
        document_id: row.try_get(3)?,
        operation: row.try_get(4)?,
        payload: row.try_get(5)?,
        traceparent: row.try_get(6)?,
        created_at: row.try_get(7)?,
        payload_bytes,
        origin: row.try_get(9)?,
        write_epoch: row.try_get(10)?,
    })
}

/// The oldest unpublished rows: at most `max_rows`, and no more than `max_bytes` of payload
/// (the first row always comes, however large). Run on the connection that will [`settle`]
/// the batch.
pub async fn fetch_unpublished(
    client: &Client,
    max_rows: i64,
    max_bytes: i64,
) -> anyhow::Result<Unpublished> {
    fetch_share(client, max_rows, max_bytes, None).await
}

/// [`fetch_unpublished`] of one share of the outbox (`None`: the whole outbox).
pub async fn fetch_share(
    client: &Client,
    max_rows: i64,
    max_bytes: i64,
    share: Option<Share>,
) -> anyhow::Result<Unpublished> {
    let rows = match share {
        Some(share) if share.count > 1 => {
            let stmt = client.prepare_cached(FETCH_UNPUBLISHED_SHARE).await?;
            let slots = share.slots();
            // Twice a fair part per slot: a batch fills from the slots that have rows without
            // reading a whole batch from each.
            let slot_count = slots.len().max(1) as i64;
            let per_slot = ((max_rows * 2 + slot_count - 1) / slot_count).max(64);
            client
                .query(&stmt, &[&max_rows, &max_bytes, &slots, &per_slot])
                .await
        }
        _ => {
            let stmt = client.prepare_cached(FETCH_UNPUBLISHED).await?;
            client.query(&stmt, &[&max_rows, &max_bytes]).await
        }
    }
    .context("Failed to read the outbox")?;
    let heads = rows
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(8)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?;
    Ok(Unpublished { rows, heads })
}

/// Creates the index the partitioned relays read their shares through ([`SLOT_INDEX`]; over
/// the unpublished rows only, so it builds in moments), without blocking writes. One relay
/// builds it at a time; an index left invalid by an interrupted build is rebuilt.
pub async fn prepare_shares(settings: &crate::db::DatabaseSettings) -> anyhow::Result<()> {
    let session = crate::db::connect_session(settings).await?;
    let client = &session.client;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&SLOT_INDEX_LOCK])
        .await
        .context("Failed to take the slot index's lock")?;
    // None: no such index yet; Some(false): left invalid by an interrupted build.
    let valid: Option<bool> = client
        .query_opt(
            "SELECT indisvalid FROM pg_index \
             WHERE indexrelid = to_regclass('outbox_unpublished_slot')",
            &[],
        )
        .await?
        .map(|row| row.get(0));
    if valid == Some(false) {
        client
            .batch_execute("DROP INDEX CONCURRENTLY IF EXISTS outbox_unpublished_slot")
            .await
            .context("Failed to drop an invalid outbox_unpublished_slot")?;
    }
    client
        .batch_execute(SLOT_INDEX)
        .await
        .context("Failed to create the index outbox_unpublished_slot")?;
    if valid != Some(true) {
        // Statistics for the new index's expression, so the planner reads shares through it
        // before autovacuum gets to the table.
        client
            .batch_execute("ANALYZE outbox")
            .await
            .context("Failed to analyse the outbox")?;
    }
    Ok(())
}

/// The lock one relay holds while it creates [`SLOT_INDEX`].
const SLOT_INDEX_LOCK: i64 = 0x7461_6e64_656d_0003;

/// Records a batch's outcome atomically (one statement when nothing was refused, else one
/// transaction): the `published` rows (the broker acknowledged them) are marked published, and
/// the `refused` ones (`seq`, reason: retrying cannot publish them) are moved to
/// `relay_dead_letters`. With a `fence`, nothing commits unless this process is still the
/// elected leader ([`crate::documents::StoreError::Fenced`] then).
/// Returns how many rows were moved aside. Does nothing when both are empty.
pub async fn settle(
    client: &mut Client,
    fence: Option<Fence>,
    published: &[i64],
    refused: &[(i64, String)],
) -> anyhow::Result<u64> {
    if published.is_empty() && refused.is_empty() {
        return Ok(0);
    }
    // The usual case, all of a batch acknowledged: one statement instead of a transaction's
    // four round trips, which the relay's next batch would wait for.
    if refused.is_empty() {
        match fence {
            Some(fence) => {
                let stmt = client.prepare_cached(MARK_PUBLISHED_FENCED).await?;
                let row = client
                    .query_one(&stmt, &[&published, &fence.role, &fence.epoch])
                    .await
                    .context("Failed to mark rows published")?;
                if !row.try_get::<_, bool>(0)? {
                    return Err(crate::documents::StoreError::Fenced { epoch: fence.epoch }.into());
                }
            }
            None => {
                let stmt = client.prepare_cached(MARK_PUBLISHED).await?;
                client
                    .execute(&stmt, &[&published])
                    .await
                    .context("Failed to mark rows published")?;
            }
        }
        return Ok(0);
    }
    let tx = client.transaction().await?;
    if let Some(fence) = fence {
        check_fence(&tx, fence).await?;
    }
    if !published.is_empty() {
        let stmt = tx.prepare_cached(MARK_PUBLISHED).await?;
        tx.execute(&stmt, &[&published])
            .await
            .context("Failed to mark rows published")?;
    }
    let mut moved = 0;
    if !refused.is_empty() {
        let (seqs, reasons): (Vec<i64>, Vec<&str>) =
            refused.iter().map(|(s, r)| (*s, r.as_str())).unzip();
        let stmt = tx.prepare_cached(DEAD_LETTER_ROWS).await?;
        moved = tx
            .execute(&stmt, &[&seqs, &reasons])
            .await
            .context("Failed to move unpublishable rows to relay_dead_letters")?;
    }
    tx.commit()
        .await
        .context("Failed to commit the batch's marks")?;
    Ok(moved)
}

/// The time the next heartbeat carries: the commit time of the oldest unpublished row
/// (everything committed before it is published), or now when there is none.
pub async fn heartbeat_time(pool: &Pool) -> anyhow::Result<OffsetDateTime> {
    let client = pool.get().await?;
    Ok(client.query_one(HEARTBEAT_TIME, &[]).await?.try_get(0)?)
}

/// How many rows wait to be published (the relay's backlog).
pub async fn count_unpublished(pool: &Pool) -> anyhow::Result<i64> {
    let client = pool.get().await?;
    Ok(client.query_one(COUNT_UNPUBLISHED, &[]).await?.try_get(0)?)
}

/// A row the relay set aside (`relay_dead_letters`), for the operator.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayDeadLetter {
    pub seq: i64,
    pub collection: String,
    pub document_id: String,
    pub version: i64,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub dead_lettered_at: OffsetDateTime,
}

/// Every row the relay set aside, oldest first (they stay until an operator removes them).
pub async fn relay_dead_letters(pool: &Pool) -> anyhow::Result<Vec<RelayDeadLetter>> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT seq, collection, document_id, version, reason, dead_lettered_at \
             FROM relay_dead_letters ORDER BY seq",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(RelayDeadLetter {
                seq: r.try_get(0)?,
                collection: r.try_get(1)?,
                document_id: r.try_get(2)?,
                version: r.try_get(3)?,
                reason: r.try_get(4)?,
                dead_lettered_at: r.try_get(5)?,
            })
        })
        .collect()
}

/// Removes rows published longer than `retention` ago, 10,000 at a time, each round recorded
/// as the housekeeping pass that started at `pass` did it; returns how many.
pub async fn prune_published(
    pool: &Pool,
    retention: Duration,
    pass: OffsetDateTime,
) -> anyhow::Result<u64> {
    let retention = retention.as_secs_f64();
    let client = pool.get().await?;
    Ok(crate::housekeeping::prune_in_rounds(
        &client,
        "outbox",
        PRUNE_PUBLISHED,
        &[&retention],
        pass,
    )
    .await?)
}

/// Marks every retained row created at or after `since` as unpublished, so the active relay
/// publishes them again (after a broker lost its data), and wakes it. Returns how many rows
/// will be replayed.
pub async fn replay_since(pool: &Pool, since: OffsetDateTime) -> anyhow::Result<u64> {
    let client = pool
        .get()
        .await
        .context("Failed to get a database connection")?;
    let oldest: Option<OffsetDateTime> = client.query_one(OLDEST_RETAINED, &[]).await?.get(0);
    if let Some(oldest) = oldest {
        if oldest > since {
            tracing::warn!(%oldest, "rows older than the retention period are gone; replay starts at the oldest retained row");
        }
    }
    let n = client
        .execute(MARK_FOR_REPLAY, &[&since])
        .await
        .context("Failed to mark rows for replay")?;
    client.execute(NOTIFY, &[]).await.ok();
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_listens_where_writers_notify() {
        let channel = LISTEN.strip_prefix("LISTEN ").expect("a LISTEN statement");
        assert_eq!(NOTIFY, format!("NOTIFY {channel}"));
        assert!(NOTIFY_UNFLUSHED.contains(&format!("; {NOTIFY};")));
    }

    #[test]
    fn the_prune_batch_is_the_statement_limit() {
        let round = crate::housekeeping::ROUND;
        assert!(PRUNE_PUBLISHED.ends_with(&format!("LIMIT {round})")));
    }
}

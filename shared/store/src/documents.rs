//! PostgreSQL storage of documents. Every write commits the document row, exactly one outbox
//! row and (when the client sent an `Idempotency-Key`) the recorded outcome in one
//! transaction; a write that fails anywhere commits none of them.
//!
//! So the outbox's *enqueue* statements live here, with the document's; what happens to the
//! rows afterwards (the relay fetching, marking, setting aside, pruning and replaying them)
//! lives in [`crate::outbox`].

use crate::outbox::RelayWake;
use deadpool_postgres::{Pool, PoolError, Transaction};
use serde_json::{Map, Value};
use tandem_core::document::{Collection, Document, DocumentId, DocumentKey, Stored};
use tandem_core::event::Tombstone;
use tandem_core::limits::{LIST_PAGE_BYTES, MAX_DOCUMENT_BYTES, MAX_JSON_DEPTH};
use tandem_core::write::{
    Current, Idempotency, Refusal, WriteCommand, WriteOutcome, WriteRequest, WriteResult,
    plan_change, plan_creation,
};
use time::OffsetDateTime;
use tokio_postgres::types::{Json, ToSql};
use uuid::Uuid;

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_TTL_SECONDS: i64 = 24 * 60 * 60;

/// A storage failure, classed by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is shutting down: worth retrying later (503).
    #[error("the database is unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// Anything else: a bug or a broken invariant (500, logged with its cause).
    #[error("the database reported an error")]
    Internal(#[source] anyhow::Error),
    /// A worker's transaction found that it is no longer the elected leader
    /// ([`crate::leader::FENCE_CHECK`]): nothing was committed, and the worker must stand down.
    #[error("this process is no longer the elected leader (epoch {epoch} was superseded)")]
    Fenced { epoch: i64 },
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let transient = match e.code() {
            Some(code) => is_transient_sqlstate(code.code()),
            // No SQLSTATE: transient only for a closed connection or an I/O failure; a value
            // that cannot be converted, say, is a bug to report, not to retry.
            None => {
                e.is_closed()
                    || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
                    || e.to_string().contains("timed out")
            }
        };
        if transient {
            Self::Unavailable(e.into())
        } else {
            Self::Internal(e.into())
        }
    }
}

/// Whether retrying later can succeed: the database or its host is in a passing state, not
/// the request or the data at fault.
///
/// * `08…` connection exceptions, `57P…` shutdown / crash recovery;
/// * `53…` insufficient resources (disk full 53100, out of memory 53200, too many
///   connections 53300), `58…` system errors (I/O error 58030);
/// * `57014` statement timeout or cancel, `55P03` lock not available (lock_timeout);
/// * `25006` read-only transaction (a replica being promoted, `default_transaction_read_only`);
/// * `40001` serialisation failure, `40P01` deadlock.
pub fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("57P")
        || code.starts_with("53")
        || code.starts_with("58")
        || matches!(code, "57014" | "55P03" | "25006" | "40001" | "40P01")
}

impl From<PoolError> for StoreError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Backend(e) => e.into(),
            other => Self::Unavailable(anyhow::anyhow!("connection pool: {other}")),
        }
    }
}

/// Why a write was refused.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the document does not exist")]
    NotFound,
    #[error("precondition failed; current version is {current:?}")]
    PreconditionFailed { current: Option<i64> },
    #[error("the idempotency key was already used with a different request")]
    IdempotencyKeyReused,
    /// The document as stored would exceed [`MAX_DOCUMENT_BYTES`] (the database measured it).
    #[error("the stored document would exceed {MAX_DOCUMENT_BYTES} bytes")]
    DocumentTooLarge,
    /// A merge patch would nest the document deeper than [`MAX_JSON_DEPTH`].
    #[error("the document would nest deeper than {MAX_JSON_DEPTH} levels")]
    TooDeep,
    /// This region is not the write region, or its writes are fenced (a switchover): the
    /// database refused the write ([`crate::roles`]); nothing was written.
    #[error("{message}")]
    NotWritable {
        message: String,
        write_region: String,
        write_epoch: i64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<tokio_postgres::Error> for WriteError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e
            .as_db_error()
            .filter(|db| db.code().code() == crate::roles::NOT_WRITABLE)
        {
            return Self::NotWritable {
                message: db.message().to_owned(),
                write_region: db.detail().unwrap_or_default().to_owned(),
                write_epoch: db.hint().and_then(|h| h.parse().ok()).unwrap_or(0),
            };
        }
        let size_check = e.as_db_error().is_some_and(|db| {
            db.code() == &tokio_postgres::error::SqlState::CHECK_VIOLATION
                && db.constraint() == Some(DOCUMENT_SIZE_CONSTRAINT)
        });
        if size_check {
            Self::DocumentTooLarge
        } else {
            Self::Store(e.into())
        }
    }
}

/// The CHECK constraint that holds documents to [`MAX_DOCUMENT_BYTES`] (migration V3).
const DOCUMENT_SIZE_CONSTRAINT: &str = "documents_data_size";

impl From<PoolError> for WriteError {
    fn from(e: PoolError) -> Self {
        Self::Store(e.into())
    }
}

impl From<Refusal> for WriteError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::NotFound => Self::NotFound,
            Refusal::PreconditionFailed { current } => Self::PreconditionFailed { current },
            Refusal::TooDeep => Self::TooDeep,
            Refusal::Invariant(broken) => {
                Self::Store(StoreError::Internal(anyhow::anyhow!(broken)))
            }
        }
    }
}

/// One page of a collection listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub documents: Vec<Document>,
    /// Documents follow the last one of this page.
    pub more: bool,
}

/// The current row, from a `SELECT version, deleted, data` row.
fn current_from_row(row: &tokio_postgres::Row) -> Result<Current, tokio_postgres::Error> {
    let data: Option<Json<Map<String, Value>>> = row.try_get(2)?;
    Ok(Current {
        version: row.try_get(0)?,
        deleted: row.try_get(1)?,
        data: data.map(|Json(d)| d),
    })
}

/// A transaction driven by hand so that `BEGIN` and `COMMIT` can be pipelined with its
/// statements. Dropped unfinished (an error, a cancelled request), it rolls back before its
/// connection returns to the pool.
struct PipelinedTransaction {
    client: Option<deadpool_postgres::Object>,
}

impl PipelinedTransaction {
    fn new(client: deadpool_postgres::Object) -> Self {
        Self {
            client: Some(client),
        }
    }

    fn client(&self) -> &deadpool_postgres::Object {
        self.client
            .as_ref()
            .expect("the connection stays until the transaction ends")
    }

    async fn rollback(mut self) {
        if let Some(client) = self.client.take() {
            if client.batch_execute("ROLLBACK").await.is_err() {
                // Never hand a connection in an unknown state back to the pool.
                drop(deadpool_postgres::Object::take(client));
            }
        }
    }

    /// The transaction ended (its `COMMIT` was answered): the connection can be reused.
    fn finish(mut self) {
        self.client.take();
    }
}

impl Drop for PipelinedTransaction {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if client.batch_execute("ROLLBACK").await.is_err() {
                        drop(deadpool_postgres::Object::take(client));
                    }
                });
            }
            Err(_) => drop(deadpool_postgres::Object::take(client)),
        }
    }
}

/// The row lock every write takes; the document itself (`data`) is loaded only when the write
/// needs it (`$3`: a merge patch), so replacing a large document does not read it.
const SELECT_FOR_UPDATE: &str = "SELECT version, deleted, CASE WHEN $3::boolean THEN data END \
     FROM documents WHERE collection = $1 AND id = $2 FOR UPDATE";
const INSERT_FIRST_VERSION: &str = "INSERT INTO documents \
     (collection, id, version, data, deleted, created_at, updated_at) \
     SELECT $1::text, $2::text, 1, $3::jsonb, false, clock.t, clock.t \
     FROM (SELECT clock_timestamp() AS t) clock \
     ON CONFLICT (collection, id) DO NOTHING RETURNING created_at, updated_at";
const UPDATE_DOCUMENT: &str = "UPDATE documents SET version = $3, data = $4, deleted = $5, \
     updated_at = clock.t, created_at = CASE WHEN $6 THEN clock.t ELSE created_at END \
     FROM (SELECT clock_timestamp() AS t) clock \
     WHERE collection = $1 AND id = $2 RETURNING created_at, updated_at";
/// Version 1 and its outbox row in one statement, for the pipelined path: nothing (no row
/// returned) when the document exists already (a concurrent creator). The payload (the
/// document's state, as the general path's [`Document`] serialises it) is built from the row
/// written, so the document travels and is parsed once; its times are written in UTC (`Z`, ISO 8601 as `to_jsonb` writes a timestamp)
/// whatever the session's `TimeZone`, as Rust writes them.
const INSERT_AND_QUEUE: &str = "WITH inserted AS ( \
       INSERT INTO documents (collection, id, version, data, deleted, created_at, updated_at) \
       SELECT $1::text, $2::text, 1, $3::jsonb, false, clock.t, clock.t \
       FROM (SELECT clock_timestamp() AS t) clock \
       ON CONFLICT (collection, id) DO NOTHING RETURNING data, created_at, updated_at), \
     queued AS ( \
       INSERT INTO outbox (event_id, collection, document_id, version, operation, payload, traceparent) \
       SELECT $4::uuid, $1, $2, 1, 'upsert', jsonb_build_object('collection', $1::text, \
           'id', $2::text, 'version', 1, 'data', i.data, 'created_at', ((to_jsonb(i.created_at AT TIME ZONE 'UTC') #>> '{}') || 'Z'), \
           'updated_at', ((to_jsonb(i.updated_at AT TIME ZONE 'UTC') #>> '{}') || 'Z')), $5::text \
       FROM inserted i RETURNING 1) \
     SELECT i.created_at, i.updated_at FROM inserted i CROSS JOIN queued";
/// The update and its outbox row in one statement, for the pipelined path
/// ([`Store::write_pipelined`]); the payload is built from the row written, as above (a
/// tombstone's, like [`Tombstone`], has no `data` or `created_at`). The `version = $3 - 1` guard
/// makes it a no-op (no row returned) should the row not be the one locked.
const UPDATE_AND_QUEUE: &str = "WITH updated AS ( \
       UPDATE documents SET version = $3::bigint, data = $4::jsonb, deleted = $5::boolean, \
         updated_at = clock.t, \
         created_at = CASE WHEN $6::boolean THEN clock.t ELSE created_at END \
       FROM (SELECT clock_timestamp() AS t) clock \
       WHERE collection = $1::text AND id = $2::text AND version = $3::bigint - 1 \
       RETURNING data, deleted, created_at, updated_at), \
     queued AS ( \
       INSERT INTO outbox (event_id, collection, document_id, version, operation, payload, traceparent) \
       SELECT $7::uuid, $1, $2, $3, $8::text, CASE WHEN u.deleted \
           THEN jsonb_build_object('collection', $1::text, 'id', $2::text, 'version', $3::bigint, \
             'deleted', true, 'updated_at', ((to_jsonb(u.updated_at AT TIME ZONE 'UTC') #>> '{}') || 'Z')) \
           ELSE jsonb_build_object('collection', $1::text, 'id', $2::text, 'version', $3::bigint, \
             'data', u.data, 'created_at', ((to_jsonb(u.created_at AT TIME ZONE 'UTC') #>> '{}') || 'Z'), \
             'updated_at', ((to_jsonb(u.updated_at AT TIME ZONE 'UTC') #>> '{}') || 'Z')) END, $9::text \
       FROM updated u RETURNING 1) \
     SELECT u.created_at, u.updated_at FROM updated u CROSS JOIN queued";
const INSERT_OUTBOX: &str = "INSERT INTO outbox \
     (event_id, collection, document_id, version, operation, payload, traceparent) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";
const CLAIM_IDEMPOTENCY_KEY: &str = "INSERT INTO idempotency_keys \
     (principal, key, fingerprint, expires_at) \
     VALUES ($1, $2, $3, now() + make_interval(secs => $4)) \
     ON CONFLICT (principal, key) DO UPDATE \
       SET fingerprint = EXCLUDED.fingerprint, outcome = NULL, created_at = now(), \
           expires_at = EXCLUDED.expires_at \
       WHERE idempotency_keys.expires_at < now() \
     RETURNING 1";
const READ_IDEMPOTENCY_KEY: &str =
    "SELECT fingerprint, outcome FROM idempotency_keys WHERE principal = $1 AND key = $2";
const RECORD_IDEMPOTENCY_OUTCOME: &str =
    "UPDATE idempotency_keys SET outcome = $3 WHERE principal = $1 AND key = $2";
const SELECT_VERSION: &str = "SELECT version FROM documents WHERE collection = $1 AND id = $2";
const SELECT_DOCUMENT: &str = "SELECT version, deleted, data, created_at, updated_at \
     FROM documents WHERE collection = $1 AND id = $2";
/// A page of live documents in id order, budgeted by bytes: rows come while the stored sizes
/// (plus [`LIST_ITEM_OVERHEAD`] each for the metadata) add up to at most `$4`; the first row
/// always comes, and so does the first row past the budget, without its data, to say there
/// is more.
const LIST_DOCUMENTS: &str = "SELECT id, version, CASE WHEN fits THEN data END, created_at, \
       updated_at, fits FROM ( \
       SELECT id, version, data, created_at, updated_at, \
         running <= $4 OR running = own AS fits, running - own AS before \
       FROM ( \
         SELECT id, version, data, created_at, updated_at, data_bytes + $5 AS own, \
           sum(data_bytes + $5) OVER (ORDER BY id) AS running \
         FROM documents WHERE collection = $1 AND id > $2 AND NOT deleted \
         ORDER BY id LIMIT $3) sized) page \
     WHERE before <= $4 ORDER BY id";
/// What one list item adds to its document's size in a page (collection, id, version and
/// timestamps), counted against the page's byte budget.
const LIST_ITEM_OVERHEAD: i32 = 400;

/// Document storage over a connection pool.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// Readiness probes' own connection ([`crate::db::connect_probe`]); the request pool when
    /// none is set.
    probe: Option<Pool>,
    /// Wakes the relay after each committed write (the Write API's store).
    wake: Option<RelayWake>,
}

impl Store {
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            probe: None,
            wake: None,
        }
    }

    /// Wakes the relay after every committed write ([`RelayWake`], notifications sent over
    /// this store's pool). Needs a Tokio runtime.
    pub fn with_relay_wake(mut self) -> Self {
        self.wake = Some(RelayWake::spawn(self.pool.clone()));
        self
    }

    fn committed(&self) {
        if let Some(wake) = &self.wake {
            wake.wake();
        }
    }

    /// Probes readiness on `probe` instead of the request pool.
    pub fn with_probe(mut self, probe: Pool) -> Self {
        self.probe = Some(probe);
        self
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Checks that the database answers (for `/readyz`), on the probe connection.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.probe.as_ref().unwrap_or(&self.pool).get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Applies one write atomically: document row + one outbox row (+ idempotency record).
    /// Its span is the write's database transaction in a trace.
    #[tracing::instrument(
        name = "transaction",
        skip_all,
        fields(
            otel.kind = "client",
            db.system.name = "postgresql",
            collection = %request.key.collection,
            id = %request.key.id,
        )
    )]
    pub async fn write(&self, request: WriteRequest) -> Result<WriteResult, WriteError> {
        if request.idempotency.is_none() {
            if let Some(outcome) = self.write_pipelined(&request).await? {
                self.committed();
                return Ok(WriteResult::Applied(outcome));
            }
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;

        if let Some(idem) = &request.idempotency {
            if let Some(previous) = claim_idempotency_key(&tx, idem).await? {
                // The transaction only read; dropping it rolls back.
                return previous.map(WriteResult::Replayed);
            }
        }

        let outcome = apply_command(&tx, &request).await?;

        let payload = match &outcome.document {
            Some(document) => serde_json::to_value(document),
            None => serde_json::to_value(Tombstone {
                collection: outcome.collection.clone(),
                id: outcome.id.clone(),
                version: outcome.version,
                deleted: true,
                updated_at: outcome.committed_at,
            }),
        }
        .map_err(|e| StoreError::Internal(e.into()))?;
        let operation = if outcome.document.is_some() {
            "upsert"
        } else {
            "delete"
        };
        let stmt = tx.prepare_cached(INSERT_OUTBOX).await?;
        tx.execute(
            &stmt,
            &[
                &outcome.event_id,
                &outcome.collection.as_str(),
                &outcome.id.as_str(),
                &outcome.version,
                &operation,
                &payload,
                &request.traceparent.as_str(),
            ],
        )
        .await?;

        if let Some(idem) = &request.idempotency {
            let stmt = tx.prepare_cached(RECORD_IDEMPOTENCY_OUTCOME).await?;
            tx.execute(&stmt, &[&idem.principal, &idem.key, &Json(&outcome)])
                .await?;
        }

        tx.commit().await?;
        self.committed();
        Ok(WriteResult::Applied(outcome))
    }

    /// A write without an `Idempotency-Key` in two round trips instead of five: `BEGIN`
    /// travels with the row lock, and the change, its outbox row (one statement) and `COMMIT`
    /// travel together. The rules are the general path's ([`plan_change`]); if the statement
    /// fails, PostgreSQL answers the pipelined `COMMIT` with a rollback, so nothing is
    /// half-written. `None` (nothing written) when a concurrent writer created the document
    /// first: the general path then retries it as an update.
    async fn write_pipelined(
        &self,
        request: &WriteRequest,
    ) -> Result<Option<WriteOutcome>, WriteError> {
        let client = self.pool.get().await?;
        let lock = client.prepare_cached(SELECT_FOR_UPDATE).await?;
        let tx = PipelinedTransaction::new(client);
        let key = &request.key;
        let (collection, id) = (key.collection.as_str(), key.id.as_str());
        let needs_data = matches!(request.command, WriteCommand::Patch(_));
        let lock_params: [&(dyn ToSql + Sync); 3] = [&collection, &id, &needs_data];
        // `biased`: polled in this order, so the requests go out in this order.
        let (begun, row) = tokio::join!(
            biased;
            tx.client().batch_execute("BEGIN"),
            tx.client().query_opt(&lock, &lock_params),
        );
        begun?;
        let planned = match row? {
            Some(row) => plan_change(request, &current_from_row(&row)?),
            None => plan_creation(request),
        };
        let change = match planned {
            Ok(change) => change,
            Err(refusal) => {
                tx.rollback().await;
                return Err(refusal.into());
            }
        };
        let statement = if change.version == 1 {
            INSERT_AND_QUEUE
        } else {
            UPDATE_AND_QUEUE
        };
        let statement = match tx.client().prepare_cached(statement).await {
            Ok(statement) => statement,
            Err(e) => {
                tx.rollback().await;
                return Err(StoreError::from(e).into());
            }
        };
        let event_id = Uuid::now_v7();
        let data = change.data.as_ref().map(Json);
        let deleted = change.data.is_none();
        let operation = change.operation();
        let traceparent = request.traceparent.as_str();
        let update_params: [&(dyn ToSql + Sync); 9] = [
            &collection,
            &id,
            &change.version,
            &data,
            &deleted,
            &change.recreated,
            &event_id,
            &operation,
            &traceparent,
        ];
        let insert_params: [&(dyn ToSql + Sync); 5] =
            [&collection, &id, &data, &event_id, &traceparent];
        let params: &[&(dyn ToSql + Sync)] = if change.version == 1 {
            &insert_params
        } else {
            &update_params
        };
        let (written, committed) = tokio::join!(
            biased;
            tx.client().query_opt(&statement, params),
            tx.client().batch_execute("COMMIT"),
        );
        // The transaction is over either way (committed, or rolled back by that COMMIT).
        tx.finish();
        let row = match (written, committed) {
            (Ok(Some(row)), Ok(())) => row,
            (Err(e), _) | (Ok(_), Err(e)) => return Err(e.into()),
            // Created concurrently (the insert found the row there): nothing was written.
            (Ok(None), Ok(())) if change.version == 1 => return Ok(None),
            (Ok(None), Ok(())) => {
                return Err(StoreError::Internal(anyhow::anyhow!(
                    "the locked row was not at the version read under its lock"
                ))
                .into());
            }
        };
        let created_at: OffsetDateTime = row.try_get(0)?;
        let updated_at: OffsetDateTime = row.try_get(1)?;
        Ok(Some(change.outcome(key, event_id, created_at, updated_at)))
    }

    /// The stored version of a document (live or tombstone), without reading the document.
    pub async fn version(&self, key: &DocumentKey) -> Result<Option<i64>, StoreError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(SELECT_VERSION).await?;
        let row = client
            .query_opt(&stmt, &[&key.collection.as_str(), &key.id.as_str()])
            .await?;
        Ok(row.map(|row| row.try_get(0)).transpose()?)
    }

    /// Reads one document, live or tombstone.
    pub async fn get(&self, key: &DocumentKey) -> Result<Option<Stored>, StoreError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(SELECT_DOCUMENT).await?;
        let row = client
            .query_opt(&stmt, &[&key.collection.as_str(), &key.id.as_str()])
            .await?;
        let Some(row) = row else { return Ok(None) };
        let version: i64 = row.try_get(0)?;
        if row.try_get::<_, bool>(1)? {
            return Ok(Some(Stored::Deleted { version }));
        }
        let Json(data): Json<Map<String, Value>> = row.try_get(2)?;
        Ok(Some(Stored::Live(Document {
            collection: key.collection.clone(),
            id: key.id.clone(),
            version,
            data,
            created_at: row.try_get(3)?,
            updated_at: row.try_get(4)?,
        })))
    }

    /// Lists live documents of a collection in id order, starting after `after`: at most
    /// `limit`, and no more than [`LIST_PAGE_BYTES`] of them (one always). `more` says whether
    /// documents follow.
    pub async fn list(
        &self,
        collection: &Collection,
        after: Option<&DocumentId>,
        limit: u32,
    ) -> Result<Page, StoreError> {
        self.list_within(collection, after, limit, LIST_PAGE_BYTES)
            .await
    }

    /// [`Self::list`] with an explicit byte budget.
    pub async fn list_within(
        &self,
        collection: &Collection,
        after: Option<&DocumentId>,
        limit: u32,
        budget: usize,
    ) -> Result<Page, StoreError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(LIST_DOCUMENTS).await?;
        let budget = i64::try_from(budget).unwrap_or(i64::MAX);
        let rows = client
            .query(
                &stmt,
                &[
                    &collection.as_str(),
                    &after.map_or("", |a| a.as_str()),
                    &(i64::from(limit) + 1),
                    &budget,
                    &LIST_ITEM_OVERHEAD,
                ],
            )
            .await?;
        let mut documents = Vec::with_capacity(rows.len());
        let mut more = false;
        for row in &rows {
            let fits: bool = row.try_get(5)?;
            if !fits || documents.len() == limit as usize {
                more = true;
                break;
            }
            let id: String = row.try_get(0)?;
            let Json(data): Json<Map<String, Value>> = row.try_get(2)?;
            documents.push(Document {
                collection: collection.clone(),
                id: DocumentId::parse(&id).map_err(|e| StoreError::Internal(e.into()))?,
                version: row.try_get(1)?,
                data,
                created_at: row.try_get(3)?,
                updated_at: row.try_get(4)?,
            });
        }
        Ok(Page { documents, more })
    }
}

/// Claims the key for this transaction. `Ok(None)`: claimed, go ahead. `Ok(Some(..))`: the key
/// was used before: the previous outcome, or an error when the request differs. A concurrent
/// request with the same key blocks on the unique index until the first one commits.
async fn claim_idempotency_key(
    tx: &Transaction<'_>,
    idem: &Idempotency,
) -> Result<Option<Result<WriteOutcome, WriteError>>, WriteError> {
    let stmt = tx.prepare_cached(CLAIM_IDEMPOTENCY_KEY).await?;
    let fingerprint = idem.fingerprint.as_slice();
    let claimed = tx
        .query_opt(
            &stmt,
            &[
                &idem.principal,
                &idem.key,
                &fingerprint,
                &(IDEMPOTENCY_TTL_SECONDS as f64),
            ],
        )
        .await?;
    if claimed.is_some() {
        return Ok(None);
    }
    let stmt = tx.prepare_cached(READ_IDEMPOTENCY_KEY).await?;
    let row = tx.query_one(&stmt, &[&idem.principal, &idem.key]).await?;
    let stored: Vec<u8> = row.try_get(0)?;
    if stored != fingerprint {
        return Ok(Some(Err(WriteError::IdempotencyKeyReused)));
    }
    let outcome: Option<Json<WriteOutcome>> = row.try_get(1)?;
    match outcome {
        Some(Json(outcome)) => Ok(Some(Ok(outcome))),
        None => Err(StoreError::Internal(anyhow::anyhow!(
            "idempotency key committed without an outcome"
        ))
        .into()),
    }
}

async fn lock_current(
    tx: &Transaction<'_>,
    key: &DocumentKey,
    needs_data: bool,
) -> Result<Option<Current>, WriteError> {
    let stmt = tx.prepare_cached(SELECT_FOR_UPDATE).await?;
    let row = tx
        .query_opt(
            &stmt,
            &[&key.collection.as_str(), &key.id.as_str(), &needs_data],
        )
        .await?;
    Ok(row.as_ref().map(current_from_row).transpose()?)
}

/// Inserts version 1 unless a concurrent writer created the row first (`None` then).
async fn insert_first_version(
    tx: &Transaction<'_>,
    key: &DocumentKey,
    data: Map<String, Value>,
) -> Result<Option<Document>, WriteError> {
    let stmt = tx.prepare_cached(INSERT_FIRST_VERSION).await?;
    let row = tx
        .query_opt(
            &stmt,
            &[&key.collection.as_str(), &key.id.as_str(), &Json(&data)],
        )
        .await?;
    row.map(|row| {
        Ok(Document {
            collection: key.collection.clone(),
            id: key.id.clone(),
            version: 1,
            data,
            created_at: row.try_get(0)?,
            updated_at: row.try_get(1)?,
        })
    })
    .transpose()
}

async fn apply_command(
    tx: &Transaction<'_>,
    request: &WriteRequest,
) -> Result<WriteOutcome, WriteError> {
    let key = &request.key;
    let outcome = |document: Option<Document>, version: i64, created: bool, at: OffsetDateTime| {
        WriteOutcome {
            collection: key.collection.clone(),
            id: key.id.clone(),
            version,
            created,
            document,
            event_id: Uuid::now_v7(),
            committed_at: at,
        }
    };

    let needs_data = matches!(request.command, WriteCommand::Patch(_));
    let mut current = lock_current(tx, key, needs_data).await?;

    if current.is_none() {
        // A creation always carries the document.
        let data = plan_creation(request)?.data.unwrap_or_default();
        match insert_first_version(tx, key, data).await? {
            Some(document) => {
                let at = document.updated_at;
                return Ok(outcome(Some(document), 1, true, at));
            }
            // Lost a race with a concurrent creator: its row is committed now, so lock it and
            // continue as an update (preconditions are re-evaluated against it below).
            None => current = lock_current(tx, key, needs_data).await?,
        }
    }

    let Some(current) = current else {
        return Err(
            StoreError::Internal(anyhow::anyhow!("document vanished under its lock")).into(),
        );
    };
    let change = plan_change(request, &current)?;
    let stmt = tx.prepare_cached(UPDATE_DOCUMENT).await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &key.collection.as_str(),
                &key.id.as_str(),
                &change.version,
                &change.data.as_ref().map(Json),
                &change.data.is_none(),
                &change.recreated,
            ],
        )
        .await?;
    let created_at: OffsetDateTime = row.try_get(0)?;
    let updated_at: OffsetDateTime = row.try_get(1)?;
    Ok(change.outcome(key, Uuid::now_v7(), created_at, updated_at))
}

/// What [`repair`] did (or, on a dry run, would do) for one document.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum RepairAction {
    /// Region 1's current state was enqueued as a repair event.
    Reemitted {
        version: i64,
        deleted: bool,
        replaces: Option<i64>,
        event_id: Option<Uuid>,
    },
    /// Region 1 has no such document: a purge of Region 2's row at `replaces` was enqueued.
    Purge {
        replaces: i64,
        event_id: Option<Uuid>,
    },
    /// Neither region has the document (any more): nothing to do.
    Nothing,
}

/// Lock the document's row; the state a repair re-emits is read under this lock.
const SELECT_FOR_REPAIR: &str = "SELECT version, deleted, data, created_at, updated_at \
     FROM documents WHERE collection = $1 AND id = $2 FOR UPDATE";
/// A placeholder for a document Region 1 does not have: inserting it takes the unique-index
/// entry a create of the same key takes, so a concurrent create waits for this transaction
/// (which deletes the placeholder before it commits) and its outbox row follows the purge's.
const INSERT_PLACEHOLDER: &str = "INSERT INTO documents \
     (collection, id, version, data, deleted, created_at, updated_at) \
     VALUES ($1, $2, 1, NULL, true, clock_timestamp(), clock_timestamp()) \
     ON CONFLICT (collection, id) DO NOTHING RETURNING 1";
const DELETE_PLACEHOLDER: &str = "DELETE FROM documents WHERE collection = $1 AND id = $2";

/// Repairs one document verify found different: enqueues, through the outbox like any
/// write, Region 1's current state as a repair event ([`tandem_core::event::Repair`]) with
/// `region2_version` (Region 2's version as verify saw it) as what it replaces; or, when Region
/// 1 has no such document, a purge of Region 2's row at that version. Never writes Region 2.
/// With `dry_run`, only reads (no lock, no outbox row) and says what it would do.
///
/// A purge cannot race a create of the same document: the transaction holds the key with a
/// placeholder row (deleted before commit, never visible), so a create waits and is enqueued
/// after the purge; and if a create committed first, its state is re-emitted instead.
/// Region 1 never removes a document's row (a delete leaves a tombstone), so a purge is the
/// first event of its document in the stream.
pub async fn repair(
    pool: &Pool,
    key: &DocumentKey,
    region2_version: Option<i64>,
    dry_run: bool,
) -> Result<RepairAction, StoreError> {
    use tandem_core::event::{DocumentState, Repair};

    let (collection, id) = (key.collection.as_str(), key.id.as_str());
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let lock = if dry_run {
        SELECT_DOCUMENT
    } else {
        SELECT_FOR_REPAIR
    };
    let mut row = tx.query_opt(lock, &[&collection, &id]).await?;
    if row.is_none() {
        if dry_run {
            return Ok(match region2_version {
                Some(replaces) => RepairAction::Purge {
                    replaces,
                    event_id: None,
                },
                None => RepairAction::Nothing,
            });
        }
        if tx
            .query_opt(INSERT_PLACEHOLDER, &[&collection, &id])
            .await?
            .is_some()
        {
            tx.execute(DELETE_PLACEHOLDER, &[&collection, &id]).await?;
            let Some(replaces) = region2_version else {
                tx.commit().await?;
                return Ok(RepairAction::Nothing);
            };
            let event_id = Uuid::now_v7();
            let payload = DocumentState {
                collection: key.collection.clone(),
                id: key.id.clone(),
                version: replaces,
                deleted: true,
                data: None,
                created_at: None,
                updated_at: OffsetDateTime::now_utc(),
                repair: Some(Repair {
                    replaces: Some(replaces),
                    purge: true,
                }),
            };
            enqueue_repair(&tx, event_id, &payload).await?;
            tx.commit().await?;
            return Ok(RepairAction::Purge {
                replaces,
                event_id: Some(event_id),
            });
        }
        // Created concurrently (committed while the placeholder waited): re-emit that.
        row = tx.query_opt(SELECT_FOR_REPAIR, &[&collection, &id]).await?;
    }
    let Some(row) = row else {
        return Err(StoreError::Internal(anyhow::anyhow!(
            "document {collection}/{id} conflicted on insert but cannot be read"
        )));
    };
    let version: i64 = row.try_get(0)?;
    let deleted: bool = row.try_get(1)?;
    let data: Option<Json<Map<String, Value>>> = row.try_get(2)?;
    let payload = DocumentState {
        collection: key.collection.clone(),
        id: key.id.clone(),
        version,
        deleted,
        data: data.map(|Json(d)| d),
        created_at: if deleted { None } else { row.try_get(3)? },
        updated_at: row.try_get(4)?,
        repair: Some(Repair {
            replaces: region2_version,
            purge: false,
        }),
    };
    let event_id = if dry_run {
        None
    } else {
        let event_id = Uuid::now_v7();
        enqueue_repair(&tx, event_id, &payload).await?;
        tx.commit().await?;
        Some(event_id)
    };
    Ok(RepairAction::Reemitted {
        version,
        deleted,
        replaces: region2_version,
        event_id,
    })
}

/// The repair event's outbox row, in the repair's transaction.
async fn enqueue_repair(
    tx: &Transaction<'_>,
    event_id: Uuid,
    state: &tandem_core::event::DocumentState,
) -> Result<(), StoreError> {
    let payload = serde_json::to_value(state).map_err(|e| StoreError::Internal(e.into()))?;
    let operation = if state.deleted { "delete" } else { "upsert" };
    let stmt = tx.prepare_cached(INSERT_OUTBOX).await?;
    tx.execute(
        &stmt,
        &[
            &event_id,
            &state.collection.as_str(),
            &state.id.as_str(),
            &state.version,
            &operation,
            &payload,
            &None::<&str>,
        ],
    )
    .await?;
    Ok(())
}

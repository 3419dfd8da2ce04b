//! Applying Kafka records to Region 2, a batch at a time: one transaction per batch (the
//! effects, the event ids, the heartbeats and the positions), the cache update after the
//! commit, the dead-letter path and the retry policy. The consumer pod and the Lambda function
//! both apply through it. The SQL it runs is `tandem_store::replica`'s.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
#[cfg(feature = "rdkafka")]
use rdkafka::message::{Headers, Message};
use tandem_core::document::{DocumentKey, Stored};
use tandem_core::event::{
    ChangeEvent, EventHeaders, HEADER_SCHEMA, Heartbeat, PoisonReason, Schema,
};
use tandem_runtime::shutdown::CancellationToken;
use tandem_store::cache::{Cache, CacheError, Entry};
use tandem_store::documents::StoreError;
use tandem_store::leader::Fence;
use tandem_store::replica::{
    self, ApplyTx, DeadLetter, EventColumns, Planned, Position, Quarantined, StatesApplied,
};
use time::OffsetDateTime;

use crate::metrics::ConsumerMetrics;

pub use tandem_store::replica::{APPLIED_EVENTS_RETENTION_DAYS, Proof};

/// How many times an event that fails alone for a non-transient reason is tried before it is
/// dead-lettered.
pub const INTERNAL_ATTEMPTS: u32 = 5;

/// What [`Applier::apply_batch_or_stop`] did with a batch.
#[derive(Debug, Default)]
pub struct Applied {
    /// How many messages had each outcome ([`Outcome::label`]), among those applied.
    pub outcomes: BTreeMap<&'static str, usize>,
    /// Where the batch stopped, when it did.
    pub stopped: Option<Stopped>,
}

impl Applied {
    fn count(&mut self, outcome: &Outcome) {
        *self.outcomes.entry(outcome.label()).or_default() += 1;
    }
}

/// Why a batch stopped before its end.
#[derive(Debug, Clone)]
pub struct Stopped {
    /// The index (in the batch) of the first message not applied: it and every later message
    /// are unapplied, every earlier one is committed.
    pub first_unapplied: usize,
    pub cause: String,
    /// Stopped at an event of a newer schema version ([`newer_schema`]), not by a failure.
    pub held_back: bool,
}

/// A storage error with its cause, for logs and reports.
fn describe(error: &StoreError) -> String {
    match error {
        StoreError::Unavailable(cause) | StoreError::Internal(cause) => {
            format!("{error}: {cause:#}")
        }
        StoreError::Fenced { .. } => error.to_string(),
    }
}

/// A message as received, detached from the Kafka client: every byte kept as it came, so a
/// dead letter can always be written, whatever a foreign producer sent.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<KafkaHeader>,
    /// Why the record could not even be read as bytes (a Lambda Kafka event whose base64 does
    /// not decode; `key` and `payload` then hold the text as it came): poison, dead-lettered
    /// with this reason. `None` for every record read from Kafka directly.
    pub unreadable: Option<String>,
}

impl Incoming {
    /// Detaches a received message.
    #[cfg(feature = "rdkafka")]
    pub fn from_message<M: Message>(message: &M) -> Self {
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: read_headers(message),
            unreadable: None,
        }
    }

    /// The bytes this message holds, for the batch's byte budget.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|h| {
                    h.name.as_ref().map_or(0, String::len) + h.value.as_ref().map_or(0, Vec::len)
                })
                .sum::<usize>()
    }

    /// The proof of this record at a resumed position: SHA-256 over the key's length and
    /// bytes, then the payload.
    pub fn record_hash(&self) -> Vec<u8> {
        record_hash(self.key.as_deref(), &self.payload)
    }

    /// The message as a dead letter, byte for byte.
    fn dead_letter<'a>(&'a self, reason: &'a str) -> DeadLetter<'a> {
        DeadLetter {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key.as_deref(),
            payload: &self.payload,
            header_names: self.headers.iter().map(|h| h.name.as_deref()).collect(),
            header_values: self.headers.iter().map(|h| h.value.as_deref()).collect(),
            reason,
        }
    }

    /// Why the headers alone make this message poison, if they do.
    fn header_problem(&self) -> Option<String> {
        let unreadable = self.headers.iter().filter(|h| h.name.is_none()).count();
        (unreadable > 0)
            .then(|| format!("{unreadable} header name(s) are not valid UTF-8 (stored as NULL)"))
    }
}

/// The SHA-256 that proves which record sits at a position (see [`Incoming::record_hash`]).
pub fn record_hash(key: Option<&[u8]>, payload: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    match key {
        Some(key) => {
            hasher.update((key.len() as u64).to_be_bytes());
            hasher.update(key);
        }
        None => hasher.update(u64::MAX.to_be_bytes()),
    }
    hasher.update(payload);
    hasher.finalize().to_vec()
}

/// One Kafka header. `name` is `None` when the producer sent a name that is not UTF-8: the
/// Kafka client cannot read such a name (nor its value) and would panic trying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaHeader {
    pub name: Option<String>,
    pub value: Option<Vec<u8>>,
}

/// A received message, decoded.
enum Decoded {
    Change(Box<ChangeEvent>),
    Heartbeat(Heartbeat),
    Poison(String),
    /// Held back, unapplied and not dead-lettered: an event of a newer schema version, or any
    /// later message of its partition (see [`Outcome::HeldBack`]).
    Held(u32),
}

impl Decoded {
    fn of(incoming: &Incoming) -> Self {
        if let Some(problem) = &incoming.unreadable {
            return Self::Poison(problem.clone());
        }
        if let Some(problem) = incoming.header_problem() {
            return Self::Poison(format!("invalid headers: {problem}"));
        }
        let headers = event_headers(&incoming.headers);
        if headers.is_heartbeat() {
            return match Heartbeat::decode(&incoming.payload) {
                Ok(heartbeat) => Self::Heartbeat(heartbeat),
                Err(e) => Self::Poison(e.to_string()),
            };
        }
        let header_version = match headers.schema() {
            Schema::Newer(version) => return Self::Held(version),
            Schema::Invalid(problem) => return Self::Poison(format!("invalid headers: {problem}")),
            Schema::Known(version) => headers.schema.is_some().then_some(version),
        };
        match ChangeEvent::decode(&incoming.payload) {
            Ok(event) => match header_version {
                Some(version) if version != event.schema_version() => Self::Poison(format!(
                    "invalid event: the {HEADER_SCHEMA} header says version {version}, the event {}",
                    event.schema_version()
                )),
                _ => Self::Change(Box::new(event)),
            },
            // The header decides what is held back (a check that needs no parsing, see
            // [`newer_schema`]): a newer event without it did not come from a Tandem relay.
            Err(PoisonReason::NewerSchema(version)) => Self::Poison(format!(
                "invalid event: schema version {version} without a {HEADER_SCHEMA} header"
            )),
            Err(e) => Self::Poison(e.to_string()),
        }
    }

    /// Decodes a batch; from the first message of a newer schema version on, every message
    /// of its partition is held back (applying a later one would skip it).
    fn batch(batch: &[Incoming]) -> Vec<Self> {
        let mut held: HashMap<i32, u32> = HashMap::new();
        batch
            .iter()
            .map(|incoming| {
                if let Some(version) = held.get(&incoming.partition) {
                    return Self::Held(*version);
                }
                let decoded = Self::of(incoming);
                if let Self::Held(version) = decoded {
                    held.insert(incoming.partition, version);
                }
                decoded
            })
            .collect()
    }

    /// The event id recorded with the position, for the resume proof.
    fn id(&self) -> Option<uuid::Uuid> {
        match self {
            Self::Change(event) => Some(event.id),
            Self::Heartbeat(heartbeat) => Some(heartbeat.id),
            Self::Poison(_) | Self::Held(_) => None,
        }
    }
}

/// The schema version a message's `tandem-schema` header names when it is newer than this
/// consumer reads: such an event is held back, never applied or dead-lettered.
pub fn newer_schema(incoming: &Incoming) -> Option<u32> {
    match event_headers(&incoming.headers).schema() {
        Schema::Newer(version) => Some(version),
        _ => None,
    }
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
    /// A relay heartbeat, recorded for the lag.
    Heartbeat,
    /// Not applied, not dead-lettered, the partition's position left before it: an event of a
    /// schema version newer than this consumer reads (a relay upgraded before its consumers),
    /// or a later message of the same partition. The partition waits for an upgraded consumer.
    HeldBack(u32),
    /// Not applied: an event of a write epoch older than this region records (the deposed
    /// write region's lost tail), kept in `quarantined_events`.
    Quarantined,
}

impl Outcome {
    /// The outcome's name in metrics and reports.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Stale => "stale",
            Self::Duplicate => "duplicate",
            Self::DeadLettered(_) => "dead_lettered",
            Self::Heartbeat => "heartbeat",
            Self::HeldBack(_) => "held_back",
            Self::Quarantined => "quarantined",
        }
    }
}

/// Applies events; cheap to clone.
#[derive(Clone)]
pub struct Applier {
    pub pool: Pool,
    pub cache: Cache,
    pub metrics: Arc<ConsumerMetrics>,
    /// The elected leader's epoch, checked by every apply transaction; `None` outside a
    /// leadership term (the `redrive` command).
    fence: Arc<std::sync::Mutex<Option<Fence>>>,
    /// Set with [`Self::with_deferred_progress`]: the newest event time applied since the last
    /// [`Self::record_heartbeat`], which records it instead of each apply transaction.
    deferred_progress: Option<Arc<std::sync::Mutex<Option<OffsetDateTime>>>>,
}

impl Applier {
    pub fn new(pool: Pool, cache: Cache, metrics: Arc<ConsumerMetrics>) -> Self {
        Self {
            pool,
            cache,
            metrics,
            fence: Arc::default(),
            deferred_progress: None,
        }
    }

    /// Leaves `replication_status`'s progress (the newest event time applied, when) to
    /// [`Self::record_heartbeat`], once a second, instead of every apply transaction. For
    /// transactions that run side by side (the consumer's lanes): that table is one row, and
    /// updating it in each would make them wait for each other's commit.
    pub fn with_deferred_progress(mut self) -> Self {
        self.deferred_progress = Some(Arc::default());
        self
    }

    /// Fences this term's transactions with its epoch (`None`: unfenced).
    pub fn set_fence(&self, fence: Option<Fence>) {
        if let Ok(mut slot) = self.fence.lock() {
            *slot = fence;
        }
    }

    fn fence(&self) -> Option<Fence> {
        self.fence.lock().ok().and_then(|f| *f)
    }

    /// `(partition, next_offset, proof of the record before it)` per partition.
    pub async fn stored_positions(&self, topic: &str) -> anyhow::Result<Vec<(i32, i64, Proof)>> {
        Ok(replica::stored_positions(&self.pool, topic).await?)
    }

    /// Forgets the stored position of a partition found recreated: until the re-read from its
    /// beginning has applied something, a restart reads it from the beginning too (the
    /// position stored last may name a record of the new partition, past records never read).
    pub async fn forget_position(&self, topic: &str, partition: i32) -> anyhow::Result<()> {
        Ok(replica::forget_position(&self.pool, topic, partition).await?)
    }

    /// Applies a batch of messages, in order; retries while the database is unavailable
    /// (nothing is skipped). A batch that fails for another reason committed nothing: it is
    /// split in halves, applied first half first, until the event that fails is alone, so it is
    /// dead-lettered by itself ([`Self::apply_with_retry`]) and the rest still land in batches.
    pub async fn apply_batch_with_retry(
        &self,
        batch: &[Incoming],
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut pending = vec![batch];
        while let Some(part) = pending.pop() {
            if let [incoming] = part {
                self.apply_with_retry(incoming, shutdown).await?;
                continue;
            }
            let mut backoff = Duration::from_millis(50);
            loop {
                match self.apply_batch(part).await {
                    Ok(outcomes) => {
                        self.metrics.batch_size.observe(part.len() as f64);
                        for (incoming, outcome) in part.iter().zip(&outcomes) {
                            self.report(incoming, outcome);
                        }
                        break;
                    }
                    Err(StoreError::Unavailable(cause)) => {
                        tracing::warn!(
                            error = format!("{cause:#}"),
                            "database unavailable; retrying the batch"
                        );
                    }
                    Err(StoreError::Fenced { epoch }) => {
                        anyhow::bail!("fenced: epoch {epoch} was superseded by a new leader")
                    }
                    Err(StoreError::Internal(cause)) => {
                        tracing::warn!(
                            error = format!("{cause:#}"),
                            events = part.len(),
                            "failed to apply a batch; splitting it to find the event that fails"
                        );
                        let (first, second) = part.split_at(part.len() / 2);
                        pending.push(second);
                        pending.push(first);
                        break;
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => anyhow::bail!("shutting down before the batch was applied"),
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        Ok(())
    }

    /// Applies one message; retries while the database is unavailable (nothing is skipped),
    /// and dead-letters a message that keeps failing for a non-transient reason.
    pub async fn apply_with_retry(
        &self,
        incoming: &Incoming,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(50);
        let mut internal_failures = 0;
        loop {
            let error = match self.apply_batch(std::slice::from_ref(incoming)).await {
                Ok(outcomes) => {
                    self.metrics.batch_size.observe(1.0);
                    if let Some(outcome) = outcomes.first() {
                        self.report(incoming, outcome);
                    }
                    return Ok(());
                }
                Err(error) => error,
            };
            match &error {
                StoreError::Fenced { epoch } => {
                    anyhow::bail!("fenced: epoch {epoch} was superseded by a new leader")
                }
                StoreError::Internal(cause) => {
                    internal_failures += 1;
                    tracing::error!(
                        error = format!("{cause:#}"),
                        offset = incoming.offset,
                        attempt = internal_failures,
                        "failed to apply an event"
                    );
                    if internal_failures >= INTERNAL_ATTEMPTS {
                        let reason = format!("could not be applied: {cause:#}");
                        match self.dead_letter(incoming, &reason).await {
                            Ok(()) => {
                                self.metrics.record("dead_lettered");
                                return Ok(());
                            }
                            // The position stays where it is: nothing is lost, and the event
                            // is tried again (and dead-lettered again) after the backoff.
                            Err(e) => {
                                self.metrics.dead_letter_failures.inc();
                                tracing::error!(
                                    error = format!("{e:#}"),
                                    topic = %incoming.topic,
                                    partition = incoming.partition,
                                    offset = incoming.offset,
                                    "the event can neither be applied nor dead-lettered; holding the partition's position and retrying"
                                );
                            }
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
                () = shutdown.cancelled() => anyhow::bail!("shutting down before the event was applied"),
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Applies one partition's messages, in order, like [`Self::apply_batch_with_retry`] but
    /// without waiting out a database that is unavailable: the Lambda apply's policy, where the
    /// event source mapping retries whatever the function reports as not applied.
    ///
    /// A batch that fails for another reason committed nothing: it is split in halves, first
    /// half first, until the event that fails is alone; that event is tried
    /// [`INTERNAL_ATTEMPTS`] times and then dead-lettered by itself, as in the pod. A
    /// transient failure (connection loss, read-only database, lock or statement timeout, …)
    /// stops the batch at once: the messages before the part that failed are committed, the
    /// rest are not, and [`Applied::stopped`] names the first of them. So does a dead letter
    /// that cannot be written: the event is then retried, never skipped.
    ///
    /// An event of a newer schema version ([`newer_schema`]) stops the batch too, before it:
    /// it stays unapplied, and so does the partition after it, until an upgraded function
    /// reads it.
    pub async fn apply_batch_or_stop(&self, batch: &[Incoming]) -> Applied {
        let Some(held) = batch.iter().position(|m| newer_schema(m).is_some()) else {
            return self.apply_all_or_stop(batch).await;
        };
        let mut applied = self.apply_all_or_stop(&batch[..held]).await;
        if applied.stopped.is_none() {
            let incoming = &batch[held];
            let version = newer_schema(incoming).unwrap_or_default();
            self.metrics.record("held_back");
            let cause = PoisonReason::NewerSchema(version).to_string();
            tracing::error!(
                topic = %incoming.topic,
                partition = incoming.partition,
                offset = incoming.offset,
                version,
                "{cause}; holding the partition back"
            );
            applied.stopped = Some(Stopped {
                first_unapplied: held,
                cause,
                held_back: true,
            });
        }
        applied
    }

    async fn apply_all_or_stop(&self, batch: &[Incoming]) -> Applied {
        let mut applied = Applied::default();
        if batch.is_empty() {
            return applied;
        }
        // (index in `batch` of the part's first message, the part), first part on top.
        let mut pending = vec![(0, batch)];
        while let Some((start, part)) = pending.pop() {
            if let [incoming] = part {
                match self.apply_one_or_stop(incoming).await {
                    Ok(outcome) => applied.count(&outcome),
                    Err(cause) => {
                        applied.stopped = Some(Stopped {
                            first_unapplied: start,
                            cause,
                            held_back: false,
                        });
                        return applied;
                    }
                }
                continue;
            }
            match self.apply_batch(part).await {
                Ok(outcomes) => {
                    self.metrics.batch_size.observe(part.len() as f64);
                    for (incoming, outcome) in part.iter().zip(&outcomes) {
                        self.report(incoming, outcome);
                        applied.count(outcome);
                    }
                }
                Err(StoreError::Internal(cause)) => {
                    tracing::warn!(
                        error = format!("{cause:#}"),
                        events = part.len(),
                        "failed to apply a batch; splitting it to find the event that fails"
                    );
                    let middle = part.len() / 2;
                    let (first, second) = part.split_at(middle);
                    pending.push((start + middle, second));
                    pending.push((start, first));
                }
                Err(error) => {
                    applied.stopped = Some(Stopped {
                        first_unapplied: start,
                        cause: describe(&error),
                        held_back: false,
                    });
                    return applied;
                }
            }
        }
        applied
    }

    /// One message for [`Self::apply_batch_or_stop`]: its outcome, or why it stays unapplied.
    async fn apply_one_or_stop(&self, incoming: &Incoming) -> Result<Outcome, String> {
        let mut backoff = Duration::from_millis(50);
        let mut internal_failures = 0;
        loop {
            match self.apply_batch(std::slice::from_ref(incoming)).await {
                Ok(outcomes) => {
                    self.metrics.batch_size.observe(1.0);
                    let outcome = outcomes.into_iter().next().unwrap_or(Outcome::Duplicate);
                    self.report(incoming, &outcome);
                    return Ok(outcome);
                }
                Err(StoreError::Internal(cause)) => {
                    internal_failures += 1;
                    tracing::error!(
                        error = format!("{cause:#}"),
                        partition = incoming.partition,
                        offset = incoming.offset,
                        attempt = internal_failures,
                        "failed to apply an event"
                    );
                    if internal_failures >= INTERNAL_ATTEMPTS {
                        let reason = format!("could not be applied: {cause:#}");
                        return match self.dead_letter(incoming, &reason).await {
                            Ok(()) => {
                                self.metrics.record("dead_lettered");
                                Ok(Outcome::DeadLettered(reason))
                            }
                            Err(e) => {
                                self.metrics.dead_letter_failures.inc();
                                tracing::error!(
                                    error = describe(&e),
                                    topic = %incoming.topic,
                                    partition = incoming.partition,
                                    offset = incoming.offset,
                                    "the event can neither be applied nor dead-lettered; reporting it as not applied"
                                );
                                Err(format!(
                                    "the event can neither be applied nor dead-lettered: {}",
                                    describe(&e)
                                ))
                            }
                        };
                    }
                }
                Err(error) => return Err(describe(&error)),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn report(&self, incoming: &Incoming, outcome: &Outcome) {
        self.metrics.record(outcome.label());
        if let Outcome::DeadLettered(reason) = outcome {
            tracing::warn!(topic = %incoming.topic, partition = incoming.partition, offset = incoming.offset, reason, "poison event dead-lettered");
        }
    }

    /// One transaction for the whole batch: the effects, the event ids, the heartbeats, the
    /// Kafka positions (with the proof of the record before each) and the progress, so a crash
    /// leaves either all of it or none; it commits only while this process leads. Returns each
    /// message's outcome, in order.
    ///
    /// While spans are exported, each change event gets an `apply` span for this attempt,
    /// the child of the trace context its Kafka headers carry (the relay's publish).
    pub async fn apply_batch(&self, batch: &[Incoming]) -> Result<Vec<Outcome>, StoreError> {
        let decoded = Decoded::batch(batch);
        if decoded.iter().all(|d| matches!(d, Decoded::Held(_))) {
            return Ok(decoded
                .iter()
                .map(|d| match d {
                    Decoded::Held(version) => Outcome::HeldBack(*version),
                    _ => Outcome::Duplicate,
                })
                .collect());
        }
        let spans = apply_spans(batch, &decoded);
        let result = self.apply_decoded(batch, &decoded).await;
        for (index, span) in spans {
            match &result {
                Ok(outcomes) => {
                    if let Some(outcome) = outcomes.get(index) {
                        span.record("tandem.outcome", outcome.label());
                    }
                }
                Err(_) => {
                    span.record("otel.status_code", "ERROR");
                }
            }
        }
        result
    }

    async fn apply_decoded(
        &self,
        batch: &[Incoming],
        decoded: &[Decoded],
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let writes = ApplyTx::new(&tx);
        // The fence travels with the statements after it (pipelined, one round trip fewer):
        // when it fails, the transaction is dropped and none of them commits. Its error comes
        // first (a statement after it fails only because the transaction has failed).
        let (fenced, superseded) = tokio::join!(writes.check_fence(self.fence()), async {
            for (incoming, decoded) in batch.iter().zip(decoded) {
                if let Decoded::Poison(reason) = decoded {
                    writes
                        .insert_dead_letter(&incoming.dead_letter(reason))
                        .await?;
                }
            }
            self.write_epochs(&writes, batch, decoded).await
        });
        fenced?;
        let superseded = superseded?;
        let events: Vec<&ChangeEvent> = decoded
            .iter()
            .enumerate()
            .filter_map(|(i, d)| match d {
                Decoded::Change(event) if !superseded.contains_key(&i) => Some(event.as_ref()),
                _ => None,
            })
            .collect();
        // The next position per partition: after the batch's last message there.
        let mut positions: BTreeMap<i32, (i64, Option<uuid::Uuid>, Vec<u8>)> = BTreeMap::new();
        let mut heartbeats: BTreeMap<i32, OffsetDateTime> = BTreeMap::new();
        for (incoming, decoded) in batch.iter().zip(decoded) {
            if matches!(decoded, Decoded::Held(_)) {
                continue;
            }
            let next = incoming.offset + 1;
            if positions
                .get(&incoming.partition)
                .is_none_or(|slot| next >= slot.0)
            {
                positions.insert(
                    incoming.partition,
                    (next, decoded.id(), incoming.record_hash()),
                );
            }
            if let Decoded::Heartbeat(heartbeat) = decoded {
                let slot = heartbeats
                    .entry(incoming.partition)
                    .or_insert(heartbeat.time);
                *slot = (*slot).max(heartbeat.time);
            }
        }
        let topic = batch.first().map_or("", |m| m.topic.as_str());
        let positions: Vec<Position> = positions
            .into_iter()
            .map(
                |(partition, (next_offset, last_event_id, last_record_hash))| Position {
                    partition,
                    next_offset,
                    last_event_id,
                    last_record_hash,
                },
            )
            .collect();
        let heartbeats: Vec<(i32, OffsetDateTime)> = heartbeats.into_iter().collect();
        let mut newest = events.iter().map(|e| e.time).max();
        let deferred = self.deferred_progress.as_ref().and(newest.take());
        // The positions do not depend on the outcomes: they travel with the apply's statements
        // (pipelined). The apply's error comes first, as above.
        let (applied, progress) = tokio::join!(
            self.apply_events(&writes, &events),
            writes.record_progress(topic, &positions, newest, &heartbeats),
        );
        let (applied, entries, invalidate) = applied?;
        progress?;
        let mut applied = applied.into_iter();
        let outcomes: Vec<Outcome> = decoded
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Decoded::Change(_) if superseded.contains_key(&i) => superseded[&i].clone(),
                Decoded::Change(_) => applied.next().unwrap_or(Outcome::Duplicate),
                Decoded::Heartbeat(_) => Outcome::Heartbeat,
                Decoded::Poison(reason) => Outcome::DeadLettered(reason.clone()),
                Decoded::Held(version) => Outcome::HeldBack(*version),
            })
            .collect();

        tx.commit().await?;
        if let (Some(time), Some(slot)) = (deferred, &self.deferred_progress) {
            let mut slot = slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *slot = Some(slot.map_or(time, |t| t.max(time)));
        }
        if invalidate {
            self.cache.invalidate_all().await;
        } else {
            self.refresh_cache(&entries).await;
        }
        let now = OffsetDateTime::now_utc();
        for (outcome, decoded) in outcomes.iter().zip(decoded) {
            if let (Outcome::Applied, Decoded::Change(event)) = (outcome, decoded) {
                self.metrics
                    .observe_lag((now - event.time).as_seconds_f64().max(0.0));
            }
        }
        Ok(outcomes)
    }

    /// Write epochs (`tandem_store::roles`), inside the apply transaction: a write epoch newer
    /// than this database records, on an event or a heartbeat of the other region, is learned
    /// (this region stops taking writes, after those in flight); a change event of an older
    /// write epoch is the deposed write region's lost tail: kept in `quarantined_events` with
    /// its payload, never applied (or a duplicate, when it was applied before the epoch
    /// changed). Returns those events' outcomes by batch index. Events without a write epoch
    /// (schema version 1) and databases without a role are not checked.
    async fn write_epochs(
        &self,
        writes: &ApplyTx<'_, '_>,
        batch: &[Incoming],
        decoded: &[Decoded],
    ) -> Result<HashMap<usize, Outcome>, StoreError> {
        let Some((_, mut write_region, mut epoch)) = writes.write_role().await? else {
            return Ok(HashMap::new());
        };
        let newest = decoded
            .iter()
            .filter_map(|d| match d {
                Decoded::Change(e) => e.originregion.as_deref().zip(e.writeepoch),
                Decoded::Heartbeat(h) => h.data.writeregion.as_deref().zip(h.data.writeepoch),
                _ => None,
            })
            .max_by_key(|(_, e)| *e);
        if let Some((region, newer)) = newest.filter(|(_, e)| *e > epoch) {
            writes.learn_write_role(region, newer).await?;
            tracing::warn!(
                write_region = region,
                write_epoch = newer,
                previous_write_region = write_region,
                previous_write_epoch = epoch,
                "the other region's stream carries a newer write epoch: recorded; this region's writes now go to the write region"
            );
            (write_region, epoch) = (region.to_owned(), newer);
        }
        let old: Vec<(usize, &ChangeEvent)> = decoded
            .iter()
            .enumerate()
            .filter_map(|(i, d)| match d {
                Decoded::Change(e) if e.writeepoch.is_some_and(|w| w < epoch) => {
                    Some((i, e.as_ref()))
                }
                _ => None,
            })
            .collect();
        if old.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<uuid::Uuid> = old.iter().map(|(_, e)| e.id).collect();
        let seen = writes.applied_before(&ids).await?;
        let mut outcomes = HashMap::new();
        let mut kept = Vec::new();
        for (i, event) in old {
            if seen.contains(&event.id) {
                outcomes.insert(i, Outcome::Duplicate);
                continue;
            }
            let incoming = &batch[i];
            kept.push(Quarantined {
                event_id: event.id,
                topic: &incoming.topic,
                partition: incoming.partition,
                offset: incoming.offset,
                origin: event.originregion.as_deref().unwrap_or_default(),
                write_epoch: event.writeepoch.unwrap_or_default(),
                superseded_by: epoch,
                collection: event.data.collection.as_str(),
                document_id: event.data.id.as_str(),
                version: event.data.version,
                event_time: event.time,
                payload: &incoming.payload,
            });
            outcomes.insert(i, Outcome::Quarantined);
        }
        if !kept.is_empty() {
            writes.quarantine(&kept).await?;
            tracing::warn!(
                events = kept.len(),
                write_region,
                write_epoch = epoch,
                "events of a superseded write epoch quarantined (the deposed write region's lost tail): see `tandem lost-writes`"
            );
        }
        Ok(outcomes)
    }

    /// Applies decoded events inside `tx` and returns their outcomes, in order: those applying
    /// them one by one would have had, and the cache entries of the states written (for
    /// after the commit), or `true` when a repair changed Region 2 (the cache is then
    /// invalidated instead). An event seen before is a duplicate; a fresh one is
    /// applied when its version is newer than what Region 2 held when it came (before the batch
    /// or after an earlier event of it), else it is stale (it arrived out of order). Per document only
    /// the batch's newest version is written (the versions before it in the batch are applied
    /// and superseded in the same transaction, which no reader can tell apart from applying
    /// them one by one).
    async fn apply_events(
        &self,
        writes: &ApplyTx<'_, '_>,
        events: &[&ChangeEvent],
    ) -> Result<(Vec<Outcome>, Vec<(DocumentKey, Entry)>, bool), StoreError> {
        if events.is_empty() {
            return Ok((Vec::new(), Vec::new(), false));
        }
        let columns = EventColumns {
            ids: events.iter().map(|e| e.id).collect(),
            collections: events.iter().map(|e| e.data.collection.as_str()).collect(),
            document_ids: events.iter().map(|e| e.data.id.as_str()).collect(),
            versions: events.iter().map(|e| e.data.version).collect(),
            times: events.iter().map(|e| e.time).collect(),
        };
        // The newest state per document. A duplicate may be the newest: writing it again is a
        // no-op under the version guard (Region 2 holds it already), so freshness need not be
        // known before the write, and the three statements below travel together. A repair's
        // rule is carried onto the document's newest state (a later ordinary event must not
        // lose it to a Region 2 that is ahead), and a purge (the first event of its document)
        // is planned on its own, to run before the upsert.
        let mut newest: HashMap<(&str, &str), Planned<'_>> = HashMap::new();
        let mut purges: Vec<Planned<'_>> = Vec::new();
        for event in events {
            let repair = event.data.repair.map(|r| (event.id, r));
            if repair.is_some_and(|(_, r)| r.purge) {
                purges.push(Planned {
                    state: &event.data,
                    repair,
                });
                continue;
            }
            let key = (event.data.collection.as_str(), event.data.id.as_str());
            let slot = newest.entry(key).or_insert(Planned {
                state: &event.data,
                repair,
            });
            // Ties go to the later event: a repair of the version just written is that version.
            if slot.state.version <= event.data.version {
                slot.state = &event.data;
            }
            if repair.is_some() {
                slot.repair = repair;
            }
        }
        let states: Vec<Planned<'_>> = purges.into_iter().chain(newest.into_values()).collect();
        let StatesApplied {
            mut fresh,
            held_before: mut held,
            written,
            repaired,
            purged,
        } = writes.apply_states(&columns, &states).await?;

        // The outcomes applying the events one by one, in order, would have had: `held` is
        // the version Region 2 holds after each event.
        let mut outcomes = Vec::with_capacity(events.len());
        let mut stale = Vec::new();
        for event in events {
            // The first occurrence of a fresh id is the fresh event (an id can repeat).
            let outcome = if !fresh.remove(&event.id) {
                Outcome::Duplicate
            } else {
                let key = (
                    event.data.collection.as_str().to_owned(),
                    event.data.id.as_str().to_owned(),
                );
                // Not written: the database held the batch's newest version or a newer one
                // (a concurrent writer, such as a redrive), so every fresh event of it is stale.
                let newest_written = written.contains(&key);
                match event.data.repair {
                    Some(repair) if repair.purge => {
                        if purged.contains(&key) {
                            held.insert(key, 0);
                            Outcome::Applied
                        } else {
                            stale.push(event.id);
                            Outcome::Stale
                        }
                    }
                    // A repair need not move the version forward: its rule decided.
                    Some(_) if newest_written && repaired.contains(&key) => {
                        held.insert(key, event.data.version);
                        Outcome::Applied
                    }
                    _ => {
                        let version_held = held.entry(key).or_insert(0);
                        if !newest_written || *version_held >= event.data.version {
                            stale.push(event.id);
                            Outcome::Stale
                        } else {
                            *version_held = event.data.version;
                            Outcome::Applied
                        }
                    }
                }
            };
            outcomes.push(outcome);
        }
        writes.mark_stale(&stale).await?;

        // A repair may move a version back or rewrite the same one: the cache's version guard
        // cannot take that, so the whole cache is invalidated instead (repairs are rare).
        if !repaired.is_empty() {
            return Ok((outcomes, Vec::new(), true));
        }
        let entries: Vec<(DocumentKey, Entry)> = states
            .iter()
            .map(|p| p.state)
            .filter(|s| {
                written.contains(&(s.collection.as_str().to_owned(), s.id.as_str().to_owned()))
            })
            .map(|state| {
                let entry = match state.to_stored() {
                    Stored::Live(document) => Entry::Live {
                        version: document.version,
                        body: document.to_body(),
                    },
                    Stored::Deleted { version } => Entry::Deleted { version },
                };
                (state.key(), entry)
            })
            .collect();
        Ok((outcomes, entries, false))
    }

    /// Region 2's Redis gets the committed states, version-guarded, in one round trip, after
    /// the commit (never a state the database may yet roll back). A failure makes the cache
    /// distrust itself until its generation is bumped (see `tandem_store::cache`), so no
    /// entry it failed to update can be served afterwards.
    async fn refresh_cache(&self, entries: &[(DocumentKey, Entry)]) {
        if entries.is_empty() {
            return;
        }
        match self
            .cache
            .put_many(entries.iter().map(|(k, e)| (k, e)))
            .await
        {
            Ok(_) => {}
            // Bypassed since an earlier fault: the generation bump to come covers these.
            Err(CacheError::Distrusted) => {}
            Err(e) => {
                for _ in entries {
                    self.metrics.record("cache_update_failed");
                }
                tracing::warn!(error = %e, "cache update failed; the cache generation will be bumped");
            }
        }
    }

    async fn dead_letter(&self, incoming: &Incoming, reason: &str) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let writes = ApplyTx::new(&tx);
        writes.check_fence(self.fence()).await?;
        writes
            .insert_dead_letter(&incoming.dead_letter(reason))
            .await?;
        let position = Position {
            partition: incoming.partition,
            next_offset: incoming.offset + 1,
            last_event_id: None,
            last_record_hash: incoming.record_hash(),
        };
        writes
            .record_progress(&incoming.topic, &[position], None, &[])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Starts counting every partition of the topic in the lag: one heartbeat row each (a
    /// partition without a heartbeat yet counts from now), and none for partitions the topic
    /// no longer has.
    pub async fn track_partitions(&self, topic: &str, partitions: &[i32]) -> anyhow::Result<()> {
        Ok(replica::track_partitions(&self.pool, topic, partitions).await?)
    }

    /// Counts these partitions of the topic in the lag from now on, when they are not counted
    /// yet (a partition without a heartbeat then ages from now), and forgets none: the Lambda
    /// apply knows the partition count only from its configuration, which must not make a
    /// partition that exists invisible (see [`Self::track_partitions`] for the pod, which reads
    /// the topic's metadata).
    pub async fn count_partitions_in_lag(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<u64, StoreError> {
        replica::count_partitions_in_lag(&self.pool, topic, partitions).await
    }

    /// Liveness and backlog, for the Read API's lag report.
    pub async fn record_heartbeat(&self, backlog: i64) {
        self.metrics.backlog.set(backlog);
        let newest = self.deferred_progress.as_ref().and_then(|slot| {
            slot.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
        });
        if replica::record_heartbeat(&self.pool, backlog, newest)
            .await
            .is_err()
        {
            // Recorded with the next heartbeat instead.
            if let (Some(time), Some(slot)) = (newest, &self.deferred_progress) {
                let mut slot = slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *slot = Some(slot.map_or(time, |t| t.max(time)));
            }
        }
    }

    /// Re-applies dead letters (one, or all not yet redriven): [`replica::redrive`], with
    /// this apply's cache. Returns `(id, result)` per letter.
    pub async fn redrive(&self, only: Option<i64>) -> anyhow::Result<Vec<(i64, String)>> {
        Ok(replica::redrive(&self.pool, Some(&self.cache), only).await?)
    }
}

/// The message's headers, each read on its own: rdkafka panics on a header name that is not
/// UTF-8, so such a header is caught and kept as unreadable (`name: None`) instead of
/// crashing the consumer (which would then crash again on the same record forever).
#[cfg(feature = "rdkafka")]
pub fn read_headers<M: Message>(message: &M) -> Vec<KafkaHeader> {
    let Some(headers) = message.headers() else {
        return Vec::new();
    };
    (0..headers.count())
        .filter_map(|index| {
            let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                headers.try_get(index).map(|h| KafkaHeader {
                    name: Some(h.key.to_owned()),
                    value: h.value.map(<[u8]>::to_vec),
                })
            }));
            match read {
                Ok(header) => header,
                Err(_) => Some(KafkaHeader {
                    name: None,
                    value: None,
                }),
            }
        })
        .collect()
}

/// What the message's headers say, read by the one codec ([`EventHeaders::decode`]).
/// The `apply` spans of a batch's change events, by index in the batch, while spans are
/// exported (none otherwise): each the child of its record's `traceparent` header.
fn apply_spans(batch: &[Incoming], decoded: &[Decoded]) -> Vec<(usize, tracing::Span)> {
    if !tandem_runtime::telemetry::enabled() {
        return Vec::new();
    }
    batch
        .iter()
        .zip(decoded)
        .enumerate()
        .filter_map(|(index, (incoming, decoded))| {
            let Decoded::Change(event) = decoded else {
                return None;
            };
            let span = tracing::info_span!(
                "apply",
                otel.kind = "consumer",
                otel.status_code = tracing::field::Empty,
                messaging.system = "kafka",
                messaging.operation.type = "process",
                messaging.destination.name = %incoming.topic,
                messaging.destination.partition.id = incoming.partition,
                messaging.kafka.offset = incoming.offset,
                messaging.message.id = %event.id,
                tandem.outcome = tracing::field::Empty,
            );
            if let Some(parent) = event_headers(&incoming.headers).traceparent {
                tandem_runtime::telemetry::continue_trace(&span, &parent);
            }
            Some((index, span))
        })
        .collect()
}

pub fn event_headers(headers: &[KafkaHeader]) -> EventHeaders {
    EventHeaders::decode(
        headers
            .iter()
            .map(|h| (h.name.as_deref(), h.value.as_deref())),
    )
}

//! The Region 2 consumer (long-running): applies change events from Kafka to Region 2's
//! PostgreSQL and Redis, effectively once, whatever crashes in between.
//!
//! * Events are applied in batches (whatever is already waiting, up to `CONSUMER_BATCH_SIZE` and
//!   `CONSUMER_BATCH_BYTES`), each batch in one transaction that also records the event ids
//!   (`applied_events`) and the Kafka positions (`consumer_offsets`). A crash before the commit
//!   loses nothing (the batch is consumed again); a crash after it double-applies nothing (the
//!   event ids are already recorded, and the consumer resumes from the stored positions). An
//!   event that fails alone is split out of its batch, retried, then dead-lettered.
//! * Version-monotonic: an event older than the stored version changes nothing (`stale`), and
//!   tombstones stay, so an old upsert cannot resurrect a deleted document.
//! * Redis gets the applied states with the read path's version guard right after the
//!   commit; a failed update makes the cache distrust itself until its generation is bumped
//!   (`tandem_store::cache`), so an entry the consumer failed to update is never served.
//! * Poison events (undecodable or invalid) go to `dead_letters` with the reason, and the
//!   consumer moves on. `tandem-region2-consumer redrive` re-applies them.
//! * One active consumer (advisory lock on the Region 2 database) reads every partition with
//!   explicit assignment from the stored positions; a standby takes over when it dies.
//! * A recreated topic is read again from its beginning, whether it was recreated while the
//!   consumer was away (the resume proof checked at each start) or under it (the first record
//!   read from each partition must stay at its offset; checked every 5 s).

pub mod apply;
pub mod metrics;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use futures_util::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tandem_http::http::{ReadyCheck, ScrapeHook, pool_scrape_hook};
use tandem_runtime::config::{self, ConfigError, ServiceSettings};
use tandem_runtime::kafka::KafkaSettings;
use tandem_runtime::shutdown::CancellationToken;
use tandem_store::cache::{Cache, CacheSettings};
use tandem_store::db::DatabaseSettings;
use tandem_store::leader::{CONSUMER_LOCK, Leadership};
use tokio::sync::{mpsc, watch};

pub use apply::{Applier, Incoming, KafkaHeader, Outcome};
pub use metrics::ConsumerMetrics;

/// Everything the consumer is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub service: ServiceSettings,
    pub database: DatabaseSettings,
    pub cache: CacheSettings,
    pub kafka: KafkaSettings,
    /// `KAFKA_GROUP_ID` (default `tandem-<TANDEM_REGION>`): for Kafka's lag tooling; the consumer's
    /// true position lives in its database.
    pub group_id: String,
    /// `CONSUMER_BATCH_BYTES` (default 16 MiB): a batch stops growing at this many bytes (or
    /// at `batch_size` events), so memory is bounded by bytes, not only by counts.
    pub batch_bytes: usize,
    /// `CONSUMER_BATCH_SIZE` (default 500): the most events applied in one transaction.
    pub batch_size: usize,
    /// `CONSUMER_LANES` (default 1): how many transactions apply side by side. Partition `p`
    /// goes to lane `p mod lanes`, so each partition (and so each document) stays in one
    /// ordered lane; with more than one, a batch gathers up to `batch_size` events per lane.
    pub lanes: usize,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let service = ServiceSettings::from_env()?;
        let database = DatabaseSettings::from_env()?;
        let lanes = config::parsed_or("CONSUMER_LANES", std::num::NonZeroUsize::MIN)?.get();
        // Each lane holds a connection while it applies; the heartbeat needs one more.
        if lanes >= database.pool_size {
            return Err(ConfigError::Invalid {
                name: "CONSUMER_LANES",
                value: lanes.to_string(),
                reason: format!(
                    "each lane needs a database connection of its own: at most {} with DATABASE_POOL_SIZE={}",
                    database.pool_size.saturating_sub(1),
                    database.pool_size
                ),
            });
        }
        Ok(Self {
            database,
            cache: CacheSettings::from_env()?,
            kafka: KafkaSettings::from_env()?,
            group_id: config::optional("KAFKA_GROUP_ID")
                .unwrap_or_else(|| format!("tandem-{}", service.region)),
            service,
            batch_bytes: config::parsed_or("CONSUMER_BATCH_BYTES", 16 * 1024 * 1024)?,
            batch_size: config::parsed_or("CONSUMER_BATCH_SIZE", DEFAULT_BATCH_SIZE)?.get(),
            lanes,
        })
    }
}

/// Consumer defaults, overridable through `KAFKA_PROPERTIES` (the benchmark's raw baseline uses
/// them too).
pub const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    // A stored position past the end (the topic was deleted and recreated, or the cluster
    // rebuilt from nothing) restarts from the beginning; duplicates are harmless.
    ("auto.offset.reset", "earliest"),
    // librdkafka pre-fetches up to 64 MiB per client by default; a few batches ahead is enough.
    ("queued.max.messages.kbytes", "16384"),
    // Once that queue is full, librdkafka waits this long before fetching again (default
    // 1000 ms). A raw reader of 100k events of 1.4 KiB took 1.07 s with a 16 MiB queue at the
    // default and 0.10 s at 10 ms (the same as the default 64 MiB queue): the bound on memory
    // must not cost a consumer that keeps up.
    ("fetch.queue.backoff.ms", "10"),
    ("enable.partition.eof", "false"),
    // tandem_core::limits::KAFKA_MAX_MESSAGE_BYTES: the largest record a fetch must hold.
    ("fetch.message.max.bytes", "1048576"),
];

/// The consumer's shared parts.
#[derive(Clone)]
pub struct Region2Consumer {
    pub applier: Applier,
    pub settings: Settings,
    /// `/readyz`'s own connection.
    pub probe: Pool,
    /// Kept across leadership terms: a term that ends right after a topic was recreated
    /// must not take with it the anchors that would show it.
    anchors: Anchors,
}

impl Region2Consumer {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = tandem_store::db::connect_pool(&settings.database).await?;
        tandem_store::migrations::run(&pool).await?;
        let mut cache_settings = settings.cache.clone();
        cache_settings.resolve_auth().await?;
        let cache = Cache::new(cache_settings)?;
        let mut applier = Applier::new(pool, cache, Arc::new(ConsumerMetrics::new()));
        if settings.lanes > 1 {
            applier = applier.with_deferred_progress();
        }
        Ok(Self {
            applier,
            probe: tandem_store::db::connect_probe(&settings.database).await?,
            anchors: Anchors::default(),
            settings,
        })
    }

    pub fn pool(&self) -> &Pool {
        &self.applier.pool
    }

    pub fn metrics(&self) -> &Arc<ConsumerMetrics> {
        &self.applier.metrics
    }

    /// `/readyz`: the database answers (leader and standby alike; the role is reported).
    pub fn ready_check(&self) -> ReadyCheck {
        tandem_http::worker::ready_check(self.probe.clone(), self.applier.metrics.role.clone())
    }

    pub fn scrape_hook(&self) -> ScrapeHook {
        pool_scrape_hook(self.applier.pool.clone())
    }

    /// Runs until shutdown: wait for leadership, consume while leader, repeat.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            match self.settings.kafka.ensure_topic().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "waiting for the broker");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.cancelled() => return Ok(()),
                    }
                }
            }
        }
        tandem_http::worker::run_elected(
            &self.settings.database,
            CONSUMER_LOCK,
            &self.applier.metrics.role,
            &shutdown,
            async |leadership, shutdown| self.consume(leadership, shutdown).await,
        )
        .await;
        Ok(())
    }

    fn create_consumer(&self, config: rdkafka::ClientConfig) -> anyhow::Result<StreamConsumer> {
        config
            .create()
            .context("Failed to create the Kafka consumer")
    }

    /// Assigns every partition at its stored position and applies messages until shutdown
    /// (`Ok`) or until leadership or the database is lost (`Err`).
    async fn consume(
        &self,
        leadership: &Leadership,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        self.applier.set_fence(Some(leadership.fence));
        // The previous leader may have been killed between an apply's commit and its cache
        // update: nothing cached before this term is trusted.
        self.applier.cache.invalidate_all().await;
        let result = self.consume_fenced(leadership, shutdown).await;
        self.applier.set_fence(None);
        result
    }

    async fn consume_fenced(
        &self,
        leadership: &Leadership,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let topic = self.settings.kafka.topic.clone();
        let mut config = self.settings.kafka.client_config(CONSUMER_DEFAULTS).await?;
        config.set("group.id", &self.settings.group_id);
        let mut probe_config = config.clone();
        let consumer = Arc::new(self.create_consumer(config)?);
        let metadata = {
            let consumer = consumer.clone();
            let topic = topic.clone();
            tokio::task::spawn_blocking(move || {
                consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))
            })
            .await?
            .context("Failed to read the topic's metadata")?
        };
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        anyhow::ensure!(!partitions.is_empty(), "topic {topic} has no partitions");
        let mut expected = HashMap::new();
        let assignment = self
            .assignment(&consumer, &topic, &partitions, &mut expected)
            .await?;
        self.applier.track_partitions(&topic, &partitions).await?;
        consumer
            .assign(&assignment)
            .context("Failed to assign partitions")?;
        let mut reading = Reading::from(&assignment);
        tracing::info!(
            partitions = partitions.len(),
            resuming = expected.len(),
            "consuming"
        );

        // Set when the topic gains partitions: the term ends and the next one assigns them all.
        let (grown_tx, mut grown) = watch::channel(false);
        let heartbeat = tokio::spawn(heartbeat(
            consumer.clone(),
            self.applier.clone(),
            topic.clone(),
            partitions.clone(),
            grown_tx,
        ));
        // A topic deleted and recreated under the running consumer (see [`Anchors`]).
        let anchors = self.anchors.clone();
        let (recreated_tx, mut recreated) = mpsc::channel(1);
        probe_config
            .set("auto.offset.reset", "error")
            .set("queued.max.messages.kbytes", "1024");
        let probe: BaseConsumer = probe_config
            .create()
            .context("Failed to create the Kafka probe")?;
        let watcher = tokio::spawn(watch_for_recreation(
            Arc::new(probe),
            topic.clone(),
            anchors.clone(),
            recreated_tx,
        ));
        let result = async {
            let batch_size = self.settings.batch_size * self.settings.lanes;
            let mut batch: Vec<Incoming> = Vec::with_capacity(batch_size);
            // Partitions held back at an event of a newer schema version: this term reads
            // them on but applies nothing more of them; the position stays before the event,
            // where an upgraded consumer resumes.
            let mut held: std::collections::HashSet<i32> = std::collections::HashSet::new();
            self.applier.metrics.held_partitions.set(0);
            let mut batch_bytes = 0usize;
            let mut committed: HashMap<i32, i64> = HashMap::new();
            let mut last_commit = std::time::Instant::now();
            loop {
                let first = tokio::select! {
                    message = consumer.recv() => message,
                    () = shutdown.cancelled() => return Ok(()),
                    _ = grown.changed() => anyhow::bail!("the topic gained partitions; assigning them"),
                    Some(found) = recreated.recv() => {
                        self.reread_recreated(&consumer, &topic, &mut reading, &mut expected, &anchors, found)
                            .await?;
                        continue;
                    }
                    () = tokio::time::sleep(Duration::from_secs(2)) => {
                        anyhow::ensure!(leadership.is_held().await, "the consumer's leader session ended");
                        commit_positions(&consumer, &topic, &mut committed);
                        continue;
                    }
                };
                // Then whatever else is already waiting, without waiting for more: a quiet
                // stream applies events one by one as they come, a backlog in large batches.
                let mut next = Some(first);
                while let Some(received) = next.take() {
                    let message = match received {
                        Ok(message) => message,
                        Err(e) => {
                            // librdkafka reconnects by itself (a broker's restart, a leader
                            // moving); the error is only reported.
                            tracing::warn!(error = %e, "kafka receive error");
                            break;
                        }
                    };
                    reading.read(message.partition(), message.offset());
                    match self.admit(&consumer, &topic, &mut reading, &mut expected, &message)? {
                        // Nothing of a held partition is applied after the event held back.
                        Admitted::Apply(incoming) if held.contains(&incoming.partition) => {}
                        Admitted::Apply(incoming) if apply::newer_schema(&incoming).is_some() => {
                            let version = apply::newer_schema(&incoming).unwrap_or_default();
                            held.insert(incoming.partition);
                            let metrics = &self.applier.metrics;
                            metrics.held_partitions.set(held.len() as i64);
                            metrics.record("held_back");
                            tracing::error!(
                                partition = incoming.partition,
                                offset = incoming.offset,
                                version,
                                "{}; holding the partition back until the consumer is upgraded",
                                tandem_core::event::PoisonReason::NewerSchema(version)
                            );
                        }
                        Admitted::Apply(incoming) => {
                            anchors.note(incoming.partition, incoming.offset, || {
                                incoming.record_hash()
                            });
                            batch_bytes += incoming.size();
                            batch.push(incoming);
                        }
                        Admitted::Skip => anchors.note(message.partition(), message.offset(), || {
                            apply::record_hash(message.key(), message.payload().unwrap_or_default())
                        }),
                        // The rest of what is queued may come from the old positions.
                        Admitted::Reassigned => {
                            anchors.forget(message.partition());
                            break;
                        }
                    }
                    if batch.len() < batch_size
                        && batch_bytes < self.settings.batch_bytes
                    {
                        // A poll that only consumed a client event (an offset commit's
                        // report, say) comes back empty: look twice more before ending.
                        next = (0..3).find_map(|_| consumer.recv().now_or_never());
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                let metrics = &self.applier.metrics;
                let bytes = i64::try_from(batch_bytes).unwrap_or(i64::MAX);
                metrics
                    .largest_batch_bytes
                    .set(metrics.largest_batch_bytes.get().max(bytes));
                batch_bytes = 0;
                let mut applied: HashMap<i32, i64> = HashMap::new();
                for incoming in &batch {
                    let next = applied.entry(incoming.partition).or_insert(0);
                    *next = (*next).max(incoming.offset + 1);
                }
                self.apply_in_lanes(&mut batch, shutdown).await?;
                for (partition, next) in applied {
                    let slot = committed.entry(partition).or_insert(0);
                    *slot = (*slot).max(next);
                }
                if last_commit.elapsed() >= Duration::from_secs(1) {
                    last_commit = std::time::Instant::now();
                    commit_positions(&consumer, &topic, &mut committed);
                }
            }
        }
        .await;
        heartbeat.abort();
        watcher.abort();
        // Destroying a client waits for its threads: keep that off the runtime.
        tokio::task::spawn_blocking(move || drop(consumer));
        result
    }
}

impl Region2Consumer {
    /// Applies (and empties) a batch: in one transaction, or split by partition into
    /// [`Settings::lanes`] ordered lanes whose transactions run side by side. Each lane's
    /// transaction records its own partitions' positions, so a crash between two lanes'
    /// commits resumes each partition where its own lane left it. Returns when every lane is
    /// done: the next batch starts after this one, as with one lane, so everything the
    /// receive loop decides (held partitions, re-reads) still happens between batches.
    async fn apply_in_lanes(
        &self,
        batch: &mut Vec<Incoming>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let lanes = self.settings.lanes;
        if lanes <= 1 {
            let result = self.applier.apply_batch_with_retry(batch, shutdown).await;
            batch.clear();
            return result;
        }
        let mut split: Vec<Vec<Incoming>> = (0..lanes).map(|_| Vec::new()).collect();
        for incoming in batch.drain(..) {
            let lane = usize::try_from(incoming.partition).unwrap_or_default() % lanes;
            split[lane].push(incoming);
        }
        let running: Vec<_> = split
            .into_iter()
            .filter(|lane| !lane.is_empty())
            .map(|lane| {
                let applier = self.applier.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move { applier.apply_batch_with_retry(&lane, &shutdown).await })
            })
            .collect();
        let mut first_error = None;
        for lane in running {
            let result = lane.await.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// What to do with a received message.
enum Admitted {
    Apply(Incoming),
    /// The record at a resumed position, already applied.
    Skip,
    /// The partition was recreated and is being re-read: stop the batch here.
    Reassigned,
}

/// The most messages applied in one transaction, unless `CONSUMER_BATCH_SIZE` says otherwise.
const DEFAULT_BATCH_SIZE: std::num::NonZeroUsize = std::num::NonZeroUsize::new(500).unwrap();

impl Region2Consumer {
    /// Checks a message against the resume proof of its partition (see [`Self::assignment`]):
    /// the first record of a resumed partition must be the event applied last, else the
    /// partition is re-read from the beginning.
    fn admit(
        &self,
        consumer: &StreamConsumer,
        topic: &str,
        reading: &mut Reading,
        expected: &mut HashMap<i32, (i64, apply::Proof)>,
        message: &BorrowedMessage<'_>,
    ) -> anyhow::Result<Admitted> {
        let Some((offset, proof)) = expected.remove(&message.partition()) else {
            return Ok(Admitted::Apply(Incoming::from_message(message)));
        };
        let same = message.offset() == offset
            && match (&proof.record_hash, proof.event_id) {
                (Some(hash), _) => {
                    *hash
                        == apply::record_hash(message.key(), message.payload().unwrap_or_default())
                }
                (None, Some(event_id)) => {
                    apply::event_headers(&apply::read_headers(message)).event_uuid()
                        == Some(event_id)
                }
                (None, None) => false,
            };
        if same {
            return Ok(Admitted::Skip);
        }
        tracing::warn!(
            partition = message.partition(),
            expected_offset = offset,
            "the partition no longer holds the applied events (the topic was recreated); reading it from the beginning"
        );
        self.applier.metrics.partition_rereads.inc();
        reassign_from_beginning(consumer, topic, reading, &[message.partition()])?;
        Ok(Admitted::Reassigned)
    }

    /// Re-reads, from their beginning, partitions found recreated while being consumed (when
    /// their anchor is still the one found gone: the partition may have been re-read since).
    /// The stored position is forgotten first, so a crash during the re-read re-reads again.
    async fn reread_recreated(
        &self,
        consumer: &StreamConsumer,
        topic: &str,
        reading: &mut Reading,
        expected: &mut HashMap<i32, (i64, apply::Proof)>,
        anchors: &Anchors,
        found: Vec<(i32, Anchor)>,
    ) -> anyhow::Result<()> {
        let mut reread = Vec::new();
        for (partition, anchor) in found {
            if anchors.current(partition).as_ref() != Some(&anchor) {
                continue;
            }
            tracing::warn!(
                partition,
                anchor_offset = anchor.offset,
                "the partition no longer holds the first record read from it (the topic was deleted and recreated); reading it from the beginning"
            );
            self.applier.forget_position(topic, partition).await?;
            self.applier.metrics.partition_rereads.inc();
            anchors.forget(partition);
            expected.remove(&partition);
            reread.push(partition);
        }
        if !reread.is_empty() {
            reassign_from_beginning(consumer, topic, reading, &reread)?;
        }
        Ok(())
    }

    /// Where to resume each partition: one record before the stored position, remembering the
    /// proof of the record there (the hash of its key and payload, stored for every record:
    /// events, heartbeats and dead letters alike), so the first record read proves the
    /// partition is the one the position belongs to. A topic deleted and recreated (or a
    /// cluster rebuilt from nothing) fails that proof whatever the new partition's length (a position past its
    /// end, or a refilled partition whose offsets now name other records), and the partition is
    /// re-read from the beginning; the event ids make the re-read harmless. A position stored
    /// without any proof (before proofs existed, after a dead letter) is not trusted either:
    /// the partition is re-read.
    async fn assignment(
        &self,
        consumer: &Arc<StreamConsumer>,
        topic: &str,
        partitions: &[i32],
        expected: &mut HashMap<i32, (i64, apply::Proof)>,
    ) -> anyhow::Result<TopicPartitionList> {
        expected.clear();
        let stored: HashMap<i32, (i64, apply::Proof)> = self
            .applier
            .stored_positions(topic)
            .await?
            .into_iter()
            .map(|(partition, next, last)| (partition, (next, last)))
            .collect();
        // A partition now shorter than the stored position was recreated: read it all.
        let high_watermarks =
            high_watermarks(consumer, topic, partitions, Duration::from_secs(5)).await;
        let mut assignment = TopicPartitionList::new();
        for partition in partitions {
            let stored = stored.get(partition).cloned();
            let truncated = match (&stored, high_watermarks.get(partition)) {
                (Some((next, _)), Some(&high)) => high < *next,
                _ => false,
            };
            if truncated {
                tracing::warn!(
                    partition,
                    "the partition is shorter than the stored position (the topic was recreated); reading it from the beginning"
                );
            }
            let offset = match stored.filter(|_| !truncated) {
                Some((next, proof))
                    if next > 0 && (proof.record_hash.is_some() || proof.event_id.is_some()) =>
                {
                    expected.insert(*partition, (next - 1, proof));
                    Offset::Offset(next - 1)
                }
                Some((_, _)) => {
                    tracing::warn!(
                        partition,
                        "the stored position carries no proof of the record before it; reading the partition from the beginning"
                    );
                    Offset::Beginning
                }
                None => Offset::Beginning,
            };
            assignment.add_partition_offset(topic, *partition, offset)?;
        }
        Ok(assignment)
    }
}

/// Commits the positions applied since the last call to Kafka, asynchronously. Informational
/// only (Kafka's lag tooling; the database holds the true positions), so it is done at most once
/// a second, and when the stream is idle.
fn commit_positions(consumer: &StreamConsumer, topic: &str, pending: &mut HashMap<i32, i64>) {
    if pending.is_empty() {
        return;
    }
    let mut positions = TopicPartitionList::new();
    for (&partition, &next) in pending.iter() {
        let _ = positions.add_partition_offset(topic, partition, Offset::Offset(next));
    }
    let _ = consumer.commit(&positions, CommitMode::Async);
    pending.clear();
}

/// The high watermark of each partition that answers within `timeout`. Each is a broker round
/// trip (a blocking call), so they are fetched off the runtime.
async fn high_watermarks(
    consumer: &Arc<StreamConsumer>,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> HashMap<i32, i64> {
    let consumer = consumer.clone();
    let topic = topic.to_owned();
    let partitions = partitions.to_vec();
    tokio::task::spawn_blocking(move || {
        partitions
            .iter()
            .filter_map(|&partition| {
                let (_, high) = consumer.fetch_watermarks(&topic, partition, timeout).ok()?;
                Some((partition, high))
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// Where this term reads each assigned partition next: the offset it was assigned at, until
/// a record of it is received, then the offset after that record. Kept by the consumer itself
/// because a re-assignment must put every other partition back exactly where it was: librdkafka
/// knows no position for a partition it has not yet returned a record of, and falling back to
/// the group's committed offset would hand the position to the broker (whose commits are
/// informational, and whose coordinator may not answer at all right after a broker lost its
/// data, leaving the partition unread).
struct Reading {
    next: Vec<(i32, Offset)>,
}

impl From<&TopicPartitionList> for Reading {
    fn from(assignment: &TopicPartitionList) -> Self {
        Self {
            next: assignment
                .elements()
                .iter()
                .map(|e| (e.partition(), e.offset()))
                .collect(),
        }
    }
}

impl Reading {
    /// A record of `partition` at `offset` was received.
    fn read(&mut self, partition: i32, offset: i64) {
        if let Some((_, next)) = self.next.iter_mut().find(|(p, _)| *p == partition) {
            *next = Offset::Offset(offset + 1);
        }
    }
}

/// Assigns every partition again: `from_beginning` ones at their first offset, the others where
/// this term reads them next (librdkafka discards what it fetched for the old positions).
fn reassign_from_beginning(
    consumer: &StreamConsumer,
    topic: &str,
    reading: &mut Reading,
    from_beginning: &[i32],
) -> anyhow::Result<()> {
    let mut restart = TopicPartitionList::new();
    for (partition, next) in &mut reading.next {
        if from_beginning.contains(partition) {
            *next = Offset::Beginning;
        }
        restart.add_partition_offset(topic, *partition, *next)?;
    }
    consumer
        .assign(&restart)
        .context("Failed to reassign partitions")
}

/// The first record read from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Anchor {
    offset: i64,
    record_hash: Vec<u8>,
}

/// The first record this process read from each partition (since it was last re-read; kept
/// across leadership terms, so a term that ends right after a recreation cannot resume past
/// it unnoticed). Kafka's consumer cannot tell a topic deleted and recreated under it from the
/// old one (librdkafka keeps fetching at the old
/// offsets, so when the new partition has grown past them its first records are never read).
/// A partition's records never move, so the anchor must stay where it was: if the record at its
/// offset changes, or the partition becomes shorter than it, the partition was recreated and is
/// re-read from its beginning. Checked every [`RECREATION_CHECK_INTERVAL`].
#[derive(Clone, Default)]
struct Anchors(Arc<std::sync::Mutex<HashMap<i32, Anchor>>>);

impl Anchors {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Anchor>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the first record read from `partition` (hashing it only then).
    fn note(&self, partition: i32, offset: i64, record_hash: impl FnOnce() -> Vec<u8>) {
        self.map().entry(partition).or_insert_with(|| Anchor {
            offset,
            record_hash: record_hash(),
        });
    }

    fn forget(&self, partition: i32) {
        self.map().remove(&partition);
    }

    fn current(&self, partition: i32) -> Option<Anchor> {
        self.map().get(&partition).cloned()
    }

    fn snapshot(&self) -> Vec<(i32, Anchor)> {
        self.map().iter().map(|(p, a)| (*p, a.clone())).collect()
    }
}

/// How often the anchors are checked: a topic recreated under the consumer is re-read from its
/// beginning within about this long.
const RECREATION_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// What the record at an anchor's offset says.
enum AnchorCheck {
    Holds,
    /// Another record, or none any more: the partition was recreated.
    Gone,
    /// Deleted by retention: nothing can be proven; the next record read becomes the anchor.
    Expired,
    /// The broker did not answer in time: checked again next time.
    Unknown,
}

/// Checks the anchors every [`RECREATION_CHECK_INTERVAL`] with a client of its own, and sends
/// the partitions whose anchor is gone.
async fn watch_for_recreation(
    probe: Arc<BaseConsumer>,
    topic: String,
    anchors: Anchors,
    found: mpsc::Sender<Vec<(i32, Anchor)>>,
) {
    let mut every = tokio::time::interval(RECREATION_CHECK_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let snapshot = anchors.snapshot();
        if snapshot.is_empty() {
            continue;
        }
        let (probe, topic) = (probe.clone(), topic.clone());
        let Ok(checked) = tokio::task::spawn_blocking(move || {
            snapshot
                .into_iter()
                .map(|(partition, anchor)| {
                    let check = check_anchor(&probe, &topic, partition, &anchor);
                    (partition, anchor, check)
                })
                .collect::<Vec<_>>()
        })
        .await
        else {
            continue;
        };
        let mut gone = Vec::new();
        for (partition, anchor, check) in checked {
            match check {
                AnchorCheck::Holds | AnchorCheck::Unknown => {}
                AnchorCheck::Expired => {
                    let mut map = anchors.map();
                    if map.get(&partition) == Some(&anchor) {
                        map.remove(&partition);
                    }
                }
                AnchorCheck::Gone => gone.push((partition, anchor)),
            }
        }
        if !gone.is_empty() && found.send(gone).await.is_err() {
            return;
        }
    }
}

/// Reads the record at the anchor's offset (a blocking call: watermarks, then one fetch).
fn check_anchor(probe: &BaseConsumer, topic: &str, partition: i32, anchor: &Anchor) -> AnchorCheck {
    // Generous: a slow answer only delays the check, and it runs every 5 s off the hot path.
    const TIMEOUT: Duration = Duration::from_secs(4);
    let Ok((low, high)) = probe.fetch_watermarks(topic, partition, TIMEOUT) else {
        return AnchorCheck::Unknown;
    };
    if high <= anchor.offset {
        return AnchorCheck::Gone;
    }
    if low > anchor.offset {
        return AnchorCheck::Expired;
    }
    let mut at = TopicPartitionList::new();
    if at
        .add_partition_offset(topic, partition, Offset::Offset(anchor.offset))
        .is_err()
        || probe.assign(&at).is_err()
    {
        return AnchorCheck::Unknown;
    }
    let deadline = std::time::Instant::now() + TIMEOUT;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match probe.poll(left) {
            Some(Ok(message)) if message.partition() == partition => {
                if message.offset() != anchor.offset {
                    return AnchorCheck::Unknown;
                }
                let hash = apply::record_hash(message.key(), message.payload().unwrap_or_default());
                return if hash == anchor.record_hash {
                    AnchorCheck::Holds
                } else {
                    AnchorCheck::Gone
                };
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return AnchorCheck::Unknown,
        }
    }
    AnchorCheck::Unknown
}

/// Every second: publish liveness and the consumer lag for the Read API and `/metrics`.
async fn heartbeat(
    consumer: Arc<StreamConsumer>,
    applier: Applier,
    topic: String,
    partitions: Vec<i32>,
    grown: watch::Sender<bool>,
) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    // Housekeeping runs at the first beat of a term, then every INTERVAL.
    let mut last_prune = std::time::Instant::now()
        .checked_sub(tandem_store::housekeeping::INTERVAL)
        .unwrap_or_else(std::time::Instant::now);
    let mut last_metadata = std::time::Instant::now();
    loop {
        every.tick().await;
        // Partitions added at run time: checked every 10 s; the term then restarts with all.
        if last_metadata.elapsed() >= PARTITION_CHECK_INTERVAL {
            last_metadata = std::time::Instant::now();
            if let Some(count) = partition_count(&consumer, &topic).await {
                if count > partitions.len() {
                    tracing::warn!(
                        was = partitions.len(),
                        now = count,
                        "the topic gained partitions"
                    );
                    let _ = grown.send(true);
                }
            }
        }
        let highs = high_watermarks(&consumer, &topic, &partitions, Duration::from_secs(1)).await;
        let positions = consumer.position().ok();
        let lags: Vec<(i32, i64)> = highs
            .into_iter()
            .filter_map(|(partition, high)| {
                let position = positions
                    .as_ref()
                    .and_then(|p| p.find_partition(&topic, partition))
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })?;
                Some((partition, (high - position).max(0)))
            })
            .collect();
        if last_prune.elapsed() >= tandem_store::housekeeping::INTERVAL {
            last_prune = std::time::Instant::now();
            match tandem_store::housekeeping::region2(&applier.pool).await {
                Ok(pruned) => pruned.log(),
                Err(e) => tracing::warn!(error = format!("{e:#}"), "housekeeping failed"),
            }
        }
        let mut backlog = 0;
        for (partition, lag) in lags {
            applier.metrics.set_partition_lag(partition, lag);
            backlog += lag;
        }
        applier.record_heartbeat(backlog).await;
    }
}

/// How often the consumer looks for partitions added to the topic.
const PARTITION_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// The topic's partition count, from the broker's metadata (a blocking call, off the runtime).
async fn partition_count(consumer: &Arc<StreamConsumer>, topic: &str) -> Option<usize> {
    let consumer = consumer.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .ok()?;
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().len())
    })
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::CONSUMER_DEFAULTS;
    use tandem_core::limits::KAFKA_MAX_MESSAGE_BYTES;

    #[test]
    fn the_fetch_limit_is_the_shared_one() {
        let set = CONSUMER_DEFAULTS
            .iter()
            .find(|(k, _)| *k == "fetch.message.max.bytes")
            .map(|(_, v)| *v);
        assert_eq!(set, Some(KAFKA_MAX_MESSAGE_BYTES.to_string().as_str()));
    }
}

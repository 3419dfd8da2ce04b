//! The outbox relay (Region 1, long-running): publishes committed outbox rows to Kafka in
//! order, marks them published only after the broker acknowledged them, and prunes them after
//! a retention period (keeping them that long is what makes point-in-time replay possible).
//!
//! * One active replica: the leader holds a PostgreSQL advisory lock; standbys take over within
//!   about a second of the leader's session ending.
//! * Low latency and no stalls: it wakes on `LISTEN tandem_outbox` (a statement trigger on the
//!   outbox) and also polls every `RELAY_POLL_INTERVAL_MS`, so a lost notification costs one
//!   interval at most.
//! * Never skips a late committer: it selects rows with `published_at IS NULL` in `seq` order
//!   instead of "rows after the last published seq" (see the outbox migration).
//! * Order per document: events are keyed `collection/id`, so one document's events share a
//!   partition, and the idempotent producer (`enable.idempotence=true`, `acks=all`) keeps their
//!   order across retries. The consumer's version guard is the second line of defence.

pub mod metrics;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::Pool;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tandem_shared::config::{self, ConfigError, ServiceSettings};
use tandem_shared::db::DatabaseSettings;
use tandem_shared::event::{
    ChangeEvent, DocumentState, HEADER_COLLECTION, HEADER_EVENT_ID, HEADER_EVENT_TYPE,
    HEADER_TRACEPARENT,
};
use tandem_shared::http::{ReadyCheck, ScrapeHook, pool_scrape_hook};
use tandem_shared::kafka::KafkaSettings;
use tandem_shared::leader::{Leadership, RELAY_LOCK};
use time::OffsetDateTime;
use tokio::sync::watch;

pub use metrics::RelayMetrics;

/// Everything the relay is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub service: ServiceSettings,
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    /// Rows per batch (`RELAY_BATCH_SIZE`, default 500).
    pub batch_size: i64,
    /// Poll interval when no notification arrives (`RELAY_POLL_INTERVAL_MS`, default 500).
    pub poll_interval: Duration,
    /// How long published rows are kept for replay (`OUTBOX_RETENTION_HOURS`, default 72).
    pub retention: Duration,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            service: ServiceSettings::from_env()?,
            database: DatabaseSettings::from_env()?,
            kafka: KafkaSettings::from_env()?,
            batch_size: config::parsed_or("RELAY_BATCH_SIZE", 500)?,
            poll_interval: config::millis_or("RELAY_POLL_INTERVAL_MS", Duration::from_millis(500))?,
            retention: Duration::from_secs(
                config::parsed_or::<u64>("OUTBOX_RETENTION_HOURS", 72)? * 3600,
            ),
        })
    }
}

/// Producer defaults, overridable through `KAFKA_PROPERTIES` (the benchmark's raw baseline uses
/// them too).
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("linger.ms", "2"),
    ("message.timeout.ms", "30000"),
    ("compression.type", "lz4"),
];

/// One outbox row, as published.
struct OutboxRow {
    seq: i64,
    event: ChangeEvent,
    traceparent: Option<String>,
}

const FETCH_UNPUBLISHED: &str = "SELECT seq, event_id, payload, traceparent, created_at FROM outbox \
     WHERE published_at IS NULL ORDER BY seq LIMIT $1";
const MARK_PUBLISHED: &str =
    "UPDATE outbox SET published_at = clock_timestamp() WHERE seq = ANY($1)";
const PRUNE_PUBLISHED: &str = "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox \
     WHERE published_at < now() - make_interval(secs => $1) LIMIT 10000)";
const COUNT_UNPUBLISHED: &str = "SELECT count(*) FROM outbox WHERE published_at IS NULL";
/// How often the leader counts a backlog that outlasts one batch.
const BACKLOG_COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// The relay's shared parts.
#[derive(Clone)]
pub struct Relay {
    pub pool: Pool,
    pub settings: Settings,
    pub metrics: Arc<RelayMetrics>,
}

impl Relay {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = tandem_shared::db::connect_pool(&settings.database).await?;
        Ok(Self {
            pool,
            metrics: Arc::new(RelayMetrics::new()),
            settings,
        })
    }

    /// `/readyz`: the database answers (leader and standby alike; the role is reported).
    pub fn ready_check(&self) -> ReadyCheck {
        tandem_shared::worker::ready_check(self.pool.clone(), self.metrics.role.clone())
    }

    pub fn scrape_hook(&self) -> ScrapeHook {
        pool_scrape_hook(self.pool.clone())
    }

    /// A fresh idempotent producer. Each leadership term, and each recovery from a failed batch,
    /// gets a new one: an idempotent producer whose broker lost its state (producer ids,
    /// sequences) is permanently failed, and a new producer id is the way out.
    async fn create_producer(&self) -> anyhow::Result<FutureProducer> {
        self.settings
            .kafka
            .client_config(PRODUCER_DEFAULTS)
            .await?
            .create()
            .context("Failed to create the Kafka producer")
    }

    /// Runs until shutdown: wait for leadership, relay while leader, repeat.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        if let Err(e) = self.settings.kafka.ensure_topic().await {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not ensure the topic exists; publishing will retry"
            );
        }
        let mut last_prune = Instant::now() - Duration::from_secs(3600);
        tandem_shared::worker::run_elected(
            &self.settings.database,
            RELAY_LOCK,
            &self.metrics.role,
            &mut shutdown,
            async |leadership, shutdown| self.lead(leadership, shutdown, &mut last_prune).await,
        )
        .await;
        Ok(())
    }

    /// The leader's loop. `Ok` on shutdown, `Err` when leadership is lost.
    async fn lead(
        &self,
        leadership: &mut Leadership,
        shutdown: &mut watch::Receiver<bool>,
        last_prune: &mut Instant,
    ) -> anyhow::Result<()> {
        leadership
            .session
            .client
            .batch_execute("LISTEN tandem_outbox")
            .await
            .context("Failed to LISTEN")?;
        let mut backoff = Duration::from_millis(100);
        let mut producer = self.create_producer().await?;
        let mut last_count = Instant::now() - BACKLOG_COUNT_INTERVAL;
        loop {
            if *shutdown.borrow() {
                producer.flush(Duration::from_secs(10)).ok();
                return Ok(());
            }
            if last_prune.elapsed() >= Duration::from_secs(60) {
                self.prune().await;
                *last_prune = Instant::now();
            }
            if last_count.elapsed() >= BACKLOG_COUNT_INTERVAL {
                self.count_backlog().await;
                last_count = Instant::now();
            }
            match self.publish_batch(&producer).await {
                Ok(published) if published > 0 => {
                    backoff = Duration::from_millis(100);
                    // Drain queued notifications: the next fetch sees their rows anyway.
                    while leadership.session.notifications.try_recv().is_ok() {}
                    continue;
                }
                Ok(_) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        backoff_ms = backoff.as_millis() as u64,
                        "publishing failed; retrying"
                    );
                    self.metrics.publish_errors.inc();
                    // A broker that lost its data has lost the topic too: recreate it.
                    if let Err(e) = self.settings.kafka.ensure_topic().await {
                        tracing::warn!(error = format!("{e:#}"), "topic check failed");
                    }
                    match self.create_producer().await {
                        Ok(fresh) => {
                            // Destroying a producer waits for its broker threads: off the runtime.
                            let old = std::mem::replace(&mut producer, fresh);
                            tokio::task::spawn_blocking(move || drop(old));
                        }
                        Err(e) => tracing::warn!(
                            error = format!("{e:#}"),
                            "failed to recreate the producer"
                        ),
                    }
                    if !leadership.is_held().await {
                        anyhow::bail!("the leader session ended");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            tokio::select! {
                notification = leadership.session.notifications.recv() => {
                    if notification.is_none() {
                        anyhow::bail!("the leader session ended");
                    }
                }
                () = tokio::time::sleep(self.settings.poll_interval) => {
                    if !leadership.is_held().await {
                        anyhow::bail!("the leader session ended");
                    }
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    /// Publishes one batch of unpublished rows; returns how many were acknowledged.
    pub async fn publish_batch(&self, producer: &FutureProducer) -> anyhow::Result<usize> {
        let client = self
            .pool
            .get()
            .await
            .context("Failed to get a database connection")?;
        let stmt = client.prepare_cached(FETCH_UNPUBLISHED).await?;
        let rows = client
            .query(&stmt, &[&self.settings.batch_size])
            .await
            .context("Failed to read the outbox")?;
        if rows.is_empty() {
            self.metrics.backlog.set(0);
            return Ok(0);
        }
        let region = &self.settings.service.region;
        let mut batch = Vec::with_capacity(rows.len());
        for row in &rows {
            let payload: serde_json::Value = row.try_get(2)?;
            let state: DocumentState = serde_json::from_value(payload)
                .context("An outbox payload is not a document state")?;
            let created_at: OffsetDateTime = row.try_get(4)?;
            batch.push(OutboxRow {
                seq: row.try_get(0)?,
                event: ChangeEvent::new(row.try_get(1)?, region, created_at, state),
                traceparent: row.try_get(3)?,
            });
        }
        let started = Instant::now();
        let mut deliveries = Vec::with_capacity(batch.len());
        for row in &batch {
            let payload = row.event.encode();
            let event_id = row.event.id.to_string();
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: HEADER_EVENT_ID,
                    value: Some(event_id.as_str()),
                })
                .insert(Header {
                    key: HEADER_EVENT_TYPE,
                    value: Some(row.event.kind.as_str()),
                })
                .insert(Header {
                    key: HEADER_COLLECTION,
                    value: Some(row.event.data.collection.as_str()),
                });
            if let Some(tp) = &row.traceparent {
                headers = headers.insert(Header {
                    key: HEADER_TRACEPARENT,
                    value: Some(tp.as_str()),
                });
            }
            let mut record = FutureRecord::to(&self.settings.kafka.topic)
                .key(row.event.partition_key())
                .payload(&payload)
                .headers(headers);
            // Enqueue in seq order; when librdkafka's queue is full, wait for it to drain.
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        record = returned;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(anyhow::anyhow!("failed to enqueue an event: {e}")),
                }
            }
        }
        // Every delivery resolves within message.timeout.ms; the outer bound is a safety net
        // against a client that never reports back.
        let results = tokio::time::timeout(
            Duration::from_secs(120),
            futures_util::future::join_all(deliveries),
        )
        .await
        .map_err(|_| anyhow::anyhow!("the producer reported no delivery outcome within 120 s"))?;
        let mut acknowledged = Vec::with_capacity(batch.len());
        let mut first_error = None;
        for (row, result) in batch.iter().zip(results) {
            match result {
                Ok(Ok(_)) => acknowledged.push(row.seq),
                Ok(Err((e, _))) => {
                    first_error.get_or_insert(e.to_string());
                }
                Err(_cancelled) => {
                    first_error.get_or_insert("the producer dropped the delivery".to_owned());
                }
            }
        }
        if !acknowledged.is_empty() {
            let stmt = client.prepare_cached(MARK_PUBLISHED).await?;
            client
                .execute(&stmt, &[&acknowledged])
                .await
                .context("Failed to mark rows published")?;
        }
        self.metrics.published.inc_by(acknowledged.len() as u64);
        self.metrics.batch_size.observe(acknowledged.len() as f64);
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        // A short batch drained the backlog; while it lasts, the leader loop counts it now and
        // then (counting a large backlog after every batch cost a tenth of the drain).
        if rows.len() < self.settings.batch_size as usize {
            self.metrics.backlog.set(0);
        }
        match first_error {
            Some(e) => Err(anyhow::anyhow!(
                "the broker did not acknowledge every event: {e}"
            )),
            None => Ok(acknowledged.len()),
        }
    }

    /// Sets the `backlog` gauge to the number of unpublished rows.
    async fn count_backlog(&self) {
        let Ok(client) = self.pool.get().await else {
            return;
        };
        if let Ok(row) = client.query_one(COUNT_UNPUBLISHED, &[]).await {
            self.metrics.backlog.set(row.get(0));
        }
    }

    async fn prune(&self) {
        let retention = self.settings.retention.as_secs_f64();
        let result = async {
            let client = self.pool.get().await?;
            let mut total = 0;
            loop {
                let n = client.execute(PRUNE_PUBLISHED, &[&retention]).await?;
                total += n;
                if n < 10_000 {
                    return Ok::<u64, anyhow::Error>(total);
                }
            }
        }
        .await;
        match result {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "published outbox rows past retention removed"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "failed to prune the outbox"),
        }
    }
}

/// Marks every retained row created at or after `since` as unpublished, so the active relay
/// publishes them again (after a broker lost its data). Returns how many rows will be replayed.
pub async fn replay_since(pool: &Pool, since: OffsetDateTime) -> anyhow::Result<u64> {
    let client = pool
        .get()
        .await
        .context("Failed to get a database connection")?;
    let oldest: Option<OffsetDateTime> = client
        .query_one("SELECT min(created_at) FROM outbox", &[])
        .await?
        .get(0);
    if let Some(oldest) = oldest {
        if oldest > since {
            tracing::warn!(%oldest, "rows older than the retention period are gone; replay starts at the oldest retained row");
        }
    }
    let n = client
        .execute(
            "UPDATE outbox SET published_at = NULL WHERE created_at >= $1 AND published_at IS NOT NULL",
            &[&since],
        )
        .await
        .context("Failed to mark rows for replay")?;
    client.execute("NOTIFY tandem_outbox", &[]).await.ok();
    Ok(n)
}

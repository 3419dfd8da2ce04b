//! The outbox relay (Region 1, long-running): publishes committed outbox rows to Kafka in
//! order, marks them published only after the broker acknowledged them, and prunes them after
//! a retention period (keeping them that long is what makes point-in-time replay possible).
//!
//! * One active replica: the leader holds a PostgreSQL advisory lock; standbys take over within
//!   about a second of the leader's session ending.
//! * Or, with `RELAY_SHARES` = n > 1, n shares of the outbox (by document key), each published
//!   by the one relay holding its advisory lock, with an epoch and a fence of its own: the
//!   relays balance the shares among themselves (each takes at most ⌈n / relays⌉ and hands
//!   the rest back after its batch in flight), and a share whose relay died is taken over
//!   within about a second ([`Relay::run`]).
//! * Low latency and no stalls: it wakes on `LISTEN tandem_outbox` (the Write API notifies after
//!   its commits, never inside them: `tandem_store::outbox::RelayWake`) and also polls every
//!   `RELAY_POLL_INTERVAL_MS`, so a lost notification costs one interval at most.
//! * Never skips a late committer: it selects rows with `published_at IS NULL` in `seq` order
//!   instead of "rows after the last published seq" (see the outbox migration).
//! * Order per document: events are keyed `collection/id`, so one document's events share a
//!   partition, and the idempotent producer (`enable.idempotence=true`, `acks=all`) keeps their
//!   order across retries. The consumer's version guard is the second line of defence.

pub mod metrics;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::Pool;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tandem_core::document::{Collection, DocumentId, DocumentKey};
use tandem_core::event::{
    EventHeaders, HEARTBEAT_KEY, Heartbeat, Origin, encode_envelope, partition_key,
};
use tandem_core::limits::MAX_EVENT_BYTES;
use tandem_http::http::{ReadyCheck, ScrapeHook, pool_scrape_hook};
use tandem_runtime::config::{self, ConfigError, ServiceSettings};
use tandem_runtime::kafka::{KafkaSettings, owned_headers};
use tandem_runtime::shutdown::CancellationToken;
use tandem_store::db::DatabaseSettings;
use tandem_store::documents::StoreError;
use tandem_store::housekeeping;
use tandem_store::leader::{Fence, Leadership, MAX_SHARES, Membership, RELAY_LOCK, Share};
use tandem_store::outbox::{self, OutboxRow};

pub use metrics::RelayMetrics;

/// Everything the relay is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub service: ServiceSettings,
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    /// Rows per batch (`RELAY_BATCH_SIZE`, default 2000).
    pub batch_size: i64,
    /// Payload bytes per batch (`RELAY_BATCH_BYTES`, default 16 MiB): a batch stops before the
    /// row that would pass it (one larger row travels alone), so the relay's memory is bounded
    /// by bytes, not only by rows.
    pub batch_bytes: i64,
    /// Poll interval when no notification arrives (`RELAY_POLL_INTERVAL_MS`, default 500).
    pub poll_interval: Duration,
    /// How long published rows are kept for replay (`RELAY_OUTBOX_RETENTION_HOURS`, default 72).
    pub retention: Duration,
    /// `RELAY_SHARES` (default 1, at most 64): how many shares the outbox is split into, each
    /// published by one relay at a time (1: one active relay for the whole outbox).
    pub shares: u32,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            service: ServiceSettings::from_env()?,
            database: DatabaseSettings::from_env()?,
            kafka: KafkaSettings::from_env()?,
            batch_size: config::parsed_or("RELAY_BATCH_SIZE", 2000)?,
            batch_bytes: config::parsed_or("RELAY_BATCH_BYTES", 16 * 1024 * 1024)?,
            poll_interval: config::millis_or("RELAY_POLL_INTERVAL_MS", Duration::from_millis(500))?,
            retention: Duration::from_secs(
                config::parsed_or::<u64>("RELAY_OUTBOX_RETENTION_HOURS", 72)? * 3600,
            ),
            shares: match config::parsed_or::<u32>("RELAY_SHARES", 1)? {
                shares @ 1..=MAX_SHARES => shares,
                other => {
                    return Err(ConfigError::Invalid {
                        name: "RELAY_SHARES",
                        value: other.to_string(),
                        reason: format!("between 1 and {MAX_SHARES}"),
                    });
                }
            },
        })
    }
}

/// Producer defaults, overridable through `KAFKA_PROPERTIES` (the benchmark's raw baseline uses
/// them too).
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    // tandem_core::limits::KAFKA_MAX_MESSAGE_BYTES (the topic's max.message.bytes is the same).
    ("message.max.bytes", "1048576"),
    ("acks", "all"),
    ("linger.ms", "2"),
    ("message.timeout.ms", "30000"),
    // A topic missing from the metadata fails its messages after this long (default 30 s),
    // and the relay then recreates it: a deleted topic stalls publishing for 5 s, not 30.
    // (The relay creates the topic before publishing, so propagation is never this slow.)
    ("topic.metadata.propagation.max.ms", "5000"),
    ("compression.type", "lz4"),
];

/// One outbox row, ready to publish: its envelope is built around the stored payload text.
struct Outgoing {
    seq: i64,
    event_id: uuid::Uuid,
    key: DocumentKey,
    deleted: bool,
    encoded: Vec<u8>,
    traceparent: Option<String>,
}

impl Outgoing {
    /// Its Kafka headers, with the row's trace context.
    fn headers(&self) -> Vec<(&'static str, Vec<u8>)> {
        self.headers_with(self.traceparent.clone())
    }

    /// Its Kafka headers, with this trace context.
    fn headers_with(&self, traceparent: Option<String>) -> Vec<(&'static str, Vec<u8>)> {
        EventHeaders::change(
            self.event_id,
            self.deleted,
            &self.key.collection,
            traceparent,
        )
        .encode()
    }
}

/// How often the leader sends a heartbeat through every partition.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How often the leader re-reads the topic's partitions (for heartbeats to new ones).
const PARTITIONS_REFRESH: Duration = Duration::from_secs(10);
/// How often the leader counts a backlog that outlasts one batch.
const BACKLOG_COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// The relay's shared parts.
#[derive(Clone)]
pub struct Relay {
    pub pool: Pool,
    /// `/readyz`'s own connection.
    pub probe: Pool,
    pub settings: Settings,
    pub metrics: Arc<RelayMetrics>,
}

impl Relay {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = tandem_store::db::connect_pool(&settings.database).await?;
        Ok(Self {
            pool,
            probe: tandem_store::db::connect_probe(&settings.database).await?,
            metrics: Arc::new(RelayMetrics::new()),
            settings,
        })
    }

    /// `/readyz`: the database answers (leader and standby alike; the role is reported).
    pub fn ready_check(&self) -> ReadyCheck {
        tandem_http::worker::ready_check(self.probe.clone(), self.metrics.role.clone())
    }

    pub fn scrape_hook(&self) -> ScrapeHook {
        pool_scrape_hook(self.pool.clone())
    }

    /// A fresh idempotent producer. Each leadership term, and each recovery from a failed batch,
    /// gets a new one: an idempotent producer that hit a fatal error is permanently failed, and a
    /// new producer id is the way out. MSK produces those errors too: a topic deleted under the
    /// producer (its sequences are gone) or a fenced producer id.
    async fn create_producer(&self) -> anyhow::Result<FutureProducer> {
        self.settings
            .kafka
            .client_config(PRODUCER_DEFAULTS)
            .await?
            .create()
            .context("Failed to create the Kafka producer")
    }

    /// Runs until shutdown: wait for leadership, relay while leader, repeat.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        if let Err(e) = self.settings.kafka.ensure_topic().await {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not ensure the topic exists; publishing will retry"
            );
        }
        self.metrics.shares.set(i64::from(self.settings.shares));
        if self.settings.shares > 1 {
            self.run_shares(&shutdown).await;
            return Ok(());
        }
        let mut last_prune = Instant::now() - Duration::from_secs(3600);
        tandem_http::worker::run_elected(
            &self.settings.database,
            RELAY_LOCK,
            &self.metrics.role,
            &shutdown,
            async |leadership, shutdown| {
                self.metrics.shares_held.set(1);
                let result = self.lead(leadership, shutdown, &mut last_prune, None).await;
                self.metrics.shares_held.set(0);
                result
            },
        )
        .await;
        Ok(())
    }

    /// The partitioned mode (`RELAY_SHARES` > 1), until shutdown. The process joins the relays
    /// of the same share count ([`Membership`]), then every second computes its fair part,
    /// ⌈shares / relays⌉: one task per share tries to take its share while the process holds
    /// fewer, and the process hands back a share when it holds more (a relay joined). A share
    /// is handed back after its batch in flight is settled, and taken by the next relay from
    /// its oldest unpublished row, so one document's events keep their order across the
    /// handover; when a relay dies instead, its share's lock goes with its session, and the
    /// next holder's epoch fences off anything the dead one still had in flight.
    async fn run_shares(&self, shutdown: &CancellationToken) {
        let count = self.settings.shares;
        while let Err(e) = outbox::prepare_shares(&self.settings.database).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not prepare the outbox's shares; retrying"
            );
            self.pause(shutdown, Duration::from_secs(1)).await;
            if shutdown.is_cancelled() {
                return;
            }
        }
        while !shutdown.is_cancelled() {
            let membership = match Membership::join(&self.settings.database, count).await {
                Ok(Some(membership)) => membership,
                Ok(None) => {
                    // Jittered: two relays of different share counts that joined at the same
                    // moment and turned each other away must not keep meeting.
                    let jitter = u64::from(std::process::id() % 700);
                    self.pause(shutdown, Duration::from_millis(1000 + jitter))
                        .await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "could not join the relays; retrying"
                    );
                    self.pause(shutdown, Duration::from_secs(1)).await;
                    continue;
                }
            };
            tracing::info!(shares = count, "joined the partitioned relays");
            let term = shutdown.child_token();
            let shares = Arc::new(ShareState {
                target: std::sync::atomic::AtomicU32::new(0),
                held: std::sync::Mutex::new(HashMap::new()),
                taking: tokio::sync::Mutex::new(()),
            });
            let tasks: Vec<_> = (0..count)
                .map(|index| {
                    let relay = self.clone();
                    let (term, shares) = (term.clone(), shares.clone());
                    tokio::spawn(async move {
                        relay
                            .publish_share(Share { index, count }, &term, &shares)
                            .await;
                    })
                })
                .collect();
            loop {
                if !membership.is_held().await {
                    tracing::warn!("the membership session ended; rejoining");
                    break;
                }
                match membership.relays().await {
                    Ok(relays) => {
                        let fair = count.div_ceil(relays);
                        shares.target.store(fair, Ordering::Relaxed);
                        // One share a second: the relay that joined takes it before the next.
                        if shares.keeping() > fair as usize {
                            if let Some(token) = shares.release_highest() {
                                tracing::info!(relays, fair, "handing back a share");
                                token.cancel();
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), "could not count the relays")
                    }
                }
                let held = shares.held().len();
                self.metrics.shares_held.set(held as i64);
                self.metrics.role.set_leader(held > 0);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => break,
                }
            }
            term.cancel();
            for task in tasks {
                let _ = task.await;
            }
            self.metrics.shares_held.set(0);
            self.metrics.role.set_leader(false);
            drop(membership);
        }
    }

    /// One share's task in the partitioned mode: takes the share while the process holds fewer
    /// than its fair part, publishes it until handed back (or lost), and tries again.
    async fn publish_share(&self, share: Share, term: &CancellationToken, shares: &ShareState) {
        let mut last_prune = Instant::now() - Duration::from_secs(3600);
        while !term.is_cancelled() {
            let taken = {
                let _one_at_a_time = shares.taking.lock().await;
                if shares.held().len() < shares.target.load(Ordering::Relaxed) as usize {
                    match Leadership::try_share(&self.settings.database, share).await {
                        Ok(Some(leadership)) => {
                            let release = term.child_token();
                            shares.hold(share.index, release.clone());
                            Some((leadership, release))
                        }
                        Ok(None) => None,
                        Err(e) => {
                            tracing::warn!(
                                error = format!("{e:#}"),
                                share = share.index,
                                "could not take a share"
                            );
                            None
                        }
                    }
                } else {
                    None
                }
            };
            if let Some((mut leadership, release)) = taken {
                tracing::info!(
                    share = share.index,
                    shares = share.count,
                    "publishing a share"
                );
                self.metrics.role.set_leader(true);
                let result = self
                    .lead(
                        &mut leadership,
                        &release,
                        &mut last_prune,
                        Some((share, shares)),
                    )
                    .await;
                shares.drop_share(share.index);
                // Closing the session releases the share's lock.
                drop(leadership);
                match result {
                    Ok(()) => tracing::info!(share = share.index, "share handed back"),
                    Err(e) => tracing::warn!(
                        error = format!("{e:#}"),
                        share = share.index,
                        "stopped publishing a share"
                    ),
                }
            }
            // Staggered, so that the shares of a relay that died are spread over the others.
            let wait = Duration::from_millis(1000 + 37 * u64::from(share.index % 16));
            self.pause(term, wait).await;
        }
    }

    /// Sleeps `wait` or until `token` is cancelled.
    async fn pause(&self, token: &CancellationToken, wait: Duration) {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = token.cancelled() => {}
        }
    }

    /// The leader's loop. `Ok` on shutdown, `Err` when leadership is lost.
    async fn lead(
        &self,
        leadership: &mut Leadership,
        shutdown: &CancellationToken,
        last_prune: &mut Instant,
        shares: Option<(Share, &ShareState)>,
    ) -> anyhow::Result<()> {
        let share = shares.map(|(share, _)| share);
        // Heartbeats and the backlog count cover the whole outbox: in a process holding
        // several shares, only the loop of its lowest share sends and counts them.
        let speaks_for_process =
            || shares.is_none_or(|(share, state)| state.lowest() == Some(share.index));
        outbox::listen(&leadership.session.client).await?;
        let mut backoff = Duration::from_millis(100);
        let mut producer = self.create_producer().await?;
        let mut last_count = Instant::now() - BACKLOG_COUNT_INTERVAL;
        let fence = Some(leadership.fence);
        let mut last_beat = Instant::now() - HEARTBEAT_INTERVAL;
        let mut partitions: (Instant, Vec<i32>) = (Instant::now() - PARTITIONS_REFRESH, Vec::new());
        loop {
            if shutdown.is_cancelled() {
                producer.flush(Duration::from_secs(10)).ok();
                return Ok(());
            }
            if last_beat.elapsed() >= HEARTBEAT_INTERVAL && speaks_for_process() {
                last_beat = Instant::now();
                if partitions.0.elapsed() >= PARTITIONS_REFRESH || partitions.1.is_empty() {
                    if let Some(found) = self.partitions(&producer) {
                        partitions = (Instant::now(), found);
                    }
                }
                if let Err(e) = self.send_heartbeats(&producer, &partitions.1).await {
                    tracing::warn!(error = format!("{e:#}"), "heartbeat not sent");
                }
            }
            // Partitioned, the holder of share 0 prunes for all.
            if last_prune.elapsed() >= housekeeping::INTERVAL && share.is_none_or(|s| s.index == 0)
            {
                self.prune().await;
                *last_prune = Instant::now();
            }
            if last_count.elapsed() >= BACKLOG_COUNT_INTERVAL && speaks_for_process() {
                self.count_backlog().await;
                last_count = Instant::now();
            }
            match self.publish_batch(&producer, fence, share).await {
                Ok(published) if published > 0 => {
                    backoff = Duration::from_millis(100);
                    // Drain queued notifications: the next fetch sees their rows anyway.
                    while leadership.session.notifications.try_recv().is_ok() {}
                    continue;
                }
                Ok(_) => backoff = Duration::from_millis(100),
                Err(e) if matches!(e.downcast_ref(), Some(StoreError::Fenced { .. })) => {
                    return Err(e.context("a new relay leader was elected"));
                }
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        backoff_ms = backoff.as_millis() as u64,
                        "publishing failed; retrying"
                    );
                    self.metrics.publish_errors.inc();
                    // A deleted topic (an operator's mistake, a cluster rebuilt from nothing) is
                    // recreated; `replay --since` then refills what it held.
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
                        () = shutdown.cancelled() => return Ok(()),
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
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Publishes one batch of unpublished rows; returns how many were acknowledged. A row
    /// that retrying cannot publish (larger than [`MAX_EVENT_BYTES`], or refused by the broker
    /// as too large or invalid) is moved to `relay_dead_letters` and the batch goes on: one row
    /// never stops the relay. Transient failures (the broker unreachable) fail the batch, which
    /// is retried.
    /// With a `fence`, the rows are marked published (or set aside) only while this process
    /// is the elected leader: a deposed relay's marks do not commit (its produced events are
    /// duplicates Region 2 recognises by their ids).
    /// With a `share`, only that share's rows.
    pub async fn publish_batch(
        &self,
        producer: &FutureProducer,
        fence: Option<Fence>,
        share: Option<Share>,
    ) -> anyhow::Result<usize> {
        let mut client = self
            .pool
            .get()
            .await
            .context("Failed to get a database connection")?;
        let rows = outbox::fetch_share(
            &client,
            self.settings.batch_size,
            self.settings.batch_bytes,
            share,
        )
        .await?;
        // One share empty says nothing of the others' backlog.
        let whole_outbox = share.is_none();
        if rows.is_empty() {
            if whole_outbox {
                self.metrics.backlog.set(0);
            }
            return Ok(0);
        }
        let region = &self.settings.service.region;
        let mut batch = Vec::with_capacity(rows.len());
        let mut refused: Vec<(i64, String)> = Vec::new();
        let mut batch_bytes: i64 = 0;
        for row in rows.rows() {
            let (seq, payload_bytes, prepared) = match row {
                Ok(row) => (row.seq, row.payload_bytes, outgoing(&row, region)),
                Err(bad) => (bad.seq, bad.payload_bytes, Err(bad.error.into())),
            };
            batch_bytes += i64::from(payload_bytes);
            match prepared {
                Ok(row) if row.encoded.len() > MAX_EVENT_BYTES => refused.push((
                    seq,
                    format!(
                        "the event is {} bytes; the largest the relay publishes is {MAX_EVENT_BYTES}",
                        row.encoded.len()
                    ),
                )),
                Ok(row) => batch.push(row),
                Err(e) => refused.push((seq, format!("undecodable outbox row: {e:#}"))),
            }
        }
        drop(rows);
        self.metrics
            .largest_batch_bytes
            .set(self.metrics.largest_batch_bytes.get().max(batch_bytes));
        let fetched = batch.len() + refused.len();
        let started = Instant::now();
        let mut deliveries = Vec::with_capacity(batch.len());
        // One `publish` span per event while spans are exported, open until the broker's
        // acknowledgement (aligned with `deliveries`).
        let traced = tandem_runtime::telemetry::enabled();
        let mut spans = Vec::with_capacity(if traced { batch.len() } else { 0 });
        for row in &batch {
            let span = if traced {
                publish_span(row, &self.settings.kafka.topic)
            } else {
                tracing::Span::none()
            };
            // The publish span's own context when exported, so Region 2's apply becomes its
            // child; else the row's, as the write recorded it.
            let traceparent = tandem_runtime::telemetry::traceparent(&span)
                .map(|t| t.to_string())
                .or_else(|| row.traceparent.clone());
            let headers = row.headers_with(traceparent);
            let partition_key = partition_key(&row.key);
            let mut record = self.kafka_record(row, &partition_key, &headers);
            // Enqueue in seq order; when librdkafka's queue is full, wait for it to drain.
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push((row.seq, delivery));
                        if traced {
                            spans.push(span);
                        }
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        record = returned;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) if is_permanent(&e) => {
                        span.record("otel.status_code", "ERROR");
                        refused.push((row.seq, format!("refused by the Kafka client: {e}")));
                        break;
                    }
                    Err((e, _)) => return Err(anyhow::anyhow!("failed to enqueue an event: {e}")),
                }
            }
        }
        // Every delivery resolves within message.timeout.ms; the outer bound is a safety net
        // against a client that never reports back.
        let (seqs, deliveries): (Vec<i64>, Vec<_>) = deliveries.into_iter().unzip();
        let results = tokio::time::timeout(
            Duration::from_secs(120),
            futures_util::future::join_all(deliveries),
        )
        .await
        .map_err(|_| anyhow::anyhow!("the producer reported no delivery outcome within 120 s"))?;
        let mut acknowledged = Vec::with_capacity(batch.len());
        let mut first_error = None;
        let mut suspects = Vec::new();
        let travelled = seqs.len();
        let mut spans = spans.into_iter();
        for (seq, result) in seqs.into_iter().zip(results) {
            // Ends when dropped, at the end of this iteration: at the acknowledgement.
            let span = spans.next().unwrap_or_else(tracing::Span::none);
            if !matches!(result, Ok(Ok(_))) {
                span.record("otel.status_code", "ERROR");
            }
            match result {
                Ok(Ok(_)) => acknowledged.push(seq),
                Ok(Err((e, _))) if is_permanent(&e) && travelled == 1 => {
                    refused.push((seq, format!("refused by the broker: {e}")));
                }
                Ok(Err((e, _))) if is_permanent(&e) => suspects.push(seq),
                Ok(Err((e, _))) => {
                    first_error.get_or_insert(e.to_string());
                }
                Err(_cancelled) => {
                    first_error.get_or_insert("the producer dropped the delivery".to_owned());
                }
            }
        }
        // The broker refuses a produce request as a whole: every record of a partition that
        // travelled with the one it cannot take gets the same error. So a record refused beside
        // others is sent again alone, in seq order, and set aside only if refused alone. (After
        // a transient error the suspects wait for the batch's retry.)
        if first_error.is_none() {
            for seq in suspects {
                let Some(row) = batch.iter().find(|row| row.seq == seq) else {
                    continue;
                };
                match self.send_alone(producer, row).await {
                    Ok(()) => acknowledged.push(seq),
                    Err(e) if is_permanent(&e) => {
                        refused.push((seq, format!("refused by the broker: {e}")));
                    }
                    Err(e) => {
                        first_error = Some(e.to_string());
                        break;
                    }
                }
            }
        }
        let moved = outbox::settle(&mut client, fence, &acknowledged, &refused).await?;
        self.record_dead_letters(moved, &refused);
        self.metrics.published.inc_by(acknowledged.len() as u64);
        self.metrics.batch_size.observe(acknowledged.len() as f64);
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        // A short batch drained the backlog; while it lasts, the leader loop counts it now and
        // then (counting a large backlog after every batch cost a tenth of the drain).
        if whole_outbox && fetched < self.settings.batch_size as usize && first_error.is_none() {
            self.metrics.backlog.set(0);
        }
        match first_error {
            Some(e) => Err(anyhow::anyhow!(
                "the broker did not acknowledge every event: {e}"
            )),
            None => Ok(acknowledged.len() + refused.len()),
        }
    }

    /// The Kafka record of one row.
    fn kafka_record<'a>(
        &'a self,
        row: &'a Outgoing,
        partition_key: &'a str,
        headers: &'a [(&'static str, Vec<u8>)],
    ) -> FutureRecord<'a, str, Vec<u8>> {
        FutureRecord::to(&self.settings.kafka.topic)
            .key(partition_key)
            .payload(&row.encoded)
            .headers(owned_headers(headers))
    }

    /// Produces one row on its own and waits for the broker's answer.
    async fn send_alone(
        &self,
        producer: &FutureProducer,
        row: &Outgoing,
    ) -> Result<(), KafkaError> {
        let headers = row.headers();
        let partition_key = partition_key(&row.key);
        producer
            .send(
                self.kafka_record(row, &partition_key, &headers),
                Duration::from_secs(5),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }

    /// Counts and logs the rows a committed batch moved into `relay_dead_letters`.
    fn record_dead_letters(&self, moved: u64, refused: &[(i64, String)]) {
        self.metrics.dead_lettered.inc_by(moved);
        for (seq, reason) in refused {
            tracing::error!(
                seq,
                reason,
                "outbox row cannot be published; moved to relay_dead_letters"
            );
        }
    }

    /// The topic's partitions, from the producer's metadata (a blocking call).
    fn partitions(&self, producer: &FutureProducer) -> Option<Vec<i32>> {
        let topic = &self.settings.kafka.topic;
        let metadata = tokio::task::block_in_place(|| {
            producer
                .client()
                .fetch_metadata(Some(topic), Duration::from_secs(5))
        })
        .ok()?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        (!partitions.is_empty()).then_some(partitions)
    }

    /// Sends a heartbeat through every partition, after everything published so far: Region
    /// 2's lag is the age of the oldest partition's newest heartbeat, so it grows whatever
    /// stalls between Region 1's commits and Region 2's applies.
    async fn send_heartbeats(
        &self,
        producer: &FutureProducer,
        partitions: &[i32],
    ) -> anyhow::Result<()> {
        if partitions.is_empty() {
            anyhow::bail!("the topic's partitions are not known yet");
        }
        let time = outbox::heartbeat_time(&self.pool).await?;
        // The role rides along, so the other region learns of a newer write epoch even when
        // no write flows (the role is read after the time: it is at least as new).
        // A database not yet migrated to the role (a rolling upgrade) sends heartbeats without.
        let role = tandem_store::roles::current(&self.pool)
            .await
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, "no region role for the heartbeats");
                None
            });
        let region = &self.settings.service.region;
        let mut deliveries = Vec::with_capacity(partitions.len());
        for &partition in partitions {
            let mut heartbeat = Heartbeat::new(region, time, partition);
            if let Some(role) = &role {
                heartbeat = heartbeat.with_write_role(&role.write_region, role.write_epoch);
            }
            let payload = heartbeat.encode();
            let headers = EventHeaders::heartbeat(heartbeat.id).encode();
            let record = FutureRecord::to(&self.settings.kafka.topic)
                .partition(partition)
                .key(HEARTBEAT_KEY)
                .payload(&payload)
                .headers(owned_headers(&headers));
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => anyhow::bail!("failed to enqueue a heartbeat: {e}"),
            }
        }
        let results = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::future::join_all(deliveries),
        )
        .await
        .map_err(|_| anyhow::anyhow!("heartbeats not acknowledged within 10 s"))?;
        for result in results {
            match result {
                Ok(Ok(_)) => {
                    self.metrics.heartbeats.inc();
                }
                Ok(Err((e, _))) => anyhow::bail!("a heartbeat was not acknowledged: {e}"),
                Err(_) => anyhow::bail!("the producer dropped a heartbeat"),
            }
        }
        Ok(())
    }

    /// Sets the `backlog` gauge to the number of unpublished rows.
    async fn count_backlog(&self) {
        if let Ok(backlog) = outbox::count_unpublished(&self.pool).await {
            self.metrics.backlog.set(backlog);
        }
    }

    /// Region 1's housekeeping (`tandem_store::housekeeping`): the outbox and the
    /// idempotency keys.
    async fn prune(&self) {
        match housekeeping::region1(&self.pool, self.settings.retention).await {
            Ok(pruned) => pruned.log(),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "housekeeping failed"),
        }
    }
}

/// The partitioned mode's shares in this process: its fair part, and the shares it holds
/// with the token that hands each back.
struct ShareState {
    target: std::sync::atomic::AtomicU32,
    held: std::sync::Mutex<HashMap<u32, CancellationToken>>,
    /// Taken while a share task checks the count and takes its share: never more than the
    /// fair part at once.
    taking: tokio::sync::Mutex<()>,
}

impl ShareState {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u32, CancellationToken>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn held(&self) -> Vec<u32> {
        self.map().keys().copied().collect()
    }

    /// The lowest share held.
    fn lowest(&self) -> Option<u32> {
        self.map().keys().min().copied()
    }

    fn hold(&self, index: u32, release: CancellationToken) {
        self.map().insert(index, release);
    }

    fn drop_share(&self, index: u32) {
        self.map().remove(&index);
    }

    /// How many shares are held and not being handed back.
    fn keeping(&self) -> usize {
        self.map().values().filter(|t| !t.is_cancelled()).count()
    }

    /// The token of the highest share held that is not being handed back already.
    fn release_highest(&self) -> Option<CancellationToken> {
        self.map()
            .iter()
            .filter(|(_, token)| !token.is_cancelled())
            .max_by_key(|(index, _)| **index)
            .map(|(_, token)| token.clone())
    }
}

/// The envelope of one fetched outbox row.
fn outgoing(row: &OutboxRow<'_>, region: &str) -> anyhow::Result<Outgoing> {
    let key = DocumentKey::new(
        Collection::parse(row.collection)?,
        DocumentId::parse(row.document_id)?,
    );
    let deleted = match row.operation {
        "upsert" => false,
        "delete" => true,
        other => anyhow::bail!("unknown operation {other:?}"),
    };
    Ok(Outgoing {
        seq: row.seq,
        event_id: row.event_id,
        encoded: encode_envelope(
            row.event_id,
            // Rows from before the write fence were Region 1's, the only write region, in write epoch 1.
            &Origin {
                region: row.origin.unwrap_or(region).to_owned(),
                write_epoch: row.write_epoch.unwrap_or(1),
                sequence: row.seq,
            },
            row.created_at,
            deleted,
            &key,
            row.payload,
        ),
        key,
        deleted,
        traceparent: row.traceparent.map(str::to_owned),
    })
}

/// The span of one event's publish: the child of the trace its write recorded in the outbox.
fn publish_span(row: &Outgoing, topic: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "publish",
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = %topic,
        messaging.message.id = %row.event_id,
        tandem.outbox.seq = row.seq,
    );
    if let Some(parent) = &row.traceparent {
        tandem_runtime::telemetry::continue_trace(&span, parent);
    }
    span
}

/// Whether a produce error is about the record itself, so that retrying cannot help: it is too
/// large for the broker or the client, or the broker found it invalid.
fn is_permanent(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as Code;
    matches!(
        error.rdkafka_error_code(),
        Some(
            Code::MessageSizeTooLarge
                | Code::MessageBatchTooLarge
                | Code::InvalidMessageSize
                | Code::InvalidMessage
                | Code::InvalidRecord
                | Code::BadMessage
        )
    )
}

#[cfg(test)]
mod tests {
    use super::PRODUCER_DEFAULTS;
    use tandem_core::limits::KAFKA_MAX_MESSAGE_BYTES;

    #[test]
    fn the_producer_message_limit_is_the_shared_one() {
        let set = PRODUCER_DEFAULTS
            .iter()
            .find(|(k, _)| *k == "message.max.bytes")
            .map(|(_, v)| *v);
        assert_eq!(set, Some(KAFKA_MAX_MESSAGE_BYTES.to_string().as_str()));
    }
}

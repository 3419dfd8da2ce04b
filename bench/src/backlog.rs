//! Measurement 4, relay drain: an outbox backlog committed at once, until the relay has published every row,
//! against a raw rdkafka producer sending the same messages (same bytes, keys, headers and
//! producer settings) to the same broker.
//!
//! Measurement 5, Region 2 catch-up: the consumer applying that backlog from Kafka, against a plain batched
//! `INSERT … ON CONFLICT` of the same document rows into the same PostgreSQL cluster.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tandem_core::event::{ChangeEvent, DocumentState, EventHeaders};
use tandem_runtime::kafka::owned_headers;
use time::OffsetDateTime;

use crate::cpu::{CpuSplit, Meter, Probe};
use crate::stack::{Kind, Probes, Service, Stack, pool};

const COLLECTION: &str = "drain";

/// The relay's producer settings, before `KAFKA_PROPERTIES`.
const RELAY_PRODUCER: &[(&str, &str)] = tandem_outbox_relay::PRODUCER_DEFAULTS;

/// A producer configured as the relay's is.
pub async fn relay_like_producer(stack: &Stack, topic: &str) -> anyhow::Result<FutureProducer> {
    let settings = stack.kafka_settings(topic);
    settings.ensure_topic().await?;
    Ok(settings.client_config(RELAY_PRODUCER).await?.create()?)
}

#[derive(Debug)]
pub struct Drain {
    pub rows: u64,
    pub relay: Duration,
    pub raw: Duration,
    pub message_bytes: usize,
    pub relay_cpu: CpuSplit,
    pub raw_cpu: CpuSplit,
    pub profile: Vec<String>,
}

/// Commits `rows` outbox rows in one statement (the relay is running and waiting), waits until
/// all are published, then sends the same messages with a raw producer to a fresh topic.
/// Returns the figures and the document states, for the catch-up baseline.
pub async fn relay_drain(
    stack: &Stack,
    rows: u64,
    relay_service: &Service,
    probes: &Probes,
) -> anyhow::Result<(Drain, Vec<DocumentState>)> {
    let relay_meter = Meter::default()
        .with("relay", relay_service.probe())
        .with("PostgreSQL", probes.pg1)
        .with("broker", probes.broker);
    let db = pool(&stack.db1, 2).await?;
    let client = db.get().await?;
    fill_outbox(&client, COLLECTION, rows).await?;
    let committed: OffsetDateTime = client
        .query_one("SELECT clock_timestamp()", &[])
        .await?
        .get(0);
    crate::profile::reset(&stack.db1).await?;
    let cpu = relay_meter.start();
    // Done when the newest row is published: the relay publishes in `seq` order, so every
    // older row is by then (checked once more below). A primary-key lookup: polling must not
    // load the database it measures.
    let newest: i64 = client
        .query_one("SELECT max(seq) FROM outbox", &[])
        .await?
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let published: bool = client
            .query_one(
                "SELECT published_at IS NOT NULL FROM outbox WHERE seq = $1",
                &[&newest],
            )
            .await?
            .get(0);
        if published {
            let left: i64 = tandem_store::outbox::count_unpublished(&db).await?;
            if left == 0 {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay did not drain the outbox:\n{}",
            relay_service.process.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last: OffsetDateTime = client
        .query_one("SELECT max(published_at) FROM outbox", &[])
        .await?
        .get(0);
    let relay = Duration::try_from(last - committed).unwrap_or_default();
    let relay_cpu = cpu.stop();
    let profile = crate::profile::top(&stack.db1, "relay drain (Region 1)").await?;

    // The same messages, built exactly as the relay builds them from the same rows.
    let rows_read = client
        .query(
            "SELECT event_id, payload, created_at, seq, origin, write_epoch FROM outbox \
             WHERE collection = $1 ORDER BY seq",
            &[&COLLECTION],
        )
        .await?;
    let mut states = Vec::with_capacity(rows_read.len());
    let mut messages = Vec::with_capacity(rows_read.len());
    for row in &rows_read {
        let state: DocumentState = serde_json::from_value(row.try_get(1)?)?;
        let event = ChangeEvent::new(
            row.try_get(0)?,
            &tandem_core::event::Origin::new(row.try_get(4)?, row.try_get(5)?, row.try_get(3)?),
            row.try_get(2)?,
            state.clone(),
        );
        messages.push((
            event.partition_key().to_owned(),
            EventHeaders::change(event.id, false, &state.collection, None).encode(),
            event.encode(),
        ));
        states.push(state);
    }
    drop(rows_read);
    let message_bytes = messages.first().map_or(0, |m| m.2.len());
    let topic = format!("{}.raw", stack.topic);
    let producer = relay_like_producer(stack, &topic).await?;
    // A sliding window of unacknowledged messages keeps the pipeline as full as librdkafka
    // allows without queueing so many that the last ones time out before their turn.
    const WINDOW: usize = 1000;
    let cpu = Meter::default()
        .with("producer (this process)", Some(Probe::LoadGenerator))
        .with("broker", probes.broker)
        .start();
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for (key, headers, payload) in &messages {
        if in_flight.len() >= WINDOW {
            delivered(in_flight.next().await)?;
        }
        let mut record = FutureRecord::to(&topic)
            .key(key.as_str())
            .payload(payload.as_slice())
            .headers(owned_headers(headers));
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    in_flight.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => anyhow::bail!("raw producer: {e}"),
            }
        }
    }
    while !in_flight.is_empty() {
        delivered(in_flight.next().await)?;
    }
    let raw = started.elapsed();
    let raw_cpu = cpu.stop();
    tokio::task::spawn_blocking(move || drop(producer)).await?;
    Ok((
        Drain {
            rows,
            relay,
            raw,
            message_bytes,
            relay_cpu,
            raw_cpu,
            profile,
        },
        states,
    ))
}

/// Commits `rows` outbox rows of `collection` (documents `d1`…) in one statement.
pub async fn fill_outbox(
    client: &tokio_postgres::Client,
    collection: &str,
    rows: u64,
) -> anyhow::Result<()> {
    client
        .execute(
            "INSERT INTO outbox (event_id, collection, document_id, version, operation, payload) \
             SELECT (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0') \
                     || substr(md5(random()::text || g::text), 1, 20))::uuid, \
                    $1, 'd' || g, 1, 'upsert', \
                    jsonb_build_object('collection', $1::text, 'id', 'd' || g, 'version', 1, \
                      'data', $2::text::jsonb, \
                      'created_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                      'updated_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')) \
             FROM generate_series(1, $3::bigint) g",
            &[&collection, &crate::document_json(), &i64::try_from(rows)?],
        )
        .await
        .context("Failed to fill the outbox")?;
    Ok(())
}

fn delivered<E>(
    outcome: Option<Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>>,
) -> anyhow::Result<()> {
    match outcome {
        Some(Ok(Ok(_))) | None => Ok(()),
        Some(Ok(Err((e, _)))) => anyhow::bail!("raw producer: delivery failed: {e}"),
        Some(Err(_)) => anyhow::bail!("raw producer: delivery cancelled"),
    }
}

#[derive(Debug)]
pub struct CatchUp {
    pub events: u64,
    /// First event applied → last event applied (the consumer's own start-up excluded).
    pub consumer: Duration,
    /// Spawn → last event applied.
    pub consumer_wall: Duration,
    pub batched_insert: Duration,
    pub batch_rows: usize,
    pub consumer_cpu: CpuSplit,
    pub insert_cpu: CpuSplit,
    pub profile: Vec<String>,
}

/// Starts the consumer on the backlog the relay published and times the apply; then inserts the
/// same rows in batches into a fresh database of Region 2's cluster.
pub async fn catch_up(
    stack: &Stack,
    states: &[DocumentState],
    probes: &Probes,
) -> anyhow::Result<(CatchUp, Service)> {
    let events = states.len() as u64;
    let db = pool(&stack.db2, 1).await?;
    let client = db.get().await?;
    crate::profile::reset(&stack.db2).await?;
    let spawned = Instant::now();
    let consumer = stack.spawn(Kind::Consumer).await?;
    let cpu = Meter::default()
        .with("consumer", consumer.probe())
        .with("PostgreSQL", probes.pg2)
        .with("Redis", probes.redis2)
        .with("broker", probes.broker)
        .start();
    // Done when the consumer's stored positions cover every message the relay published
    // (3 rows to read: polling must not load the database it measures), then confirmed by
    // counting the applied backlog events once.
    let published: i64 = pool(&stack.db1, 1)
        .await?
        .get()
        .await?
        .query_one(
            "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let position: i64 = client
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets WHERE topic = $1",
                &[&stack.topic],
            )
            .await?
            .get(0);
        if position >= published {
            let applied: i64 = client
                .query_one(
                    "SELECT count(*) FROM applied_events WHERE collection = $1",
                    &[&COLLECTION],
                )
                .await?
                .get(0);
            if applied as u64 >= events {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the consumer did not apply the backlog ({position} of {published} messages):\n{}",
            consumer.process.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let consumer_wall = spawned.elapsed();
    let consumer_cpu = cpu.stop();
    let profile = crate::profile::top(&stack.db2, "catch-up (Region 2)").await?;
    let row = client
        .query_one(
            "SELECT min(applied_at), max(applied_at) FROM applied_events WHERE collection = $1",
            &[&COLLECTION],
        )
        .await?;
    let (first, last): (OffsetDateTime, OffsetDateTime) = (row.get(0), row.get(1));
    let consumer_span = Duration::try_from(last - first).unwrap_or_default();

    // The baseline: the same rows, 1000 per statement, into an empty documents table.
    let url = stack.pg2.create_database().await?;
    let baseline = pool(&url, 1).await?;
    tandem_store::migrations::run(&baseline).await?;
    let client = baseline.get().await?;
    let statement = client
        .prepare(
            "INSERT INTO documents (collection, id, version, data, deleted, created_at, updated_at) \
             SELECT c, i, v, d::jsonb, x, ca, ua FROM unnest($1::text[], $2::text[], $3::int8[], \
               $4::text[], $5::bool[], $6::timestamptz[], $7::timestamptz[]) AS t(c, i, v, d, x, ca, ua) \
             ON CONFLICT (collection, id) DO UPDATE SET version = EXCLUDED.version, \
               data = EXCLUDED.data, deleted = EXCLUDED.deleted, created_at = EXCLUDED.created_at, \
               updated_at = EXCLUDED.updated_at WHERE documents.version < EXCLUDED.version",
        )
        .await?;
    const BATCH: usize = 1000;
    // Columns prepared before the clock starts: the baseline times the database, not serde.
    type Columns = (
        Vec<String>,
        Vec<String>,
        Vec<i64>,
        Vec<Option<String>>,
        Vec<bool>,
        Vec<OffsetDateTime>,
        Vec<OffsetDateTime>,
    );
    let batches: Vec<Columns> = states
        .chunks(BATCH)
        .map(|chunk| {
            (
                chunk
                    .iter()
                    .map(|s| s.collection.as_str().to_owned())
                    .collect(),
                chunk.iter().map(|s| s.id.as_str().to_owned()).collect(),
                chunk.iter().map(|s| s.version).collect(),
                chunk
                    .iter()
                    .map(|s| {
                        s.data
                            .as_ref()
                            .map(|d| serde_json::Value::Object(d.clone()).to_string())
                    })
                    .collect(),
                chunk.iter().map(|s| s.deleted).collect(),
                chunk
                    .iter()
                    .map(|s| s.created_at.unwrap_or(s.updated_at))
                    .collect(),
                chunk.iter().map(|s| s.updated_at).collect(),
            )
        })
        .collect();
    let cpu = Meter::default()
        .with("PostgreSQL", probes.pg2)
        .with("client (this process)", Some(Probe::LoadGenerator))
        .start();
    let started = Instant::now();
    for (collections, ids, versions, data, deleted, created, updated) in &batches {
        client
            .execute(
                &statement,
                &[collections, ids, versions, data, deleted, created, updated],
            )
            .await?;
    }
    let batched_insert = started.elapsed();
    let insert_cpu = cpu.stop();
    Ok((
        CatchUp {
            events,
            consumer: consumer_span,
            consumer_wall,
            batched_insert,
            batch_rows: BATCH,
            consumer_cpu,
            insert_cpu,
            profile,
        },
        consumer,
    ))
}

//! Measurement 2, replication lag: writes at a fixed rate (open loop) through Region 1; for each, the time
//! from its acknowledgement until Region 2's Read API returns it. The consumer's own histogram
//! (event created → applied) is read from its `/metrics`. Baseline: a raw rdkafka
//! produce → consume round trip on the same broker, at the same rate, with the relay's producer
//! and the consumer's fetch settings.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use crate::cpu::{CpuSplit, Meter, Probe};
use crate::load::{histogram, open_loop, record};
use crate::stack::{Kind, PARTITIONS, Stack, http_client};

/// How often a pending write is looked for in Region 2.
pub const POLL: Duration = Duration::from_millis(2);
const COLLECTION: &str = "lag";

/// The consumer's fetch settings, before `KAFKA_PROPERTIES`.
const CONSUMER_SETTINGS: &[(&str, &str)] = tandem_region2_consumer::CONSUMER_DEFAULTS;

#[derive(Debug)]
pub struct Lag {
    pub writes: u64,
    pub rate: f64,
    /// Write acknowledgement latency, µs.
    pub ack: Histogram<u64>,
    /// Acknowledgement → visible in Region 2's Read API, µs.
    pub visible: Histogram<u64>,
    pub failed: u64,
    /// The consumer's histogram over the run: (bucket upper bound s, count) and the sum.
    pub server: Option<ServerHistogram>,
    /// Raw produce → consume, µs.
    pub raw: Histogram<u64>,
    pub raw_lost: u64,
    pub cpu: CpuSplit,
    pub raw_cpu: CpuSplit,
    pub profile: Vec<String>,
    /// Where the time goes: each stage's histogram (µs) over the measured writes, from the
    /// databases' clocks, the records' timestamps and the pollers' (one machine, one clock).
    pub stages: Vec<(&'static str, Histogram<u64>)>,
}

/// Documents the writes go to, round robin. Each has one poller in Region 2, so looking for the
/// writes costs `LANES / POLL` requests per second whatever the lag (a poller per pending write
/// would add load exactly when the system falls behind, and make it fall further).
pub const LANES: u64 = 4;

/// `PUT` a document; its new version (from the `ETag`).
async fn put(client: &reqwest::Client, url: &str, token: &str, body: bytes::Bytes) -> Option<i64> {
    let response = client
        .put(url)
        .header("authorization", token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .ok()?;
    let version = etag(&response);
    let ok = response.status().is_success();
    response.bytes().await.ok()?;
    version.filter(|_| ok)
}

/// `GET` a document; its version when it exists.
async fn version(client: &reqwest::Client, url: &str) -> Option<i64> {
    let response = client.get(url).send().await.ok()?;
    let version = etag(&response);
    let ok = response.status() == 200;
    response.bytes().await.ok()?;
    version.filter(|_| ok)
}

fn etag(response: &reqwest::Response) -> Option<i64> {
    response
        .headers()
        .get("etag")?
        .to_str()
        .ok()?
        .trim_matches('"')
        .parse()
        .ok()
}

pub async fn run(
    stack: &Stack,
    rate: f64,
    duration: Duration,
    meter: &Meter,
    broker: Option<Probe>,
) -> anyhow::Result<Lag> {
    let count = (rate * duration.as_secs_f64()).round() as u64;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let client = http_client(256);
    let token = format!("Bearer {}", stack.token);
    let body = bytes::Bytes::from(crate::document_json());
    let lane_path = |lane: u64| format!("/v1/{COLLECTION}/{run}-{lane}");
    let write_urls: Vec<String> = (0..LANES)
        .map(|l| format!("{}{}", stack.url(Kind::Write), lane_path(l)))
        .collect();
    let read_urls: Vec<String> = (0..LANES)
        .map(|l| format!("{}{}", stack.url(Kind::Read2), lane_path(l)))
        .collect();
    // Warm-up: create every lane's document and wait for it in Region 2.
    for (write, read) in write_urls.iter().zip(&read_urls) {
        put(&client, write, &token, body.clone())
            .await
            .ok_or_else(|| anyhow::anyhow!("a warm-up write failed"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while version(&client, read).await.is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "a warm-up write never reached Region 2"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // One poller per lane: the first moment each version is visible.
    let seen: Arc<Vec<AtomicI64>> = Arc::new((0..LANES).map(|_| AtomicI64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = read_urls
        .iter()
        .enumerate()
        .map(|(lane, url)| {
            let (client, url, seen, stop) =
                (client.clone(), url.clone(), seen.clone(), stop.clone());
            tokio::spawn(async move {
                let mut timeline: Vec<(Instant, i64)> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(v) = version(&client, &url).await {
                        let at = Instant::now();
                        if timeline.last().is_none_or(|(_, last)| v > *last) {
                            timeline.push((at, v));
                            seen[lane].store(v, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(POLL).await;
                }
                timeline
            })
        })
        .collect();

    let metrics = format!("{}/metrics", stack.url(Kind::Consumer));
    let before = scrape(&client, &metrics).await;
    crate::profile::reset(&stack.db1).await?;
    crate::profile::reset(&stack.db2).await?;
    let cpu = meter.start();
    // Instants as wall-clock microseconds, to line them up with the databases' timestamps.
    let anchor = (Instant::now(), std::time::SystemTime::now());
    let wall_us = move |at: Instant| -> i64 {
        // Every instant used is after the anchor (acknowledgements and sightings come later).
        let wall = anchor.1 + at.saturating_duration_since(anchor.0);
        let since = wall
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
    };
    let results = open_loop(rate, count, |i| {
        let lane = i % LANES;
        let (client, url, token, body) = (
            client.clone(),
            write_urls[lane as usize].clone(),
            token.clone(),
            body.clone(),
        );
        async move {
            let sent = Instant::now();
            let version = put(&client, &url, &token, body).await;
            (lane as usize, version, sent, Instant::now())
        }
    })
    .await;
    // Wait until every acknowledged version has been seen (or give up after 30 s).
    let mut newest = vec![0i64; LANES as usize];
    for (lane, version, _, _) in &results {
        if let Some(v) = version {
            newest[*lane] = newest[*lane].max(*v);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && newest
            .iter()
            .enumerate()
            .any(|(lane, v)| seen[lane].load(Ordering::Relaxed) < *v)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = cpu.stop();
    stop.store(true, Ordering::Relaxed);
    let mut profile = crate::profile::top(&stack.db1, "replication lag run (Region 1)").await?;
    profile.extend(crate::profile::top(&stack.db2, "replication lag run (Region 2)").await?);
    let mut timelines = Vec::new();
    for poller in pollers {
        timelines.push(poller.await?);
    }
    let after = scrape(&client, &metrics).await;

    let (mut ack, mut visible, mut failed) = (histogram(), histogram(), 0);
    let mut shown: HashMap<(u64, i64), i64> = HashMap::new();
    for (lane, version, sent, acked) in results {
        let first_seen = version.and_then(|v| {
            timelines[lane]
                .iter()
                .find(|(_, seen)| *seen >= v)
                .map(|(at, _)| *at)
        });
        match first_seen {
            Some(at) => {
                record(&mut ack, acked - sent);
                record(&mut visible, at.saturating_duration_since(acked));
                if let Some(v) = version {
                    shown.insert((lane as u64, v), wall_us(at));
                }
            }
            None => failed += 1,
        }
    }
    let server = match (before, after) {
        (Some(before), Some(after)) => Some(after.minus(&before)),
        _ => None,
    };
    let stages = stages(stack, &run, &shown).await?;
    let (raw, raw_lost, raw_cpu) = raw_round_trip(stack, rate, count, broker).await?;
    Ok(Lag {
        writes: count,
        rate,
        ack,
        visible,
        failed,
        server,
        raw,
        raw_lost,
        cpu,
        raw_cpu,
        profile,
        stages,
    })
}

/// Microsecond timestamps of one run's events, by event id: the outbox row's insertion and
/// its mark (Region 1), its record's timestamp (set by the relay's producer when it sends; the
/// broker keeps it, in milliseconds) and its insertion in Region 2's `applied_events`
/// (inside the apply transaction, before its commit).
#[derive(Default)]
struct Times {
    lane: u64,
    version: i64,
    written: i64,
    marked: Option<i64>,
    produced: Option<i64>,
    applied: Option<i64>,
}

/// The stage breakdown of the measured writes (see [`Lag::stages`]). `shown` holds when each
/// (lane, version) was first read back in Region 2, in wall-clock microseconds.
async fn stages(
    stack: &Stack,
    run: &str,
    shown: &HashMap<(u64, i64), i64>,
) -> anyhow::Result<Vec<(&'static str, Histogram<u64>)>> {
    let like = format!("{run}-%");
    let micros = |column: &str| format!("(extract(epoch FROM {column}) * 1000000)::int8");
    let db1 = crate::stack::pool(&stack.db1, 1).await?;
    let rows = db1
        .get()
        .await?
        .query(
            &format!(
                "SELECT event_id::text, document_id, version, {}, {} FROM outbox \
                 WHERE collection = $1 AND document_id LIKE $2",
                micros("created_at"),
                micros("published_at")
            ),
            &[&COLLECTION, &like],
        )
        .await?;
    let mut times: HashMap<String, Times> = HashMap::new();
    for row in rows {
        let document: String = row.try_get(1)?;
        let Some(lane) = document.rsplit('-').next().and_then(|l| l.parse().ok()) else {
            continue;
        };
        times.insert(
            row.try_get(0)?,
            Times {
                lane,
                version: row.try_get(2)?,
                written: row.try_get(3)?,
                marked: row.try_get(4)?,
                ..Times::default()
            },
        );
    }
    let db2 = crate::stack::pool(&stack.db2, 1).await?;
    for row in db2
        .get()
        .await?
        .query(
            &format!(
                "SELECT event_id::text, {} FROM applied_events \
                 WHERE collection = $1 AND document_id LIKE $2",
                micros("applied_at")
            ),
            &[&COLLECTION, &like],
        )
        .await?
    {
        let id: String = row.try_get(0)?;
        if let Some(t) = times.get_mut(&id) {
            t.applied = Some(row.try_get(1)?);
        }
    }
    for (id, produced) in record_times(stack, run).await? {
        if let Some(t) = times.get_mut(&id) {
            t.produced = Some(produced);
        }
    }
    let mut stages: Vec<(&'static str, Histogram<u64>)> = [
        "outbox row written → record produced (the relay's wake-up, fetch and send)",
        "record produced → applied in Region 2 (broker, consumer fetch, apply transaction up to its insert)",
        "applied → visible in Region 2's Read API (commit, cache update, up to one 2 ms poll)",
        "record produced → marked published (broker acknowledgement, the relay's mark statement)",
        "outbox row written → visible in Region 2's Read API",
    ]
    .into_iter()
    .map(|name| (name, histogram()))
    .collect();
    let mut put = |stage: usize, from: Option<i64>, to: Option<i64>| {
        if let (Some(from), Some(to)) = (from, to) {
            let micros = u64::try_from(to.saturating_sub(from)).unwrap_or(0);
            stages[stage].1.saturating_record(micros.max(1));
        }
    };
    for t in times.values() {
        // Only the measured writes (the warm-up's first version has no acknowledgement here).
        let Some(visible) = shown.get(&(t.lane, t.version)).copied() else {
            continue;
        };
        put(0, Some(t.written), t.produced);
        put(1, t.produced, t.applied);
        put(2, t.applied, Some(visible));
        put(3, t.produced, t.marked);
        put(4, Some(t.written), Some(visible));
    }
    Ok(stages)
}

/// Each of this run's records' timestamp (µs, millisecond resolution), by event id, read back
/// from the topic.
async fn record_times(stack: &Stack, run: &str) -> anyhow::Result<HashMap<String, i64>> {
    use rdkafka::message::Headers;
    let settings = stack.kafka_settings(&stack.topic);
    let mut config = settings.client_config(CONSUMER_SETTINGS).await?;
    config.set("group.id", format!("stages-{run}"));
    let consumer: StreamConsumer = config.create()?;
    let mut assignment = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset(&stack.topic, partition, Offset::Beginning)?;
        let (_, high) =
            consumer.fetch_watermarks(&stack.topic, partition, Duration::from_secs(10))?;
        ends.insert(partition, high);
    }
    consumer.assign(&assignment)?;
    let prefix = format!("{COLLECTION}/{run}-");
    let mut found = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ends.values().any(|end| *end > 0) && Instant::now() < deadline {
        let Ok(Ok(message)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await
        else {
            continue;
        };
        if let Some(end) = ends.get_mut(&message.partition()) {
            if message.offset() + 1 >= *end {
                *end = 0;
            }
        }
        if !message
            .key()
            .is_some_and(|k| k.starts_with(prefix.as_bytes()))
        {
            continue;
        }
        let (Some(at), Some(headers)) = (message.timestamp().to_millis(), message.headers()) else {
            continue;
        };
        if let Some(id) = headers
            .iter()
            .find(|h| h.key == "ce_id")
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
        {
            found.insert(id.to_owned(), at * 1000);
        }
    }
    tokio::task::spawn_blocking(move || drop(consumer)).await?;
    Ok(found)
}

/// Produce → consume through the broker alone.
async fn raw_round_trip(
    stack: &Stack,
    rate: f64,
    count: u64,
    broker: Option<Probe>,
) -> anyhow::Result<(Histogram<u64>, u64, CpuSplit)> {
    let topic = format!("{}.rtt", stack.topic);
    let producer = crate::backlog::relay_like_producer(stack, &topic).await?;
    let settings = stack.kafka_settings(&topic);
    let mut config = settings.client_config(CONSUMER_SETTINGS).await?;
    config.set("group.id", format!("rtt-{}", stack.topic));
    let consumer: StreamConsumer = config.create()?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let epoch = Instant::now();
    let warm = Arc::new(AtomicU64::new(0));
    let receiver = {
        let warm = warm.clone();
        tokio::spawn(async move {
            let mut latency = histogram();
            let mut seen = 0u64;
            let deadline = Instant::now()
                + Duration::from_secs(120)
                + Duration::from_secs_f64(count as f64 / rate);
            while seen < count && Instant::now() < deadline {
                let Ok(Ok(message)) =
                    tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await
                else {
                    continue;
                };
                let now = epoch.elapsed();
                let Some(payload) = message.payload().filter(|p| p.len() >= 9) else {
                    continue;
                };
                let sent = u64::from_le_bytes(payload[1..9].try_into().unwrap_or_default());
                if payload[0] == 0 {
                    warm.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let nanos = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
                record(
                    &mut latency,
                    Duration::from_nanos(nanos.saturating_sub(sent)),
                );
                seen += 1;
            }
            tokio::task::spawn_blocking(move || drop(consumer))
                .await
                .ok();
            (latency, seen)
        })
    };
    let message = |measured: bool, i: u64| {
        let mut payload = vec![0u8; 1300];
        payload[0] = u8::from(measured);
        let nanos = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        payload[1..9].copy_from_slice(&nanos.to_le_bytes());
        (format!("{COLLECTION}/rtt-{i}"), payload)
    };
    // Warm-up until the consumer has its fetches going.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    while warm.load(Ordering::Relaxed) == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the raw consumer never received a message"
        );
        let (key, payload) = message(false, i);
        i += 1;
        let _ = producer.send_result(FutureRecord::to(&topic).key(&key).payload(&payload));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let producer = Arc::new(producer);
    let cpu = Meter::default()
        .with("broker", broker)
        .with(
            "producer and consumer (this process)",
            Some(Probe::LoadGenerator),
        )
        .start();
    let deliveries = open_loop(rate, count, |i| {
        let (key, payload) = message(true, i);
        let delivery = producer
            .send_result(FutureRecord::to(&topic).key(&key).payload(&payload))
            .map_err(|(e, _)| e);
        async move {
            match delivery {
                Ok(delivery) => matches!(delivery.await, Ok(Ok(_))),
                Err(_) => false,
            }
        }
    })
    .await;
    let undelivered = deliveries.iter().filter(|ok| !**ok).count() as u64;
    let (latency, seen) = receiver.await?;
    let cpu = cpu.stop();
    tokio::task::spawn_blocking(move || drop(producer)).await?;
    anyhow::ensure!(
        undelivered == 0,
        "the raw producer failed {undelivered} messages"
    );
    Ok((latency, count - seen, cpu))
}

/// A Prometheus histogram as scraped: cumulative buckets, sum and count.
#[derive(Debug, Clone)]
pub struct ServerHistogram {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl ServerHistogram {
    fn minus(&self, earlier: &Self) -> Self {
        Self {
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| {
                    let before = earlier
                        .buckets
                        .iter()
                        .find(|(l, _)| l == le)
                        .map_or(0, |(_, b)| *b);
                    (*le, n.saturating_sub(before))
                })
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count.saturating_sub(earlier.count),
        }
    }

    /// The upper bound (ms) of the bucket holding quantile `q`.
    pub fn quantile_bound_ms(&self, q: f64) -> Option<f64> {
        let target = (q * self.count as f64).ceil().max(1.0) as u64;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= target)
            .map(|(le, _)| le * 1000.0)
    }

    pub fn mean_ms(&self) -> f64 {
        self.sum / self.count.max(1) as f64 * 1000.0
    }
}

async fn scrape(client: &reqwest::Client, url: &str) -> Option<ServerHistogram> {
    let text = client.get(url).send().await.ok()?.text().await.ok()?;
    let name = "tandem_replication_lag_seconds";
    let mut histogram = ServerHistogram {
        buckets: Vec::new(),
        sum: 0.0,
        count: 0,
    };
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = rest.rsplit(' ').next()?;
        if let Some(bucket) = rest.strip_prefix("_bucket{le=\"") {
            let le = bucket.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            histogram.buckets.push((le, value.parse().ok()?));
        } else if rest.starts_with("_sum") {
            histogram.sum = value.parse().ok()?;
        } else if rest.starts_with("_count") {
            histogram.count = value.parse().ok()?;
        }
    }
    (!histogram.buckets.is_empty()).then_some(histogram)
}

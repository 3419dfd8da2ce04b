//! Region 2's apply as a Lambda function behind a Kafka event source mapping (Amazon MSK or
//! self-managed Apache Kafka: the event is the same), the alternative to the consumer pod.
//!
//! The event source mapping polls the topic, keeps the Kafka positions (its consumer group's
//! committed offsets) and invokes the function with a batch of records grouped by
//! topic-partition. The function applies each partition's records, in offset order, with the
//! pod's batch apply ([`Applier::apply_batch_or_stop`]): one transaction per partition that
//! records the event ids with the data (a batch delivered again changes nothing, its events come
//! out `duplicate`), the relay's heartbeats (so Region 2's lag stays truthful) and the position
//! after the batch (with its proof, so the pod can take over where the function stopped); poison
//! goes to `dead_letters` and the batch moves on; Region 2's Redis gets the applied states after
//! the commit.
//!
//! A partition whose records could not all be applied for a transient reason (the database
//! unreachable, read-only, a lock or statement timeout, a dead letter that could not be written)
//! is reported in the response, every record from the first unapplied one on
//! ([`KafkaBatchResponse`], the event source mapping's `ReportBatchItemFailures`): the event
//! source retries exactly those, and the other partitions' records are not delivered again.
//!
//! No leader election and no epoch fence: the event source mapping invokes at most one batch
//! per partition at a time, and the event ids and version guards make any overlap (a retried
//! invocation whose first attempt did commit, the pod and the function running together during a
//! switch) harmless.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use lambda_runtime::{LambdaEvent, service_fn};
use serde::{Deserialize, Serialize};
use tandem_runtime::config::{self, ConfigError, ServiceSettings};
use tandem_store::cache::{Cache, CacheSettings};
use tandem_store::db::DatabaseSettings;

pub use aws_lambda_events::event::kafka::{KafkaEvent, KafkaRecord};

use crate::apply::{Applier, Incoming, KafkaHeader};
use crate::metrics::ConsumerMetrics;

/// The function's answer to the event source mapping (with `FunctionResponseTypes` =
/// `["ReportBatchItemFailures"]`): `{"batchItemFailures":[{"itemIdentifier":
/// {"topic-partition":"<topic>-<partition>","offset":<offset>}}, …]}`. An empty list: every
/// record was applied (or dead-lettered).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaBatchResponse {
    pub batch_item_failures: Vec<KafkaBatchItemFailure>,
}

/// One record the event source must deliver again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaBatchItemFailure {
    pub item_identifier: KafkaItemIdentifier,
}

/// A record's place: the event's `records` key it came under, and its offset.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KafkaItemIdentifier {
    #[serde(rename = "topic-partition")]
    pub topic_partition: String,
    pub offset: i64,
}

/// An event the function cannot read at all (a record without a usable partition or topic).
/// AWS does not send such events; should one come, the invocation fails and the event source
/// retries it, then sends it to its on-failure destination.
#[derive(Debug, thiserror::Error)]
#[error("malformed Kafka event: {0}")]
pub struct MalformedEvent(String);

impl Incoming {
    /// A record of a Lambda Kafka event, under its `records` key (`<topic>-<partition>`).
    /// The key and the value are base64; a record whose base64 does not decode is kept as the
    /// text that came and is poison ([`Incoming::unreadable`]): it is dead-lettered, never
    /// retried. Header values come as arrays of (signed) bytes, one `{name: bytes}` map per
    /// header, in order.
    pub fn from_lambda_record(
        topic_partition: &str,
        record: &KafkaRecord,
    ) -> Result<Self, MalformedEvent> {
        let partition = i32::try_from(record.partition).map_err(|_| {
            MalformedEvent(format!(
                "partition {} of {topic_partition} is out of range",
                record.partition
            ))
        })?;
        let topic = match &record.topic {
            Some(topic) if !topic.is_empty() => topic.clone(),
            _ => topic_partition
                .rsplit_once('-')
                .map(|(topic, _)| topic.to_owned())
                .filter(|topic| !topic.is_empty())
                .ok_or_else(|| {
                    MalformedEvent(format!("a record under {topic_partition:?} names no topic"))
                })?,
        };
        let mut problems = Vec::new();
        let key = record
            .key
            .as_deref()
            .map(|text| decode(text, "key", &mut problems));
        let payload = record
            .value
            .as_deref()
            .map(|text| decode(text, "value", &mut problems))
            .unwrap_or_default();
        let headers = record
            .headers
            .iter()
            .flat_map(|header| {
                // One entry per map in practice; sorted so that several come out in one order.
                let mut entries: Vec<_> = header.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                entries.into_iter().map(|(name, value)| KafkaHeader {
                    name: Some(name.clone()),
                    value: Some(value.iter().map(|byte| *byte as u8).collect()),
                })
            })
            .collect();
        Ok(Self {
            topic,
            partition,
            offset: record.offset,
            key,
            payload,
            headers,
            unreadable: (!problems.is_empty()).then(|| problems.join("; ")),
        })
    }
}

/// The bytes of a base64 field, or (noting why) the text itself.
fn decode(text: &str, field: &str, problems: &mut Vec<String>) -> Vec<u8> {
    match BASE64.decode(text) {
        Ok(bytes) => bytes,
        Err(e) => {
            problems.push(format!("the record's {field} is not valid base64 ({e})"));
            text.as_bytes().to_vec()
        }
    }
}

/// How often an instance of the function prunes applied event ids past their retention (the
/// pod does it from its heartbeat task, which the function does not have).
const PRUNE_INTERVAL: Duration = tandem_store::housekeeping::INTERVAL;

/// The function's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `TANDEM_REGION` (logged); `PORT` and `BIND_ADDRESS` are not used under Lambda.
    pub service: ServiceSettings,
    pub database: DatabaseSettings,
    pub cache: CacheSettings,
    /// `KAFKA_TOPIC` (default `tandem.documents`): the topic the event source mapping reads.
    pub topic: String,
    /// `KAFKA_TOPIC_PARTITIONS` (default 6): its partition count. Every partition is counted in
    /// Region 2's lag from the first cold start on, so one the event source never delivers
    /// shows as lag instead of going unnoticed.
    pub partitions: i32,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            service: ServiceSettings::from_env()?,
            database: DatabaseSettings::from_env()?,
            cache: CacheSettings::from_env()?,
            topic: config::optional("KAFKA_TOPIC").unwrap_or_else(|| "tandem.documents".to_owned()),
            partitions: config::parsed_or("KAFKA_TOPIC_PARTITIONS", 6)?,
        })
    }
}

/// The function: cheap to clone, one per Lambda instance.
#[derive(Clone)]
pub struct KafkaApply {
    applier: Applier,
    /// When this instance last pruned applied event ids.
    last_prune: Arc<Mutex<Option<Instant>>>,
}

impl KafkaApply {
    /// Cold start: connects, applies the migrations (Region 2 owns its schema, as the pod
    /// does), and counts the topic's partitions in the lag.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let pool = tandem_store::db::connect_pool(&settings.database).await?;
        tandem_store::migrations::run(&pool)
            .await
            .context("Failed to apply the migrations")?;
        let mut cache_settings = settings.cache.clone();
        cache_settings.resolve_auth().await?;
        let cache = Cache::new(cache_settings)?;
        // A cold start follows a crash or a timeout as well as a scale-out: an invocation
        // killed between its commit and its cache update left the replaced version cached.
        cache.invalidate_all().await;
        let applier = Applier::new(pool, cache, Arc::new(ConsumerMetrics::new()));
        tracing::info!(region = %settings.service.region, topic = %settings.topic, "Region 2 apply function starting");
        Ok(Self::start(applier, &settings.topic, settings.partitions).await)
    }

    /// The function over an [`Applier`] (unfenced), with the topic's partitions counted in the
    /// lag (best effort: a failure is logged, and the next cold start tries again).
    pub async fn start(applier: Applier, topic: &str, partitions: i32) -> Self {
        let all: Vec<i32> = (0..partitions.max(0)).collect();
        match applier.count_partitions_in_lag(topic, &all).await {
            Ok(0) => {}
            Ok(added) => {
                tracing::info!(
                    topic,
                    added,
                    "partitions counted in Region 2's lag from now on"
                );
            }
            Err(e) => tracing::warn!(error = %e, "failed to count the partitions in the lag"),
        }
        Self {
            applier,
            last_prune: Arc::default(),
        }
    }

    pub fn applier(&self) -> &Applier {
        &self.applier
    }

    /// The handler as the Lambda runtime calls it (`lambda_runtime::run(apply.service())`).
    pub fn service(
        self,
    ) -> impl lambda_runtime::Service<
        LambdaEvent<KafkaEvent>,
        Response = KafkaBatchResponse,
        Error = lambda_runtime::Error,
        Future = lambda_runtime::BoxFuture<
            'static,
            Result<KafkaBatchResponse, lambda_runtime::Error>,
        >,
    > + Clone
    + Send {
        service_fn(move |event: LambdaEvent<KafkaEvent>| {
            let apply = self.clone();
            // Boxed: the apply future is deep, and the runtime's layers nest it further.
            // Spans are exported before the invocation returns: the sandbox may be frozen
            // (and its batch exporter with it) until the next one. Nothing when traces are off.
            let handled: lambda_runtime::BoxFuture<'static, _> = Box::pin(async move {
                let handled = apply.handle(event.payload).await;
                tandem_runtime::telemetry::flush().await;
                handled
            });
            handled
        })
    }

    /// Applies one event: each partition's records in offset order, partition after partition.
    pub async fn handle(
        &self,
        event: KafkaEvent,
    ) -> Result<KafkaBatchResponse, lambda_runtime::Error> {
        let started = Instant::now();
        // (topic, partition) -> (the `records` key, its records).
        let mut partitions: BTreeMap<(String, i32), (String, Vec<Incoming>)> = BTreeMap::new();
        for (topic_partition, records) in &event.records {
            for record in records {
                let incoming = Incoming::from_lambda_record(topic_partition, record)?;
                partitions
                    .entry((incoming.topic.clone(), incoming.partition))
                    .or_insert_with(|| (topic_partition.clone(), Vec::new()))
                    .1
                    .push(incoming);
            }
        }
        let records: usize = partitions.values().map(|(_, r)| r.len()).sum();
        self.report_gaps(&partitions).await;

        let mut response = KafkaBatchResponse::default();
        let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut held_partitions = 0;
        for ((topic, partition), (topic_partition, mut batch)) in partitions {
            batch.sort_by_key(|incoming| incoming.offset);
            let applied = self.applier.apply_batch_or_stop(&batch).await;
            for (outcome, n) in applied.outcomes {
                *outcomes.entry(outcome).or_default() += n;
            }
            let Some(stopped) = applied.stopped else {
                continue;
            };
            held_partitions += i64::from(stopped.held_back);
            let unapplied = &batch[stopped.first_unapplied..];
            tracing::warn!(
                %topic,
                partition,
                from_offset = unapplied.first().map(|i| i.offset),
                records = unapplied.len(),
                cause = %stopped.cause,
                "records not applied; reported for the event source to deliver again"
            );
            response
                .batch_item_failures
                .extend(unapplied.iter().map(|incoming| KafkaBatchItemFailure {
                    item_identifier: KafkaItemIdentifier {
                        topic_partition: topic_partition.clone(),
                        offset: incoming.offset,
                    },
                }));
        }
        self.applier.metrics.held_partitions.set(held_partitions);
        tracing::info!(
            event_source = event.event_source.as_deref().unwrap_or_default(),
            records,
            not_applied = response.batch_item_failures.len(),
            outcomes = ?outcomes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Kafka batch applied"
        );
        self.prune_when_due().await;
        Ok(response)
    }

    /// Logs, at error level, a partition whose batch starts past the position stored after
    /// the last record applied from it: the records in between never reached Region 2 (the
    /// event source gave up on them after its retries and sent them to its on-failure
    /// destination, or they expired before they were read). Region 2 may lack those writes
    /// until the documents change again or `tandem-outbox-relay replay --since` republishes
    /// them.
    async fn report_gaps(&self, partitions: &BTreeMap<(String, i32), (String, Vec<Incoming>)>) {
        let Some(((topic, _), _)) = partitions.first_key_value() else {
            return;
        };
        let Ok(stored) = self.applier.stored_positions(topic).await else {
            return;
        };
        for (partition, next, _) in stored {
            let Some((_, batch)) = partitions.get(&(topic.clone(), partition)) else {
                continue;
            };
            let Some(first) = batch.iter().map(|incoming| incoming.offset).min() else {
                continue;
            };
            if first > next {
                tracing::error!(
                    %topic,
                    partition,
                    missing_from = next,
                    missing_to = first - 1,
                    "records of this partition were never delivered to Region 2's apply (discarded by the event source after its retries, or expired); replay them from Region 1 with tandem-outbox-relay replay --since"
                );
            }
        }
    }

    /// Region 2's housekeeping (`tandem_store::housekeeping`), at most every [`PRUNE_INTERVAL`] per
    /// instance (several instances pruning at once only share the work).
    async fn prune_when_due(&self) {
        let due = match self.last_prune.lock() {
            Ok(mut last) => {
                let due = last.is_none_or(|at| at.elapsed() >= PRUNE_INTERVAL);
                if due {
                    *last = Some(Instant::now());
                }
                due
            }
            Err(_) => false,
        };
        if !due {
            return;
        }
        match tandem_store::housekeeping::region2(&self.applier.pool).await {
            Ok(pruned) => pruned.log(),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "housekeeping failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as AWS sends it (MSK and self-managed Kafka alike).
    fn event(value: &str) -> KafkaEvent {
        serde_json::from_value(serde_json::json!({
            "eventSource": "aws:kafka",
            "eventSourceArn": "arn:aws:kafka:us-east-1:123456789012:cluster/tandem/abc",
            "bootstrapServers": "b-1.tandem.example:9096",
            "records": {
                "tandem.documents-2": [{
                    "topic": "tandem.documents",
                    "partition": 2,
                    "offset": 41,
                    "timestamp": 1_700_000_000_000_i64,
                    "timestampType": "CREATE_TIME",
                    "key": BASE64.encode("notes/n1"),
                    "value": value,
                    "headers": [{"ce_id": [49, 50]}, {"bin": [-1, 0, 127, -128]}]
                }]
            }
        }))
        .expect("the AWS event shape")
    }

    fn only_record(event: &KafkaEvent) -> Incoming {
        let (key, records) = event.records.iter().next().expect("one partition");
        Incoming::from_lambda_record(key, &records[0]).expect("readable")
    }

    #[test]
    fn a_record_keeps_its_bytes_and_headers_in_order() {
        let incoming = only_record(&event(&BASE64.encode(b"{\"x\":1}")));
        assert_eq!(incoming.topic, "tandem.documents");
        assert_eq!((incoming.partition, incoming.offset), (2, 41));
        assert_eq!(incoming.key.as_deref(), Some(&b"notes/n1"[..]));
        assert_eq!(incoming.payload, b"{\"x\":1}");
        assert_eq!(incoming.unreadable, None);
        let headers: Vec<(Option<&str>, Option<&[u8]>)> = incoming
            .headers
            .iter()
            .map(|h| (h.name.as_deref(), h.value.as_deref()))
            .collect();
        // Signed bytes (Java's) back to the bytes the producer sent.
        assert_eq!(
            headers,
            vec![
                (Some("ce_id"), Some(&b"12"[..])),
                (Some("bin"), Some(&[0xff, 0x00, 0x7f, 0x80][..])),
            ]
        );
    }

    #[test]
    fn undecodable_base64_is_kept_as_text_and_marked_poison() {
        let incoming = only_record(&event("%%% not base64 %%%"));
        assert_eq!(incoming.payload, b"%%% not base64 %%%");
        let reason = incoming.unreadable.expect("poison");
        assert!(reason.contains("value is not valid base64"), "{reason}");
    }

    #[test]
    fn the_topic_comes_from_the_records_key_when_a_record_omits_it() {
        let mut event = event(&BASE64.encode(b"{}"));
        for records in event.records.values_mut() {
            records[0].topic = None;
        }
        assert_eq!(only_record(&event).topic, "tandem.documents");
    }

    /// The fixture of `cargo lambda invoke` (README) is a Kafka event whose record is a valid
    /// change event.
    #[test]
    fn the_shipped_fixture_carries_a_change_event() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/events/kafka.json");
        let text = std::fs::read_to_string(path).expect("events/kafka.json");
        let event: KafkaEvent = serde_json::from_str(&text).expect("a Kafka event");
        let incoming = only_record(&event);
        let change = tandem_core::event::ChangeEvent::decode(&incoming.payload)
            .expect("a valid change event");
        assert_eq!(
            incoming.key.as_deref(),
            Some(change.partition_key().as_bytes())
        );
        assert_eq!(
            crate::apply::event_headers(&incoming.headers).event_uuid(),
            Some(change.id)
        );
    }

    #[test]
    fn the_response_has_the_shape_the_event_source_reads() {
        let response = KafkaBatchResponse {
            batch_item_failures: vec![KafkaBatchItemFailure {
                item_identifier: KafkaItemIdentifier {
                    topic_partition: "tandem.documents-2".to_owned(),
                    offset: 41,
                },
            }],
        };
        assert_eq!(
            serde_json::to_value(&response).expect("serialises"),
            serde_json::json!({"batchItemFailures": [
                {"itemIdentifier": {"topic-partition": "tandem.documents-2", "offset": 41}}
            ]})
        );
        assert_eq!(
            serde_json::to_value(KafkaBatchResponse::default()).expect("serialises"),
            serde_json::json!({"batchItemFailures": []})
        );
    }
}

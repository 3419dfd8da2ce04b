//! What the broker says about the topic's partitions: each one's low and high watermark, which
//! `tandem status` sets next to Region 2's applied positions (so the consumer's lag per
//! partition reads in messages). Every broker call is bounded by one deadline.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tandem_runtime::kafka::KafkaSettings;

/// How long `tandem status` waits for the broker in all.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// `(topic, partition)` → `(low, high)` watermark.
pub type Watermarks = BTreeMap<(String, i32), (i64, i64)>;

/// Every partition of each of `topics` (a topic the broker does not know has none) with its
/// watermarks, all within `timeout`. With no topic, only checks that the broker answers.
pub async fn watermarks(
    settings: &KafkaSettings,
    topics: Vec<String>,
    timeout: Duration,
) -> anyhow::Result<Watermarks> {
    let deadline = Instant::now() + timeout;
    let config = settings.client_config(&[]).await?;
    let consumer: BaseConsumer = config.create().context("cannot create a Kafka client")?;
    let brokers = settings.brokers.clone();
    // librdkafka's calls block: off the runtime's threads.
    tokio::task::spawn_blocking(move || {
        let left = || {
            deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .with_context(|| {
                    format!(
                        "the broker ({brokers}) did not answer within {} s",
                        timeout.as_secs()
                    )
                })
        };
        let mut found = Watermarks::new();
        if topics.is_empty() {
            consumer
                .fetch_metadata(None, left()?)
                .with_context(|| format!("the broker ({brokers}) did not answer"))?;
        }
        for topic in topics {
            let metadata = consumer
                .fetch_metadata(Some(&topic), left()?)
                .with_context(|| format!("the broker ({brokers}) did not answer"))?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            for partition in partitions {
                let marks = consumer
                    .fetch_watermarks(&topic, partition, left()?)
                    .with_context(|| {
                        format!("the broker ({brokers}) gave no watermarks for {topic}/{partition}")
                    })?;
                found.insert((topic.clone(), partition), marks);
            }
        }
        Ok(found)
    })
    .await
    .context("the broker query stopped")?
}

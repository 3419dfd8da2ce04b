//! The two-region system for replication tests: Region 1 (Write + Read APIs in-process over
//! its own PostgreSQL cluster and Redis), an Apache Kafka broker of its own, the outbox relay and
//! the Region 2 consumer as real processes (so tests can SIGKILL them), and Region 2's Read API
//! (replica mode) over a second PostgreSQL cluster and a second Redis.

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use crate::kafka::{Broker, Kafka, KafkaCluster};

use serde_json::Value;
use tandem_runtime::config::ServiceSettings;
use tandem_store::cache::CacheSettings;
use tandem_store::db::DatabaseSettings;

use crate::process::{ManagedProcess, binary, free_port, scratch_dir};
use crate::services::{Postgres, Redis, TestApp, TestAppOptions, serve, spawn_app_with};

/// The second region's own servers, shared by the tests of one process.
fn region2_postgres() -> &'static Postgres {
    static PG: std::sync::OnceLock<Postgres> = std::sync::OnceLock::new();
    PG.get_or_init(|| Postgres::start_shared().expect("failed to start Region 2's PostgreSQL"))
}

fn region2_redis() -> &'static Redis {
    static REDIS: std::sync::OnceLock<Redis> = std::sync::OnceLock::new();
    REDIS.get_or_init(|| Redis::start().expect("failed to start Region 2's Redis"))
}

/// Region 1, the broker, the workers and Region 2.
pub struct TwoRegions {
    pub region1: TestApp,
    pub region2_read_url: String,
    pub region2_database_url: String,
    pub region2_pool: deadpool_postgres::Pool,
    pub region2_redis_url: String,
    pub region2_key_prefix: String,
    /// One Kafka node, or a 3-node cluster ([`TwoRegions::start_on_cluster`]).
    pub broker: Kafka,
    /// Region 2's own Redis, when the test needs one it may freeze or restart.
    pub region2_redis: Option<Redis>,
    /// Region 2's own PostgreSQL cluster, when the test needs one it may stop and restart
    /// ([`TwoRegions::start_with_own_region2_postgres`]).
    pub region2_postgres: Option<Postgres>,
    pub topic: String,
    pub relays: Vec<ManagedProcess>,
    pub consumers: Vec<ManagedProcess>,
    /// The ops port (`/healthz`, `/readyz`, `/metrics`) of each relay and consumer.
    pub relay_ports: Vec<u16>,
    pub consumer_ports: Vec<u16>,
    dir: PathBuf,
}

impl TwoRegions {
    /// Everything up, one relay and one consumer running, and the consumer reporting.
    pub async fn start() -> Self {
        let mut regions = Self::start_without_workers().await;
        regions.start_relay();
        regions.start_consumer();
        regions.wait_region2_ready(Duration::from_secs(60)).await;
        regions
    }

    /// Waits until Region 2's `/readyz` passes: the consumer is assigned and heartbeating.
    pub async fn wait_region2_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/readyz", self.region2_read_url);
        loop {
            if let Ok(response) = self.region1.client.get(&url).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "Region 2 never became ready:\n{}",
                self.consumers
                    .iter()
                    .map(ManagedProcess::log_tail)
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn start_without_workers() -> Self {
        Self::start_without_workers_with(None, Duration::from_secs(5)).await
    }

    /// Everything up on a 3-node Kafka cluster (replication factor 3, `min.insync.replicas`
    /// 2), one relay and one consumer running.
    pub async fn start_on_cluster() -> Self {
        let cluster = KafkaCluster::start()
            .await
            .expect("a 3-node Kafka cluster (make test installs Kafka)");
        let mut regions =
            Self::start_with(Kafka::Cluster(cluster), None, None, Duration::from_secs(5)).await;
        regions.start_relay();
        regions.start_consumer();
        regions.wait_region2_ready(Duration::from_secs(90)).await;
        regions
    }

    /// Everything up but the workers, Region 2's Read API failing `/readyz` above `max_lag`.
    pub async fn start_without_workers_max_lag(max_lag: Duration) -> Self {
        Self::start_without_workers_with(None, max_lag).await
    }

    /// Everything up, one relay and one consumer, with a Redis of Region 2's own (so the
    /// test can freeze or restart it without touching other tests).
    pub async fn start_with_own_region2_redis() -> Self {
        let redis = Redis::start().expect("region2 redis");
        let mut regions =
            Self::start_without_workers_with(Some(redis), Duration::from_secs(5)).await;
        regions.start_relay();
        regions.start_consumer();
        regions.wait_region2_ready(Duration::from_secs(60)).await;
        regions
    }

    /// Everything up, one relay and one consumer, with a PostgreSQL cluster of Region 2's
    /// own (so the test can stop and restart it without touching other tests).
    pub async fn start_with_own_region2_postgres() -> Self {
        let postgres = Postgres::start().expect("region2 postgres");
        let broker = Broker::start()
            .await
            .expect("the Kafka broker (make test installs it)");
        let mut regions = Self::start_with(
            Kafka::Single(broker),
            None,
            Some(postgres),
            Duration::from_secs(5),
        )
        .await;
        regions.start_relay();
        regions.start_consumer();
        regions.wait_region2_ready(Duration::from_secs(60)).await;
        regions
    }

    async fn start_without_workers_with(own_redis: Option<Redis>, max_lag: Duration) -> Self {
        let broker = Broker::start()
            .await
            .expect("the Kafka broker (make test installs it)");
        Self::start_with(Kafka::Single(broker), own_redis, None, max_lag).await
    }

    async fn start_with(
        broker: Kafka,
        own_redis: Option<Redis>,
        own_postgres: Option<Postgres>,
        max_lag: Duration,
    ) -> Self {
        let region1 = spawn_app_with(TestAppOptions::default()).await;
        let region2_database_url = own_postgres
            .as_ref()
            .unwrap_or_else(|| region2_postgres())
            .create_database()
            .await
            .expect("region2 database");
        let region2_redis_url = own_redis
            .as_ref()
            .map_or_else(|| region2_redis().url(), Redis::url);
        let region2_key_prefix = format!("r2-{}", uuid::Uuid::now_v7().simple());
        let mut cache = CacheSettings::from_url(&region2_redis_url);
        cache.key_prefix = region2_key_prefix.clone();
        let settings = tandem_read::Settings {
            service: ServiceSettings {
                region: "region2".into(),
                port: 0,
                bind_address: [127, 0, 0, 1].into(),
                request_timeout: Duration::from_secs(10),
            },
            database: DatabaseSettings::from_url(&region2_database_url),
            cache,
            auth: Default::default(),
            migrate_on_start: true,
            replica: Some(tandem_read::ReplicaSettings {
                primary_read_url: region1.read_url.clone(),
                consistency_wait: Duration::from_secs(1),
                max_lag,
            }),
        };
        let state = tandem_read::AppState::build(&settings)
            .await
            .expect("region2 read state");
        let region2_read_url = serve(tandem_read::router(state)).await;
        Self {
            region2_pool: tandem_store::db::connect_url(&region2_database_url)
                .await
                .expect("pool"),
            region1,
            region2_read_url,
            region2_database_url,
            region2_redis_url,
            region2_key_prefix,
            topic: format!("tandem.test.{}", uuid::Uuid::now_v7().simple()),
            broker,
            region2_redis: own_redis,
            region2_postgres: own_postgres,
            relays: Vec::new(),
            consumers: Vec::new(),
            relay_ports: Vec::new(),
            consumer_ports: Vec::new(),
            dir: scratch_dir("regions"),
        }
    }

    fn kafka_env(&self) -> Vec<(String, String)> {
        [
            ("KAFKA_BROKERS", self.broker.address()),
            ("KAFKA_TOPIC", self.topic.clone()),
            ("KAFKA_TOPIC_PARTITIONS", "3".to_owned()),
            (
                "KAFKA_TOPIC_REPLICATION",
                self.broker.replication().to_string(),
            ),
            ("BIND_ADDRESS", "127.0.0.1".to_owned()),
            ("RUST_LOG", "info,librdkafka=warn,rdkafka=warn".to_owned()),
            ("TANDEM_LOG_FORMAT", "pretty".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Starts one more relay (the first becomes leader; later ones stand by).
    pub fn start_relay(&mut self) -> usize {
        self.start_relay_with(&[])
    }

    /// Starts one more relay with extra environment (overriding the defaults).
    pub fn start_relay_with(&mut self, extra: &[(&str, &str)]) -> usize {
        let mut env = self.kafka_env();
        env.extend([
            ("DATABASE_URL".to_owned(), self.region1.database_url.clone()),
            ("TANDEM_REGION".to_owned(), "region1".to_owned()),
            ("RELAY_POLL_INTERVAL_MS".to_owned(), "200".to_owned()),
        ]);
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let port = free_port();
        env.push(("PORT".to_owned(), port.to_string()));
        self.relay_ports.push(port);
        let n = self.relays.len();
        let log = self.dir.join(format!("relay-{n}.log"));
        let relay =
            ManagedProcess::start("relay", &binary("tandem-outbox-relay"), &[], &env, &log, "")
                .expect("start tandem-outbox-relay");
        self.relays.push(relay);
        n
    }

    /// Starts one more consumer.
    pub fn start_consumer(&mut self) -> usize {
        self.start_consumer_with(&[])
    }

    /// Starts one more consumer with extra environment (overriding the defaults).
    pub fn start_consumer_with(&mut self, extra: &[(&str, &str)]) -> usize {
        let mut env = self.kafka_env();
        env.extend([
            ("DATABASE_URL".to_owned(), self.region2_database_url.clone()),
            ("REDIS_URL".to_owned(), self.region2_redis_url.clone()),
            (
                "REDIS_KEY_PREFIX".to_owned(),
                self.region2_key_prefix.clone(),
            ),
            ("TANDEM_REGION".to_owned(), "region2".to_owned()),
            ("KAFKA_GROUP_ID".to_owned(), format!("group-{}", self.topic)),
        ]);
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let port = free_port();
        env.push(("PORT".to_owned(), port.to_string()));
        self.consumer_ports.push(port);
        let n = self.consumers.len();
        let log = self.dir.join(format!("consumer-{n}.log"));
        let consumer = ManagedProcess::start(
            "consumer",
            &binary("tandem-region2-consumer"),
            &[],
            &env,
            &log,
            "",
        )
        .expect("start tandem-region2-consumer");
        self.consumers.push(consumer);
        n
    }

    /// Runs the relay binary's `replay --since` command against Region 1.
    pub fn replay_since(&self, since: &str) -> std::process::Output {
        let mut command = std::process::Command::new(binary("tandem-outbox-relay"));
        command.args(["replay", "--since", since]);
        for (k, v) in self.kafka_env() {
            command.env(k, v);
        }
        command.env("DATABASE_URL", &self.region1.database_url);
        command.output().expect("run replay")
    }

    /// Runs the consumer binary's `redrive` command against Region 2.
    pub fn redrive(&self) -> std::process::Output {
        self.redrive_with(&[])
    }

    /// `redrive` with arguments (`--id N`).
    pub fn redrive_with(&self, args: &[&str]) -> std::process::Output {
        let mut command = std::process::Command::new(binary("tandem-region2-consumer"));
        command.arg("redrive").args(args);
        for (k, v) in self.kafka_env() {
            command.env(k, v);
        }
        command
            .env("DATABASE_URL", &self.region2_database_url)
            .env("REDIS_URL", &self.region2_redis_url)
            .env("REDIS_KEY_PREFIX", &self.region2_key_prefix);
        command.output().expect("run redrive")
    }

    /// Every document of a region, as `(collection, id, version, deleted, data)`, in key order.
    pub async fn snapshot(
        pool: &deadpool_postgres::Pool,
    ) -> Vec<(String, String, i64, bool, Option<Value>)> {
        let client = pool.get().await.expect("db");
        client
            .query("SELECT collection, id, version, deleted, data FROM documents ORDER BY collection, id", &[])
            .await
            .expect("snapshot")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect()
    }

    /// Waits until Region 2's documents equal Region 1's, row for row.
    pub async fn wait_converged(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let one = Self::snapshot(&self.region1.pool).await;
            let two = Self::snapshot(&self.region2_pool).await;
            if one == two {
                return;
            }
            if Instant::now() > deadline {
                let missing = one.iter().filter(|r| !two.contains(r)).count();
                panic!(
                    "Region 2 did not converge within {timeout:?}: {} rows in region1, {} in region2, {missing} differ\nrelay logs:\n{}\nconsumer logs:\n{}",
                    one.len(),
                    two.len(),
                    self.relays
                        .iter()
                        .map(ManagedProcess::log_tail)
                        .collect::<Vec<_>>()
                        .join("\n---\n"),
                    self.consumers
                        .iter()
                        .map(ManagedProcess::log_tail)
                        .collect::<Vec<_>>()
                        .join("\n---\n"),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A metric's value from a worker's `/metrics`: the first sample of `series`, a name
    /// optionally with its labels (`name{label="value"}`), followed by a space or more labels.
    pub async fn metric(&self, port: u16, series: &str) -> Option<f64> {
        let text = self
            .region1
            .client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .filter(|line| !line.starts_with('#'))
            // The series itself, not a longer name it begins (`tandem_relay_shares_held` for
            // `tandem_relay_shares`).
            .find(|line| {
                line.strip_prefix(series)
                    .is_some_and(|rest| rest.starts_with([' ', '{']))
            })
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
    }

    /// Waits until Region 2 serves `path` at `version` or newer.
    pub async fn wait_region2_version(&self, path: &str, version: i64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let response = self.region2_get(path).await;
            let served = response
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim_matches('"').parse::<i64>().ok());
            if served.is_some_and(|v| v >= version) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Region 2 did not serve {path} at version {version} within {timeout:?} (serves {served:?})\nrelay logs:\n{}\nconsumer logs:\n{}",
                self.relays
                    .iter()
                    .map(ManagedProcess::log_tail)
                    .collect::<Vec<_>>()
                    .join("\n---\n"),
                self.consumers
                    .iter()
                    .map(ManagedProcess::log_tail)
                    .collect::<Vec<_>>()
                    .join("\n---\n"),
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Region 2's `/readyz`: its status and its `replication_lag` line.
    pub async fn region2_readiness(&self) -> (u16, String) {
        let Ok(response) = self
            .region1
            .client
            .get(format!("{}/readyz", self.region2_read_url))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        else {
            return (0, "no answer".to_owned());
        };
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or_default();
        (
            status,
            body["checks"]["replication_lag"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    }

    /// Waits until Region 2's readiness is `ready` (bounded), returning the last lag line.
    pub async fn wait_region2_readiness(&self, ready: bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, line) = self.region2_readiness().await;
            if (status == 200) == ready && status != 0 {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "Region 2's readiness did not become {ready} within {timeout:?} (status {status}, lag {line})\nconsumer logs:\n{}",
                self.consumers
                    .iter()
                    .map(ManagedProcess::log_tail)
                    .collect::<Vec<_>>()
                    .join("\n---\n"),
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A GET against Region 2's Read API.
    pub async fn region2_get(&self, path: &str) -> reqwest::Response {
        self.region1
            .client
            .get(format!("{}{path}", self.region2_read_url))
            .send()
            .await
            .expect("region2 GET")
    }
}

impl Drop for TwoRegions {
    fn drop(&mut self) {
        self.relays.clear();
        self.consumers.clear();
        // TANDEM_KEEP_TEST_LOGS=1 keeps the workers' logs for a post-mortem.
        if std::env::var_os("TANDEM_KEEP_TEST_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("worker logs kept in {}", self.dir.display());
        }
    }
}

//! The system under test, started from the test harness: two PostgreSQL clusters, two Redis
//! servers and an Apache Kafka broker (each under the harness's watchdog), and the Tandem services as
//! their real binaries from the same `target/<profile>/` directory as this benchmark.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cpu::{Probe, find_process, postmaster};
use anyhow::Context;
use tandem_tests::{Broker, ManagedProcess, Postgres, Redis, binary, free_port, scratch_dir};

/// librdkafka properties the services get beyond their own defaults: none, as in `make up` and
/// the tests (a tuning experiment sets its own through `TANDEM_BENCH_ENV`).
pub const KAFKA_PROPERTIES: &str = "";
pub const PARTITIONS: i32 = 3;
/// The cache key prefix of both regions (the Write and Read APIs must share it).
const KEY_PREFIX: &str = "bench";

/// One of the long-running services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Write,
    Read1,
    Relay,
    Consumer,
    Read2,
    /// Region 2's Write API, which forwards every write to Region 1's (measurement 8).
    Write2,
}

impl Kind {
    pub fn binary(self) -> &'static str {
        match self {
            Self::Write | Self::Write2 => "tandem-write",
            Self::Read1 | Self::Read2 => "tandem-read",
            Self::Relay => "tandem-outbox-relay",
            Self::Consumer => "tandem-region2-consumer",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Write => "tandem-write",
            Self::Read1 => "tandem-read (region 1)",
            Self::Relay => "tandem-outbox-relay",
            Self::Consumer => "tandem-region2-consumer",
            Self::Read2 => "tandem-read (region 2 replica)",
            Self::Write2 => "tandem-write (region 2, forwarding)",
        }
    }

    /// The region whose database the service uses.
    pub fn region(self) -> u8 {
        match self {
            Self::Write | Self::Read1 | Self::Relay => 1,
            Self::Consumer | Self::Read2 | Self::Write2 => 2,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A running service.
pub struct Service {
    pub kind: Kind,
    pub url: String,
    pub process: ManagedProcess,
}

impl Service {
    /// `(VmRSS, VmHWM)` in KiB: resident now and the peak so far.
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        memory_kib(self.process.program_pid()?)
    }
}

/// Resident and peak resident set of a process, KiB, from `/proc/<pid>/status`.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Everything the services run on.
pub struct Stack {
    pub pg1: Postgres,
    pub pg2: Postgres,
    pub redis1: Redis,
    pub redis2: Redis,
    pub broker: Broker,
    pub db1: String,
    pub db2: String,
    pub secret: String,
    pub token: String,
    pub topic: String,
    pub dir: PathBuf,
    pub http: reqwest::Client,
    ports: [u16; 6],
}

impl Stack {
    pub async fn start() -> anyhow::Result<Self> {
        let (pg1, pg2, redis1, redis2) = tokio::task::spawn_blocking(|| {
            anyhow::Ok((
                Postgres::start_durable()?,
                Postgres::start_durable()?,
                Redis::start()?,
                Redis::start()?,
            ))
        })
        .await??;
        let broker = Broker::start()
            .await
            .context("the Kafka broker (scripts/lib.sh ensure_kafka installs it)")?;
        let db1 = pg1.create_database().await?;
        let db2 = pg2.create_database().await?;
        for url in [&db1, &db2] {
            let pool = tandem_store::db::connect_url(url).await?;
            tandem_store::migrations::run(&pool).await?;
        }
        let secret = format!("bench-{}", uuid::Uuid::now_v7().simple());
        let token = tandem_http::auth::mint_hs256(
            &secret,
            "bench",
            &["tandem:write", "tandem:read"],
            Duration::from_secs(24 * 3600),
            None,
        )?;
        Ok(Self {
            pg1,
            pg2,
            redis1,
            redis2,
            broker,
            db1,
            db2,
            secret,
            token,
            topic: format!("tandem.bench.{}", uuid::Uuid::now_v7().simple()),
            dir: scratch_dir("bench"),
            http: http_client(64),
            ports: std::array::from_fn(|_| free_port()),
        })
    }

    pub fn url(&self, kind: Kind) -> String {
        format!("http://127.0.0.1:{}", self.ports[kind.index()])
    }

    pub fn kafka_settings(&self, topic: &str) -> tandem_runtime::kafka::KafkaSettings {
        tandem_runtime::kafka::KafkaSettings {
            brokers: self.broker.address(),
            topic: topic.to_owned(),
            properties: kafka_properties()
                .split(',')
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            sasl_secret_id: None,
            partitions: PARTITIONS,
            replication: 1,
        }
    }

    /// The environment of one service, listening on `port`.
    fn env(&self, kind: Kind, port: u16) -> Vec<(String, String)> {
        let mut env = vec![
            ("PORT", port.to_string()),
            ("BIND_ADDRESS", "127.0.0.1".to_owned()),
            ("REDIS_KEY_PREFIX", KEY_PREFIX.to_owned()),
        ];
        let kafka = [
            ("KAFKA_BROKERS", self.broker.address()),
            ("KAFKA_TOPIC", self.topic.clone()),
            ("KAFKA_PROPERTIES", kafka_properties()),
            ("KAFKA_TOPIC_PARTITIONS", PARTITIONS.to_string()),
            ("KAFKA_TOPIC_REPLICATION", "1".to_owned()),
            ("RUST_LOG", "info,librdkafka=warn,rdkafka=warn".to_owned()),
        ];
        match kind {
            Kind::Write | Kind::Read1 => env.extend([
                ("TANDEM_REGION", "region1".to_owned()),
                ("DATABASE_URL", self.db1.clone()),
                ("REDIS_URL", self.redis1.url()),
                ("TANDEM_JWT_HS256_SECRET", self.secret.clone()),
            ]),
            Kind::Relay => {
                env.extend([
                    ("TANDEM_REGION", "region1".to_owned()),
                    ("DATABASE_URL", self.db1.clone()),
                ]);
                env.extend(kafka);
            }
            Kind::Consumer => {
                env.extend([
                    ("TANDEM_REGION", "region2".to_owned()),
                    ("DATABASE_URL", self.db2.clone()),
                    ("REDIS_URL", self.redis2.url()),
                    ("KAFKA_GROUP_ID", format!("group-{}", self.topic)),
                ]);
                env.extend(kafka);
            }
            Kind::Read2 => env.extend([
                ("TANDEM_REGION", "region2".to_owned()),
                ("DATABASE_URL", self.db2.clone()),
                ("REDIS_URL", self.redis2.url()),
                ("TANDEM_JWT_HS256_SECRET", self.secret.clone()),
                ("TANDEM_PRIMARY_READ_URL", self.url(Kind::Read1)),
            ]),
            // Region 2's database records Region 1 as the write region at this first start
            // (`TANDEM_INITIAL_WRITE_REGION` defaults to region1), so every write is forwarded.
            Kind::Write2 => env.extend([
                ("TANDEM_REGION", "region2".to_owned()),
                ("DATABASE_URL", self.db2.clone()),
                ("REDIS_URL", self.redis2.url()),
                ("TANDEM_JWT_HS256_SECRET", self.secret.clone()),
                ("TANDEM_WRITE_FORWARD_URL", self.url(Kind::Write)),
            ]),
        }
        let mut env: Vec<(String, String)> =
            env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        // Tuning experiments: `TANDEM_BENCH_ENV='RELAY_BATCH_SIZE=2000;DATABASE_POOL_SIZE=32'`
        // is given to every service (the report says so).
        for pair in extra_env().split(';') {
            if let Some((k, v)) = pair.split_once('=') {
                env.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        env
    }

    /// Starts a long-running service under the harness's watchdog and waits for `/healthz`.
    pub async fn spawn(&self, kind: Kind) -> anyhow::Result<Service> {
        self.spawn_on(kind, self.ports[kind.index()], &[]).await
    }

    /// [`Self::spawn`] on a port of its own, with environment `overrides` (a second instance,
    /// another database or topic).
    pub async fn spawn_with(
        &self,
        kind: Kind,
        overrides: &[(&str, String)],
    ) -> anyhow::Result<Service> {
        self.spawn_on(kind, free_port(), overrides).await
    }

    async fn spawn_on(
        &self,
        kind: Kind,
        port: u16,
        overrides: &[(&str, String)],
    ) -> anyhow::Result<Service> {
        let log = self.dir.join(format!("{}-{port}.log", kind.binary()));
        let mut env = self.env(kind, port);
        env.retain(|(k, _)| !overrides.iter().any(|(o, _)| o == k));
        env.extend(overrides.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let process =
            ManagedProcess::start(kind.name(), &binary(kind.binary()), &[], &env, &log, "")?;
        let service = Service {
            kind,
            url: format!("http://127.0.0.1:{port}"),
            process,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !healthy(&self.http, &service.url).await {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not answer /healthz within 60 s:\n{}",
                kind.name(),
                service.process.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(service)
    }

    /// Start-up time of a service binary: exec → first 200 on `/healthz` (databases already
    /// migrated, so this is a restart or a scale-out, not a first deployment), and its idle
    /// resident memory (KiB) half a second later. The process is stopped afterwards.
    pub async fn startup_time(&self, kind: Kind) -> anyhow::Result<(Duration, Option<u64>)> {
        let port = free_port();
        let log_path = self
            .dir
            .join(format!("startup-{}-{port}.log", kind.binary()));
        let log = std::fs::File::create(&log_path)?;
        let client = http_client(1);
        let url = format!("http://127.0.0.1:{port}");
        let mut command = Command::new(binary(kind.binary()));
        command
            .envs(self.env(kind, port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let started = Instant::now();
        let mut child = Stopped(command.spawn()?);
        loop {
            if healthy(&client, &url).await {
                break;
            }
            if let Some(status) = child.0.try_wait()? {
                anyhow::bail!(
                    "{} exited with {status} before answering /healthz:\n{}",
                    kind.name(),
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "{} did not answer /healthz within 30 s",
                kind.name()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = started.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = memory_kib(child.0.id()).map(|(rss, _)| rss);
        drop(child);
        Ok((elapsed, idle))
    }
}

/// The services' `KAFKA_PROPERTIES`: [`KAFKA_PROPERTIES`], or the one a tuning experiment sets
/// in `TANDEM_BENCH_ENV` (the raw baselines use the same).
pub fn kafka_properties() -> String {
    extra_env()
        .split(';')
        .find_map(|pair| pair.trim().strip_prefix("KAFKA_PROPERTIES="))
        .unwrap_or(KAFKA_PROPERTIES)
        .to_owned()
}

/// `TANDEM_BENCH_ENV`: extra `KEY=value` settings (`;`-separated) for every service.
pub fn extra_env() -> String {
    std::env::var("TANDEM_BENCH_ENV").unwrap_or_default()
}

/// A directly spawned child, stopped (SIGTERM, then waited for) when dropped.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTP/1.1 keep-alive client for `concurrency` parallel requests to loopback.
pub fn http_client(concurrency: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// Sends a request and reads the whole response (so the connection is reused); true when the
/// status is `expected`.
pub async fn send(request: reqwest::RequestBuilder, expected: u16) -> bool {
    match request.send().await {
        Ok(response) => {
            let status = response.status();
            response.bytes().await.is_ok() && status == expected
        }
        Err(_) => false,
    }
}

async fn healthy(client: &reqwest::Client, url: &str) -> bool {
    client
        .get(format!("{url}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

/// CPU probes for the servers the harness started.
#[derive(Debug, Clone, Copy)]
pub struct Probes {
    pub pg1: Option<Probe>,
    pub pg2: Option<Probe>,
    pub redis1: Option<Probe>,
    pub redis2: Option<Probe>,
    pub broker: Option<Probe>,
}

impl Stack {
    pub fn probes(&self) -> Probes {
        let pg = |pg: &Postgres| postmaster(&pg.dir.join("data")).map(Probe::Tree);
        let redis =
            |port: u16| find_process("redis-server", &format!(":{port}")).map(Probe::Process);
        Probes {
            pg1: pg(&self.pg1),
            pg2: pg(&self.pg2),
            redis1: redis(self.redis1.port),
            redis2: redis(self.redis2.port),
            broker: self.broker.pid().map(Probe::Process),
        }
    }
}

impl Service {
    pub fn probe(&self) -> Option<Probe> {
        self.process.program_pid().map(Probe::Process)
    }
}

/// The `postgres` client pool for a database URL, `size` connections.
pub async fn pool(url: &str, size: usize) -> anyhow::Result<deadpool_postgres::Pool> {
    let mut settings = tandem_store::db::DatabaseSettings::from_url(url);
    settings.pool_size = size;
    settings.pool_timeout = Duration::from_secs(30);
    tandem_store::db::connect_pool(&settings).await
}

/// The harness's log directory, kept when `TANDEM_KEEP_TEST_LOGS` is set.
pub fn keep_logs(dir: &Path) {
    if std::env::var_os("TANDEM_KEEP_TEST_LOGS").is_some() {
        eprintln!("service logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

//! The chaos system: a complete two-region Tandem of its own for the Jepsen-style test in
//! `tests/chaos/`, with every part a real process that a nemesis can kill, freeze or cut off.
//!
//! Region 1 is a PostgreSQL cluster, a Redis server, `tandem-write`, `tandem-read` and
//! `tandem-outbox-relay`; Region 2 is another PostgreSQL cluster and Redis server,
//! `tandem-region2-consumer` and `tandem-read` in replica mode. Between them an Apache Kafka
//! broker (durable: its data survives a SIGKILL) sits behind a [`TcpProxy`]: the broker
//! advertises the proxy's port, so
//! every Kafka connection of the relay and the consumer goes through the proxy and a cut of
//! the proxy is the broker becoming unreachable. The relay and the consumer name themselves
//! with `client.id`, which lets the proxy cut Region 2's consumer alone.
//!
//! Nothing here is shared with the other tests: the servers are stopped and their data removed
//! when the system is dropped (and by their watchdogs if the test process dies).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::kafka::broker_script;
use crate::process::{ManagedProcess, binary, free_port, wait_for_port};
use crate::proxy::{Cut, TcpProxy};
use crate::services::{Postgres, Redis};

/// The `client.id` the relay's Kafka clients announce.
pub const RELAY_CLIENT_ID: &str = "tandem-chaos-relay";
/// The `client.id` the consumer's Kafka clients announce.
pub const CONSUMER_CLIENT_ID: &str = "tandem-chaos-consumer";
/// The Redis key prefix of both regions' caches (each region has its own server).
pub const KEY_PREFIX: &str = "chaos";

/// A part of the system a fault can hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    WriteApi,
    Region1ReadApi,
    Region2ReadApi,
    Relay,
    Consumer,
    Redis1,
    Redis2,
    Postgres1,
    Postgres2,
    Broker,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Self::WriteApi => "write-api",
            Self::Region1ReadApi => "region1-read-api",
            Self::Region2ReadApi => "region2-read-api",
            Self::Relay => "relay",
            Self::Consumer => "consumer",
            Self::Redis1 => "redis1",
            Self::Redis2 => "redis2",
            Self::Postgres1 => "postgres1",
            Self::Postgres2 => "postgres2",
            Self::Broker => "broker",
        }
    }
}

/// One fault; [`ChaosSystem::inject`] starts it and [`ChaosSystem::heal`] ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL; healed by starting it again (PostgreSQL: crash recovery; Redis: empty).
    Kill(Component),
    /// SIGSTOP (PostgreSQL: the postmaster and every backend); healed by SIGCONT.
    Pause(Component),
    /// The broker unreachable for everyone (relay and consumer): the proxy drops its
    /// connections and refuses new ones.
    CutBroker,
    /// Region 2's consumer alone cut off from the broker; the relay still publishes.
    CutRegion2FromBroker,
}

impl Fault {
    pub fn name(self) -> String {
        match self {
            Self::Kill(c) => format!("kill {}", c.name()),
            Self::Pause(c) => format!("pause {}", c.name()),
            Self::CutBroker => "cut broker".to_owned(),
            Self::CutRegion2FromBroker => "cut region2 from broker".to_owned(),
        }
    }

    /// Every fault the system supports.
    pub fn all() -> Vec<Self> {
        use Component::*;
        let services = [WriteApi, Region1ReadApi, Region2ReadApi, Relay, Consumer];
        let mut all: Vec<Self> = Vec::new();
        for c in services.into_iter().chain([Redis1, Redis2]) {
            all.push(Self::Kill(c));
            all.push(Self::Pause(c));
        }
        for c in [Postgres1, Postgres2] {
            all.push(Self::Kill(c));
            all.push(Self::Pause(c));
        }
        all.push(Self::Kill(Broker));
        all.push(Self::Pause(Broker));
        all.push(Self::CutBroker);
        all.push(Self::CutRegion2FromBroker);
        all
    }
}

/// A program run as its own process, restartable with the same command, environment and port.
pub struct Service {
    pub name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The port it listens on (HTTP for the services, Kafka for the broker).
    pub port: u16,
    pub log: PathBuf,
    process: Option<ManagedProcess>,
}

impl Service {
    fn new(
        name: &'static str,
        program: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        port: u16,
        dir: &Path,
    ) -> Self {
        Self {
            name,
            program,
            args,
            env,
            port,
            log: dir.join(format!("{name}.log")),
            process: None,
        }
    }

    /// Starts it and waits (bounded) until it accepts connections on its port.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        // A failed start leaves its process behind: never run two on one port.
        self.kill();
        let process = ManagedProcess::start(
            self.name,
            &self.program,
            &self.args,
            &self.env,
            &self.log,
            "",
        )
        .with_context(|| format!("Failed to start {}", self.name))?;
        let listening = wait_for_port(self.port, Duration::from_secs(60)).await;
        let tail = process.log_tail();
        self.process = Some(process);
        listening.with_context(|| format!("{} did not start; its log ends:\n{tail}", self.name))
    }

    /// SIGKILL, waiting until it is gone.
    pub fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            if let Some(pid) = process.program_pid() {
                kill_and_wait(&[pid]);
            }
        }
    }

    pub fn pause(&self, paused: bool) {
        if let Some(pid) = self.process.as_ref().and_then(ManagedProcess::program_pid) {
            send_signal(pid, if paused { "STOP" } else { "CONT" });
        }
    }

    /// Whether its program runs (it may have exited on its own).
    pub fn is_running(&self) -> bool {
        self.process
            .as_ref()
            .and_then(ManagedProcess::program_pid)
            .is_some_and(is_running)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // A frozen program ignores SIGTERM until thawed.
        if self.is_running() {
            self.pause(false);
        }
    }
}

/// The whole two-region system.
pub struct ChaosSystem {
    pub postgres1: Postgres,
    pub postgres2: Postgres,
    pub redis1: Redis,
    pub redis2: Redis,
    redis_pids: [Option<u32>; 2],
    pub broker: Service,
    pub proxy: TcpProxy,
    pub write: Service,
    pub read1: Service,
    pub read2: Service,
    pub relay: Service,
    /// The partitioned mode's second relay ([`ChaosSystem::start_partitioned`]): no fault hits
    /// it, so it takes over the shares of the one that is killed or frozen.
    pub relay_b: Option<Service>,
    pub consumer: Service,
    pub database1_url: String,
    pub database2_url: String,
    pub topic: String,
    /// A `tandem:write` + `tandem:read` JWT for the Write API.
    pub token: String,
    /// Where every log goes.
    pub dir: PathBuf,
    /// Keep `dir` when dropped (for a post-mortem).
    pub keep_logs: bool,
}

impl ChaosSystem {
    /// Starts everything and waits until Region 2 reports ready (the consumer is assigned and
    /// heartbeating). About ten seconds.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(false).await
    }

    /// [`Self::start`] in the partitioned mode: two relays splitting the outbox into three
    /// shares (`RELAY_SHARES`; the faults hit the first) and a consumer applying with three
    /// lanes (`CONSUMER_LANES`).
    pub async fn start_partitioned() -> anyhow::Result<Self> {
        Self::start_with(true).await
    }

    async fn start_with(partitioned: bool) -> anyhow::Result<Self> {
        let dir = crate::process::scratch_dir("chaos");
        let (postgres1, postgres2, redis1, redis2) = tokio::task::spawn_blocking(|| {
            anyhow::Ok((
                Postgres::start().context("Failed to start Region 1's PostgreSQL")?,
                Postgres::start().context("Failed to start Region 2's PostgreSQL")?,
                Redis::start().context("Failed to start Region 1's Redis")?,
                Redis::start().context("Failed to start Region 2's Redis")?,
            ))
        })
        .await??;
        let database1_url = postgres1.create_database().await?;
        let database2_url = postgres2.create_database().await?;

        // The proxy must know the broker's port and the broker the proxy's.
        let broker_port = free_port();
        let proxy = TcpProxy::start(([127, 0, 0, 1], broker_port).into()).await?;
        // Its data lives in the run's directory: a SIGKILL and restart keeps every record.
        let mut broker = Service::new(
            "broker",
            broker_script(),
            vec![dir.join("kafka").display().to_string()],
            vec![
                ("KAFKA_PORT".to_owned(), broker_port.to_string()),
                ("KAFKA_ADVERTISED_PORT".to_owned(), proxy.port().to_string()),
                ("KAFKA_CONTROLLER_PORT".to_owned(), free_port().to_string()),
                ("KAFKA_HEAP".to_owned(), "384m".to_owned()),
            ],
            broker_port,
            &dir,
        );
        broker
            .start()
            .await
            .context("the Kafka broker (make test installs it)")?;

        let secret = format!("chaos-secret-{}", uuid::Uuid::now_v7().simple());
        let token = tandem_http::auth::mint_hs256(
            &secret,
            "chaos",
            &["tandem:write", "tandem:read"],
            Duration::from_secs(24 * 3600),
            None,
        )?;
        let topic = "tandem.chaos".to_owned();
        let common = |extra: &[(&str, String)]| -> Vec<(String, String)> {
            [
                ("BIND_ADDRESS", "127.0.0.1".to_owned()),
                ("RUST_LOG", "info,librdkafka=warn,rdkafka=warn".to_owned()),
                ("TANDEM_LOG_FORMAT", "pretty".to_owned()),
            ]
            .iter()
            .chain(extra)
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
        };
        let kafka = |client_id: &str| -> Vec<(&'static str, String)> {
            vec![
                ("KAFKA_BROKERS", format!("127.0.0.1:{}", proxy.port())),
                ("KAFKA_TOPIC", topic.clone()),
                ("KAFKA_PROPERTIES", format!("client.id={client_id}")),
                ("KAFKA_TOPIC_PARTITIONS", "3".to_owned()),
                ("KAFKA_TOPIC_REPLICATION", "1".to_owned()),
            ]
        };
        let region1 = [
            ("DATABASE_URL", database1_url.clone()),
            ("REDIS_URL", redis1.url()),
            ("REDIS_KEY_PREFIX", KEY_PREFIX.to_owned()),
            ("TANDEM_REGION", "region1".to_owned()),
        ];
        let region2 = [
            ("DATABASE_URL", database2_url.clone()),
            ("REDIS_URL", redis2.url()),
            ("REDIS_KEY_PREFIX", KEY_PREFIX.to_owned()),
            ("TANDEM_REGION", "region2".to_owned()),
        ];

        let port = free_port();
        let mut env = region1.to_vec();
        env.extend([
            ("PORT", port.to_string()),
            ("TANDEM_JWT_HS256_SECRET", secret.clone()),
        ]);
        let write = Service::new(
            "write-api",
            binary("tandem-write"),
            Vec::new(),
            common(&env),
            port,
            &dir,
        );
        let port = free_port();
        let mut env = region1.to_vec();
        env.push(("PORT", port.to_string()));
        let read1 = Service::new(
            "region1-read-api",
            binary("tandem-read"),
            Vec::new(),
            common(&env),
            port,
            &dir,
        );
        let port = free_port();
        let mut env = region2.to_vec();
        env.extend([
            ("PORT", port.to_string()),
            ("TANDEM_PRIMARY_READ_URL", read1.url()),
        ]);
        let read2 = Service::new(
            "region2-read-api",
            binary("tandem-read"),
            Vec::new(),
            common(&env),
            port,
            &dir,
        );
        let relay_env = |port: u16| {
            let mut env = kafka(RELAY_CLIENT_ID);
            env.extend([
                ("DATABASE_URL", database1_url.clone()),
                ("TANDEM_REGION", "region1".to_owned()),
                ("RELAY_POLL_INTERVAL_MS", "200".to_owned()),
                ("PORT", port.to_string()),
            ]);
            if partitioned {
                env.push(("RELAY_SHARES", "3".to_owned()));
            }
            common(&env)
        };
        let port = free_port();
        let relay = Service::new(
            "relay",
            binary("tandem-outbox-relay"),
            Vec::new(),
            relay_env(port),
            port,
            &dir,
        );
        let relay_b = partitioned.then(|| {
            let port = free_port();
            Service::new(
                "relay-b",
                binary("tandem-outbox-relay"),
                Vec::new(),
                relay_env(port),
                port,
                &dir,
            )
        });
        let port = free_port();
        let mut env = kafka(CONSUMER_CLIENT_ID);
        env.extend(region2.iter().cloned());
        env.extend([
            ("KAFKA_GROUP_ID", "tandem-chaos".to_owned()),
            ("PORT", port.to_string()),
        ]);
        if partitioned {
            env.push(("CONSUMER_LANES", "3".to_owned()));
        }
        let consumer = Service::new(
            "consumer",
            binary("tandem-region2-consumer"),
            Vec::new(),
            common(&env),
            port,
            &dir,
        );

        let mut system = Self {
            postgres1,
            postgres2,
            redis1,
            redis2,
            redis_pids: [None, None],
            broker,
            proxy,
            write,
            read1,
            read2,
            relay,
            relay_b,
            consumer,
            database1_url,
            database2_url,
            topic,
            token,
            dir,
            keep_logs: std::env::var_os("TANDEM_KEEP_TEST_LOGS").is_some(),
        };
        system.redis_pids = [
            redis_pid(&system.redis1.url()).await,
            redis_pid(&system.redis2.url()).await,
        ];
        // One at a time: the APIs migrate their databases at start-up.
        system.write.start().await?;
        system.read1.start().await?;
        system.read2.start().await?;
        system.relay.start().await?;
        if let Some(relay_b) = &mut system.relay_b {
            relay_b.start().await?;
        }
        system.consumer.start().await?;
        system.wait_region2_ready(Duration::from_secs(90)).await?;
        Ok(system)
    }

    /// Waits until Region 2's `/readyz` passes.
    pub async fn wait_region2_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + timeout;
        let url = format!("{}/readyz", self.read2.url());
        loop {
            let last = match client.get(&url).send().await {
                Ok(response) if response.status() == 200 => return Ok(()),
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            anyhow::ensure!(
                Instant::now() < deadline,
                "Region 2 was not ready within {timeout:?} (last answer: {last})\n{}",
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts a fault.
    pub async fn inject(&mut self, fault: Fault) -> anyhow::Result<()> {
        match fault {
            Fault::Kill(component) => self.kill(component).await,
            Fault::Pause(component) => self.pause(component, true),
            Fault::CutBroker => {
                self.proxy.cut(Cut::Everything);
                Ok(())
            }
            Fault::CutRegion2FromBroker => {
                self.proxy
                    .cut(Cut::KafkaClient(CONSUMER_CLIENT_ID.to_owned()));
                Ok(())
            }
        }
    }

    /// Ends a fault: restarts what was killed, thaws what was frozen, reconnects what was cut.
    pub async fn heal(&mut self, fault: Fault) -> anyhow::Result<()> {
        match fault {
            Fault::Kill(component) => self.restart(component).await,
            Fault::Pause(component) => self.pause(component, false),
            Fault::CutBroker | Fault::CutRegion2FromBroker => {
                self.proxy.heal();
                Ok(())
            }
        }
    }

    fn service(&mut self, component: Component) -> Option<&mut Service> {
        match component {
            Component::WriteApi => Some(&mut self.write),
            Component::Region1ReadApi => Some(&mut self.read1),
            Component::Region2ReadApi => Some(&mut self.read2),
            Component::Relay => Some(&mut self.relay),
            Component::Consumer => Some(&mut self.consumer),
            Component::Broker => Some(&mut self.broker),
            _ => None,
        }
    }

    async fn kill(&mut self, component: Component) -> anyhow::Result<()> {
        match component {
            Component::Redis1 | Component::Redis2 => {
                let pid = self.redis_pids[usize::from(component == Component::Redis2)]
                    .context("the Redis server's pid is unknown")?;
                tokio::task::block_in_place(|| kill_and_wait(&[pid]));
                Ok(())
            }
            Component::Postgres1 | Component::Postgres2 => {
                let postgres = if component == Component::Postgres1 {
                    &self.postgres1
                } else {
                    &self.postgres2
                };
                let postmaster = postmaster_pid(postgres)?;
                // The backends first listed, then everything killed at once: a machine crash.
                let mut pids = vec![postmaster];
                pids.extend(children_of(postmaster));
                tokio::task::block_in_place(|| kill_and_wait(&pids));
                Ok(())
            }
            service => {
                if let Some(service) = self.service(service) {
                    tokio::task::block_in_place(|| service.kill());
                }
                Ok(())
            }
        }
    }

    async fn restart(&mut self, component: Component) -> anyhow::Result<()> {
        match component {
            Component::Redis1 | Component::Redis2 => {
                let index = usize::from(component == Component::Redis2);
                let redis = if index == 0 {
                    &mut self.redis1
                } else {
                    &mut self.redis2
                };
                tokio::task::block_in_place(|| redis.restart())
                    .with_context(|| format!("Failed to restart {}", component.name()))?;
                let url = redis.url();
                self.redis_pids[index] = redis_pid(&url).await;
                Ok(())
            }
            Component::Postgres1 | Component::Postgres2 => {
                let postgres = if component == Component::Postgres1 {
                    &mut self.postgres1
                } else {
                    &mut self.postgres2
                };
                tokio::task::block_in_place(|| postgres.restart())
                    .with_context(|| format!("Failed to restart {}", component.name()))
            }
            service => match self.service(service) {
                Some(service) => service.start().await,
                None => Ok(()),
            },
        }
    }

    fn pause(&mut self, component: Component, paused: bool) -> anyhow::Result<()> {
        let signal = if paused { "STOP" } else { "CONT" };
        match component {
            Component::Redis1 | Component::Redis2 => {
                let pid = self.redis_pids[usize::from(component == Component::Redis2)]
                    .context("the Redis server's pid is unknown")?;
                send_signal(pid, signal);
            }
            Component::Postgres1 | Component::Postgres2 => {
                let postgres = if component == Component::Postgres1 {
                    &self.postgres1
                } else {
                    &self.postgres2
                };
                let postmaster = postmaster_pid(postgres)?;
                // Frozen, the postmaster forks no new backend; thawed last, it finds its
                // backends running again.
                if paused {
                    send_signal(postmaster, signal);
                }
                for child in children_of(postmaster) {
                    send_signal(child, signal);
                }
                if !paused {
                    send_signal(postmaster, signal);
                }
            }
            service => {
                if let Some(service) = self.service(service) {
                    service.pause(paused);
                }
            }
        }
        Ok(())
    }

    /// Restarts every service whose program exited on its own (not by a fault), and returns
    /// their names: an orchestrator would have restarted them too, but the run reports them.
    pub async fn revive_exited(&mut self) -> anyhow::Result<Vec<&'static str>> {
        let mut revived = Vec::new();
        for component in [
            Component::WriteApi,
            Component::Region1ReadApi,
            Component::Region2ReadApi,
            Component::Relay,
            Component::Consumer,
        ] {
            if let Some(service) = self.service(component) {
                if !service.is_running() {
                    revived.push(service.name);
                    service.kill();
                    service.start().await?;
                }
            }
        }
        Ok(revived)
    }

    /// The last lines of every service's log, for failure messages.
    pub fn log_tails(&self) -> String {
        [
            Some(&self.write),
            Some(&self.read1),
            Some(&self.read2),
            Some(&self.relay),
            self.relay_b.as_ref(),
            Some(&self.consumer),
            Some(&self.broker),
        ]
        .iter()
        .flatten()
        .map(|s| format!("--- {} ({}):\n{}", s.name, s.log.display(), s.log_tail()))
        .collect::<Vec<_>>()
        .join("\n")
    }
}

impl Drop for ChaosSystem {
    fn drop(&mut self) {
        // Thaw everything a failed run may have left frozen, so it can be stopped.
        for fault in Fault::all() {
            if let Fault::Pause(component) = fault {
                let _ = self.pause(component, false);
            }
        }
        self.proxy.heal();
        if self.keep_logs {
            eprintln!("chaos logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The Redis server's pid, from `INFO server`.
async fn redis_pid(url: &str) -> Option<u32> {
    let client = redis::Client::open(url).ok()?;
    let mut connection = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut connection)
        .await
        .ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

/// The postmaster's pid, from the first line of its data directory's `postmaster.pid`.
fn postmaster_pid(postgres: &Postgres) -> anyhow::Result<u32> {
    let file = postgres.dir.join("data").join("postmaster.pid");
    std::fs::read_to_string(&file)
        .ok()
        .and_then(|text| text.lines().next()?.trim().parse().ok())
        .with_context(|| format!("no pid in {}", file.display()))
}

fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(std::process::Stdio::null())
        .status();
}

/// SIGKILLs every pid and waits (bounded) until none runs.
fn kill_and_wait(pids: &[u32]) {
    for pid in pids {
        send_signal(*pid, "KILL");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|pid| is_running(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The processes whose parent is `parent` (from `/proc/*/stat`).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| stat_field(*pid, 1).and_then(|p| p.parse().ok()) == Some(parent))
        .collect()
}

/// Whether `pid` runs (a zombie does not: it only waits to be reaped).
fn is_running(pid: u32) -> bool {
    stat_field(pid, 0).is_some_and(|state| state != "Z")
}

/// A field of `/proc/<pid>/stat` after the command name (0: state, 1: parent pid).
fn stat_field(pid: u32, index: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`: comm may hold spaces and parentheses, so split after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(index).map(str::to_owned)
}

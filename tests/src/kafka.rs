//! Apache Kafka for the tests: single nodes and 3-node clusters, each node a real broker (KRaft,
//! combined broker and controller) started by `scripts/kafka-broker.sh`, the script `make up`
//! uses too, so the tests run the configuration developers run.
//!
//! Each test that needs a broker starts its own (about three seconds and 300 MB): a test may then
//! freeze, kill, restart or wipe it without touching another test, and topics, groups and
//! positions never leak between tests. A shared broker with per-test topics would save those
//! seconds but make every broker fault a hazard for the tests running beside it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::process::{ManagedProcess, free_port, scratch_dir};

/// `scripts/kafka-broker.sh` of this checkout.
pub fn broker_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka-broker.sh")
}

/// The Apache Kafka version the local broker runs (`deploy/local/kafka/pom.xml`).
pub fn kafka_version() -> String {
    let pom = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/kafka/pom.xml");
    std::fs::read_to_string(pom)
        .ok()
        .and_then(|text| {
            let start = text.find("<kafka.version>")? + "<kafka.version>".len();
            let end = start + text[start..].find('<')?;
            Some(text[start..end].to_owned())
        })
        .unwrap_or_else(|| "(unknown version)".to_owned())
}

/// One Kafka node. Its data survives [`Broker::kill`] and [`Broker::restart`] (a real broker's
/// log is durable), and only [`Broker::restart_empty`] throws it away.
pub struct Broker {
    pub port: u16,
    pub controller_port: u16,
    pub node_id: u32,
    /// The cluster's static quorum (`id@host:port,...`); `None` for a single node.
    voters: Option<String>,
    cluster_id: Option<String>,
    /// The port clients are told to connect to (a proxy's, in the chaos suite).
    advertised_port: u16,
    dir: PathBuf,
    process: Option<ManagedProcess>,
    /// Started with the node: how many brokers the cluster's metadata must list when ready.
    cluster_size: usize,
}

impl Broker {
    /// A single node on fresh ports, ready for clients.
    ///
    /// A port found free can be taken before the JVM binds it, seconds later (by another
    /// test's listener, or as the local port of any outgoing connection: both come from the
    /// same range). A node that exits while starting is therefore started again on fresh ports
    /// and a fresh directory, three attempts in all; each failure's log goes to stderr.
    pub async fn start() -> anyhow::Result<Self> {
        const ATTEMPTS: u32 = 3;
        let mut attempt = 1;
        loop {
            let port = free_port();
            let mut broker = Self::single(port, port);
            match broker.launch().await {
                Ok(()) => return Ok(broker),
                Err(e) if attempt < ATTEMPTS && broker.exited() => {
                    eprintln!("Kafka node exited while starting (attempt {attempt}): {e:#}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the node's process is gone (or was never started).
    fn exited(&self) -> bool {
        self.process
            .as_ref()
            .is_none_or(|p| p.program_pid().is_none_or(|pid| !alive(pid)))
    }

    /// A single node whose clients are told to connect to `advertised_port` (a proxy in front
    /// of `port`); not started yet: see [`Broker::launch`].
    pub fn single(port: u16, advertised_port: u16) -> Self {
        Self {
            port,
            controller_port: free_port(),
            node_id: 1,
            voters: None,
            cluster_id: None,
            advertised_port,
            dir: scratch_dir("broker"),
            process: None,
            cluster_size: 1,
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.advertised_port)
    }

    /// The broker's pid (the JVM), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(ManagedProcess::program_pid)
    }

    /// The broker's log (its stderr).
    pub fn log(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    /// Starts the node (formatting its storage on the first start) and waits until it
    /// answers metadata requests listing the whole cluster.
    pub async fn launch(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_ready(Duration::from_secs(120)).await
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut env = vec![
            ("KAFKA_PORT".to_owned(), self.port.to_string()),
            (
                "KAFKA_ADVERTISED_PORT".to_owned(),
                self.advertised_port.to_string(),
            ),
            (
                "KAFKA_CONTROLLER_PORT".to_owned(),
                self.controller_port.to_string(),
            ),
            ("KAFKA_NODE_ID".to_owned(), self.node_id.to_string()),
            ("KAFKA_HEAP".to_owned(), "384m".to_owned()),
        ];
        if let Some(voters) = &self.voters {
            env.push(("KAFKA_VOTERS".to_owned(), voters.clone()));
        }
        if let Some(cluster_id) = &self.cluster_id {
            env.push(("KAFKA_CLUSTER_ID".to_owned(), cluster_id.clone()));
        }
        let process = ManagedProcess::start(
            "kafka",
            &broker_script(),
            &[self.dir.display().to_string()],
            &env,
            &self.log(),
            "",
        )
        .context("Failed to start scripts/kafka-broker.sh")?;
        self.process = Some(process);
        Ok(())
    }

    async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let deadline = started + timeout;
        let address = format!("127.0.0.1:{}", self.port);
        let expected = self.cluster_size;
        loop {
            let address = address.clone();
            let brokers = tokio::task::spawn_blocking(move || metadata_brokers(&address))
                .await
                .unwrap_or(0);
            if brokers >= expected {
                return Ok(());
            }
            let exited = self.exited();
            if exited || Instant::now() > deadline {
                anyhow::bail!(
                    "Kafka node {} on port {} {} after {:.1} s; its log ({}):\n{}",
                    self.node_id,
                    self.port,
                    if exited {
                        "exited"
                    } else {
                        "did not list the cluster's brokers"
                    },
                    started.elapsed().as_secs_f64(),
                    self.log().display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        self.process
            .as_ref()
            .map(ManagedProcess::log_tail)
            .unwrap_or_default()
    }

    /// Freezes the broker (SIGSTOP) or thaws it (SIGCONT): an outage without data loss.
    pub fn pause(&self, paused: bool) {
        if let Some(process) = &self.process {
            process.signal(if paused { "STOP" } else { "CONT" });
        }
    }

    /// SIGKILLs the node and waits until it is gone. Its data stays for [`Broker::restart`].
    pub fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            process.signal("CONT");
            process.kill_and_wait();
            drop(process);
        }
    }

    /// Starts a killed node again on the same ports and data, and waits until it is ready.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch().await
    }

    /// Kills the node, throws its data away and starts an empty one on the same port (a new
    /// cluster: every topic and offset is gone, as after losing a cluster's storage).
    pub async fn restart_empty(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.voters.is_none(), "restart_empty is for single nodes");
        self.kill();
        std::fs::remove_dir_all(self.dir.join("data")).context("Failed to wipe the broker")?;
        self.launch().await
    }
}

fn alive(pid: u32) -> bool {
    // A zombie (state Z) is dead: it only waits for its parent to reap it.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.split_whitespace().nth(2).is_none_or(|s| s != "Z"))
}

/// How many brokers a metadata request to `address` lists (0 when it does not answer).
fn metadata_brokers(address: &str) -> usize {
    let consumer: Result<BaseConsumer, _> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", address)
        .set("log_level", "0")
        .create();
    consumer
        .ok()
        .and_then(|c| c.fetch_metadata(None, Duration::from_secs(2)).ok())
        .map_or(0, |m| m.brokers().len())
}

impl Drop for Broker {
    fn drop(&mut self) {
        // No controlled shutdown: the data is thrown away, and SIGTERM costs seconds.
        self.kill();
        if std::env::var_os("TANDEM_KEEP_TEST_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("broker logs kept in {}", self.dir.display());
        }
    }
}

/// A 3-node cluster (each node broker and controller): replication factor 3,
/// `min.insync.replicas=2`, so an `acks=all` write survives the loss of any one node.
pub struct KafkaCluster {
    pub nodes: Vec<Broker>,
}

impl KafkaCluster {
    pub async fn start() -> anyhow::Result<Self> {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, controller))| format!("{}@127.0.0.1:{controller}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        // As Kafka's own ids: never one starting with '-', which the format tool would take
        // for an option.
        let cluster_id = loop {
            use base64::Engine as _;
            let id =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
            if !id.starts_with('-') {
                break id;
            }
        };
        let mut nodes: Vec<Broker> = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, controller_port))| Broker {
                port,
                controller_port,
                node_id: u32::try_from(i + 1).unwrap_or(1),
                voters: Some(voters.clone()),
                cluster_id: Some(cluster_id.clone()),
                advertised_port: port,
                dir: scratch_dir(&format!("kafka-node{}", i + 1)),
                process: None,
                cluster_size: 3,
            })
            .collect();
        // The nodes wait for each other's quorum: start all, then wait for each.
        for node in &mut nodes {
            node.spawn()?;
        }
        for node in &nodes {
            node.wait_ready(Duration::from_secs(90)).await?;
        }
        Ok(Self { nodes })
    }

    /// Every node's address, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(Broker::address)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index in `nodes` of the node leading `topic`'s `partition`, as the cluster's
    /// metadata says.
    pub async fn leader_of(&self, topic: &str, partition: i32) -> anyhow::Result<usize> {
        let bootstrap = self.bootstrap();
        let topic = topic.to_owned();
        let leader = tokio::task::spawn_blocking(move || -> anyhow::Result<i32> {
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .create()?;
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
            metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
                .map(|p| p.leader())
                .filter(|&leader| leader > 0)
                .context("the partition has no leader")
        })
        .await??;
        self.nodes
            .iter()
            .position(|n| i64::from(n.node_id) == i64::from(leader))
            .context("the leader is not one of the cluster's nodes")
    }

    pub fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("node {}:\n{}", n.node_id, n.log_tail()))
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

/// The Kafka a two-region system runs on: one node, or a 3-node cluster.
pub enum Kafka {
    Single(Broker),
    Cluster(KafkaCluster),
}

impl Kafka {
    /// The bootstrap servers.
    pub fn address(&self) -> String {
        match self {
            Self::Single(broker) => broker.address(),
            Self::Cluster(cluster) => cluster.bootstrap(),
        }
    }

    /// The replication factor topics get.
    pub fn replication(&self) -> usize {
        match self {
            Self::Single(_) => 1,
            Self::Cluster(cluster) => cluster.nodes.len(),
        }
    }

    /// Freezes or thaws every node.
    pub fn pause(&self, paused: bool) {
        match self {
            Self::Single(broker) => broker.pause(paused),
            Self::Cluster(cluster) => cluster.nodes.iter().for_each(|n| n.pause(paused)),
        }
    }

    /// A single node's [`Broker::restart_empty`].
    pub async fn restart_empty(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Single(broker) => broker.restart_empty().await,
            Self::Cluster(_) => anyhow::bail!("restart_empty is for a single node"),
        }
    }

    /// The cluster (panics on a single node: a test asked for the wrong system).
    pub fn cluster_mut(&mut self) -> &mut KafkaCluster {
        match self {
            Self::Cluster(cluster) => cluster,
            Self::Single(_) => panic!("this system runs on a single Kafka node"),
        }
    }

    pub fn log_tails(&self) -> String {
        match self {
            Self::Single(broker) => broker.log_tail(),
            Self::Cluster(cluster) => cluster.log_tails(),
        }
    }
}

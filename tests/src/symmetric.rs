//! Two symmetric regions, every service a real process, as `make up` runs them: in each region a
//! Write API (forwarding to the write region while it is not it), a Read API (a replica while
//! another region writes), an outbox relay publishing the region's own topic and a consumer
//! applying the other region's; one Kafka broker; the HAProxy edge in front. For the tests of
//! write forwarding and switchover.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::kafka::Broker;
use crate::process::{ManagedProcess, binary, free_port, scratch_dir, wait_for_port};
use crate::services::{Postgres, Redis};

/// One region's processes and addresses.
pub struct Region {
    pub name: &'static str,
    pub database_url: String,
    pub pool: deadpool_postgres::Pool,
    pub key_prefix: String,
    pub topic: String,
    pub write_url: String,
    pub read_url: String,
    pub relay_port: u16,
    pub consumer_port: u16,
    pub write: Option<ManagedProcess>,
    pub read: Option<ManagedProcess>,
    pub relay: Option<ManagedProcess>,
    pub consumer: Option<ManagedProcess>,
}

/// Both regions, the broker and the edge.
pub struct Symmetric {
    pub regions: [Region; 2],
    pub broker: Broker,
    pub edge_url: String,
    pub edge: Option<ManagedProcess>,
    pub token: String,
    pub client: reqwest::Client,
    pub redis_url: String,
    secret: String,
    dir: PathBuf,
}

fn region2_postgres() -> &'static Postgres {
    static PG: std::sync::OnceLock<Postgres> = std::sync::OnceLock::new();
    PG.get_or_init(|| Postgres::start_shared().expect("failed to start Region 2's PostgreSQL"))
}

impl Symmetric {
    /// Everything up and Region 2's Read API ready (it has applied a heartbeat).
    pub async fn start() -> Self {
        let broker = Broker::start()
            .await
            .expect("the Kafka broker (make test installs it)");
        let run = uuid::Uuid::now_v7().simple().to_string();
        let dir = scratch_dir("symmetric");
        let redis_url = Redis::shared().url();
        let secret = format!("test-secret-{run}");
        let token = tandem_http::auth::mint_hs256(
            &secret,
            "test-user",
            &["tandem:write", "tandem:read"],
            Duration::from_secs(3600),
            None,
        )
        .expect("mint token");
        let mut regions = Vec::new();
        for (name, postgres, topic) in [
            ("region1", Postgres::shared(), format!("tandem.test.{run}")),
            (
                "region2",
                region2_postgres(),
                format!("tandem.test.{run}.region2"),
            ),
        ] {
            let database_url = postgres.create_database().await.expect("database");
            regions.push(Region {
                name,
                pool: tandem_store::db::connect_url(&database_url)
                    .await
                    .expect("pool"),
                database_url,
                key_prefix: format!("{name}-{run}"),
                topic,
                write_url: format!("http://127.0.0.1:{}", free_port()),
                read_url: format!("http://127.0.0.1:{}", free_port()),
                relay_port: free_port(),
                consumer_port: free_port(),
                write: None,
                read: None,
                relay: None,
                consumer: None,
            });
        }
        let regions: [Region; 2] = regions.try_into().unwrap_or_else(|_| unreachable!());
        let mut system = Self {
            regions,
            broker,
            edge_url: String::new(),
            edge: None,
            token,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            redis_url,
            secret,
            dir,
        };
        // Region 1's Write API first: it records both the schema and, in each database, the
        // role (Region 1 writes at write epoch 1).
        for i in 0..2 {
            system.start_service(i, "write");
            let port = port_of(&system.regions[i].write_url);
            wait_for_port(port, Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| panic!("{}", system.logs(&format!("write API: {e}"))));
        }
        for i in 0..2 {
            for service in ["read", "relay", "consumer"] {
                system.start_service(i, service);
            }
        }
        system.start_edge().await;
        system.wait_ready(1, Duration::from_secs(90)).await;
        system
    }

    fn base_env(&self, i: usize) -> Vec<(String, String)> {
        let region = &self.regions[i];
        [
            ("TANDEM_REGION", region.name.to_owned()),
            ("DATABASE_URL", region.database_url.clone()),
            ("REDIS_URL", self.redis_url.clone()),
            ("REDIS_KEY_PREFIX", region.key_prefix.clone()),
            ("BIND_ADDRESS", "127.0.0.1".to_owned()),
            ("RUST_LOG", "info,librdkafka=warn,rdkafka=warn".to_owned()),
            ("TANDEM_LOG_FORMAT", "pretty".to_owned()),
            ("KAFKA_BROKERS", self.broker.address()),
            ("KAFKA_TOPIC_PARTITIONS", "3".to_owned()),
            ("KAFKA_TOPIC_REPLICATION", "1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Starts (or restarts) one service of region `i` (0 or 1): `write`, `read`, `relay` or
    /// `consumer`.
    pub fn start_service(&mut self, i: usize, service: &str) {
        let other = 1 - i;
        let mut env = self.base_env(i);
        let (binary_name, port) = match service {
            "write" => {
                env.push(("TANDEM_JWT_HS256_SECRET".into(), self.secret.clone()));
                env.push((
                    "TANDEM_WRITE_FORWARD_URL".into(),
                    self.regions[other].write_url.clone(),
                ));
                ("tandem-write", port_of(&self.regions[i].write_url))
            }
            "read" => {
                env.push(("TANDEM_JWT_HS256_SECRET".into(), self.secret.clone()));
                env.push((
                    "TANDEM_PRIMARY_READ_URL".into(),
                    self.regions[other].read_url.clone(),
                ));
                env.push(("TANDEM_MIGRATE_ON_START".into(), "false".into()));
                ("tandem-read", port_of(&self.regions[i].read_url))
            }
            "relay" => {
                env.push(("KAFKA_TOPIC".into(), self.regions[i].topic.clone()));
                env.push(("RELAY_POLL_INTERVAL_MS".into(), "200".into()));
                ("tandem-outbox-relay", self.regions[i].relay_port)
            }
            "consumer" => {
                env.push(("KAFKA_TOPIC".into(), self.regions[other].topic.clone()));
                env.push((
                    "KAFKA_GROUP_ID".into(),
                    format!("group-{}", self.regions[i].key_prefix),
                ));
                ("tandem-region2-consumer", self.regions[i].consumer_port)
            }
            other => panic!("no service {other}"),
        };
        env.push(("PORT".into(), port.to_string()));
        let name = format!("{}-{service}", self.regions[i].name);
        let log = self.dir.join(format!("{name}.log"));
        let process = ManagedProcess::start(&name, &binary(binary_name), &[], &env, &log, "")
            .unwrap_or_else(|e| panic!("start {binary_name}: {e}"));
        let region = &mut self.regions[i];
        let slot = match service {
            "write" => &mut region.write,
            "read" => &mut region.read,
            "relay" => &mut region.relay,
            _ => &mut region.consumer,
        };
        *slot = Some(process);
    }

    async fn start_edge(&mut self) {
        let port = free_port();
        let host = |url: &str| url.trim_start_matches("http://").to_owned();
        let config = crate::edge::haproxy_config(
            port,
            &host(&self.regions[0].write_url),
            &host(&self.regions[1].write_url),
            &host(&self.regions[0].read_url),
            &host(&self.regions[1].read_url),
        );
        std::fs::write(self.dir.join("haproxy.cfg"), config).expect("write haproxy.cfg");
        self.edge = Some(
            ManagedProcess::start(
                "edge",
                &crate::edge::haproxy_binary(),
                &[
                    "-db".into(),
                    "-f".into(),
                    self.dir.join("haproxy.cfg").display().to_string(),
                ],
                &[],
                &self.dir.join("edge.log"),
                "",
            )
            .expect("haproxy (apt install haproxy; make test does)"),
        );
        wait_for_port(port, Duration::from_secs(10))
            .await
            .expect("edge up");
        self.edge_url = format!("http://127.0.0.1:{port}");
    }

    /// Waits until region `i`'s Read API is ready (as a replica: it has applied a heartbeat).
    pub async fn wait_ready(&self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/readyz", self.regions[i].read_url);
        loop {
            if let Ok(response) = self.client.get(&url).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}",
                self.logs(&format!("{} never became ready", self.regions[i].name))
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs every service of region `i` (the region is lost; its database stays).
    pub fn kill_region(&mut self, i: usize) {
        let region = &mut self.regions[i];
        for slot in [
            &mut region.write,
            &mut region.read,
            &mut region.relay,
            &mut region.consumer,
        ] {
            if let Some(process) = slot.take() {
                process.kill_and_wait();
            }
        }
    }

    /// The region's recorded role: (write region, write epoch).
    pub async fn role(&self, i: usize) -> (String, i64) {
        let role = tandem_store::roles::current(&self.regions[i].pool)
            .await
            .expect("role")
            .expect("a recorded role");
        (role.write_region, role.write_epoch)
    }

    /// A write request to `base` (a Write API or the edge), authenticated.
    pub fn write(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.client.request(method, url).bearer_auth(&self.token)
    }

    /// Runs the `tandem` CLI against both databases.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_with(
            args,
            [&self.regions[0].database_url, &self.regions[1].database_url],
        )
    }

    /// Runs the `tandem` CLI with these database URLs (an unreachable one, say).
    pub fn cli_with(&self, args: &[&str], urls: [&str; 2]) -> std::process::Output {
        std::process::Command::new(binary("tandem"))
            .args(args)
            .env("TANDEM_REGION1_DATABASE_URL", urls[0])
            .env("TANDEM_REGION2_DATABASE_URL", urls[1])
            .env("TANDEM_STACK_FILE", "none")
            .env_remove("KAFKA_BROKERS")
            .env_remove("KAFKA_TOPIC")
            .output()
            .expect("run tandem")
    }

    /// Waits until both regions hold the same documents, row for row.
    pub async fn wait_converged(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let one = crate::TwoRegions::snapshot(&self.regions[0].pool).await;
            let two = crate::TwoRegions::snapshot(&self.regions[1].pool).await;
            if one == two {
                return;
            }
            if Instant::now() > deadline {
                let differ = one.iter().filter(|r| !two.contains(r)).count()
                    + two.iter().filter(|r| !one.contains(r)).count();
                panic!(
                    "{}",
                    self.logs(&format!(
                        "the regions did not converge within {timeout:?}: {} rows in region1, {} in region2, {differ} differ",
                        one.len(),
                        two.len()
                    ))
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `message`, then the last lines of every service's log.
    pub fn logs(&self, message: &str) -> String {
        let mut out = message.to_owned();
        for region in &self.regions {
            for process in [&region.write, &region.read, &region.relay, &region.consumer]
                .into_iter()
                .flatten()
            {
                out.push_str(&format!("\n--- {}:\n{}", process.name, process.log_tail()));
            }
        }
        out
    }
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a URL with a port")
}

impl Drop for Symmetric {
    fn drop(&mut self) {
        self.edge = None;
        for region in &mut self.regions {
            region.write = None;
            region.read = None;
            region.relay = None;
            region.consumer = None;
        }
        if std::env::var_os("TANDEM_KEEP_TEST_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("service logs kept in {}", self.dir.display());
        }
    }
}

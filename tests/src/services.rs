//! Real servers for the tests (PostgreSQL, Redis) and in-process Tandem services on them.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::{Method, RequestBuilder};
use tandem_http::auth::{AuthSettings, mint_hs256};
use tandem_runtime::config::ServiceSettings;
use tandem_store::cache::CacheSettings;
use tandem_store::db::DatabaseSettings;

use crate::process::{ManagedProcess, free_port, pg_program, scratch_dir};

fn wait_for_port_blocking(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "nothing listens on port {port} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// PostgreSQL refuses to run as root; when the tests do (CI, containers), run its programs as
/// the `postgres` user through `setpriv`, which execs in place so signals reach the server.
fn pg_command(program: &str) -> (PathBuf, Vec<String>) {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let program = pg_program(program);
    if is_root {
        (
            PathBuf::from("setpriv"),
            vec![
                "--reuid=postgres".into(),
                "--regid=postgres".into(),
                "--init-groups".into(),
                "--".into(),
                program.display().to_string(),
            ],
        )
    } else {
        (program, Vec::new())
    }
}

fn give_to_postgres_user(dir: &std::path::Path) {
    let _ = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .status();
}

/// A PostgreSQL cluster of our own: own data directory, own port.
pub struct Postgres {
    pub port: u16,
    pub dir: PathBuf,
    process: Option<ManagedProcess>,
    remove_on_drop: bool,
    /// Commits flushed to disk (`fsync` on, as RDS runs); the tests run with `fsync=off`.
    durable: bool,
}

impl Postgres {
    /// Creates and starts a new cluster (about a second), with `fsync=off`: a killed process
    /// loses nothing (the page cache survives), only a machine crash would.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_inner(false, false)
    }

    /// A cluster that flushes every commit (`fsync` and `synchronous_commit` on, the
    /// defaults, as on RDS): what the benchmark measures against.
    pub fn start_durable() -> anyhow::Result<Self> {
        Self::start_inner(false, true)
    }

    fn start_inner(shared: bool, durable: bool) -> anyhow::Result<Self> {
        let dir = scratch_dir("pg");
        give_to_postgres_user(&dir);
        let data = dir.join("data");
        let (initdb, prefix) = pg_command("initdb");
        let status = Command::new(initdb)
            .args(prefix)
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
                "-D",
            ])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .context("Failed to run initdb")?;
        anyhow::ensure!(status.success(), "initdb failed for {}", data.display());
        let mut pg = Self {
            port: free_port(),
            dir,
            process: None,
            remove_on_drop: !shared,
            durable,
        };
        pg.launch(shared)?;
        Ok(pg)
    }

    fn launch(&mut self, shared: bool) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        let (program, mut args) = pg_command("postgres");
        args.extend::<Vec<String>>(vec![
            "-D".into(),
            data.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-k".into(),
            self.dir.display().to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            format!("fsync={}", if self.durable { "on" } else { "off" }),
            "-c".into(),
            "synchronous_commit=on".into(),
            "-c".into(),
            "max_connections=300".into(),
        ]);
        let cleanup = if shared {
            format!("rm -rf '{}'", self.dir.display())
        } else {
            String::new()
        };
        let process = ManagedProcess::start(
            "postgres",
            &program,
            &args,
            &[],
            &self.dir.join("postgres.log"),
            &cleanup,
        )?;
        wait_for_port_blocking(self.port, Duration::from_secs(30))
            .with_context(|| format!("postgres did not start:\n{}", process.log_tail()))?;
        // Accepting TCP is not yet accepting queries: wait for a real connection.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !Command::new(pg_program("pg_isready"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "postgres not ready:\n{}",
                process.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.process = Some(process);
        Ok(())
    }

    /// A cluster for the whole test process, removed when the process exits.
    pub fn start_shared() -> anyhow::Result<Self> {
        Self::start_inner(true, false)
    }

    /// The cluster every test of this process shares (each test gets its own database).
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(|| {
            Postgres::start_inner(true, false).expect("failed to start the shared PostgreSQL")
        })
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates an empty database with a random name and returns its URL.
    pub async fn create_database(&self) -> anyhow::Result<String> {
        let name = format!("t_{}", uuid::Uuid::now_v7().simple());
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        Ok(self.url(&name))
    }

    /// Fast shutdown (what a crashed or failed-over database looks like to clients).
    pub fn stop(&mut self) {
        if let Some(process) = &self.process {
            process.signal("INT");
        }
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
    }

    /// Starts the stopped cluster again on the same port and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.launch(false)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        if self.remove_on_drop {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A Redis server of our own.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    process: Option<ManagedProcess>,
}

impl Redis {
    pub fn start() -> anyhow::Result<Self> {
        let dir = scratch_dir("redis");
        let mut redis = Self {
            port: free_port(),
            dir,
            process: None,
        };
        redis.launch()?;
        Ok(redis)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &self.dir.display().to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let process = ManagedProcess::start(
            "redis",
            &PathBuf::from("redis-server"),
            &args,
            &[],
            &self.dir.join("redis.log"),
            "",
        )?;
        wait_for_port_blocking(self.port, Duration::from_secs(10))
            .with_context(|| format!("redis did not start:\n{}", process.log_tail()))?;
        self.process = Some(process);
        Ok(())
    }

    /// The server every test of this process shares (each test gets its own key prefix).
    pub fn shared() -> &'static Redis {
        static SHARED: OnceLock<Redis> = OnceLock::new();
        SHARED.get_or_init(|| Redis::start().expect("failed to start the shared Redis"))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.launch()
    }

    /// Freezes the server (SIGSTOP) or thaws it (SIGCONT): commands sent meanwhile time out
    /// at the client and may still run later.
    pub fn pause(&self, paused: bool) {
        if let Some(process) = &self.process {
            process.signal(if paused { "STOP" } else { "CONT" });
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How to build a [`TestApp`].
#[derive(Debug, Clone, Default)]
pub struct TestAppOptions {
    /// Use this database instead of a fresh one in the shared cluster.
    pub database_url: Option<String>,
    /// Use this Redis instead of the shared one.
    pub redis_url: Option<String>,
    pub read_requires_auth: bool,
    /// The HS256 secret (default: a random one per app).
    pub secret: Option<String>,
    /// The APIs' `lock_timeout` (default: the product's).
    pub lock_timeout: Option<Duration>,
    /// The APIs' request timeout (default 10 s).
    pub request_timeout: Option<Duration>,
}

/// The Write and Read APIs of Region 1, served over real HTTP on loopback.
pub struct TestApp {
    pub write_url: String,
    pub read_url: String,
    /// The Redis URL and key prefix of this app's cache.
    pub redis_url: String,
    pub cache_prefix: String,
    pub database_url: String,
    pub pool: deadpool_postgres::Pool,
    pub client: reqwest::Client,
    pub secret: String,
    pub token: String,
    pub write_state: tandem_write::AppState,
    pub read_state: tandem_read::AppState,
    /// What the Write API was started with, so a test can start another one.
    pub write_settings: tandem_write::Settings,
}

/// Writes a live cache entry of `version` for a document straight into Redis, in the current
/// generation: what a writer killed between its commit and its cache update leaves behind
/// (the previous version, still cached).
pub async fn plant_cache_entry(
    redis_url: &str,
    prefix: &str,
    collection: &str,
    id: &str,
    version: i64,
    data: &serde_json::Value,
) {
    let client = redis::Client::open(redis_url).expect("redis client");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let generation: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:gen"))
        .query_async(&mut connection)
        .await
        .expect("read the generation");
    let generation = generation.unwrap_or_else(|| "0".to_owned());
    let body = serde_json::json!({"collection": collection, "id": id, "version": version,
        "data": data, "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"});
    let _: () = redis::cmd("HSET")
        .arg(format!("{prefix}:g{generation}:doc:{collection}/{id}"))
        .arg("v")
        .arg(version)
        .arg("s")
        .arg("L")
        .arg("b")
        .arg(body.to_string())
        .query_async(&mut connection)
        .await
        .expect("plant the entry");
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(TestAppOptions::default()).await
}

pub async fn spawn_app_with(options: TestAppOptions) -> TestApp {
    let database_url = match options.database_url {
        Some(url) => url,
        None => Postgres::shared()
            .create_database()
            .await
            .expect("create test database"),
    };
    let redis_url = options.redis_url.unwrap_or_else(|| Redis::shared().url());
    let secret = options
        .secret
        .unwrap_or_else(|| format!("test-secret-{}", uuid::Uuid::now_v7()));
    let mut cache = CacheSettings::from_url(&redis_url);
    cache.key_prefix = format!("test-{}", uuid::Uuid::now_v7().simple());
    let cache_prefix = cache.key_prefix.clone();
    cache.cooldown = Duration::from_millis(200);
    let auth = AuthSettings {
        hs256_secret: Some(secret.clone().into()),
        read_requires_auth: options.read_requires_auth,
        ..AuthSettings::default()
    };
    let service = ServiceSettings {
        region: "region1".into(),
        port: 0,
        bind_address: [127, 0, 0, 1].into(),
        request_timeout: options.request_timeout.unwrap_or(Duration::from_secs(10)),
    };
    let mut database = DatabaseSettings::from_url(&database_url);
    database.pool_timeout = Duration::from_secs(1);
    if let Some(lock_timeout) = options.lock_timeout {
        database.limits.lock_timeout = lock_timeout;
    }
    let write_settings = tandem_write::Settings {
        service: service.clone(),
        database: database.clone(),
        cache: cache.clone(),
        auth: auth.clone(),
        migrate_on_start: true,
        initial_write_region: "region1".into(),
        forward_url: None,
    };
    let write_state = tandem_write::AppState::build(&write_settings)
        .await
        .expect("build write state");
    let read_settings = tandem_read::Settings {
        service,
        database,
        cache,
        auth,
        migrate_on_start: false,
        replica: None,
    };
    let read_state = tandem_read::AppState::build(&read_settings)
        .await
        .expect("build read state");
    let write_url = serve(tandem_write::router(write_state.clone())).await;
    let read_url = serve(tandem_read::router(read_state.clone())).await;
    let token = mint_hs256(
        &secret,
        "test-user",
        &["tandem:write", "tandem:read"],
        Duration::from_secs(3600),
        None,
    )
    .expect("mint token");
    TestApp {
        write_url,
        read_url,
        redis_url: redis_url.clone(),
        cache_prefix,
        pool: tandem_store::db::connect_url(&database_url)
            .await
            .expect("pool"),
        database_url,
        client: reqwest::Client::new(),
        secret,
        token,
        write_state,
        read_state,
        write_settings,
    }
}

/// Serves a router on an ephemeral loopback port for the rest of the test.
pub async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{address}")
}

impl TestApp {
    /// A request to the Write API, authenticated with a `tandem:write` token.
    pub fn write(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.write_url))
            .bearer_auth(&self.token)
    }

    /// `PUT` of a JSON document.
    pub async fn put(
        &self,
        collection: &str,
        id: &str,
        data: &serde_json::Value,
    ) -> reqwest::Response {
        self.write(Method::PUT, &format!("/v1/{collection}/{id}"))
            .json(data)
            .send()
            .await
            .expect("PUT failed to send")
    }

    /// `GET` from the Read API.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.read_url))
            .send()
            .await
            .expect("GET failed to send")
    }

    /// A token with exactly these scopes.
    pub fn token_with(&self, scopes: &[&str]) -> String {
        mint_hs256(
            &self.secret,
            "test-user",
            scopes,
            Duration::from_secs(3600),
            None,
        )
        .expect("mint token")
    }

    /// Number of rows in a table of the test database.
    pub async fn count(&self, table: &str) -> i64 {
        let client = self.pool.get().await.expect("db connection");
        client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count query")
            .get(0)
    }
}

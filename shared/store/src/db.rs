//! PostgreSQL connection pooling with three credential sources and optional TLS.
//!
//! * `DATABASE_URL`: a libpq-style URL or key/value string (local development, tests).
//! * `DATABASE_SECRET_ID`: an AWS Secrets Manager secret in the RDS JSON shape
//!   (`username`, `password`, `host`, `port`, `dbname`), re-read periodically so a rotation is
//!   picked up by new connections without a restart.
//! * `DATABASE_IAM_HOST` (+ `DATABASE_IAM_USER`, `DATABASE_IAM_DBNAME`, `DATABASE_IAM_PORT`):
//!   RDS IAM authentication; a fresh token (valid 15 minutes) is generated every
//!   `DATABASE_CREDENTIALS_REFRESH_SECONDS`, well before it expires.
//!
//! Credentials are refreshed by a background task into a shared slot, and every new connection
//! reads the slot, so a refresh never blocks a request and existing connections stay open
//! (PostgreSQL only checks the password when a connection opens).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

use tandem_runtime::config::{self, ConfigError};
use tandem_runtime::metrics::PoolUsage;

/// Whether and how to use TLS towards PostgreSQL (`DATABASE_TLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain TCP or a Unix socket (local development).
    Disable,
    /// TLS, verifying the server certificate against the web PKI roots plus `DATABASE_CA_FILE`
    /// (set it to the RDS CA bundle in AWS) and the host name.
    VerifyFull,
}

/// Where the connection settings come from.
#[derive(Debug, Clone)]
pub enum CredentialSource {
    Url(SecretString),
    SecretsManager {
        secret_id: String,
    },
    Iam {
        host: String,
        port: u16,
        user: String,
        dbname: String,
    },
}

/// Database settings, read from the environment.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub source: CredentialSource,
    pub tls: TlsMode,
    /// Extra PEM CA certificates for `verify-full` (`DATABASE_CA_FILE`).
    pub ca_file: Option<String>,
    /// Maximum connections per process (`DATABASE_POOL_SIZE`).
    pub pool_size: usize,
    /// How long a request waits for a pooled connection before answering 503
    /// (`DATABASE_POOL_TIMEOUT_MS`).
    pub pool_timeout: Duration,
    /// How often rotating credentials are re-read (`DATABASE_CREDENTIALS_REFRESH_SECONDS`).
    pub refresh_every: Duration,
    /// Time bounds every connection carries, so that no statement, lock wait or forgotten
    /// transaction holds a connection (and the rows it locked) for long.
    pub limits: SessionLimits,
}

/// PostgreSQL session settings applied to every connection (pooled and dedicated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// `statement_timeout` (`DATABASE_STATEMENT_TIMEOUT_MS`, default 15000).
    pub statement_timeout: Duration,
    /// `lock_timeout` (`DATABASE_LOCK_TIMEOUT_MS`, default 5000): a write waiting this long
    /// for a row lock answers 503 instead of holding its connection.
    pub lock_timeout: Duration,
    /// `idle_in_transaction_session_timeout`
    /// (`DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS`, default 30000).
    pub idle_in_transaction: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            statement_timeout: Duration::from_secs(15),
            lock_timeout: Duration::from_secs(5),
            idle_in_transaction: Duration::from_secs(30),
        }
    }
}

impl SessionLimits {
    pub fn from_env() -> Result<Self, ConfigError> {
        let default = Self::default();
        Ok(Self {
            statement_timeout: config::millis_or(
                "DATABASE_STATEMENT_TIMEOUT_MS",
                default.statement_timeout,
            )?,
            lock_timeout: config::millis_or("DATABASE_LOCK_TIMEOUT_MS", default.lock_timeout)?,
            idle_in_transaction: config::millis_or(
                "DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS",
                default.idle_in_transaction,
            )?,
        })
    }

    /// Adds the limits to a connection's startup options.
    fn apply(&self, config: &mut tokio_postgres::Config) {
        let mut options = config.get_options().unwrap_or_default().to_owned();
        for (name, value) in [
            ("statement_timeout", self.statement_timeout),
            ("lock_timeout", self.lock_timeout),
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction,
            ),
        ] {
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str(&format!("-c {name}={}", value.as_millis()));
        }
        config.options(&options);
    }
}

impl DatabaseSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let url = config::secret("DATABASE_URL");
        let secret_id = config::optional("DATABASE_SECRET_ID");
        let iam_host = config::optional("DATABASE_IAM_HOST");
        let source = match (url, secret_id, iam_host) {
            (Some(url), None, None) => CredentialSource::Url(url),
            (None, Some(secret_id), None) => CredentialSource::SecretsManager { secret_id },
            (None, None, Some(host)) => CredentialSource::Iam {
                host,
                port: config::parsed_or("DATABASE_IAM_PORT", 5432)?,
                user: config::required("DATABASE_IAM_USER", "the database user granted rds_iam")?,
                dbname: config::required("DATABASE_IAM_DBNAME", "the database name")?,
            },
            (None, None, None) => {
                return Err(ConfigError::Missing {
                    name: "DATABASE_URL",
                    hint: "set exactly one of DATABASE_URL, DATABASE_SECRET_ID or DATABASE_IAM_HOST",
                });
            }
            _ => {
                return Err(ConfigError::Invalid {
                    name: "DATABASE_URL",
                    value: "<several set>".into(),
                    reason:
                        "set exactly one of DATABASE_URL, DATABASE_SECRET_ID or DATABASE_IAM_HOST"
                            .into(),
                });
            }
        };
        let tls = match config::optional("DATABASE_TLS").as_deref() {
            None | Some("disable") => TlsMode::Disable,
            Some("verify-full") => TlsMode::VerifyFull,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "DATABASE_TLS",
                    value: other.into(),
                    reason: "expected disable or verify-full".into(),
                });
            }
        };
        Ok(Self {
            source,
            tls,
            ca_file: config::optional("DATABASE_CA_FILE"),
            pool_size: config::parsed_or("DATABASE_POOL_SIZE", 16)?,
            pool_timeout: config::millis_or("DATABASE_POOL_TIMEOUT_MS", Duration::from_secs(2))?,
            refresh_every: Duration::from_secs(config::parsed_or(
                "DATABASE_CREDENTIALS_REFRESH_SECONDS",
                600,
            )?),
            limits: SessionLimits::from_env()?,
        })
    }

    /// Settings for a plain URL, used by tools and tests.
    pub fn from_url(url: &str) -> Self {
        Self {
            source: CredentialSource::Url(SecretString::from(url.to_owned())),
            tls: TlsMode::Disable,
            ca_file: None,
            pool_size: 16,
            pool_timeout: Duration::from_secs(2),
            refresh_every: Duration::from_secs(600),
            limits: SessionLimits::default(),
        }
    }
}

/// The shape of an RDS-managed Secrets Manager secret.
#[derive(Deserialize)]
struct RdsSecret {
    username: String,
    password: String,
    host: String,
    #[serde(default)]
    port: Option<serde_json::Value>,
    #[serde(default)]
    dbname: Option<String>,
}

/// The connection settings every new connection uses; swapped by the refresher.
type ConfigSlot = Arc<RwLock<tokio_postgres::Config>>;

#[derive(Clone)]
enum Tls {
    None,
    Rustls(MakeRustlsConnect),
}

/// Opens connections with whatever settings the slot holds at that moment.
struct RefreshingConnect {
    slot: ConfigSlot,
    tls: Tls,
}

impl deadpool_postgres::Connect for RefreshingConnect {
    fn connect(
        &self,
        _static_config: &tokio_postgres::Config,
    ) -> BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let config = self
            .slot
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
        let tls = self.tls.clone();
        Box::pin(async move {
            let on_error = |e: tokio_postgres::Error| {
                tracing::warn!(error = %e, "postgres connection ended with an error");
            };
            match tls {
                Tls::None => {
                    let (client, connection) = config.connect(NoTls).await?;
                    let task = tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            on_error(e);
                        }
                    });
                    Ok((client, task))
                }
                Tls::Rustls(tls) => {
                    let (client, connection) = config.connect(tls).await?;
                    let task = tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            on_error(e);
                        }
                    });
                    Ok((client, task))
                }
            }
        })
    }
}

/// Builds the pool and, for rotating credentials, starts the task that keeps them fresh.
/// Fails only on bad settings or when the first credentials cannot be fetched; an unreachable
/// database is not an error here (`/readyz` reports it and requests answer 503).
pub async fn connect_pool(settings: &DatabaseSettings) -> anyhow::Result<Pool> {
    let initial = resolve_limited(settings)
        .await
        .context("Failed to resolve the database connection settings")?;
    let slot: ConfigSlot = Arc::new(RwLock::new(initial.clone()));
    if !matches!(settings.source, CredentialSource::Url(_)) {
        spawn_refresher(settings.clone(), slot.clone());
    }
    let tls = match settings.tls {
        TlsMode::Disable => Tls::None,
        TlsMode::VerifyFull => Tls::Rustls(rustls_connector(settings.ca_file.as_deref())?),
    };
    let manager = Manager::from_connect(
        initial,
        RefreshingConnect { slot, tls },
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(settings.pool_timeout))
        .create_timeout(Some(settings.pool_timeout))
        .recycle_timeout(Some(settings.pool_timeout))
        .build()
        .context("Failed to build the database pool")
}

/// A pool of one connection for readiness probes, so that `/readyz` never queues behind the
/// requests of a saturated pool (which would mark every replica unready at once): it answers
/// within about a second whatever the request pool is doing.
pub async fn connect_probe(settings: &DatabaseSettings) -> anyhow::Result<Pool> {
    let mut settings = settings.clone();
    settings.pool_size = 1;
    settings.pool_timeout = settings.pool_timeout.min(Duration::from_secs(1));
    connect_pool(&settings).await
}

/// A pool for a plain URL (tools and tests).
pub async fn connect_url(url: &str) -> anyhow::Result<Pool> {
    connect_pool(&DatabaseSettings::from_url(url)).await
}

fn rustls_connector(ca_file: Option<&str>) -> anyhow::Result<MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("Failed to read DATABASE_CA_FILE {path}"))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots
                .add(cert.with_context(|| format!("Failed to parse a certificate in {path}"))?)
                .with_context(|| format!("Failed to add a certificate from {path}"))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("Failed to configure TLS")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// The connection settings with the session limits applied.
async fn resolve_limited(settings: &DatabaseSettings) -> anyhow::Result<tokio_postgres::Config> {
    let mut config = resolve_config(&settings.source).await?;
    settings.limits.apply(&mut config);
    Ok(config)
}

async fn resolve_config(source: &CredentialSource) -> anyhow::Result<tokio_postgres::Config> {
    match source {
        CredentialSource::Url(url) => url
            .expose_secret()
            .parse()
            .context("DATABASE_URL is not a valid PostgreSQL connection string"),
        CredentialSource::SecretsManager { secret_id } => {
            let text =
                tandem_runtime::secrets::read_string(secret_id, "database credentials").await?;
            config_from_secret(&text)
                .with_context(|| format!("Secret {secret_id} is not an RDS secret"))
        }
        CredentialSource::Iam {
            host,
            port,
            user,
            dbname,
        } => {
            let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let generator = aws_sdk_rds::auth_token::AuthTokenGenerator::new(
                aws_sdk_rds::auth_token::Config::builder()
                    .hostname(host)
                    .port(u64::from(*port))
                    .username(user)
                    .build()
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .context("Failed to configure the RDS auth token generator")?,
            );
            let token = generator
                .auth_token(&sdk)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("Failed to generate an RDS IAM auth token")?;
            let mut config = tokio_postgres::Config::new();
            config
                .host(host)
                .port(*port)
                .user(user)
                .dbname(dbname)
                .password(token.as_str());
            Ok(config)
        }
    }
}

/// Parses an RDS secret (`{"username","password","host","port","dbname"}`).
pub fn config_from_secret(text: &str) -> anyhow::Result<tokio_postgres::Config> {
    let secret: RdsSecret =
        serde_json::from_str(text).context("Failed to parse the secret JSON")?;
    let port = match secret.port {
        None => 5432,
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .context("bad port")?,
        Some(serde_json::Value::String(s)) => s.parse().context("bad port")?,
        Some(_) => anyhow::bail!("port must be a number"),
    };
    let mut config = tokio_postgres::Config::new();
    config
        .host(&secret.host)
        .port(port)
        .user(&secret.username)
        .password(secret.password.as_str())
        .dbname(secret.dbname.as_deref().unwrap_or("postgres"));
    Ok(config)
}

fn spawn_refresher(settings: DatabaseSettings, slot: ConfigSlot) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(settings.refresh_every);
        interval.tick().await;
        loop {
            interval.tick().await;
            match resolve_limited(&settings).await {
                Ok(config) => {
                    if let Ok(mut guard) = slot.write() {
                        *guard = config;
                    }
                    tracing::info!("database credentials refreshed");
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "failed to refresh database credentials; keeping the previous ones"
                ),
            }
        }
    });
}

/// The pool's usage, for [`tandem_runtime::metrics::Metrics::set_pool_usage`].
pub fn pool_usage(pool: &Pool) -> PoolUsage {
    let status = pool.status();
    PoolUsage {
        max: status.max_size,
        open: status.size,
        idle: status.available,
        waiting: status.waiting,
    }
}

/// A dedicated connection outside the pool, for session state the pool must not share:
/// advisory locks (leader election) and `LISTEN`. Notifications arrive on the channel; the
/// channel closes when the connection ends, which tells the holder it lost its session.
pub struct SessionConnection {
    pub client: tokio_postgres::Client,
    pub notifications: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// Opens a [`SessionConnection`] with the same credentials and TLS as the pool.
pub async fn connect_session(settings: &DatabaseSettings) -> anyhow::Result<SessionConnection> {
    let mut config = resolve_limited(settings).await?;
    // Notice a dead peer within seconds: a lost session means lost leadership.
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3)
        .connect_timeout(Duration::from_secs(5));
    let (sender, notifications) = tokio::sync::mpsc::unbounded_channel();
    let client = match settings.tls {
        TlsMode::Disable => {
            let (client, connection) = config
                .connect(NoTls)
                .await
                .context("Failed to connect to PostgreSQL")?;
            spawn_session_driver(connection, sender);
            client
        }
        TlsMode::VerifyFull => {
            let tls = rustls_connector(settings.ca_file.as_deref())?;
            let (client, connection) = config
                .connect(tls)
                .await
                .context("Failed to connect to PostgreSQL")?;
            spawn_session_driver(connection, sender);
            client
        }
    };
    Ok(SessionConnection {
        client,
        notifications,
    })
}

fn spawn_session_driver<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    sender: tokio::sync::mpsc::UnboundedSender<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let message = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
            match message {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if sender.send(n.channel().to_owned()).is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "session connection failed");
                    break;
                }
                None => break,
            }
        }
    });
}

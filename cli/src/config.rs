//! Where the two regions are: flags, else their environment variables, else
//! `.tandem/stack.json` (written by `make up` while the local stack runs).

use std::path::{Path, PathBuf};

use anyhow::Context;
use deadpool_postgres::Pool;
use tandem_store::db::DatabaseSettings;

/// The connection settings every command accepts.
#[derive(clap::Args)]
pub struct Args {
    /// Region 1's (the write region's) PostgreSQL URL.
    #[arg(
        long,
        global = true,
        env = "TANDEM_REGION1_DATABASE_URL",
        value_name = "URL"
    )]
    region1_database_url: Option<String>,
    /// Region 2's (the replica's) PostgreSQL URL.
    #[arg(
        long,
        global = true,
        env = "TANDEM_REGION2_DATABASE_URL",
        value_name = "URL"
    )]
    region2_database_url: Option<String>,
    /// Region 2's Redis, whose cache a redrive updates (as the consumer's `REDIS_URL`).
    #[arg(
        long,
        global = true,
        env = "TANDEM_REGION2_REDIS_URL",
        value_name = "URL"
    )]
    region2_redis_url: Option<String>,
    /// The key prefix of Region 2's cache (as the services' `REDIS_KEY_PREFIX`).
    #[arg(long, global = true, env = "REDIS_KEY_PREFIX", value_name = "PREFIX")]
    redis_key_prefix: Option<String>,
    /// The Kafka bootstrap brokers (as the services' `KAFKA_BROKERS`), which `status` asks for
    /// each partition's high watermark; `KAFKA_PROPERTIES` and `KAFKA_SASL_SECRET_ID` apply as
    /// they do to the services.
    #[arg(
        long,
        global = true,
        env = "KAFKA_BROKERS",
        value_name = "HOST:PORT[,…]"
    )]
    kafka_brokers: Option<String>,
    /// The change-event topic (as the services' `KAFKA_TOPIC`); `status` also shows every
    /// topic Region 2 holds positions of.
    #[arg(long, global = true, env = "KAFKA_TOPIC", value_name = "TOPIC")]
    kafka_topic: Option<String>,
    /// The local stack's description (default: `.tandem/stack.json` here or in a parent;
    /// `none`: use no stack file).
    #[arg(long, global = true, env = "TANDEM_STACK_FILE", value_name = "FILE")]
    stack_file: Option<PathBuf>,
}

/// The resolved settings; databases are connected on first use.
pub struct Connections {
    region1: Option<String>,
    region2: Option<String>,
    pub region2_redis: Option<String>,
    pub redis_key_prefix: Option<String>,
    pub kafka_brokers: Option<String>,
    pub kafka_topic: Option<String>,
}

impl Connections {
    pub fn resolve(args: &Args) -> anyhow::Result<Self> {
        let stack = match &args.stack_file {
            Some(path) if path.as_os_str() == "none" => None,
            Some(path) => Some(read_stack(path)?),
            None => find_stack().map(|p| read_stack(&p)).transpose()?,
        };
        let from_stack = |region: &str, field: &str| {
            stack
                .as_ref()
                .and_then(|s| s["regions"][region][field].as_str())
                .map(str::to_owned)
        };
        Ok(Self {
            region1: args
                .region1_database_url
                .clone()
                .or_else(|| from_stack("region1", "postgres")),
            region2: args
                .region2_database_url
                .clone()
                .or_else(|| from_stack("region2", "postgres")),
            region2_redis: args
                .region2_redis_url
                .clone()
                .or_else(|| from_stack("region2", "redis")),
            redis_key_prefix: args.redis_key_prefix.clone(),
            kafka_brokers: args.kafka_brokers.clone().or_else(|| {
                stack
                    .as_ref()
                    .and_then(|s| s["kafka"].as_str())
                    .map(str::to_owned)
            }),
            kafka_topic: args.kafka_topic.clone(),
        })
    }

    /// A small pool on one region's database (1 or 2).
    pub async fn region(&self, region: u8) -> anyhow::Result<Pool> {
        let (url, flag, env) = match region {
            1 => (
                &self.region1,
                "--region1-database-url",
                "TANDEM_REGION1_DATABASE_URL",
            ),
            _ => (
                &self.region2,
                "--region2-database-url",
                "TANDEM_REGION2_DATABASE_URL",
            ),
        };
        let url = url.as_deref().with_context(|| {
            format!(
                "Region {region}'s database is not configured: pass {flag} (or set {env}), or run `make up`"
            )
        })?;
        let mut settings = DatabaseSettings::from_url(url);
        settings.pool_size = 8;
        settings.pool_timeout = std::time::Duration::from_secs(5);
        // Verify's range hashes may scan millions of rows in one statement.
        settings.limits.statement_timeout = std::time::Duration::from_secs(600);
        let pool = tandem_store::db::connect_pool(&settings).await?;
        // Fail now, with the region named, rather than in the middle of a command.
        drop(
            pool.get()
                .await
                .with_context(|| format!("cannot reach Region {region}'s database"))?,
        );
        Ok(pool)
    }
}

fn find_stack() -> Option<PathBuf> {
    let mut dir = std::env::current_dir().ok()?;
    loop {
        let candidate = dir.join(".tandem").join("stack.json");
        if candidate.is_file() {
            return Some(candidate);
        }
        if !dir.pop() {
            return None;
        }
    }
}

fn read_stack(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

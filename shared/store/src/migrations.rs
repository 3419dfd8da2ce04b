//! Schema migrations (refinery, SQL files in `shared/store/migrations/`), run at start-up by the
//! services that own a database or explicitly with the `migrate` sub-command.
//!
//! Several replicas may start at once, so the run holds a PostgreSQL advisory lock: the first
//! applies the migrations, the others wait and then find nothing to do.

use anyhow::Context;
use deadpool_postgres::Pool;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Advisory lock key for migrations ("tandem" in ASCII).
const MIGRATION_LOCK: i64 = 0x74_61_6e_64_65_6d;

/// The `migrate` sub-command of every binary: reads only the database settings (`DATABASE_URL`
/// or its alternatives, and the session limits), so it runs without the service's other
/// settings (Redis, Kafka, JWT), then applies every pending migration.
pub async fn run_from_env() -> anyhow::Result<()> {
    let settings = crate::db::DatabaseSettings::from_env().context("Invalid configuration")?;
    let pool = crate::db::connect_pool(&settings).await?;
    run(&pool).await
}

/// Applies every pending migration.
pub async fn run(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool
        .get()
        .await
        .context("Failed to get a connection for migrations")?;
    // A migration may rewrite a large table, and the lock waits for another replica's run:
    // neither is bounded by the pool's statement and lock timeouts. The connection returns to
    // the pool with its defaults restored.
    client
        .batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")
        .await
        .context("Failed to lift the session's timeouts for migrations")?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("Failed to take the migration lock")?;
    let client: &mut tokio_postgres::Client = &mut client;
    let result = embedded::migrations::runner()
        .set_migration_table_name("tandem_schema_history")
        .run_async(client)
        .await
        .context("Failed to apply migrations");
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .context("Failed to release the migration lock");
    client
        .batch_execute("RESET statement_timeout; RESET lock_timeout")
        .await
        .ok();
    let report = result?;
    unlock?;
    for migration in report.applied_migrations() {
        tracing::info!(
            version = migration.version(),
            name = migration.name(),
            "migration applied"
        );
    }
    Ok(())
}

/// The newest migration this build embeds.
pub fn latest_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version() as i32)
        .max()
        .unwrap_or(0)
}

/// The newest migration applied to this database (`None` before any).
pub async fn applied_version(pool: &Pool) -> anyhow::Result<Option<i32>> {
    let client = pool.get().await?;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('tandem_schema_history') IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    Ok(client
        .query_one("SELECT max(version) FROM tandem_schema_history", &[])
        .await?
        .try_get(0)?)
}

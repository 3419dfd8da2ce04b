//! `TANDEM_BENCH_PROFILE=1`: PostgreSQL's own account of each phase. Both clusters are
//! restarted with `pg_stat_statements`, and the report lists the statements that took the most
//! execution time during each measurement. Off by default (the extension costs a little).

use crate::stack::{Stack, pool};

pub fn enabled() -> bool {
    std::env::var_os("TANDEM_BENCH_PROFILE").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Restarts both clusters with `pg_stat_statements` loaded and installs its view.
pub async fn enable(stack: &mut Stack) -> anyhow::Result<()> {
    for pg in [&mut stack.pg1, &mut stack.pg2] {
        let admin = pool(&pg.url("postgres"), 1).await?;
        admin
            .get()
            .await?
            .batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            .await?;
        drop(admin);
        pg.stop();
        pg.restart()?;
    }
    for url in [&stack.db1, &stack.db2] {
        pool(url, 1)
            .await?
            .get()
            .await?
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await?;
    }
    Ok(())
}

/// Forgets the statistics of the cluster `url` belongs to (no-op unless profiling).
pub async fn reset(url: &str) -> anyhow::Result<()> {
    if enabled() {
        pool(url, 1)
            .await?
            .get()
            .await?
            .batch_execute("SELECT pg_stat_statements_reset()")
            .await?;
    }
    Ok(())
}

/// The statements of `url`'s database with the most execution time since the last reset, as
/// Markdown list items (empty unless profiling).
pub async fn top(url: &str, title: &str) -> anyhow::Result<Vec<String>> {
    if !enabled() {
        return Ok(Vec::new());
    }
    let rows = pool(url, 1)
        .await?
        .get()
        .await?
        .query(
            "SELECT calls, total_exec_time, rows, \
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 140) \
             FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             ORDER BY total_exec_time DESC LIMIT 6",
            &[],
        )
        .await?;
    let mut lines = vec![format!(
        "  - PostgreSQL, {title} (pg_stat_statements, by execution time):"
    )];
    for row in rows {
        let calls: i64 = row.get(0);
        let total: f64 = row.get(1);
        let returned: i64 = row.get(2);
        let query: String = row.get(3);
        lines.push(format!(
            "    - {total:.0} ms in {calls} calls ({:.3} ms each, {returned} rows): `{}`",
            total / calls.max(1) as f64,
            query.replace('`', "'")
        ));
    }
    Ok(lines)
}

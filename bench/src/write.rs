//! Measurement 1, write throughput: `PUT` of a ~1 KiB document through the Write API (closed loop) against
//! `pgbench -f` running the same SQL transaction (lock the row, update it, insert the outbox row)
//! at the same concurrency on the same PostgreSQL database.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use tandem_tests::process::pg_program;

use crate::Sizes;
use crate::cpu::{CpuSplit, Meter};
use crate::load::{Amount, Outcome, closed_loop};
use crate::stack::{Kind, Stack, pool};

pub const COLLECTION: &str = "wbench";

/// One concurrency level's figures.
#[derive(Debug)]
pub struct WriteRun {
    pub concurrency: usize,
    pub api: Outcome,
    pub pgbench_tps: f64,
    pub pgbench_latency_ms: f64,
    pub pgbench_transactions: u64,
    /// pgbench with the same transaction plus `NOTIFY tandem_outbox` inside it: how every
    /// write committed until migration V9 moved the relay's wake-up after the commit.
    pub pgbench_notify_tps: f64,
    pub pgbench_notify_latency_ms: f64,
    pub api_cpu: CpuSplit,
    pub pgbench_cpu: CpuSplit,
    /// `TANDEM_BENCH_PROFILE` statement statistics of both runs.
    pub profile: Vec<String>,
}

/// The documents every write replaces (both contenders take the update path).
pub async fn prepare(stack: &Stack, keys: u64) -> anyhow::Result<()> {
    let pool = pool(&stack.db1, 1).await?;
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO documents (collection, id, version, data, deleted, created_at, updated_at) \
             SELECT $1, 'd' || g, 1, $2::text::jsonb, false, now(), now() \
             FROM generate_series(1, $3::bigint) g ON CONFLICT DO NOTHING",
            &[&COLLECTION, &crate::document_json(), &i64::try_from(keys)?],
        )
        .await?;
    Ok(())
}

pub async fn run(
    stack: &Stack,
    sizes: &Sizes,
    concurrency: usize,
    api_meter: &Meter,
    pgbench_meter: &Meter,
) -> anyhow::Result<WriteRun> {
    let amount = sizes.write_amount;
    let keys = sizes.write_keys;
    if let Amount::For(_) = amount {
        // Warm-up: connection pools, prepared statements, page cache.
        api(
            stack,
            concurrency,
            Amount::For(Duration::from_secs(2)),
            keys,
        )
        .await;
    }
    crate::profile::reset(&stack.db1).await?;
    let cpu = api_meter.start();
    let outcome = api(stack, concurrency, amount, keys)
        .await
        .checked("Write API PUT")?;
    let api_cpu = cpu.stop();
    let mut profile =
        crate::profile::top(&stack.db1, &format!("Write API, concurrency {concurrency}")).await?;
    crate::profile::reset(&stack.db1).await?;
    let cpu = pgbench_meter.start();
    let (pgbench_tps, pgbench_latency_ms, pgbench_transactions) =
        pgbench(stack, concurrency, amount, keys, false)?;
    let pgbench_cpu = cpu.stop();
    profile.extend(
        crate::profile::top(&stack.db1, &format!("pgbench, concurrency {concurrency}")).await?,
    );
    let (pgbench_notify_tps, pgbench_notify_latency_ms, _) =
        pgbench(stack, concurrency, amount, keys, true)?;
    Ok(WriteRun {
        concurrency,
        api: outcome,
        pgbench_tps,
        pgbench_latency_ms,
        pgbench_transactions,
        pgbench_notify_tps,
        pgbench_notify_latency_ms,
        api_cpu,
        pgbench_cpu,
        profile,
    })
}

async fn api(stack: &Stack, concurrency: usize, amount: Amount, keys: u64) -> Outcome {
    puts(
        stack,
        &stack.url(Kind::Write),
        concurrency,
        amount,
        keys,
        |_| true,
    )
    .await
}

/// Closed-loop `PUT`s of the benchmark document to random existing keys of the Write API at
/// `url`; a 200 whose headers `accept` refuses counts as failed.
pub async fn puts<A>(
    stack: &Stack,
    url: &str,
    concurrency: usize,
    amount: Amount,
    keys: u64,
    accept: A,
) -> Outcome
where
    A: Fn(&reqwest::header::HeaderMap) -> bool + Send + Sync + 'static,
{
    let client = crate::stack::http_client(concurrency);
    let base = format!("{url}/v1/{COLLECTION}");
    let token = format!("Bearer {}", stack.token);
    let body = bytes::Bytes::from(crate::document_json());
    let accept = std::sync::Arc::new(accept);
    closed_loop(concurrency, amount, move |_| {
        let request = client
            .put(format!("{base}/d{}", 1 + rand::random::<u64>() % keys))
            .header("authorization", &token)
            .header("content-type", "application/json")
            .body(body.clone());
        let accept = accept.clone();
        async move {
            match request.send().await {
                Ok(response) => {
                    let good = response.status() == 200 && accept(response.headers());
                    // The whole body is read, so the connection is reused.
                    response.bytes().await.is_ok() && good
                }
                Err(_) => false,
            }
        }
    })
    .await
}

/// The Write API's transaction for a `PUT` that replaces a document, statement for statement
/// (`shared/store/src/documents.rs`, `write_pipelined`: `BEGIN`, the row lock, the update with its outbox
/// row in one statement, `COMMIT`), with the same values sent as parameters (see
/// [`variables`]); the event id is time-ordered like the API's UUIDv7. pgbench sends them one
/// at a time (its `\\gset` cannot be pipelined); the API pipelines them in two round trips.
/// With `notify`, the transaction also sends `NOTIFY tandem_outbox`, as V2's outbox trigger
/// made every write do.
fn script(keys: u64, notify: bool) -> String {
    let notify = if notify {
        "NOTIFY tandem_outbox;\n"
    } else {
        ""
    };
    format!(
        "\\set n random(1, {keys})\n\
         BEGIN;\n\
         SELECT version, deleted, data FROM documents WHERE collection = '{COLLECTION}' AND id = 'd' || :n::text FOR UPDATE \\gset cur_\n\
         WITH updated AS (UPDATE documents SET version = :cur_version::bigint + 1, data = :data::jsonb, deleted = false, updated_at = clock.t, created_at = CASE WHEN false THEN clock.t ELSE created_at END FROM (SELECT clock_timestamp() AS t) clock WHERE collection = '{COLLECTION}' AND id = 'd' || :n::text AND version = :cur_version::bigint RETURNING data, deleted, created_at, updated_at), \
         queued AS (INSERT INTO outbox (event_id, collection, document_id, version, operation, payload, traceparent) SELECT (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0') || substr(md5(random()::text), 1, 20))::uuid, '{COLLECTION}', 'd' || :n::text, :cur_version::bigint + 1, 'upsert', CASE WHEN u.deleted THEN jsonb_build_object('collection', '{COLLECTION}'::text, 'id', 'd' || :n::text, 'version', :cur_version::bigint + 1, 'deleted', true, 'updated_at', ((to_jsonb(u.updated_at AT TIME ZONE 'UTC') #>> '{{}}') || 'Z')) ELSE jsonb_build_object('collection', '{COLLECTION}'::text, 'id', 'd' || :n::text, 'version', :cur_version::bigint + 1, 'data', u.data, 'created_at', ((to_jsonb(u.created_at AT TIME ZONE 'UTC') #>> '{{}}') || 'Z'), 'updated_at', ((to_jsonb(u.updated_at AT TIME ZONE 'UTC') #>> '{{}}') || 'Z')) END, :traceparent FROM updated u RETURNING 1) \
         SELECT u.created_at, u.updated_at FROM updated u CROSS JOIN queued;\n\
         {notify}\
         END;\n"
    )
}

/// pgbench variables: in `-M prepared` mode they travel as parameters, as the API's values do
/// (a literal would be parsed once at prepare time and spare PostgreSQL the JSON parsing the
/// API's statements cost it).
fn variables() -> Vec<String> {
    let data = crate::document_json();
    [
        format!("data={data}"),
        "traceparent=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
    ]
    .into_iter()
    .flat_map(|v| ["-D".to_owned(), v])
    .collect()
}

/// Runs pgbench; returns (transactions/s, average latency ms, transactions).
fn pgbench(
    stack: &Stack,
    concurrency: usize,
    amount: Amount,
    keys: u64,
    notify: bool,
) -> anyhow::Result<(f64, f64, u64)> {
    let path = stack.dir.join(format!("write-{concurrency}-{notify}.sql"));
    std::fs::write(&path, script(keys, notify))?;
    let database = stack
        .db1
        .rsplit('/')
        .next()
        .unwrap_or("postgres")
        .to_owned();
    let mut command = Command::new(pgbench_program());
    command.args(["-n", "-M", "prepared", "-h", "127.0.0.1", "-U", "postgres"]);
    command.arg("-p").arg(stack.pg1.port.to_string());
    command
        .arg("-c")
        .arg(concurrency.to_string())
        .arg("-j")
        .arg(concurrency.min(2).to_string());
    match amount {
        Amount::For(duration) => command.arg("-T").arg(duration.as_secs().max(1).to_string()),
        Amount::Requests(n) => command
            .arg("-t")
            .arg(n.div_ceil(concurrency as u64).to_string()),
    };
    command.args(variables());
    command.arg("-f").arg(&path).arg(database);
    let output = command
        .output()
        .context("pgbench did not run (apt-get install postgresql-contrib)")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let number_after = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    let failed = number_after("number of failed transactions:").unwrap_or(0.0);
    anyhow::ensure!(
        failed == 0.0,
        "pgbench: {failed} transactions failed\n{text}"
    );
    let tps = number_after("tps =").context(format!("no tps in pgbench's output:\n{text}"))?;
    let latency = number_after("latency average =").unwrap_or(f64::NAN);
    let transactions = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("number of transactions actually processed:")
        })
        .and_then(|rest| rest.trim().split('/').next())
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Ok((tps, latency, transactions))
}

/// `pgbench` from PostgreSQL's program directory (where Debian puts it), then `PATH`.
pub fn pgbench_program() -> std::path::PathBuf {
    let path = pg_program("pgbench");
    if path.exists() {
        path
    } else {
        "pgbench".into()
    }
}

/// Removes the outbox rows the write benchmark left (nothing relays them).
pub async fn clear_outbox(stack: &Stack) -> anyhow::Result<()> {
    let pool = pool(&stack.db1, 1).await?;
    pool.get().await?.execute("DELETE FROM outbox", &[]).await?;
    Ok(())
}

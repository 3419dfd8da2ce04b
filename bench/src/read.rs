//! Measurement 3, read throughput. Cache hits: `GET` of cached documents through the Read API against a bare
//! axum server returning the same bytes (its own process, like the Read API), both driven by
//! the same load generator. Cache misses: each document read once (Redis has never seen it)
//! against the same point `SELECT` sent straight to PostgreSQL over as many connections as the
//! Read API's pool.

use std::time::Duration;

use tandem_tests::{ManagedProcess, free_port, wait_for_port};

use crate::Sizes;
use crate::cpu::{CpuSplit, Meter, Probe};
use crate::load::{Amount, Outcome, closed_loop};
use crate::stack::{Kind, Probes, Service, Stack, http_client, pool, send};

pub const CONCURRENCY: usize = 64;
const HIT: &str = "rbench";
const MISS: &str = "rmiss";
/// Region 2's hot documents: a collection name as long as [`HIT`]'s, so the bodies have the
/// same size.
const NEAR: &str = "rbnear";

#[derive(Debug)]
pub struct ReadFigures {
    pub hit: Outcome,
    pub bare: Outcome,
    pub miss: Outcome,
    pub miss_sql: Outcome,
    pub body_bytes: usize,
    pub hit_cpu: CpuSplit,
    pub bare_cpu: CpuSplit,
    pub miss_cpu: CpuSplit,
    pub miss_sql_cpu: CpuSplit,
    /// Cache hits through Region 2's Read API (documents the consumer cached).
    pub near: Option<(Outcome, CpuSplit)>,
}

pub async fn run(
    stack: &Stack,
    sizes: &Sizes,
    read_api: &Service,
    probes: &Probes,
) -> anyhow::Result<ReadFigures> {
    let api_meter = Meter::default()
        .with("Read API", read_api.probe())
        .with("PostgreSQL", probes.pg1)
        .with("Redis", probes.redis1)
        .with("load generator", Some(Probe::LoadGenerator));
    let read = stack.url(Kind::Read1);
    // Cached documents: written through the Write API, which stores each committed version in
    // Redis before acknowledging.
    let docs = sizes.read_docs;
    write_documents(stack, HIT, docs).await?;
    let body = reqwest::get(format!("{read}/v1/{HIT}/h0"))
        .await?
        .error_for_status()?
        .bytes()
        .await?;

    let (hit, hit_cpu) = get_random(
        &format!("{read}/v1/{HIT}"),
        docs,
        sizes.read_amount,
        &api_meter,
    )
    .await;
    let hit = hit.checked("Read API cache hits")?;

    let (bare, bare_cpu) = {
        let body_file = stack.dir.join("body.json");
        std::fs::write(&body_file, &body)?;
        let port = free_port();
        let server = ManagedProcess::start(
            "bare-server",
            &std::env::current_exe()?,
            &[
                "bare-server".to_owned(),
                port.to_string(),
                body_file.display().to_string(),
            ],
            &[],
            &stack.dir.join("bare-server.log"),
            "",
        )?;
        wait_for_port(port, Duration::from_secs(10)).await?;
        let meter = Meter::default()
            .with("bare server", server.program_pid().map(Probe::Process))
            .with("load generator", Some(Probe::LoadGenerator));
        let (bare, cpu) = get_random(
            &format!("http://127.0.0.1:{port}/v1/{HIT}"),
            docs,
            sizes.read_amount,
            &meter,
        )
        .await;
        (bare.checked("bare server")?, cpu)
    };

    // Cache misses: documents PostgreSQL has and Redis never saw, each read once.
    let misses = sizes.miss_docs;
    let db = pool(&stack.db1, 1).await?;
    db.get()
        .await?
        .execute(
            "INSERT INTO documents (collection, id, version, data, deleted, created_at, updated_at) \
             SELECT $1, 'm' || g, 1, $2::text::jsonb, false, now(), now() \
             FROM generate_series(0, $3::bigint - 1) g",
            &[&MISS, &crate::document_json(), &i64::try_from(misses)?],
        )
        .await?;
    let cpu = api_meter.start();
    let miss = {
        let client = http_client(CONCURRENCY);
        let base = format!("{read}/v1/{MISS}");
        closed_loop(CONCURRENCY, Amount::Requests(misses), move |i| {
            let request = client.get(format!("{base}/m{i}"));
            async move { send(request, 200).await }
        })
        .await
        .checked("Read API cache misses")?
    };
    let miss_cpu = cpu.stop();
    let sql_meter = Meter::default()
        .with("PostgreSQL", probes.pg1)
        .with("load generator", Some(Probe::LoadGenerator));
    let cpu = sql_meter.start();
    let miss_sql = {
        // The Read API's pool size (DATABASE_POOL_SIZE default) and its exact statement.
        let sql = pool(&stack.db1, 16).await?;
        closed_loop(CONCURRENCY, Amount::Requests(misses), move |i| {
            let sql = sql.clone();
            async move {
                let Ok(client) = sql.get().await else {
                    return false;
                };
                let Ok(statement) = client
                    .prepare_cached(
                        "SELECT version, deleted, data, created_at, updated_at \
                         FROM documents WHERE collection = $1 AND id = $2",
                    )
                    .await
                else {
                    return false;
                };
                let id = format!("m{i}");
                client
                    .query_opt(&statement, &[&MISS, &id])
                    .await
                    .is_ok_and(|row| {
                        row.is_some_and(|r| {
                            r.try_get::<_, serde_json::Value>(2).is_ok()
                                && r.try_get::<_, time::OffsetDateTime>(3).is_ok()
                        })
                    })
            }
        })
        .await
        .checked("point SELECT")?
    };
    let miss_sql_cpu = cpu.stop();
    Ok(ReadFigures {
        hit,
        bare,
        miss,
        miss_sql,
        body_bytes: body.len(),
        hit_cpu,
        bare_cpu,
        miss_cpu,
        miss_sql_cpu,
        near: None,
    })
}

/// Cache hits in Region 2: the same documents and load as Region 1's, through Region 2's Read
/// API. The documents are written in Region 1 and replicated (the consumer caches each version
/// it applies in Region 2's Redis, where the Read API's near cache finds it).
pub async fn region2_hits(
    stack: &Stack,
    sizes: &Sizes,
    read2: &Service,
    probes: &Probes,
) -> anyhow::Result<(Outcome, CpuSplit)> {
    let docs = sizes.read_docs;
    write_documents(stack, NEAR, docs).await?;
    let read = format!("{}/v1/{NEAR}", stack.url(Kind::Read2));
    let client = http_client(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    for i in 0..docs {
        loop {
            let found = client.get(format!("{read}/h{i}")).send().await;
            if found.is_ok_and(|r| r.status() == 200) {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "document h{i} did not reach Region 2 within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let meter = Meter::default()
        .with("Read API 2", read2.probe())
        .with("PostgreSQL 2", probes.pg2)
        .with("Redis 2", probes.redis2)
        .with("load generator", Some(Probe::LoadGenerator));
    let (near, cpu) = get_random(&read, docs, sizes.read_amount, &meter).await;
    Ok((near.checked("Region 2 Read API cache hits")?, cpu))
}

/// Writes `collection/h0` … `h<docs - 1>` through the Write API, which stores each committed
/// version in Region 1's Redis before acknowledging.
async fn write_documents(stack: &Stack, collection: &str, docs: u64) -> anyhow::Result<()> {
    let client = http_client(16);
    let base = format!("{}/v1/{collection}", stack.url(Kind::Write));
    let token = format!("Bearer {}", stack.token);
    closed_loop(16, Amount::Requests(docs), move |i| {
        let request = client
            .put(format!("{base}/h{i}"))
            .header("authorization", &token)
            .header("content-type", "application/json")
            .body(crate::document_json());
        async move { send(request, 201).await }
    })
    .await
    .checked("writing the documents to read")?;
    Ok(())
}

/// `GET base/h<random>` at [`CONCURRENCY`], after a warm-up when timed.
async fn get_random(base: &str, docs: u64, amount: Amount, meter: &Meter) -> (Outcome, CpuSplit) {
    let client = http_client(CONCURRENCY);
    let run = |amount| {
        let client = client.clone();
        let base = base.to_owned();
        closed_loop(CONCURRENCY, amount, move |_| {
            let request = client.get(format!("{base}/h{}", rand::random::<u64>() % docs));
            send(request, 200)
        })
    };
    if let Amount::For(_) = amount {
        run(Amount::For(Duration::from_secs(2))).await;
    }
    let cpu = meter.start();
    let outcome = run(amount).await;
    (outcome, cpu.stop())
}

/// The baseline server: `tandem-bench bare-server <port> <body file>` serves the file's bytes
/// as `application/json` on the document route, nothing else.
pub async fn bare_server(port: u16, body_file: &str) -> anyhow::Result<()> {
    let body = bytes::Bytes::from(std::fs::read(body_file)?);
    let app = axum::Router::new().route(
        "/v1/{collection}/{id}",
        axum::routing::get(move || {
            let body = body.clone();
            async move {
                (
                    [
                        (axum::http::header::CONTENT_TYPE, "application/json"),
                        (axum::http::header::ETAG, "\"1\""),
                    ],
                    body,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

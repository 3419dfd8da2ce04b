//! The `tandem` CLI, run as the built binary against the real two-region system: `status`,
//! the operations it took over from the workers (`replay`, `redrive`, `dead-letters`,
//! `migrate`, the workers' own sub-commands staying as aliases), `verify` and `repair`, and
//! the exit codes scripts rely on.

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tandem_core::document::{Collection, DocumentId};
use tandem_core::event::{ChangeEvent, DocumentState};
use tandem_tests::{TwoRegions, binary};

/// Runs `tandem` with both regions' settings (and Region 2's cache, and the broker) as flags.
pub fn tandem(regions: &TwoRegions, args: &[&str]) -> Output {
    std::process::Command::new(binary("tandem"))
        .args(args)
        .args([
            "--region1-database-url",
            &regions.region1.database_url,
            "--region2-database-url",
            &regions.region2_database_url,
            "--region2-redis-url",
            &regions.region2_redis_url,
            "--kafka-brokers",
            &regions.broker.address(),
        ])
        .env("REDIS_KEY_PREFIX", &regions.region2_key_prefix)
        // Never the developer's `make up`: only what the flags say.
        .env("TANDEM_STACK_FILE", "none")
        .env_remove("TANDEM_REGION1_DATABASE_URL")
        .env_remove("TANDEM_REGION2_DATABASE_URL")
        .env_remove("KAFKA_TOPIC")
        .env_remove("KAFKA_PROPERTIES")
        .output()
        .expect("run tandem")
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn explain(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `tandem status --json` until `accept` holds (bounded), returning the last answer.
async fn status_until(regions: &TwoRegions, accept: impl Fn(&Value, i32) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let output = tandem(regions, &["status", "--json"]);
        let status = json_of(&output);
        if accept(&status, code(&output)) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "status never as expected: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A dead letter in Region 2 holding a valid change event for `collection/id` at `version`.
async fn plant_dead_letter(regions: &TwoRegions, id: &str, offset: i64) -> i64 {
    let state = DocumentState {
        collection: Collection::parse("letters").expect("collection"),
        id: DocumentId::parse(id).expect("id"),
        version: 1,
        deleted: false,
        data: Some(serde_json::Map::from_iter([(
            "n".to_owned(),
            json!(offset),
        )])),
        created_at: None,
        updated_at: time::OffsetDateTime::now_utc(),
        repair: None,
    };
    let event = ChangeEvent::new(
        uuid::Uuid::now_v7(),
        &tandem_core::event::Origin::new("region1", 1, 1),
        time::OffsetDateTime::now_utc(),
        state,
    );
    let client = regions.region2_pool.get().await.expect("db");
    client
        .query_one(
            "INSERT INTO dead_letters (topic, partition, \"offset\", payload, reason) \
             VALUES ('planted', 0, $1, $2, 'planted by the test') RETURNING id",
            &[&offset, &event.encode()],
        )
        .await
        .expect("plant a dead letter")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_each_region_and_exits_1_on_dead_letters() {
    let regions = TwoRegions::start().await;
    regions
        .region1
        .put("notes", "a", &json!({"text": "hi"}))
        .await;
    regions.wait_converged(Duration::from_secs(30)).await;

    // Healthy: exit 0, each region's role, epochs, positions, schema at this build's.
    let status = status_until(&regions, |s, code| {
        code == 0
            && s["region1"]["relay_backlog"] == 0
            && !s["region2"]["positions"]
                .as_array()
                .is_none_or(Vec::is_empty)
    })
    .await;
    assert_eq!(status["healthy"], true, "{status:#}");
    assert_eq!(status["region1"]["role"], "write region (write epoch 1)");
    assert_eq!(status["region1"]["write_role"]["write_region"], "region1");
    assert_eq!(status["region1"]["write_role"]["writable"], true);
    // No Write API ever ran on Region 2's database: no role is recorded there.
    assert_eq!(status["region2"]["role"], "replica");
    assert_eq!(status["region2"]["write_role"], serde_json::Value::Null);
    assert_eq!(status["region1"]["leader_epochs"][0]["role"], "relay");
    assert_eq!(status["region1"]["leader_epochs"][0]["epoch"], 1);
    assert_eq!(status["region2"]["leader_epochs"][0]["role"], "consumer");
    assert_eq!(status["region2"]["leader_epochs"][0]["epoch"], 1);
    assert_eq!(status["region1"]["schema_version"], status["schema_latest"]);
    assert_eq!(status["region2"]["schema_version"], status["schema_latest"]);
    assert_eq!(status["region2"]["dead_letters"], 0);
    assert_eq!(status["cli_version"], env!("CARGO_PKG_VERSION"));
    assert!(
        status["region2"]["replication_lag_ms"].as_i64().is_some(),
        "{status:#}"
    );
    let positions = status["region2"]["positions"]
        .as_array()
        .expect("positions");
    assert!(
        positions
            .iter()
            .all(|p| p["topic"] == regions.topic.as_str()),
        "{status:#}"
    );
    assert!(
        positions
            .iter()
            .map(|p| p["next_offset"].as_i64().unwrap_or(0))
            .sum::<i64>()
            >= 1
    );

    // Every partition of the topic: Region 2's applied offset next to the broker's high
    // watermark, and how far behind it is in messages.
    let partitions = status["region2"]["partitions"]
        .as_array()
        .expect("partitions");
    assert_eq!(partitions.len(), 3, "one per partition: {status:#}");
    assert_eq!(status["broker"]["reachable"], true, "{status:#}");
    for p in partitions {
        assert_eq!(p["topic"], regions.topic.as_str(), "{status:#}");
        let high = p["high_watermark"].as_i64().expect("a high watermark");
        let applied = p["applied_offset"].as_i64().expect("an applied offset");
        assert!(high >= applied, "applied past the end of the topic: {p}");
        assert_eq!(p["behind"].as_i64(), Some(high - applied), "{p}");
    }
    assert!(
        partitions
            .iter()
            .filter_map(|p| p["high_watermark"].as_i64())
            .sum::<i64>()
            >= 1,
        "{status:#}"
    );

    // The human table names both regions, the partitions' watermarks and the broker.
    let human = tandem(&regions, &["status"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("write region")
            && text.contains("replica")
            && text.contains("healthy")
            && text.contains("HIGH WATERMARK")
            && text.contains("BEHIND")
            && text.contains("reachable"),
        "{}",
        explain(&human)
    );

    // A pending dead letter: status and dead-letters exit 1 and name it.
    let letter = plant_dead_letter(&regions, "x", 1).await;
    let status = tandem(&regions, &["status", "--json"]);
    assert_eq!(code(&status), 1, "{}", explain(&status));
    assert_eq!(json_of(&status)["region2"]["dead_letters"], 1);
    let letters = tandem(&regions, &["dead-letters", "--json"]);
    assert_eq!(code(&letters), 1, "{}", explain(&letters));
    assert_eq!(json_of(&letters)["region2_apply"][0]["id"], letter);
    assert_eq!(
        json_of(&letters)["region2_apply"][0]["reason"],
        "planted by the test"
    );

    // `tandem redrive --id` applies it through the usual guards; the worker's own `redrive`
    // (the alias kept for a release) applies another the same way.
    let redriven = tandem(
        &regions,
        &["redrive", "--id", &letter.to_string(), "--json"],
    );
    assert_eq!(code(&redriven), 0, "{}", explain(&redriven));
    assert_eq!(json_of(&redriven)["redriven"][0]["result"], "applied");
    let second = plant_dead_letter(&regions, "y", 2).await;
    let alias = regions.redrive();
    assert!(alias.status.success(), "{alias:?}");
    for id in ["x", "y"] {
        assert_eq!(
            regions
                .region2_get(&format!("/v1/letters/{id}"))
                .await
                .status(),
            200
        );
    }
    let letters = tandem(&regions, &["dead-letters", "--json"]);
    assert_eq!(code(&letters), 0, "{}", explain(&letters));
    assert_eq!(
        json_of(&letters)["region2_apply"],
        json!([]),
        "letter {second} still pending"
    );
    status_until(&regions, |_, code| code == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_migrate_run_from_the_cli_and_exit_codes_hold() {
    let regions = TwoRegions::start().await;
    let before = time::OffsetDateTime::now_utc() - time::Duration::seconds(5);
    for id in ["a", "b", "c"] {
        regions.region1.put("notes", id, &json!({"id": id})).await;
    }
    regions.wait_converged(Duration::from_secs(30)).await;

    // replay --since marks every retained row since then; the relay republishes them and
    // Region 2 recognises them as duplicates (still equal).
    let since = before
        .format(&time::format_description::well_known::Rfc3339)
        .expect("time");
    let replay = tandem(&regions, &["replay", "--since", &since, "--json"]);
    assert_eq!(code(&replay), 0, "{}", explain(&replay));
    assert_eq!(json_of(&replay)["rows"], 3);
    // The relay's own sub-command is the alias kept for a release: it runs the same function.
    let alias = regions.replay_since(&since);
    assert!(alias.status.success(), "{alias:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let client = regions.region1.pool.get().await.expect("db");
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replayed rows were never republished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    regions.wait_converged(Duration::from_secs(30)).await;

    // migrate: both regions are at this build's version already; running it again is a no-op.
    for region in ["1", "2"] {
        let migrate = tandem(&regions, &["migrate", "--region", region]);
        assert_eq!(code(&migrate), 0, "{}", explain(&migrate));
        assert!(String::from_utf8_lossy(&migrate.stdout).contains("schema is at version"));
    }

    // Exit codes: 2 for usage, 3 for an unreachable dependency.
    for usage in [
        vec!["replay", "--since", "yesterday"],
        vec!["migrate", "--region", "3"],
        vec!["no-such-command"],
        vec!["redrive", "--id"],
    ] {
        let output = tandem(&regions, &usage);
        assert_eq!(code(&output), 2, "{usage:?}: {}", explain(&output));
    }
    let unreachable = std::process::Command::new(binary("tandem"))
        .args([
            "status",
            "--json",
            "--region1-database-url",
            "postgres://postgres@127.0.0.1:1/none",
        ])
        .args(["--region2-database-url", &regions.region2_database_url])
        .env("TANDEM_STACK_FILE", "none")
        .output()
        .expect("run tandem");
    assert_eq!(code(&unreachable), 3, "{}", explain(&unreachable));
    assert!(
        String::from_utf8_lossy(&unreachable.stderr).contains("Region 1"),
        "{}",
        explain(&unreachable)
    );
    // The broker unreachable: everything else is still printed, the broker is named, exit 3.
    let no_broker = std::process::Command::new(binary("tandem"))
        .args(["status", "--json", "--kafka-brokers", "127.0.0.1:1"])
        .args(["--region1-database-url", &regions.region1.database_url])
        .args(["--region2-database-url", &regions.region2_database_url])
        .env("TANDEM_STACK_FILE", "none")
        .env_remove("KAFKA_PROPERTIES")
        .output()
        .expect("run tandem");
    assert_eq!(code(&no_broker), 3, "{}", explain(&no_broker));
    let status = json_of(&no_broker);
    assert_eq!(status["broker"]["reachable"], false, "{status:#}");
    assert_eq!(
        status["region1"]["role"], "write region (write epoch 1)",
        "{status:#}"
    );
    assert_eq!(status["region2"]["role"], "replica", "{status:#}");
    let partitions = status["region2"]["partitions"]
        .as_array()
        .expect("partitions");
    assert!(!partitions.is_empty(), "{status:#}");
    assert!(
        partitions
            .iter()
            .all(|p| p["applied_offset"].is_i64() && p["high_watermark"].is_null()),
        "{status:#}"
    );
    assert!(
        String::from_utf8_lossy(&no_broker.stderr).contains("Kafka broker (127.0.0.1:1)"),
        "{}",
        explain(&no_broker)
    );
    let help = std::process::Command::new(binary("tandem"))
        .arg("--help")
        .output()
        .expect("help");
    assert!(String::from_utf8_lossy(&help.stdout).contains("Exit codes"));
}

/// Region 2's database, written directly: how the tests plant drift.
async fn region2_sql(regions: &TwoRegions, sql: &str) {
    let client = regions.region2_pool.get().await.expect("db");
    let n = client.execute(sql, &[]).await.expect("plant");
    assert_eq!(n, 1, "{sql} changed {n} rows");
}

/// The four kinds of drift, planted in Region 2: `(id, kind)`.
async fn plant_every_kind(regions: &TwoRegions) -> Vec<(&'static str, &'static str)> {
    region2_sql(
        regions,
        "DELETE FROM documents WHERE collection = 'items' AND id = 'i010'",
    )
    .await;
    region2_sql(
        regions,
        "INSERT INTO documents (collection, id, version, data, deleted, created_at, updated_at) \
         VALUES ('items', 'i200-extra', 3, '{\"x\": 1}', false, now(), now())",
    )
    .await;
    region2_sql(
        regions,
        "UPDATE documents SET version = version + 5 WHERE collection = 'items' AND id = 'i020'",
    )
    .await;
    region2_sql(
        regions,
        "UPDATE documents SET data = '{\"tampered\": true}' WHERE collection = 'items' AND id = 'i030'",
    )
    .await;
    vec![
        ("i010", "missing_in_region2"),
        ("i020", "different_version"),
        ("i030", "same_version_different_content"),
        ("i200-extra", "extra_in_region2"),
    ]
}

/// Keeps writing `items/w…` documents in Region 1 until stopped; returns how many it wrote.
fn spawn_writer(
    regions: &TwoRegions,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let client = regions.region1.client.clone();
    let url = regions.region1.write_url.clone();
    let token = regions.region1.token.clone();
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let response = client
                .put(format!("{url}/v1/items/w{:03}", n % 40))
                .bearer_auth(&token)
                .json(&json!({"n": n}))
                .send()
                .await
                .expect("writer PUT");
            assert!(
                response.status().is_success(),
                "writer: {}",
                response.status()
            );
            n += 1;
        }
        n
    })
}

async fn verify_json(regions: &TwoRegions, args: &[&str]) -> (i32, Value) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let output = {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tokio::task::block_in_place(|| tandem(regions, &args))
    };
    (code(&output), json_of(&output))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_every_kind_of_drift_and_none_for_writes_in_flight() {
    let regions = TwoRegions::start().await;
    // 300 documents: more than one leaf range, so the bisection descends.
    for i in 0..300 {
        let response = regions
            .region1
            .put(
                "items",
                &format!("i{i:03}"),
                &json!({"i": i, "pad": "x".repeat(200)}),
            )
            .await;
        assert!(response.status().is_success());
    }
    regions.region1.put("other", "o1", &json!({"o": 1})).await;
    regions.wait_converged(Duration::from_secs(60)).await;

    let (code, report) = verify_json(&regions, &["verify", "--json"]).await;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["equal"], true);
    assert_eq!(
        report["rows_hashed"],
        2 * 301,
        "one summary per side when equal: {report:#}"
    );
    assert_eq!(report["schema_differences"], json!([]));

    let planted = plant_every_kind(&regions).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = spawn_writer(&regions, stop.clone());
    // Let the writer get going so that verify runs while writes are in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, report) = verify_json(&regions, &["verify", "--json"]).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.expect("writer");
    assert!(written > 0);
    assert_eq!(code, 1, "{report:#}");
    let found: Vec<(String, String)> = report["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap_or_default().to_owned(),
                d["kind"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = planted
        .iter()
        .map(|(i, k)| ((*i).to_owned(), (*k).to_owned()))
        .collect();
    assert_eq!(
        found, expected,
        "exactly the planted drift, no write in flight: {report:#}"
    );
    assert!(report["bytes_exchanged"].as_u64().unwrap_or(0) > 0);
    assert!(
        report["ranges_compared"].as_u64().unwrap_or(0) > 1,
        "the bisection descended: {report:#}"
    );
    assert_eq!(
        report["differences"][1]["region1_version"]
            .as_i64()
            .map(|v| v + 5),
        report["differences"][1]["region2_version"].as_i64()
    );

    // The collection filter: `other` has no drift.
    let (code, report) =
        verify_json(&regions, &["verify", "--collection", "other", "--json"]).await;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["rows_hashed"], 2);

    // A schema difference in Region 2's documents table is reported too.
    let client = regions.region2_pool.get().await.expect("db");
    client
        .batch_execute("ALTER TABLE documents ADD COLUMN stray integer")
        .await
        .expect("alter");
    let (code, report) =
        verify_json(&regions, &["verify", "--collection", "other", "--json"]).await;
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(
        report["schema_differences"],
        json!(["region2: stray integer null"])
    );
}

/// Region 1's outbox rows of repair events, as `(document id, payload)`.
async fn repair_rows(regions: &TwoRegions) -> Vec<(String, Value)> {
    let client = regions.region1.pool.get().await.expect("db");
    client
        .query(
            "SELECT document_id, payload FROM outbox WHERE payload ? 'repair' ORDER BY seq",
            &[],
        )
        .await
        .expect("outbox")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// One Region 2 row: `(version, data)`, `None` when there is no row.
async fn region2_row(regions: &TwoRegions, id: &str) -> Option<(i64, Option<Value>)> {
    let client = regions.region2_pool.get().await.expect("db");
    client
        .query_opt(
            "SELECT version, data FROM documents WHERE collection = 'items' AND id = $1",
            &[&id],
        )
        .await
        .expect("region2 row")
        .map(|r| (r.get(0), r.get(1)))
}

/// How Region 2's apply recorded an event (`applied` or `stale`), once it has.
async fn applied_outcome(regions: &TwoRegions, event_id: uuid::Uuid) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let client = regions.region2_pool.get().await.expect("db");
        if let Some(row) = client
            .query_opt(
                "SELECT outcome FROM applied_events WHERE event_id = $1",
                &[&event_id],
            )
            .await
            .expect("applied_events")
        {
            return row.get(0);
        }
        assert!(
            Instant::now() < deadline,
            "event {event_id} was never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn run_json(regions: &TwoRegions, args: &[&str]) -> (i32, Value) {
    let output = tokio::task::block_in_place(|| tandem(regions, args));
    (code(&output), json_of(&output))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_fixes_every_kind_of_drift_through_the_outbox() {
    let regions = TwoRegions::start().await;
    for i in 0..40 {
        let response = regions
            .region1
            .put("items", &format!("i{i:03}"), &json!({"i": i}))
            .await;
        assert!(response.status().is_success());
    }
    // A second version of i020, so that Region 2 "ahead" is version 7 over Region 1's 2.
    assert!(
        regions
            .region1
            .put("items", "i020", &json!({"i": 20, "again": true}))
            .await
            .status()
            .is_success()
    );
    regions.wait_converged(Duration::from_secs(60)).await;

    let planted = plant_every_kind(&regions).await;
    assert_eq!(planted.len(), 4);
    // Region 2's cache gets the tampered i030 (its entry dropped, the Read API fills it from
    // the row), so a repair that left the cache alone would keep serving it.
    let redis = redis::Client::open(regions.region2_redis_url.as_str()).expect("client");
    let mut connection = redis
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*:doc:items/i030", regions.region2_key_prefix))
        .query_async(&mut connection)
        .await
        .expect("keys");
    for key in keys {
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("del");
    }
    let served: Value = regions
        .region2_get("/v1/items/i030")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(served["data"], json!({"tampered": true}), "{served:#}");
    let i030_version: i64 = served["version"].as_i64().expect("version");

    // An ordinary event of the same version as Region 2's tampered row keeps the strict
    // `version >` guard: it is stale, and Region 2 keeps the tampered content.
    let ordinary = uuid::Uuid::now_v7();
    let r1 = regions.region1.pool.get().await.expect("db");
    r1.execute(
        "INSERT INTO outbox (event_id, collection, document_id, version, operation, payload) \
         SELECT $1, collection, id, version, 'upsert', jsonb_build_object('collection', \
           collection, 'id', id, 'version', version, 'data', data, \
           'created_at', to_jsonb(created_at), 'updated_at', to_jsonb(updated_at)) \
         FROM documents WHERE collection = 'items' AND id = 'i030'",
        &[&ordinary],
    )
    .await
    .expect("an ordinary event");
    assert_eq!(applied_outcome(&regions, ordinary).await, "stale");
    assert_eq!(
        region2_row(&regions, "i030").await,
        Some((i030_version, Some(json!({"tampered": true})))),
        "an ordinary same-version event must not overwrite"
    );

    // A dry run says what it would do and enqueues nothing.
    let (code, report) = run_json(&regions, &["repair", "--dry-run", "--json"]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["repaired"], 4, "{report:#}");
    assert_eq!(report["documents"][3]["repair"]["action"], "purge");
    assert!(repair_rows(&regions).await.is_empty(), "a dry run enqueued");

    let (code, report) = run_json(&regions, &["repair", "--json"]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["failed"], 0);
    let actions: Vec<(String, String, String)> = report["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap_or_default().to_owned(),
                d["kind"].as_str().unwrap_or_default().to_owned(),
                d["repair"]["action"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("i010", "missing_in_region2", "reemitted"),
            ("i020", "different_version", "reemitted"),
            ("i030", "same_version_different_content", "reemitted"),
            ("i200-extra", "extra_in_region2", "purge"),
        ]
        .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned())),
        "{report:#}"
    );
    assert_eq!(report["documents"][1]["repair"]["replaces"], 7);

    // Through the outbox: one repair event per document, with Region 2's version as verify
    // saw it.
    let rows = repair_rows(&regions).await;
    let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["i010", "i020", "i030", "i200-extra"]);
    assert_eq!(rows[0].1["repair"], json!({"replaces": null}));
    assert_eq!(rows[1].1["repair"], json!({"replaces": 7}));
    assert_eq!(rows[1].1["version"], 2);
    assert_eq!(rows[3].1["repair"], json!({"replaces": 3, "purge": true}));
    for row in &rows {
        let id = row.1["id"].as_str().unwrap_or_default();
        let event_id: uuid::Uuid = {
            let client = regions.region1.pool.get().await.expect("db");
            client
                .query_one(
                    "SELECT event_id FROM outbox WHERE document_id = $1 AND payload ? 'repair'",
                    &[&id],
                )
                .await
                .expect("event id")
                .get(0)
        };
        assert_eq!(applied_outcome(&regions, event_id).await, "applied", "{id}");
    }

    // Region 2 now equals Region 1, row for row, and serves the repaired states.
    regions.wait_converged(Duration::from_secs(60)).await;
    assert_eq!(region2_row(&regions, "i200-extra").await, None);
    assert_eq!(
        region2_row(&regions, "i020").await,
        Some((2, Some(json!({"i": 20, "again": true}))))
    );
    assert_eq!(
        region2_row(&regions, "i030").await,
        Some((1, Some(json!({"i": 30}))))
    );
    let served: Value = regions
        .region2_get("/v1/items/i030")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(served["data"], json!({"i": 30}), "{served:#}");
    assert_eq!(
        regions.region2_get("/v1/items/i200-extra").await.status(),
        404
    );

    let (code, report) = verify_json(&regions, &["verify", "--json"]).await;
    assert_eq!(code, 0, "{report:#}");
    // Nothing left to repair: exit 0, nothing enqueued.
    let (code, report) = run_json(&regions, &["repair", "--json"]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["repaired"], 0);
    assert_eq!(repair_rows(&regions).await.len(), 4);

    // A purged document can be created afterwards: its version 1 is not stale.
    assert!(
        regions
            .region1
            .put("items", "i200-extra", &json!({"new": true}))
            .await
            .status()
            .is_success()
    );
    regions.wait_converged(Duration::from_secs(60)).await;
    assert_eq!(
        region2_row(&regions, "i200-extra").await,
        Some((1, Some(json!({"new": true}))))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_racing_a_create_in_region1_keeps_the_created_document() {
    let regions = TwoRegions::start().await;
    regions.region1.put("items", "i000", &json!({"i": 0})).await;
    regions.wait_converged(Duration::from_secs(60)).await;
    region2_sql(
        &regions,
        "INSERT INTO documents (collection, id, version, data, deleted, created_at, updated_at) \
         VALUES ('items', 'racer', 3, '{\"x\": 1}', false, now(), now())",
    )
    .await;

    // A create of `racer` in Region 1, in flight: its row and outbox row written, not committed.
    let (mut creator, connection) =
        tokio_postgres::connect(&regions.region1.database_url, tokio_postgres::NoTls)
            .await
            .expect("connect");
    tokio::spawn(connection);
    let create = creator.transaction().await.expect("begin");
    let state = DocumentState {
        collection: Collection::parse("items").expect("collection"),
        id: DocumentId::parse("racer").expect("id"),
        version: 1,
        deleted: false,
        data: Some(serde_json::Map::from_iter([(
            "created".to_owned(),
            json!(true),
        )])),
        created_at: Some(time::OffsetDateTime::now_utc()),
        updated_at: time::OffsetDateTime::now_utc(),
        repair: None,
    };
    create
        .execute(
            "INSERT INTO documents (collection, id, version, data, deleted, created_at, updated_at) \
             VALUES ('items', 'racer', 1, $1, false, $2, $2)",
            &[
                &tokio_postgres::types::Json(state.data.clone()),
                &state.updated_at,
            ],
        )
        .await
        .expect("create");
    create
        .execute(
            "INSERT INTO outbox (event_id, collection, document_id, version, operation, payload) \
             VALUES ($1, 'items', 'racer', 1, 'upsert', $2)",
            &[
                &uuid::Uuid::now_v7(),
                &serde_json::to_value(&state).expect("json"),
            ],
        )
        .await
        .expect("enqueue");

    // Repair sees `racer` only in Region 2 and goes to purge it: its placeholder insert
    // waits for the create.
    let repair = {
        let args: Vec<String> = [
            "--region1-database-url",
            &regions.region1.database_url,
            "--region2-database-url",
            &regions.region2_database_url,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        std::thread::spawn(move || {
            std::process::Command::new(binary("tandem"))
                .args(["repair", "--json"])
                .args(&args)
                .env("TANDEM_STACK_FILE", "none")
                .env_remove("TANDEM_REGION1_DATABASE_URL")
                .env_remove("TANDEM_REGION2_DATABASE_URL")
                .output()
                .expect("run tandem")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let client = regions.region1.pool.get().await.expect("db");
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE 'INSERT INTO documents%ON CONFLICT%DO NOTHING RETURNING 1'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the repair never waited on the create"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    create.commit().await.expect("commit the create");

    let output = tokio::task::block_in_place(|| repair.join().expect("repair thread"));
    assert_eq!(code(&output), 0, "{}", explain(&output));
    let report = json_of(&output);
    // Not a purge: the created document's state, replacing Region 2's version 3.
    assert_eq!(report["documents"][0]["id"], "racer", "{report:#}");
    assert_eq!(
        report["documents"][0]["repair"],
        json!({"action": "reemitted", "version": 1, "deleted": false, "replaces": 3,
               "event_id": report["documents"][0]["repair"]["event_id"]}),
        "{report:#}"
    );
    regions.wait_converged(Duration::from_secs(60)).await;
    assert_eq!(
        region2_row(&regions, "racer").await,
        Some((1, Some(json!({"created": true}))))
    );
    let rows = repair_rows(&regions).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1["repair"], json!({"replaces": 3}));
    let (code, report) = verify_json(&regions, &["verify", "--json"]).await;
    assert_eq!(code, 0, "{report:#}");
}

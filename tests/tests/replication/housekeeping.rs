//! Housekeeping (`tandem_store::housekeeping`) is done by each region's elected worker, never by
//! the Write API: Region 1's relay removes expired idempotency keys and published outbox rows
//! past their retention, Region 2's consumer removes applied event ids past theirs; whatever is
//! still within its retention stays.

use std::time::Duration;

use serde_json::json;
use tandem_tests::TwoRegions;

use crate::support::wait_published;

async fn count(pool: &deadpool_postgres::Pool, sql: &str) -> i64 {
    let client = pool.get().await.expect("db");
    client.query_one(sql, &[]).await.expect("count").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_elected_workers_remove_what_is_past_its_retention_and_nothing_else() {
    let mut regions = TwoRegions::start_without_workers().await;
    // Region 1: two published outbox rows, one of them published long ago; two idempotency
    // keys, one expired. Region 2: two applied event ids, one from eight days ago.
    regions.region1.put("keep", "old", &json!({"a": 1})).await;
    regions.region1.put("keep", "new", &json!({"a": 2})).await;
    {
        let one = regions.region1.pool.get().await.expect("db");
        one.batch_execute(
            "UPDATE outbox SET published_at = now() WHERE published_at IS NULL; \
             UPDATE outbox SET published_at = now() - interval '100 hours' WHERE document_id = 'old'; \
             INSERT INTO idempotency_keys (principal, key, fingerprint, expires_at) VALUES \
               ('p', 'expired', '\\x00', now() - interval '1 hour'), \
               ('p', 'live', '\\x00', now() + interval '1 hour');",
        )
        .await
        .expect("age region 1's rows");
        let two = regions.region2_pool.get().await.expect("db");
        two.batch_execute(
            "INSERT INTO applied_events (event_id, collection, document_id, version, outcome, event_time, applied_at) VALUES \
               (gen_random_uuid(), 'keep', 'old', 1, 'applied', now(), now() - interval '8 days'), \
               (gen_random_uuid(), 'keep', 'new', 1, 'applied', now(), now());",
        )
        .await
        .expect("age region 2's rows");
    }
    // Nothing serving requests prunes: the Write API has run all along.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(
            &regions.region1.pool,
            "SELECT count(*) FROM idempotency_keys"
        )
        .await,
        2,
        "the Write API pruned"
    );

    regions.start_relay();
    regions.start_consumer();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let outbox = count(
            &regions.region1.pool,
            "SELECT count(*) FROM outbox WHERE document_id = 'old'",
        )
        .await;
        let keys = count(
            &regions.region1.pool,
            "SELECT count(*) FROM idempotency_keys WHERE key = 'expired'",
        )
        .await;
        let applied = count(
            &regions.region2_pool,
            "SELECT count(*) FROM applied_events WHERE applied_at < now() - interval '7 days'",
        )
        .await;
        if outbox + keys + applied == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not pruned within 60 s: {outbox} old outbox rows, {keys} expired keys, {applied} old applied events"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_published(&regions).await;
    assert_eq!(
        count(
            &regions.region1.pool,
            "SELECT count(*) FROM outbox WHERE document_id = 'new'"
        )
        .await,
        1,
        "a row within its retention was pruned"
    );
    assert_eq!(
        count(
            &regions.region1.pool,
            "SELECT count(*) FROM idempotency_keys WHERE key = 'live'"
        )
        .await,
        1,
        "a live idempotency key was pruned"
    );
    assert!(
        count(
            &regions.region2_pool,
            "SELECT count(*) FROM applied_events WHERE document_id = 'new'"
        )
        .await
            >= 1,
        "a recent applied event id was pruned"
    );

    // Each region recorded its passes in `housekeeping_runs`, in the statements that pruned:
    // per target, when the last pass ran and what it removed (the first pass removed the one
    // aged row of each; passes run a minute apart, so that one is still the last).
    for (pool, target) in [
        (&regions.region1.pool, "outbox"),
        (&regions.region1.pool, "idempotency_keys"),
        (&regions.region2_pool, "applied_events"),
    ] {
        let client = pool.get().await.expect("db");
        let (removed, total, age): (i64, i64, f64) = client
            .query_one(
                "SELECT rows_removed, total_removed, \
                   extract(epoch FROM clock_timestamp() - ran_at)::float8 \
                 FROM housekeeping_runs WHERE target = $1",
                &[&target],
            )
            .await
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .unwrap_or_else(|e| panic!("no {target} pass recorded: {e}"));
        assert_eq!((removed, total), (1, 1), "{target}");
        assert!((0.0..120.0).contains(&age), "{target}: ran {age} s ago");
    }

    // `tandem status` shows them.
    let output =
        tokio::task::block_in_place(|| crate::cli::tandem(&regions, &["status", "--json"]));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {output:?}"));
    let prune = |region: &str, target: &str| -> serde_json::Value {
        status[region]["last_prune"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|run| run["target"] == target)
            .cloned()
            .unwrap_or_else(|| panic!("no {target} pass in {region}: {status:#}"))
    };
    for (region, target) in [
        ("region1", "outbox"),
        ("region1", "idempotency_keys"),
        ("region2", "applied_events"),
    ] {
        let run = prune(region, target);
        assert_eq!(run["rows_removed"], 1, "{region} {target}: {run}");
        assert_eq!(run["total_removed"], 1, "{region} {target}: {run}");
        let ran_at = time::OffsetDateTime::parse(
            run["ran_at"].as_str().unwrap_or_default(),
            &time::format_description::well_known::Rfc3339,
        )
        .expect("an RFC 3339 time");
        let age = time::OffsetDateTime::now_utc() - ran_at;
        assert!(
            age > time::Duration::ZERO && age < time::Duration::minutes(2),
            "{region} {target}: {run}"
        );
    }
    let human = tokio::task::block_in_place(|| crate::cli::tandem(&regions, &["status"]));
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("LAST PASS") && text.contains("applied_events") && text.contains("outbox"),
        "{text}"
    );
}

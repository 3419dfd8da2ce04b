//! Symmetric regions: write forwarding from the follower, and `tandem switchover` under load.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tandem_tests::symmetric::Symmetric;

/// What a client acts on in an answer: status, ETag, whether it was an idempotent replay, the
/// problem type or the document body.
async fn observe(response: reqwest::Response) -> (u16, Option<String>, bool, Value) {
    let status = response.status().as_u16();
    let etag = response
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let body = match body.get("type") {
        Some(kind) => json!({ "problem": kind }),
        // The documents differ by id and times only.
        None => match body {
            Value::Object(mut document) => {
                for field in ["id", "created_at", "updated_at"] {
                    document.remove(field);
                }
                Value::Object(document)
            }
            other => other,
        },
    };
    (status, etag, replayed, body)
}

/// The same sequence of writes against one base URL, on document `doc` of `collection`.
async fn contract_sequence(
    system: &Symmetric,
    base: &str,
    doc: &str,
) -> Vec<(u16, Option<String>, bool, Value)> {
    let url = format!("{base}/v1/parity/{doc}");
    let key = format!("key-{doc}");
    let mut seen = Vec::new();
    // create, then the same request replayed, then the key reused for another body
    for body in [json!({"n": 1}), json!({"n": 1}), json!({"n": 2})] {
        seen.push(
            observe(
                system
                    .write(Method::PUT, &url)
                    .header("idempotency-key", &key)
                    .json(&body)
                    .send()
                    .await
                    .expect("put"),
            )
            .await,
        );
    }
    // preconditions: a stale If-Match, a matching one, If-None-Match on an existing document
    for (header, value) in [
        ("if-match", "\"7\""),
        ("if-match", "\"1\""),
        ("if-none-match", "*"),
    ] {
        seen.push(
            observe(
                system
                    .write(Method::PUT, &url)
                    .header(header, value)
                    .json(&json!({"n": 3}))
                    .send()
                    .await
                    .expect("put"),
            )
            .await,
        );
    }
    // a merge patch, a malformed body, an unauthenticated write, a delete, a delete again
    seen.push(
        observe(
            system
                .write(Method::PATCH, &url)
                .header("content-type", "application/merge-patch+json")
                .body(r#"{"m": true}"#)
                .send()
                .await
                .expect("patch"),
        )
        .await,
    );
    seen.push(
        observe(
            system
                .write(Method::PUT, &url)
                .header("content-type", "application/json")
                .body("{not json")
                .send()
                .await
                .expect("put"),
        )
        .await,
    );
    seen.push(
        observe(
            system
                .client
                .put(&url)
                .json(&json!({"n": 4}))
                .send()
                .await
                .expect("put"),
        )
        .await,
    );
    for _ in 0..2 {
        seen.push(
            observe(
                system
                    .write(Method::DELETE, &url)
                    .send()
                    .await
                    .expect("delete"),
            )
            .await,
        );
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_region2_are_forwarded_with_the_same_contract_as_direct_writes() {
    let system = Symmetric::start().await;
    let (one, two) = (&system.regions[0], &system.regions[1]);

    let direct = contract_sequence(&system, &one.write_url, "direct").await;
    let forwarded = contract_sequence(&system, &two.write_url, "forwarded").await;
    assert_eq!(
        direct, forwarded,
        "a write through Region 2 must answer as the same write sent to Region 1"
    );
    let statuses: Vec<u16> = direct.iter().map(|s| s.0).collect();
    assert_eq!(
        statuses,
        [201, 201, 422, 412, 200, 412, 200, 400, 401, 204, 404],
        "{direct:#?}"
    );
    assert!(direct[1].2, "the second PUT is an idempotent replay");

    // A forwarded write says so, carries the leader's consistency token, and Region 2 reads
    // its own write with it.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let answer = system
        .write(Method::PUT, &format!("{}/v1/ryw/mine", two.write_url))
        .header("traceparent", traceparent)
        .json(&json!({"region": "two"}))
        .send()
        .await
        .expect("put");
    assert_eq!(answer.status(), 201);
    assert_eq!(answer.headers()["x-tandem-forwarded-to"], "region1");
    assert_eq!(answer.headers()["x-tandem-region"], "region2");
    let token = answer.headers()["x-consistency-token"]
        .to_str()
        .expect("token")
        .to_owned();
    let read = system
        .client
        .get(format!("{}/v1/ryw/mine", two.read_url))
        .header("x-consistency-token", &token)
        .send()
        .await
        .expect("read");
    assert_eq!(read.status(), 200, "read-your-writes in Region 2");
    assert_eq!(read.headers()["etag"], "\"1\"");
    assert_eq!(
        read.json::<Value>().await.expect("json")["data"],
        json!({"region": "two"})
    );
    // The write committed in Region 1 only, with the client's trace context, stamped with
    // Region 1's origin and write epoch.
    let row = one
        .pool
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT traceparent, origin, write_epoch FROM outbox WHERE document_id = 'mine'",
            &[],
        )
        .await
        .expect("outbox row");
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some(traceparent)
    );
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("region1"));
    assert_eq!(row.get::<_, Option<i64>>(2), Some(1));
    let region2_outbox: i64 = two
        .pool
        .get()
        .await
        .expect("db")
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(region2_outbox, 0, "Region 2 commits no write of its own");

    // Region 1 never sends a forwarded write on, even if told it came from elsewhere.
    let bounced = system
        .write(Method::PUT, &format!("{}/v1/ryw/loop", two.write_url))
        .header("x-tandem-forwarded-from", "region1")
        .json(&json!({}))
        .send()
        .await
        .expect("put");
    assert_eq!(bounced.status(), 503);
    assert_eq!(
        bounced.json::<Value>().await.expect("problem")["write_region"],
        "region1"
    );

    // /leader says which region writes.
    for (region, expected) in [(one, 200), (two, 503)] {
        let leader = system
            .client
            .get(format!("{}/leader", region.write_url))
            .send()
            .await
            .expect("leader");
        assert_eq!(leader.status(), expected);
        let role: Value = leader.json().await.expect("json");
        assert_eq!(role["write_region"], "region1");
        assert_eq!(role["write_epoch"], 1);
    }

    // A write region learns a newer write epoch from the other region's Write API alone: with
    // Region 2's relay paused (no heartbeat can teach Region 1's consumer), Region 2's database
    // is made the write region of epoch 2 by hand, and Region 1's Write API, asking Region 2's
    // /leader every second, records it and stands down.
    two.relay.as_ref().expect("relay").signal("STOP");
    two.pool
        .get()
        .await
        .expect("db")
        .execute("SELECT tandem_promote_write_region('region2', 2)", &[])
        .await
        .expect("promote region2");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while system.role(0).await != ("region2".to_owned(), 2) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            system.logs("Region 1's Write API did not learn from Region 2's /leader")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    two.relay.as_ref().expect("relay").signal("CONT");
}

/// What the load's writers saw.
#[derive(Default)]
struct Load {
    /// Per document, the last acknowledged body's counter and version.
    acked: std::sync::Mutex<BTreeMap<String, (u64, i64)>>,
    refused: AtomicU64,
    acknowledged: AtomicU64,
}

/// `writers` tasks PUT counters to their own documents through the edge until `stop`; a 503 is
/// retried with the same body (it committed nothing).
fn start_load(
    system: &Symmetric,
    writers: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Load>, Vec<tokio::task::JoinHandle<()>>) {
    let load = Arc::new(Load::default());
    let handles = (0..writers)
        .map(|w| {
            let (client, token, edge) = (
                system.client.clone(),
                system.token.clone(),
                system.edge_url.clone(),
            );
            let (load, stop) = (load.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let doc = format!("w{w}-d{}", n % 7);
                    loop {
                        let answer = client
                            .put(format!("{edge}/v1/load/{doc}"))
                            .bearer_auth(&token)
                            .json(&json!({"writer": w, "n": n}))
                            .send()
                            .await;
                        match answer {
                            Ok(a) if a.status().is_success() => {
                                let version: i64 = a.headers()["etag"]
                                    .to_str()
                                    .unwrap_or_default()
                                    .trim_matches('"')
                                    .parse()
                                    .expect("etag");
                                load.acknowledged.fetch_add(1, Ordering::Relaxed);
                                load.acked
                                    .lock()
                                    .expect("lock")
                                    .insert(doc.clone(), (n, version));
                                break;
                            }
                            Ok(a) if a.status() == 503 => {
                                load.refused.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Ok(a) => panic!(
                                "unexpected answer {}: {}",
                                a.status(),
                                a.text().await.unwrap_or_default()
                            ),
                            Err(e) => panic!("write failed: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    (load, handles)
}

/// Every acknowledged write is in both regions: each document holds the last acknowledged body
/// at its acknowledged version.
async fn assert_acknowledged_everywhere(system: &Symmetric, load: &Load) {
    let acked = load.acked.lock().expect("lock").clone();
    assert!(!acked.is_empty());
    for region in &system.regions {
        let client = region.pool.get().await.expect("db");
        for (doc, (n, version)) in &acked {
            let row = client
                .query_one(
                    "SELECT version, data FROM documents WHERE collection = 'load' AND id = $1",
                    &[doc],
                )
                .await
                .unwrap_or_else(|e| panic!("{doc} missing in {}: {e}", region.name));
            let (stored, data): (i64, Value) = (row.get(0), row.get(1));
            assert_eq!(
                (stored, data["n"].as_u64()),
                (*version, Some(*n)),
                "{}: {doc} lost its last acknowledged write",
                region.name
            );
        }
    }
}

fn switchover(system: &Symmetric, to: &str) -> Value {
    let output = system.cli(&["switchover", "--to", to, "--json"]);
    assert!(
        output.status.success(),
        "switchover --to {to} failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        system.logs("")
    );
    serde_json::from_slice(&output.stdout).expect("switchover --json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load_loses_no_write_and_switches_back() {
    let system = Symmetric::start().await;
    let (one, two) = (&system.regions[0], &system.regions[1]);
    let stop = Arc::new(AtomicBool::new(false));
    let (load, writers) = start_load(&system, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    let report = switchover(&system, "region2");
    assert_eq!(report["outcome"], "switched");
    assert_eq!(report["write_epoch"], 2);
    let window = report["unavailable_ms"].as_u64().expect("window");
    eprintln!(
        "switchover to region2: writes refused for {window} ms, {} refusals seen",
        load.refused.load(Ordering::Relaxed)
    );
    // Writes keep flowing, now committed in Region 2.
    let before = load.acknowledged.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        load.acknowledged.load(Ordering::Relaxed) > before + 10,
        "writes resumed after the switchover"
    );

    // Region 1 now forwards, and its database refuses a write of its own at any epoch.
    let forwarded = system
        .write(Method::PUT, &format!("{}/v1/after/one", one.write_url))
        .json(&json!({"to": "region1"}))
        .send()
        .await
        .expect("put");
    assert_eq!(forwarded.status(), 201);
    assert_eq!(forwarded.headers()["x-tandem-forwarded-to"], "region2");
    let refused = one
        .pool
        .get()
        .await
        .expect("db")
        .execute(
            "INSERT INTO outbox (event_id, collection, document_id, version, operation, payload) \
             VALUES (gen_random_uuid(), 'x', 'y', 1, 'upsert', '{}')",
            &[],
        )
        .await
        .expect_err("Region 1 refuses writes after the switchover");
    assert_eq!(
        refused.as_db_error().map(|e| e.code().code()),
        Some("TD001"),
        "{refused}"
    );
    // The events Region 2 now emits carry its origin and the new epoch, and Region 1 applies
    // them (replication flows the other way).
    let stamped: i64 = two
        .pool
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT count(*) FROM outbox WHERE origin = 'region2' AND write_epoch = 2",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert!(stamped > 0);

    // And back, still under load.
    let back = switchover(&system, "region1");
    assert_eq!(back["outcome"], "switched");
    assert_eq!(back["write_epoch"], 3);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer");
    }
    system.wait_converged(Duration::from_secs(60)).await;
    assert_acknowledged_everywhere(&system, &load).await;
    eprintln!(
        "{} writes acknowledged, {} refusals (503) seen over two switchovers",
        load.acknowledged.load(Ordering::Relaxed),
        load.refused.load(Ordering::Relaxed)
    );

    // Running it again changes nothing.
    assert_eq!(switchover(&system, "region1")["outcome"], "already");
    let leader = system
        .client
        .get(format!("{}/leader", one.write_url))
        .send()
        .await
        .expect("leader");
    assert_eq!(leader.status(), 200);
    assert_eq!(
        leader.json::<Value>().await.expect("json")["write_epoch"],
        3
    );
}

/// PUTs `{"n": n}` to `base` (a Write API) and returns the answer's status (0 when there was
/// none: the service is not listening yet), version and whether it was forwarded.
async fn put_n(system: &Symmetric, base: &str, doc: &str, n: u64) -> (u16, Option<i64>, bool) {
    let Ok(answer) = system
        .write(Method::PUT, &format!("{base}/v1/fo/{doc}"))
        .json(&json!({ "n": n }))
        .send()
        .await
    else {
        return (0, None, false);
    };
    let version = answer
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_matches('"').parse().ok());
    (
        answer.status().as_u16(),
        version,
        answer.headers().contains_key("x-tandem-forwarded-to"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_quarantines_exactly_the_lost_tail_then_fails_back() {
    let mut system = Symmetric::start().await;
    let (w1, w2) = (
        system.regions[0].write_url.clone(),
        system.regions[1].write_url.clone(),
    );
    // Replicated history: documents a0..a4 in both regions.
    for i in 0..5 {
        assert_eq!(put_n(&system, &w1, &format!("a{i}"), 1).await.0, 201);
    }
    system.wait_converged(Duration::from_secs(60)).await;

    // Region 1's relay stalls (its events stay in its outbox), it keeps acknowledging writes,
    // then the whole region is lost.
    system.regions[0]
        .relay
        .as_ref()
        .expect("relay")
        .signal("STOP");
    let mut lost = BTreeMap::new();
    for i in 0..3 {
        let doc = format!("a{i}");
        let (status, version, _) = put_n(&system, &w1, &doc, 2).await;
        assert_eq!(status, 200);
        lost.insert(doc, version.expect("version"));
    }
    for i in 0..2 {
        let doc = format!("lost{i}");
        let (status, version, _) = put_n(&system, &w1, &doc, 1).await;
        assert_eq!(status, 201);
        lost.insert(doc, version.expect("version"));
    }
    system.kill_region(0);

    // Without --allow-data-loss, nothing happens.
    let refused = system.cli(&["failover", "--to", "region2"]);
    assert_eq!(refused.status.code(), Some(3));
    assert_eq!(system.role(1).await, ("region1".to_owned(), 1));

    // Region 1's database is unreachable for the operator too.
    let unreachable = "postgres://postgres@127.0.0.1:1/gone";
    let output = system.cli_with(
        &[
            "failover",
            "--to",
            "region2",
            "--allow-data-loss",
            "--reach-timeout",
            "2",
            "--json",
        ],
        [unreachable, &system.regions[1].database_url],
    );
    assert!(
        output.status.success(),
        "failover: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("failover --json");
    assert_eq!(report["outcome"], "failed_over");
    assert_eq!(report["write_epoch"], 2);
    assert_eq!(report["old_write_region_reached"], false);
    assert!(report["lag_ms"].is_i64(), "{report}");

    // Region 2 writes now, directly: a0 again (in conflict with Region 1's lost a0) and a
    // new document.
    let (status, a0_version, forwarded) = put_n(&system, &w2, "a0", 3).await;
    assert_eq!((status, forwarded), (200, false));
    assert_eq!(
        a0_version,
        Some(2),
        "Region 2 never saw Region 1's second a0"
    );
    assert_eq!(put_n(&system, &w2, "new", 1).await.0, 201);

    // Region 1 comes back while Region 2's Write API is unreachable (so Region 1 cannot learn
    // from it) and before its own consumer runs: its Write API starts at the stale write epoch
    // and takes a write. That write must end up quarantined, never silently applied or dropped.
    system.regions[1]
        .write
        .take()
        .expect("region2 write")
        .kill_and_wait();
    system.start_service(0, "write");
    let mut deposed = None;
    for attempt in 0..400 {
        match put_n(&system, &w1, "deposed", attempt).await {
            (200 | 201, Some(version), false) => {
                deposed = Some(version);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let deposed =
        deposed.unwrap_or_else(|| panic!("{}", system.logs("the deposed Write API took no write")));
    lost.insert("deposed".to_owned(), deposed);

    // Its relay and consumer come back: the consumer learns write epoch 2 from Region 2's
    // stream (Region 2's Write API is still down, so nothing else can teach it).
    for service in ["relay", "consumer", "read"] {
        system.start_service(0, service);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while system.role(0).await != ("region2".to_owned(), 2) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            system.logs("region1 never learned write epoch 2 from the stream")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    system.start_service(1, "write");
    let mut answer = (0, None, false);
    for _ in 0..200 {
        answer = put_n(&system, &w1, "after", 1).await;
        if answer.0 == 201 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        (answer.0, answer.2),
        (201, true),
        "the deposed region forwards"
    );

    // The quarantine holds exactly the writes Region 1 acknowledged that Region 2 never
    // applied, with their payloads; none of them was applied in Region 2.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let listed = loop {
        let output = system.cli(&["lost-writes", "--json"]);
        let listed: Value = serde_json::from_slice(&output.stdout).expect("lost-writes --json");
        let found: BTreeMap<String, i64> = listed["lost_writes"]
            .as_array()
            .expect("array")
            .iter()
            .map(|w| {
                (
                    w["write"]["document_id"].as_str().expect("id").to_owned(),
                    w["write"]["version"].as_i64().expect("version"),
                )
            })
            .collect();
        if found.len() >= lost.len() || std::time::Instant::now() > deadline {
            assert_eq!(output.status.code(), Some(1), "exit 1: lost writes listed");
            assert_eq!(found, lost, "{}", system.logs("quarantine"));
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for w in listed["lost_writes"].as_array().expect("array") {
        assert_eq!(w["quarantined_in"], "region2");
        assert_eq!(w["write"]["origin"], "region1");
        assert_eq!(w["write"]["write_epoch"], 1);
        assert_eq!(w["write"]["superseded_by"], 2);
        assert!(w["write"]["payload"]["data"]["data"]["n"].is_u64(), "{w}");
    }
    let by_epoch = &listed["by_write_epoch"][0];
    assert_eq!(by_epoch["superseded_by"], 2);
    assert_eq!(by_epoch["writes"], lost.len());
    let region2 = tandem_tests::TwoRegions::snapshot(&system.regions[1].pool).await;
    for doc in lost
        .keys()
        .filter(|d| d.starts_with("lost") || *d == "deposed")
    {
        assert!(
            !region2.iter().any(|r| r.0 == "fo" && &r.1 == doc),
            "{doc} was applied in Region 2"
        );
    }

    // Re-sync: repair compares the follower (Region 1) with the write region (Region 2) and
    // fixes it through Region 2's outbox; Region 2's data does not change.
    let output = system.cli(&["repair", "--json"]);
    assert!(
        output.status.success(),
        "repair: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    system.wait_converged(Duration::from_secs(60)).await;
    assert_eq!(
        tandem_tests::TwoRegions::snapshot(&system.regions[1].pool).await,
        region2,
        "repair never changes the write region"
    );
    let output = system.cli(&["verify", "--json"]);
    assert!(output.status.success(), "verify after the re-sync");

    // Fail back by switchover.
    let back = switchover(&system, "region1");
    assert_eq!(back["outcome"], "switched");
    assert_eq!(back["write_epoch"], 3);
    let (status, _, forwarded) = put_n(&system, &w2, "back", 1).await;
    assert_eq!((status, forwarded), (201, true));
    system.wait_converged(Duration::from_secs(60)).await;
}

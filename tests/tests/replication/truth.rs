//! Region 2 never lies about itself: its lag rises whatever stalls between Region 1's commits
//! and Region 2's applies, it keeps answering while its lag check or its database cannot, only
//! the elected relay and consumer commit (even under load), and a consumer resumes a partition
//! only with proof.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use tandem_runtime::shutdown::CancellationToken;
use tandem_store::db::DatabaseSettings;
use tandem_store::documents::StoreError;
use tandem_store::leader::{Leadership, RELAY_LOCK};
use tandem_store::outbox;
use tandem_tests::TwoRegions;

use crate::support::{
    assert_each_event_applied_once, produce_raw, spawn_writer, unpublished_in, wait_published,
};

/// Holds `LOCK TABLE <table>` in an open transaction until dropped (rolled back).
async fn lock_table(url: &str, table: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .expect("lock");
    client
}

/// The lag Region 2 reports on a document read.
async fn reported_lag(regions: &TwoRegions) -> Option<u64> {
    regions
        .region2_get("/v1/truth/probe")
        .await
        .headers()
        .get("x-tandem-replication-lag-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region2_lag_rises_for_every_stall_and_recovers() {
    let mut regions = TwoRegions::start_without_workers_max_lag(Duration::from_secs(2)).await;
    regions.start_relay();
    regions.start_consumer();
    regions.region1.put("truth", "probe", &json!({})).await;
    regions
        .wait_region2_readiness(true, Duration::from_secs(60))
        .await;
    let fail_within = Duration::from_secs(15);
    let recover_within = Duration::from_secs(60);

    // Each stall, then its healing: the lag must pass the 2 s threshold and come back.
    for stall in [
        "relay wedged",
        "relay down",
        "broker down",
        "broker killed",
        "consumer paused",
        "consumer blocked",
        "poison stuck",
    ] {
        let mut held = None;
        match stall {
            "relay wedged" => regions.relays[0].signal("STOP"),
            "relay down" => regions.relays[0].kill_and_wait(),
            "broker down" => regions.broker.pause(true),
            "broker killed" => single_broker(&mut regions).kill(),
            "consumer paused" => regions.consumers[0].signal("STOP"),
            "consumer blocked" => {
                held = Some(lock_table(&regions.region2_database_url, "consumer_offsets").await);
            }
            "poison stuck" => {
                // A record that cannot even be dead-lettered (the table is locked): the
                // consumer holds its partition's position, and that partition's heartbeats
                // wait behind it.
                held = Some(lock_table(&regions.region2_database_url, "dead_letters").await);
                produce_raw(&regions, "truth/poison", b"not json").await;
            }
            _ => unreachable!(),
        }
        let line = regions.wait_region2_readiness(false, fail_within).await;
        assert!(line.contains("exceeds"), "{stall}: {line}");
        let lag = reported_lag(&regions).await.expect("lag header");
        assert!(lag > 2000, "{stall}: the header reports {lag} ms");
        let metric = lag_metric(&regions).await;
        assert!(metric > 2000.0, "{stall}: the metric reports {metric} ms");
        match stall {
            "relay wedged" => regions.relays[0].signal("CONT"),
            "relay down" => {
                regions.start_relay();
            }
            "broker down" => regions.broker.pause(false),
            "broker killed" => single_broker(&mut regions)
                .restart()
                .await
                .expect("the broker restarts on its log"),
            "consumer paused" => regions.consumers[0].signal("CONT"),
            _ => drop(held.take()),
        }
        regions.wait_region2_readiness(true, recover_within).await;
        eprintln!("{stall}: detected and recovered");
        // After a relay kill the new one is the last started.
        if stall == "relay down" {
            regions.relays.swap(0, 1);
        }
    }
    // And the metric comes back down with the rest.
    let deadline = std::time::Instant::now() + recover_within;
    loop {
        let metric = lag_metric(&regions).await;
        if metric < 2000.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "recovered, but the metric still reports {metric} ms"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn single_broker(regions: &mut TwoRegions) -> &mut tandem_tests::Broker {
    match &mut regions.broker {
        tandem_tests::regions::Kafka::Single(broker) => broker,
        tandem_tests::regions::Kafka::Cluster(_) => panic!("this test runs on one node"),
    }
}

/// Region 2's `tandem_replication_lag_milliseconds`, as its Read API exports it.
async fn lag_metric(regions: &TwoRegions) -> f64 {
    let metrics = regions
        .region1
        .client
        .get(format!("{}/metrics", regions.region2_read_url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("tandem_replication_lag_milliseconds "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no lag gauge in:\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_do_not_wait_for_the_lag_check() {
    let regions = TwoRegions::start().await;
    regions
        .region1
        .put("truth", "cached", &json!({"n": 1}))
        .await;
    regions.wait_converged(Duration::from_secs(30)).await;
    assert_eq!(regions.region2_get("/v1/truth/cached").await.status(), 200);
    // The lag's table is locked: a lag read would wait for lock_timeout (5 s).
    let _held = lock_table(&regions.region2_database_url, "replication_heartbeats").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..20 {
        let response = regions
            .region1
            .client
            .get(format!("{}/v1/truth/cached", regions.region2_read_url))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .expect("answered without waiting for the lag check");
        assert_eq!(response.status(), 200);
        assert!(
            response
                .headers()
                .contains_key("x-tandem-replication-lag-ms")
        );
    }
    let ready = regions
        .region1
        .client
        .get(format!("{}/readyz", regions.region2_read_url))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .expect("readyz answered");
    assert!(matches!(ready.status().as_u16(), 200 | 503));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_region2_postgres_down_cached_reads_are_served_and_uncached_ones_fail_fast() {
    let mut regions = TwoRegions::start_with_own_region2_postgres().await;
    regions
        .region1
        .put("down", "cached", &json!({"n": 1}))
        .await;
    regions
        .region1
        .put("down", "cached", &json!({"n": 2}))
        .await;
    regions
        .wait_region2_version("/v1/down/cached", 2, Duration::from_secs(30))
        .await;
    // Served once more: from the cache (filled by the consumer after its commit, or by the
    // read just before).
    assert_eq!(regions.region2_get("/v1/down/cached").await.status(), 200);

    regions
        .region2_postgres
        .as_mut()
        .expect("own postgres")
        .stop();
    // A generous bound, only to tell an answer from a request queued behind the database (or
    // behind the lag check): not a speed assertion.
    let hang = Duration::from_secs(5);
    let get = |path: &str| {
        regions
            .region1
            .client
            .get(format!("{}{path}", regions.region2_read_url))
            .timeout(hang)
            .send()
    };
    for _ in 0..20 {
        let response = get("/v1/down/cached")
            .await
            .expect("a cached document is answered with the database down");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["etag"], "\"2\"");
        assert!(
            response
                .headers()
                .contains_key("x-tandem-replication-lag-ms")
        );
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body["version"], 2);
        assert_eq!(body["data"], json!({"n": 2}));
    }
    for path in ["/v1/down/never-written", "/v1/down"] {
        let response = get(path)
            .await
            .expect("an uncached read is answered with the database down");
        assert_eq!(response.status(), 503, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert!(response.headers().contains_key("retry-after"));
    }
    let ready = get("/readyz").await.expect("readyz answered");
    assert_eq!(ready.status(), 503);

    // Back: the consumer resumes and uncached documents are read from the database again.
    regions
        .region2_postgres
        .as_mut()
        .expect("own postgres")
        .restart()
        .expect("restart postgres");
    regions.region1.put("down", "after", &json!({"n": 3})).await;
    regions
        .wait_region2_version("/v1/down/after", 1, Duration::from_secs(60))
        .await;
    regions.wait_converged(Duration::from_secs(60)).await;
    assert_each_event_applied_once(&regions).await;
}

async fn epoch(regions: &TwoRegions, role: &str) -> i64 {
    epoch_in(&regions.region2_pool, role).await
}

/// The current leader epoch of `role` (`relay` in Region 1, `consumer` in Region 2).
async fn epoch_in(pool: &deadpool_postgres::Pool, role: &str) -> i64 {
    pool.get()
        .await
        .expect("db")
        .query_one("SELECT epoch FROM leader_epochs WHERE role = $1", &[&role])
        .await
        .expect("epoch")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_epoch_was_superseded_cannot_commit() {
    let regions = TwoRegions::start().await;
    regions.region1.put("fence", "before", &json!({})).await;
    regions.wait_converged(Duration::from_secs(30)).await;
    let elected = epoch(&regions, "consumer").await;
    // Another consumer was elected meanwhile (as after a lost session the old leader has not
    // noticed yet): the running one must not commit another apply under its old epoch.
    regions
        .region2_pool
        .get()
        .await
        .expect("db")
        .execute(
            "UPDATE leader_epochs SET epoch = epoch + 1 WHERE role = 'consumer'",
            &[],
        )
        .await
        .expect("supersede");
    regions.region1.put("fence", "after", &json!({})).await;
    regions.wait_converged(Duration::from_secs(30)).await;
    // The apply was refused, the consumer stood down, won the next election and applied.
    assert!(epoch(&regions, "consumer").await >= elected + 2);
    let log = regions.consumers[0].log_tail();
    assert!(log.contains("fenced"), "{log}");
    assert_each_event_applied_once(&regions).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_the_leaders_session_under_load_leaves_exactly_one_active_consumer() {
    let mut regions = TwoRegions::start().await;
    regions.start_consumer();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&regions.region1, "fence", 40, stop.clone());
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The advisory lock's session, terminated from outside (as a network cut or a
        // failover would end it) while batches are in flight on pooled connections.
        let terminated: i64 = regions
            .region2_pool
            .get()
            .await
            .expect("db")
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
                 WHERE locktype = 'advisory' AND granted AND database = \
                 (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .expect("terminate")
            .get(0);
        assert!(terminated >= 1, "the leader's session was found");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    regions.wait_converged(Duration::from_secs(60)).await;
    assert_each_event_applied_once(&regions).await;
    // Exactly one consumer leads.
    let mut leaders = 0.0;
    for port in regions.consumer_ports.clone() {
        leaders += regions
            .metric(port, "tandem_consumer_leader")
            .await
            .unwrap_or(0.0);
    }
    assert_eq!(leaders, 1.0);
}

/// Terminates the session holding the advisory lock `lock` in the database `pool` connects to
/// (as a network cut or a database failover would end it), once a session holds it (bounded:
/// the lock may be between two holders); returns how many sessions were ended.
async fn terminate_lock_holder(pool: &deadpool_postgres::Pool, lock: i64) -> i64 {
    let client = pool.get().await.expect("db");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // A bigint advisory key shows as its high half in classid, its low half in objid.
        let ended: i64 = client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
                 WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
                 AND classid = ($1::bigint >> 32)::oid AND objid = ($1::bigint & 4294967295)::oid \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[&lock],
            )
            .await
            .expect("terminate")
            .get(0);
        if ended > 0 || Instant::now() > deadline {
            return ended;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The relays (by index) whose `tandem_relay_leader` gauge says they are active.
async fn active_relays(regions: &TwoRegions) -> Vec<usize> {
    let mut active = Vec::new();
    for (i, port) in regions.relay_ports.iter().enumerate() {
        if regions.metric(*port, "tandem_relay_leader").await == Some(1.0) {
            active.push(i);
        }
    }
    active
}

/// A term of the relay's leadership in `settings`' database (`None` on shutdown).
async fn relay_term(
    settings: &DatabaseSettings,
    shutdown: &CancellationToken,
) -> Option<Leadership> {
    Leadership::acquire(
        settings,
        RELAY_LOCK,
        Duration::from_millis(100),
        shutdown,
        || {},
    )
    .await
}

/// The outbox rows a relay would publish next.
async fn unpublished_seqs(client: &deadpool_postgres::Client) -> Vec<i64> {
    let batch = outbox::fetch_unpublished(client, 10, 1 << 20)
        .await
        .expect("fetch");
    batch.rows().map(|row| row.expect("row").seq).collect()
}

#[tokio::test]
async fn a_relay_whose_epoch_was_superseded_cannot_settle_its_batch() {
    // The fence itself, at the store: two terms of the relay in Region 1's database, the first
    // one's session terminated (as a network cut ends it) while it still holds a batch.
    let app = tandem_tests::spawn_app().await;
    app.put("relayfence", "row", &json!({})).await;
    let settings = DatabaseSettings::from_url(&app.database_url);
    let shutdown = CancellationToken::new();
    let acquire = || relay_term(&settings, &shutdown);
    let old = acquire().await.expect("first term");
    let mut client = app.pool.get().await.expect("db");
    let seqs = unpublished_seqs(&client).await;
    assert_eq!(seqs.len(), 1);
    assert_eq!(terminate_lock_holder(&app.pool, RELAY_LOCK).await, 1);
    let new = tokio::time::timeout(Duration::from_secs(30), acquire())
        .await
        .expect("the lock was released with the session")
        .expect("second term");
    assert_eq!(new.fence.epoch, old.fence.epoch + 1);

    // The deposed term can neither mark its rows published nor set them aside.
    for (published, refused) in [
        (seqs.clone(), vec![]),
        (vec![], vec![(seqs[0], "x".into())]),
    ] {
        let error = outbox::settle(&mut client, Some(old.fence), &published, &refused)
            .await
            .expect_err("a superseded epoch must not settle");
        assert!(
            matches!(
                error.downcast_ref(),
                Some(StoreError::Fenced { epoch }) if *epoch == old.fence.epoch
            ),
            "{error:#}"
        );
        assert_eq!(unpublished_in(&client).await, 1, "nothing was marked");
        assert_eq!(
            app.count("relay_dead_letters").await,
            0,
            "nothing was moved"
        );
    }
    // The current term can.
    outbox::settle(&mut client, Some(new.fence), &seqs, &[])
        .await
        .expect("the current epoch settles");
    assert_eq!(unpublished_in(&client).await, 0);
}

#[tokio::test]
async fn a_relays_mark_and_an_election_wait_for_each_other() {
    // The mark of an acknowledged batch is one statement with the fence inside it: it must
    // still order itself with an election as the fence's transaction did. An election in
    // progress (its epoch row locked) makes the mark wait and then mark nothing; a mark in
    // progress makes the election wait.
    let app = tandem_tests::spawn_app().await;
    app.put("markfence", "row", &json!({})).await;
    let settings = DatabaseSettings::from_url(&app.database_url);
    let shutdown = CancellationToken::new();
    let leader = relay_term(&settings, &shutdown).await.expect("a term");
    let fence = leader.fence;
    let mut client = app.pool.get().await.expect("db");
    let seqs = unpublished_seqs(&client).await;

    // An election holds the epoch row: the mark waits for it, then finds the new epoch.
    let election = app.pool.get().await.expect("db");
    election
        .batch_execute(&format!(
            "BEGIN; UPDATE leader_epochs SET epoch = epoch + 1 WHERE role = '{}'",
            fence.role
        ))
        .await
        .expect("election begins");
    let mark = {
        let seqs = seqs.clone();
        tokio::spawn(async move {
            let result = outbox::settle(&mut client, Some(fence), &seqs, &[]).await;
            (result, client)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !mark.is_finished(),
        "the mark did not wait for the election"
    );
    election
        .batch_execute("COMMIT")
        .await
        .expect("election commits");
    let (result, client) = mark.await.expect("mark");
    let error = result.expect_err("a mark behind a finished election must not mark");
    assert!(
        matches!(error.downcast_ref(), Some(StoreError::Fenced { epoch }) if *epoch == fence.epoch),
        "{error:#}"
    );
    assert_eq!(unpublished_in(&client).await, 1, "nothing was marked");

    // A mark in progress makes an election wait. The mark is held up by a lock on its rows,
    // which it meets after its fence has taken the epoch row's share lock.
    let current = tandem_store::leader::Fence {
        epoch: fence.epoch + 1,
        ..fence
    };
    let blocker = app.pool.get().await.expect("db");
    blocker
        .batch_execute("BEGIN; SELECT 1 FROM outbox FOR UPDATE")
        .await
        .expect("rows locked");
    let mark = {
        let seqs = seqs.clone();
        tokio::spawn(async move {
            let mut client = client;
            outbox::settle(&mut client, Some(current), &seqs, &[]).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let next = {
        let election = app.pool.get().await.expect("db");
        let role = fence.role;
        tokio::spawn(async move {
            election
                .execute(
                    "UPDATE leader_epochs SET epoch = epoch + 1 WHERE role = $1",
                    &[&role],
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!mark.is_finished(), "the mark did not wait for its rows");
    assert!(
        !next.is_finished(),
        "the election did not wait for the mark"
    );
    blocker
        .batch_execute("COMMIT")
        .await
        .expect("rows released");
    mark.await
        .expect("mark")
        .expect("the current epoch marks its rows");
    assert_eq!(next.await.expect("election").expect("elected"), 1);
    let client = app.pool.get().await.expect("db");
    assert_eq!(
        unpublished_in(&client).await,
        0,
        "the current epoch's mark committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_epoch_was_superseded_cannot_mark_rows_published() {
    let regions = TwoRegions::start().await;
    regions
        .region1
        .put("relayfence", "before", &json!({}))
        .await;
    regions.wait_converged(Duration::from_secs(30)).await;
    let elected = epoch_in(&regions.region1.pool, "relay").await;
    // Another relay was elected meanwhile (as after a lost session the old leader has not
    // noticed yet): the running one must not mark its next batch published.
    regions
        .region1
        .pool
        .get()
        .await
        .expect("db")
        .execute(
            "UPDATE leader_epochs SET epoch = epoch + 1 WHERE role = 'relay'",
            &[],
        )
        .await
        .expect("supersede");
    regions.region1.put("relayfence", "after", &json!({})).await;
    regions.wait_converged(Duration::from_secs(30)).await;
    wait_published(&regions).await;
    // The marks were refused, the relay stood down, won the next election and published again.
    assert!(epoch_in(&regions.region1.pool, "relay").await >= elected + 2);
    let log = std::fs::read_to_string(&regions.relays[0].log).expect("relay log");
    assert!(
        log.contains("a new relay leader was elected"),
        "{}",
        regions.relays[0].log_tail()
    );
    // The broker had acknowledged the fenced batch before its marks were refused, so the event
    // went out twice; Region 2 recognises the copy by its event id and applies it once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while regions
        .metric(
            regions.consumer_ports[0],
            r#"tandem_consumer_events_total{outcome="duplicate"}"#,
        )
        .await
        .is_none_or(|seen| seen < 1.0)
    {
        assert!(
            Instant::now() < deadline,
            "the republished copy never reached Region 2"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_each_event_applied_once(&regions).await;
    regions.wait_converged(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_the_relay_leaders_session_under_load_leaves_exactly_one_active_relay() {
    let mut regions = TwoRegions::start().await;
    regions.start_relay();
    let first = epoch_in(&regions.region1.pool, "relay").await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&regions.region1, "relayfence", 40, stop.clone());
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The relay's advisory-lock session, ended from outside while batches are in flight on
        // pooled connections: whichever relay holds it then.
        let ended = terminate_lock_holder(&regions.region1.pool, RELAY_LOCK).await;
        assert_eq!(
            ended, 1,
            "round {round}: one session holds the relay's lock"
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.expect("writer");
    assert!(writes > 50, "the writer made too little progress: {writes}");
    // Every row published, every event applied exactly once, Region 2 equal to Region 1 row
    // for row (versions included: nothing applied twice in effect).
    wait_published(&regions).await;
    regions.wait_converged(Duration::from_secs(60)).await;
    assert_each_event_applied_once(&regions).await;
    // Each termination ended a term and a new one began.
    let last = epoch_in(&regions.region1.pool, "relay").await;
    assert!(last >= first + 3, "epochs {first} -> {last}");

    // Exactly one relay is active (a deposed one notices within a poll interval), and it is
    // the one the last election recorded.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut active = active_relays(&regions).await;
    while active.len() != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        active = active_relays(&regions).await;
    }
    for _ in 0..10 {
        assert_eq!(active.len(), 1, "active relays: {active:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        active = active_relays(&regions).await;
    }
    let holder: String = regions
        .region1
        .pool
        .get()
        .await
        .expect("db")
        .query_one("SELECT holder FROM leader_epochs WHERE role = 'relay'", &[])
        .await
        .expect("holder")
        .get(0);
    let pid = regions.relays[active[0]].program_pid().expect("pid");
    assert!(
        holder.ends_with(&format!(":{pid}")),
        "the active relay (pid {pid}) is not the elected one ({holder})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_dead_letter_and_a_broker_loss_the_partition_is_proven_or_reread() {
    // One partition, so the poison record is the last one the consumer stored a position for.
    let one_partition = [("KAFKA_TOPIC_PARTITIONS", "1")];
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay_with(&one_partition);
    regions.start_consumer_with(&one_partition);
    let since = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("time");
    for i in 0..20 {
        regions
            .region1
            .put("proof", &format!("d{i}"), &json!({"i": i}))
            .await;
    }
    regions.wait_converged(Duration::from_secs(30)).await;
    // No heartbeats from here: the poison record stays the partition's last.
    regions.relays[0].kill_and_wait();
    produce_raw(&regions, "proof/poison", b"not json").await;
    let client = regions.region2_pool.get().await.expect("db");
    for _ in 0..100 {
        let letters: i64 = client
            .query_one("SELECT count(*) FROM dead_letters", &[])
            .await
            .expect("count")
            .get(0);
        if letters == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (next, hash): (i64, Option<Vec<u8>>) = {
        let row = client
            .query_one(
                "SELECT next_offset, last_record_hash FROM consumer_offsets WHERE topic = $1",
                &[&regions.topic],
            )
            .await
            .expect("position");
        (row.get(0), row.get(1))
    };
    assert!(hash.is_some(), "a dead letter's position carries its proof");
    // The consumer stops; the broker loses everything and is refilled with more records than
    // the stored position: a consumer resuming at that position unproven would skip them.
    regions.consumers[0].kill_and_wait();
    regions
        .broker
        .restart_empty()
        .await
        .expect("restart broker");
    regions.start_relay_with(&one_partition);
    for i in 0..(next + 10) {
        regions
            .region1
            .put("proof", &format!("after{i}"), &json!({"i": i}))
            .await;
    }
    let output = regions.replay_since(&since);
    assert!(output.status.success());
    regions.start_consumer_with(&one_partition);
    regions.wait_converged(Duration::from_secs(90)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_at_run_time_are_consumed_and_counted_without_a_restart() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::client::DefaultClientContext;
    let one_partition = [("KAFKA_TOPIC_PARTITIONS", "1")];
    let mut regions = TwoRegions::start_without_workers().await;
    regions.start_relay_with(&one_partition);
    regions.start_consumer_with(&one_partition);
    regions.wait_region2_ready(Duration::from_secs(60)).await;
    regions.region1.put("grow", "before", &json!({})).await;
    regions.wait_converged(Duration::from_secs(30)).await;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", regions.broker.address())
        .create()
        .expect("admin");
    admin
        .create_partitions(
            &[NewPartitions::new(&regions.topic, 3)],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create partitions")
        .into_iter()
        .for_each(|r| {
            r.expect("partitions added");
        });
    // An event in a new partition (as a producer that already sees three partitions sends).
    let event = tandem_core::event::ChangeEvent::new(
        uuid::Uuid::now_v7(),
        &tandem_core::event::Origin::new("region1", 1, 1),
        time::OffsetDateTime::now_utc(),
        serde_json::from_value(
            json!({"collection": "grow", "id": "new-partition", "version": 1,
            "data": {"p": 2}, "updated_at": "2026-11-25T09:00:00Z"}),
        )
        .expect("state"),
    );
    // A fresh client may not see the new partition in its first metadata yet ("Unknown
    // partition", seen on a loaded machine), and librdkafka keeps a topic's metadata for
    // minutes: each attempt uses a new client that refreshes it every 250 ms, bounded.
    let payload = event.encode();
    let mut attempts = 0;
    loop {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", regions.broker.address())
            .set("topic.metadata.refresh.interval.ms", "250")
            .create()
            .expect("producer");
        let sent = producer
            .send(
                FutureRecord::to(&regions.topic)
                    .partition(2)
                    .key("grow/new-partition")
                    .payload(&payload),
                Duration::from_secs(5),
            )
            .await;
        match sent {
            Ok(_) => break,
            Err((e, _)) if attempts < 50 => {
                attempts += 1;
                eprintln!("produce to the new partition: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err((e, _)) => panic!("produce to the new partition: {e}"),
        }
    }
    regions
        .wait_region2_version("/v1/grow/new-partition", 1, Duration::from_secs(60))
        .await;
    let tracked: i64 = regions
        .region2_pool
        .get()
        .await
        .expect("db")
        .query_one(
            "SELECT count(*) FROM replication_heartbeats WHERE topic = $1",
            &[&regions.topic],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(tracked, 3, "every partition counts in the lag");
    // The relay sends heartbeats through the new partitions too: Region 2 is ready again.
    regions
        .wait_region2_readiness(true, Duration::from_secs(60))
        .await;
}

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tandem_core::document::Stored;
use tandem_core::document::{Collection, DocumentId, DocumentKey};
use tandem_store::cache::Entry;
use tandem_tests::{Redis, TestAppOptions, plant_cache_entry, spawn_app, spawn_app_with};

fn key(collection: &str, id: &str) -> DocumentKey {
    DocumentKey::new(
        Collection::parse(collection).expect("collection"),
        DocumentId::parse(id).expect("id"),
    )
}

#[tokio::test]
async fn a_slow_reader_cannot_fill_an_older_version_after_a_newer_write() {
    let app = spawn_app().await;
    app.put("race", "r", &json!({"v": 1})).await;
    let key = key("race", "r");
    // A reader misses the cache and reads version 1 from PostgreSQL...
    let Some(Stored::Live(old)) = app.read_state.store.get(&key).await.expect("get") else {
        panic!("document missing");
    };
    assert_eq!(old.version, 1);
    // ...a writer commits version 2 and acknowledges...
    assert_eq!(app.put("race", "r", &json!({"v": 2})).await.status(), 200);
    // ...then the slow reader tries to fill the cache with what it read.
    let filled = app
        .read_state
        .cache
        .put(
            &key,
            &Entry::Live {
                version: old.version,
                body: old.to_body(),
            },
        )
        .await
        .expect("redis");
    assert!(!filled, "an older version must not overwrite a newer one");
    let body: Value = app.get("/v1/race/r").await.json().await.expect("json");
    assert_eq!(body["version"], 2);

    // The same guard fences a delete: the last live version cannot come back.
    assert_eq!(
        app.write(Method::DELETE, "/v1/race/r")
            .send()
            .await
            .expect("send")
            .status(),
        204
    );
    let filled = app
        .read_state
        .cache
        .put(
            &key,
            &Entry::Live {
                version: 2,
                body: old.to_body(),
            },
        )
        .await
        .expect("redis");
    assert!(!filled);
    assert_eq!(app.get("/v1/race/r").await.status(), 404);
}

#[tokio::test]
async fn racing_readers_keep_the_newest_version() {
    let app = spawn_app().await;
    let key = key("race", "readers");
    let body = bytes::Bytes::from_static(b"{}");
    let cache = &app.read_state.cache;
    assert!(
        cache
            .put(
                &key,
                &Entry::Live {
                    version: 5,
                    body: body.clone()
                }
            )
            .await
            .expect("redis")
    );
    assert!(
        !cache
            .put(
                &key,
                &Entry::Live {
                    version: 4,
                    body: body.clone()
                }
            )
            .await
            .expect("redis")
    );
    assert!(
        !cache
            .put(
                &key,
                &Entry::Live {
                    version: 5,
                    body: body.clone()
                }
            )
            .await
            .expect("redis")
    );
    assert!(
        cache
            .put(&key, &Entry::Deleted { version: 6 })
            .await
            .expect("redis")
    );
    assert_eq!(
        cache.get(&key).await.expect("redis"),
        Some(Entry::Deleted { version: 6 })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_an_acknowledged_write_never_see_an_older_version() {
    let app = spawn_app().await;
    app.put("hot", "h", &json!({"n": 0})).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Background readers keep missing and filling the cache while the writer runs.
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let client = app.client.clone();
            let url = format!("{}/v1/hot/h", app.read_url);
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = client.get(&url).send().await;
                }
            })
        })
        .collect();
    for n in 1..=100 {
        let written: Value = app
            .put("hot", "h", &json!({"n": n}))
            .await
            .json()
            .await
            .expect("json");
        let version = written["version"].as_i64().expect("version");
        let read: Value = app.get("/v1/hot/h").await.json().await.expect("json");
        assert!(
            read["version"].as_i64().expect("version") >= version,
            "stale read after write {version}: {read}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for reader in readers {
        reader.await.expect("reader");
    }
}

#[tokio::test]
async fn reads_and_writes_keep_working_with_redis_stopped() {
    let mut redis = Redis::start().expect("redis");
    let app = spawn_app_with(TestAppOptions {
        redis_url: Some(redis.url()),
        ..Default::default()
    })
    .await;
    app.put("docs", "a", &json!({"v": 1})).await;
    assert_eq!(app.get("/v1/docs/a").await.status(), 200);

    redis.stop();
    let read = app.get("/v1/docs/a").await;
    assert_eq!(read.status(), 200);
    let body: Value = read.json().await.expect("json");
    assert_eq!(body["data"]["v"], 1);
    let written = app.put("docs", "a", &json!({"v": 2})).await;
    assert_eq!(written.status(), 200);
    let body: Value = app.get("/v1/docs/a").await.json().await.expect("json");
    assert_eq!(body["data"]["v"], 2);
    let listed: Value = app.get("/v1/docs").await.json().await.expect("json");
    assert_eq!(listed["items"][0]["version"], 2);

    let ready = app
        .client
        .get(format!("{}/readyz", app.read_url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200, "Redis is not required for readiness");
    let checks: Value = ready.json().await.expect("json");
    assert!(
        checks["checks"]["redis"]
            .as_str()
            .expect("str")
            .starts_with("degraded")
    );
    let metrics = app
        .client
        .get(format!("{}/metrics", app.read_url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(r#"tandem_cache_requests_total{result="bypass"}"#),
        "{metrics}"
    );

    // Back up: the cache is used again after the cool-down.
    redis.restart().expect("restart redis");
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    for _ in 0..3 {
        let body: Value = app.get("/v1/docs/a").await.json().await.expect("json");
        assert_eq!(body["version"], 2);
    }
    let metrics = app
        .client
        .get(format!("{}/metrics", app.read_url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(r#"tandem_cache_requests_total{result="hit"}"#),
        "{metrics}"
    );
}

/// A Redis key and its fields (`=` holds a string value).
type KeyDump = (String, Vec<(String, Vec<u8>)>);

/// Every version Region 1's Read API answers for `path` during `window`, in order.
async fn versions_seen(app: &tandem_tests::TestApp, path: &str, window: Duration) -> Vec<i64> {
    let deadline = std::time::Instant::now() + window;
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline {
        let body: Value = app.get(path).await.json().await.expect("json");
        seen.push(body["version"].as_i64().expect("version"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_pause_no_read_returns_the_version_the_cache_missed() {
    let redis = Redis::start().expect("redis");
    let app = spawn_app_with(TestAppOptions {
        redis_url: Some(redis.url()),
        ..Default::default()
    })
    .await;
    for n in 0..20 {
        app.put("paused", &format!("d{n}"), &json!({"v": 1})).await;
        app.get(&format!("/v1/paused/d{n}")).await;
    }
    let bumps_before = app.write_state.cache.generation_bumps();
    // Redis freezes for a second while every document gets version 2: the write-through of
    // each times out (it may or may not land later).
    redis.pause(true);
    for n in 0..20 {
        let response = app.put("paused", &format!("d{n}"), &json!({"v": 2})).await;
        assert_eq!(response.status(), 200, "writes never depend on Redis");
    }
    let during = versions_seen(&app, "/v1/paused/d0", Duration::from_millis(300)).await;
    assert!(
        during.iter().all(|&v| v == 2),
        "during the pause: {during:?}"
    );
    redis.pause(false);
    // From the moment Redis answers again, every read returns version 2 (never 1 again).
    for n in 0..20 {
        let seen =
            versions_seen(&app, &format!("/v1/paused/d{n}"), Duration::from_millis(60)).await;
        assert!(
            seen.iter().all(|&v| v == 2),
            "d{n} after the pause: {seen:?}"
        );
    }
    // And the cache serves again: the generation was bumped, not the cache abandoned.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(app.write_state.cache.is_trusted());
    assert!(app.write_state.cache.generation_bumps() > bumps_before);
    app.get("/v1/paused/d0").await;
    let before = cache_hits(&app).await;
    let body: Value = app.get("/v1/paused/d0").await.json().await.expect("json");
    assert_eq!(body["version"], 2);
    assert_eq!(
        cache_hits(&app).await,
        before + 1,
        "served from the new generation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_from_an_old_snapshot_is_not_believed() {
    // A Redis that comes back with old data (a restart from a snapshot, or a failover to a
    // replica that missed writes): its run_id changed, so every process bumps the generation.
    let mut redis = Redis::start().expect("redis");
    let app = spawn_app_with(TestAppOptions {
        redis_url: Some(redis.url()),
        ..Default::default()
    })
    .await;
    app.put("snap", "a", &json!({"v": 1})).await;
    app.get("/v1/snap/a").await;
    let client = redis::Client::open(redis.url()).expect("client");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let dump: Vec<KeyDump> = {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", app.cache_prefix))
            .query_async(&mut connection)
            .await
            .expect("keys");
        let mut dump = Vec::new();
        for key in keys {
            if key.ends_with(":gen") {
                let value: String = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut connection)
                    .await
                    .expect("get");
                dump.push((key, vec![("=".to_owned(), value.into_bytes())]));
            } else {
                let fields: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut connection)
                    .await
                    .expect("hgetall");
                dump.push((key, fields));
            }
        }
        dump
    };
    assert!(
        dump.iter().any(|(k, _)| k.contains("doc:snap/a")),
        "{dump:?}"
    );
    app.put("snap", "a", &json!({"v": 2})).await;
    // The server is replaced by one holding the old state.
    redis.stop();
    redis.restart().expect("restart");
    let client = redis::Client::open(redis.url()).expect("client");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    for (key, fields) in &dump {
        if let [(marker, value)] = fields.as_slice() {
            if marker == "=" {
                let _: () = redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .query_async(&mut connection)
                    .await
                    .expect("set");
                continue;
            }
        }
        let mut command = redis::cmd("HSET");
        command.arg(key);
        for (field, value) in fields {
            command.arg(field).arg(value);
        }
        let _: () = command.query_async(&mut connection).await.expect("hset");
    }
    // Within the run_id check (1 s) and a bump, version 1 is never served again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = versions_seen(&app, "/v1/snap/a", Duration::from_millis(200)).await;
    assert!(seen.iter().all(|&v| v == 2), "{seen:?}");
}

#[tokio::test]
async fn a_cached_entry_older_than_the_token_is_a_miss() {
    let app = spawn_app().await;
    app.put("tok", "a", &json!({"v": 1})).await;
    let written = app.put("tok", "a", &json!({"v": 2})).await;
    let token = written
        .headers()
        .get("x-consistency-token")
        .and_then(|v| v.to_str().ok())
        .expect("token")
        .to_owned();
    // Plant a stale entry (as a lost cache update would leave) in the current generation.
    plant_cache_entry(
        &app.redis_url,
        &app.cache_prefix,
        "tok",
        "a",
        1,
        &json!({"v": 1}),
    )
    .await;
    let plain: Value = app.get("/v1/tok/a").await.json().await.expect("json");
    assert_eq!(
        plain["version"], 1,
        "the planted entry is what the cache holds"
    );
    let with_token: Value = app
        .client
        .get(format!("{}/v1/tok/a", app.read_url))
        .header("x-consistency-token", &token)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(
        with_token["version"], 2,
        "a token read never returns a version below it"
    );
    // A token newer than anything Region 1 wrote was not issued here.
    let forged = tandem_core::consistency::ConsistencyToken {
        key: key("tok", "a"),
        version: 99,
        committed_ms: 0,
    }
    .encode();
    let response = app
        .client
        .get(format!("{}/v1/tok/a", app.read_url))
        .header("x-consistency-token", forged)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 400);
}

async fn cache_hits(app: &tandem_tests::TestApp) -> u64 {
    let metrics = app
        .client
        .get(format!("{}/metrics", app.read_url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    // Served from the cache: by Redis or by the near cache in front of it.
    metrics
        .lines()
        .filter(|l| {
            l.starts_with(r#"tandem_cache_requests_total{result="hit"}"#)
                || l.starts_with(r#"tandem_cache_requests_total{result="near_hit"}"#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_write_api_that_starts_trusts_nothing_cached_before_it() {
    let app = spawn_app().await;
    app.put("restart", "a", &json!({"v": 1})).await;
    app.put("restart", "a", &json!({"v": 2})).await;
    // A Write API killed between its commit of version 2 and the cache update leaves
    // version 1 cached.
    plant_cache_entry(
        &app.redis_url,
        &app.cache_prefix,
        "restart",
        "a",
        1,
        &json!({"v": 1}),
    )
    .await;
    let body: Value = app.get("/v1/restart/a").await.json().await.expect("json");
    assert_eq!(
        body["version"], 1,
        "the planted entry is what the cache holds"
    );
    // The Write API that replaces it bumps the generation as it starts.
    let restarted = tandem_write::AppState::build(&app.write_settings)
        .await
        .expect("a new Write API");
    assert!(restarted.cache.is_trusted(), "Redis answered the bump");
    assert_eq!(restarted.cache.generation_bumps(), 1);
    for _ in 0..3 {
        let body: Value = app.get("/v1/restart/a").await.json().await.expect("json");
        assert_eq!(
            body["version"], 2,
            "the database's version, never the planted one"
        );
    }
}

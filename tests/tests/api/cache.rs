use reqwest::Method;
use serde_json::{Value, json};
use tandem_shared::cache::Entry;
use tandem_shared::document::{Collection, DocumentId, DocumentKey};
use tandem_shared::store::Stored;
use tandem_tests::{Redis, TestAppOptions, spawn_app, spawn_app_with};

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

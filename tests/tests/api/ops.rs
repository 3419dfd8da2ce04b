use tandem_tests::spawn_app;

#[tokio::test]
async fn health_readiness_and_metrics_answer_on_both_services() {
    let app = spawn_app().await;
    for base in [&app.write_url, &app.read_url] {
        let health = app
            .client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(health.status(), 200);
        let ready = app
            .client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(ready.status(), 200);
        let body: serde_json::Value = ready.json().await.expect("readyz json");
        assert_eq!(body["checks"]["postgres"], "ok");
        assert_eq!(body["checks"]["redis"], "ok");
    }
    app.put("things", "a", &serde_json::json!({"n": 1})).await;
    app.get("/v1/things/a").await;
    app.get("/v1/things/a").await;
    let metrics = app
        .client
        .get(format!("{}/metrics", app.read_url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(metrics.contains(r#"tandem_http_requests_total{route="/v1/{collection}/{id}",method="GET",status="200"} 2"#), "{metrics}");
    assert!(
        metrics.contains("tandem_http_request_duration_seconds_bucket"),
        "{metrics}"
    );
    // The first read finds the write-through's entry in Redis, the second in the near cache.
    assert!(
        metrics.contains(r#"tandem_cache_requests_total{result="hit"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tandem_cache_requests_total{result="near_hit"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tandem_db_pool_connections{state="max"}"#),
        "{metrics}"
    );
    // The near cache's size, as it stood at the scrape: the one document read.
    let (entries, bytes) = app
        .read_state
        .cache
        .near_cache_usage()
        .expect("near cache on");
    assert_eq!(entries, 1);
    assert!(
        metrics.contains(&format!("tandem_near_cache_bytes {bytes}\n")),
        "{metrics}"
    );
    let write_metrics = app
        .client
        .get(format!("{}/metrics", app.write_url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        write_metrics.contains(r#"route="/v1/{collection}/{id}",method="PUT",status="201"} 1"#),
        "{write_metrics}"
    );
}

/// `migrate` needs the database and nothing else: every binary applies the migrations with only
/// `DATABASE_URL` set (no Redis, Kafka or JWT settings), and a second run finds nothing to do.
#[tokio::test]
async fn every_binarys_migrate_needs_only_the_database() {
    for binary in [
        "tandem-write",
        "tandem-read",
        "tandem-outbox-relay",
        "tandem-region2-consumer",
    ] {
        let url = tandem_tests::Postgres::shared()
            .create_database()
            .await
            .expect("database");
        for _ in 0..2 {
            let output = std::process::Command::new(tandem_tests::binary(binary))
                .arg("migrate")
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("DATABASE_URL", &url)
                .output()
                .expect("run migrate");
            assert!(
                output.status.success(),
                "{binary} migrate failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        let tables: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE tablename IN ('documents', 'outbox', 'applied_events')",
                &[],
            )
            .await
            .expect("tables")
            .get(0);
        assert_eq!(tables, 3, "{binary} migrate created the schema");
    }
}

/// A renamed setting still works under its old name for one release, with a warning naming
/// both; the new name wins when both are set. The value is made invalid so that the binary
/// stops at its configuration and says which value it took.
#[test]
fn a_setting_under_its_old_name_is_read_with_a_warning_and_the_new_name_wins() {
    let run = |envs: &[(&str, &str)]| {
        let output = std::process::Command::new(tandem_tests::binary("tandem-outbox-relay"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", "postgres://tandem@127.0.0.1:1/none")
            .env("KAFKA_BROKERS", "127.0.0.1:1")
            .envs(envs.iter().copied())
            .output()
            .expect("run the relay");
        assert!(!output.status.success(), "an invalid value must stop it");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let old = run(&[("OUTBOX_RETENTION_HOURS", "soon")]);
    assert!(
        old.contains(r#"RELAY_OUTBOX_RETENTION_HOURS="soon" is invalid"#),
        "the old name's value was not read: {old}"
    );
    assert!(
        old.contains("old name") && old.contains("OUTBOX_RETENTION_HOURS"),
        "no warning naming the old setting: {old}"
    );
    let both = run(&[
        ("RELAY_OUTBOX_RETENTION_HOURS", "later"),
        ("OUTBOX_RETENTION_HOURS", "soon"),
    ]);
    assert!(
        both.contains(r#"RELAY_OUTBOX_RETENTION_HOURS="later" is invalid"#),
        "the new name must win: {both}"
    );
    assert!(
        !both.contains("old name"),
        "no warning when the new name is set: {both}"
    );
}

//! The Secrets Manager credential path, end to end: the real `tandem-read` binary reads an RDS
//! secret from a real Secrets Manager API (the moto server emulator) and serves from the
//! database the secret names.

use std::time::Duration;

use serde_json::json;
use tandem_tests::process::{ManagedProcess, binary, scratch_dir};
use tandem_tests::{Postgres, free_port, spawn_app, wait_for_port};

fn moto_server() -> std::path::PathBuf {
    std::env::var_os("TANDEM_MOTO_SERVER")
        .map(Into::into)
        .unwrap_or_else(|| "moto_server".into())
}

#[tokio::test]
async fn the_read_binary_connects_with_credentials_from_secrets_manager() {
    // The Redis AUTH token comes from Secrets Manager too: a user of the shared Redis that only
    // that token opens (the default user stays as it is for the other tests).
    let redis = tandem_tests::Redis::shared();
    let redis_user = format!("secrets-{}", uuid::Uuid::now_v7().simple());
    let redis_token = uuid::Uuid::now_v7().simple().to_string();
    let mut admin = redis::Client::open(redis.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&redis_user)
        .arg("on")
        .arg(format!(">{redis_token}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");

    // Region 1 data, written through the API.
    let app = spawn_app().await;
    app.put("secrets", "s1", &json!({"via": "secrets manager"}))
        .await;
    let database = app
        .database_url
        .rsplit('/')
        .next()
        .expect("db name")
        .to_owned();

    let dir = scratch_dir("moto");
    let moto_port = free_port();
    let _moto = ManagedProcess::start(
        "moto",
        &moto_server(),
        &[
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            moto_port.to_string(),
        ],
        &[],
        &dir.join("moto.log"),
        "",
    )
    .expect("moto_server (pip install 'moto[server]'; make test does)");
    wait_for_port(moto_port, Duration::from_secs(30))
        .await
        .expect("moto started");
    let endpoint = format!("http://127.0.0.1:{moto_port}");
    let aws_env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "eu-west-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];

    // Store the RDS-shaped secret through the Secrets Manager API.
    let secret = json!({
        "username": "postgres",
        "password": "unused-with-trust-auth",
        "engine": "postgres",
        "host": "127.0.0.1",
        "port": Postgres::shared().port,
        "dbname": database,
    });
    for (name, value) in [
        ("tandem/region1/db", secret.to_string()),
        // As a console paste often leaves it: with a trailing newline.
        ("tandem/region1/redis", format!("{redis_token}\n")),
    ] {
        let created = app
            .client
            .post(&endpoint)
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amz-target", "secretsmanager.CreateSecret")
            .header("authorization", "AWS4-HMAC-SHA256 Credential=testing/20260101/eu-west-1/secretsmanager/aws4_request, SignedHeaders=host, Signature=0")
            .body(json!({"Name": name, "SecretString": value}).to_string())
            .send()
            .await
            .expect("CreateSecret");
        assert!(
            created.status().is_success(),
            "{}",
            created.text().await.unwrap_or_default()
        );
    }

    let port = free_port();
    let mut envs: Vec<(String, String)> = aws_env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    envs.extend(
        [
            ("DATABASE_SECRET_ID", "tandem/region1/db".to_owned()),
            (
                "REDIS_URL",
                format!("redis://{redis_user}@127.0.0.1:{}", redis.port),
            ),
            ("REDIS_AUTH_SECRET_ID", "tandem/region1/redis".to_owned()),
            ("REDIS_KEY_PREFIX", format!("secrets-{port}")),
            ("PORT", port.to_string()),
            ("BIND_ADDRESS", "127.0.0.1".to_owned()),
            ("TANDEM_REGION", "region1".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let read = ManagedProcess::start(
        "tandem-read",
        &binary("tandem-read"),
        &[],
        &envs,
        &dir.join("read.log"),
        "",
    )
    .expect("start tandem-read");
    if wait_for_port(port, Duration::from_secs(30)).await.is_err() {
        panic!("tandem-read did not start:\n{}", read.log_tail());
    }
    let response = app
        .client
        .get(format!("http://127.0.0.1:{port}/v1/secrets/s1"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 200, "{}", read.log_tail());
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["data"]["via"], "secrets manager");
    // The first read filled Redis through the authenticated connection; the second hits it.
    let again = app
        .client
        .get(format!("http://127.0.0.1:{port}/v1/secrets/s1"))
        .send()
        .await
        .expect("GET");
    assert_eq!(again.status(), 200);
    let metrics = app
        .client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains(r#"tandem_cache_requests_total{result="hit"} 1"#)
            && !metrics.contains(r#"result="bypass""#),
        "Redis was not used with the token from Secrets Manager:\n{metrics}\n{}",
        read.log_tail()
    );
}

#[tokio::test]
async fn the_read_binary_connects_with_an_rds_iam_auth_token() {
    // The harness's PostgreSQL trusts loopback, so it accepts the generated token as a
    // password: this proves the IAM path (token generation with aws-sdk-rds, connection
    // settings, refresh task) end to end; RDS itself is what checks the signature in AWS.
    let app = spawn_app().await;
    app.put("iam", "i1", &json!({"via": "iam"})).await;
    let database = app
        .database_url
        .rsplit('/')
        .next()
        .expect("db name")
        .to_owned();
    let dir = scratch_dir("iam");
    let port = free_port();
    let envs: Vec<(String, String)> = [
        ("DATABASE_IAM_HOST", "127.0.0.1".to_owned()),
        ("DATABASE_IAM_PORT", Postgres::shared().port.to_string()),
        ("DATABASE_IAM_USER", "postgres".to_owned()),
        ("DATABASE_IAM_DBNAME", database),
        ("DATABASE_CREDENTIALS_REFRESH_SECONDS", "1".to_owned()),
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
        ("AWS_REGION", "eu-west-1".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ("REDIS_URL", tandem_tests::Redis::shared().url()),
        ("REDIS_KEY_PREFIX", format!("iam-{port}")),
        ("PORT", port.to_string()),
        ("BIND_ADDRESS", "127.0.0.1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let read = ManagedProcess::start(
        "tandem-read",
        &binary("tandem-read"),
        &[],
        &envs,
        &dir.join("read.log"),
        "",
    )
    .expect("start tandem-read");
    if wait_for_port(port, Duration::from_secs(30)).await.is_err() {
        panic!("tandem-read did not start:\n{}", read.log_tail());
    }
    // Across a credential refresh (every second here), new connections keep working.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let response = app
        .client
        .get(format!("http://127.0.0.1:{port}/v1/iam/i1"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 200, "{}", read.log_tail());
    assert!(
        read.log_tail().contains("database credentials refreshed"),
        "{}",
        read.log_tail()
    );
}

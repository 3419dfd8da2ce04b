//! The region role and the write fence, kept in the database: a write commits only while its
//! region leads at the current epoch and is not fenced, whatever races it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tandem_tests::spawn_app;

/// What one write got back.
enum Answer {
    Committed(String),
    Refused(String),
}

#[tokio::test]
async fn no_write_commits_after_the_fence_and_every_refusal_says_why() {
    let app = Arc::new(spawn_app().await);
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (app, stop) = (app.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("w{w}-{i}");
                i += 1;
                let response = app.put("fenced", &id, &json!({"w": w, "i": i})).await;
                let status = response.status().as_u16();
                let retry_after = response.headers().get("retry-after").cloned();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                match status {
                    201 => answers.push(Answer::Committed(id)),
                    503 => {
                        assert_eq!(body["type"], "/problems/not-write-region", "{body}");
                        assert_eq!(body["write_region"], "region1", "{body}");
                        assert_eq!(body["write_epoch"], 1, "{body}");
                        assert!(retry_after.is_some(), "a refusal carries Retry-After");
                        answers.push(Answer::Refused(id));
                    }
                    other => panic!("unexpected {other}: {body}"),
                }
            }
            answers
        }));
    }
    // Writes flow, then the fence lands in the middle of them.
    while app.count("outbox").await < 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let role = tandem_store::roles::fence(&app.pool).await.expect("fence");
    assert!(!role.writable && !role.accepts_writes());
    let at_fence = app.count("outbox").await;
    // Writers keep trying for a while: every one of them is refused.
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut committed = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for writer in writers {
        for answer in writer.await.expect("writer") {
            match answer {
                Answer::Committed(id) => committed.insert(id),
                Answer::Refused(id) => refused.insert(id),
            };
        }
    }
    assert!(!refused.is_empty(), "writes after the fence were refused");
    assert_eq!(
        app.count("outbox").await,
        at_fence,
        "nothing committed after the fence returned"
    );
    // Exactly the acknowledged writes are in the database: none refused was half-written.
    let client = app.pool.get().await.expect("db");
    let stored: BTreeSet<String> = client
        .query("SELECT id FROM documents WHERE collection = 'fenced'", &[])
        .await
        .expect("documents")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, committed);
    assert_eq!(at_fence as usize, committed.len());

    // Every outbox row carries the region and write epoch it was written in.
    let unstamped: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox WHERE origin IS DISTINCT FROM 'region1' OR write_epoch IS DISTINCT FROM 1",
            &[],
        )
        .await
        .expect("stamps")
        .get(0);
    assert_eq!(unstamped, 0);

    // Fencing again is a no-op; lifting the fence lets writes commit again.
    assert!(
        !tandem_store::roles::fence(&app.pool)
            .await
            .expect("fence again")
            .writable
    );
    assert!(
        tandem_store::roles::unfence(&app.pool)
            .await
            .expect("unfence")
            .accepts_writes()
    );
    assert_eq!(
        app.put("fenced", "after", &json!({"ok": true}))
            .await
            .status(),
        201
    );
}

#[tokio::test]
async fn a_replica_refuses_writes_and_a_service_refuses_another_regions_database() {
    let app = spawn_app().await;
    assert_eq!(app.put("roles", "before", &json!({})).await.status(), 201);
    let client = app.pool.get().await.expect("db");
    // A failover elsewhere: region2 is the write region of write epoch 2; this database
    // learnt it.
    client
        .execute(
            "UPDATE region_role SET write_region = 'region2', write_epoch = 2",
            &[],
        )
        .await
        .expect("demote");
    let refused = app.put("roles", "after", &json!({})).await;
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.expect("problem");
    assert_eq!(body["type"], "/problems/not-write-region");
    assert_eq!(body["write_region"], "region2");
    assert_eq!(body["write_epoch"], 2);
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("the write region of write epoch 2 is region2")),
        "{body}"
    );
    assert_eq!(
        app.count("documents").await,
        1,
        "the refused write left nothing"
    );

    // Even a write that bypasses the API: the database itself refuses the outbox row.
    let direct = client
        .execute(
            "INSERT INTO outbox (event_id, collection, document_id, version, operation, payload) \
             VALUES (gen_random_uuid(), 'roles', 'sql', 1, 'upsert', '{}')",
            &[],
        )
        .await
        .expect_err("refused");
    assert_eq!(
        direct.as_db_error().map(|e| e.code().code()),
        Some(tandem_store::roles::NOT_WRITABLE)
    );
    // So does a transaction under REPEATABLE READ, whose snapshot could predate a fence.
    client
        .execute(
            "UPDATE region_role SET write_region = 'region1', write_epoch = 2",
            &[],
        )
        .await
        .expect("promote back");
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .expect("begin");
    let repeatable = client
        .execute(
            "INSERT INTO outbox (event_id, collection, document_id, version, operation, payload) \
             VALUES (gen_random_uuid(), 'roles', 'rr', 1, 'upsert', '{}')",
            &[],
        )
        .await
        .expect_err("refused under repeatable read");
    let message = repeatable.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("READ COMMITTED")),
        "{message:?}"
    );
    client.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(app.put("roles", "again", &json!({})).await.status(), 201);

    // A Write API configured as region2 on this (region1's) database does not start.
    let mut settings = app.write_settings.clone();
    settings.service.region = "region2".into();
    let error = tandem_write::AppState::build(&settings)
        .await
        .err()
        .expect("refused to start");
    assert!(
        format!("{error:#}").contains("this database serves region1, not region2"),
        "{error:#}"
    );

    // Without a recorded role (a previous release's Write API writing during a rolling
    // upgrade, before the first new one records it) writes go on, unstamped, and nothing can
    // be fenced.
    client
        .execute("DELETE FROM region_role", &[])
        .await
        .expect("forget the role");
    assert_eq!(app.put("roles", "no-role", &json!({})).await.status(), 201);
    let stamped: (Option<String>, Option<i64>) = client
        .query_one(
            "SELECT origin, write_epoch FROM outbox WHERE document_id = 'no-role'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("outbox row");
    assert_eq!(stamped, (None, None));
    let fence = tandem_store::roles::fence(&app.pool)
        .await
        .expect_err("no role, no fence");
    assert!(format!("{fence:?}").contains("no region role"), "{fence:?}");
}

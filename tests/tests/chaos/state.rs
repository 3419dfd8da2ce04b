//! What the system holds once the faults are over: Region 1's committed history (its outbox,
//! every row tied to the operation that wrote it by the `traceparent` it recorded), both
//! regions' documents, both caches read straight from Redis, the dead letters and the outbox
//! backlog; and the wait for Region 2 to converge.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_tests::chaos::{ChaosSystem, KEY_PREFIX};

use crate::history::COLLECTION;

/// One committed write in Region 1 (an outbox row).
#[derive(Debug, Clone)]
pub struct Committed {
    pub seq: i64,
    pub version: i64,
    pub deleted: bool,
    pub data: Option<Value>,
    /// The trace id of the `traceparent` the write carried.
    pub trace_id: Option<String>,
    pub published: bool,
    /// The row's `created_at` (Unix ms): inside the writing transaction, so just before its
    /// commit.
    pub created_unix_ms: f64,
}

/// A document's state in a database.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub version: i64,
    pub deleted: bool,
    pub data: Option<Value>,
}

/// A Redis cache entry, as the shared cache module lays it out: a hash
/// `{prefix}:doc:{collection}/{id}` with `v` (version), `s` (`L` live, `D` deleted) and `b`
/// (the response body, the document's JSON).
#[derive(Debug, Clone)]
pub struct Cached {
    pub version: i64,
    pub state: String,
    pub body: Option<Value>,
}

#[derive(Debug, Default)]
pub struct FinalState {
    /// Per document, Region 1's outbox rows in version order.
    pub committed: BTreeMap<String, Vec<Committed>>,
    pub region1: BTreeMap<String, Stored>,
    pub region2: BTreeMap<String, Stored>,
    pub cache1: BTreeMap<String, Cached>,
    pub cache2: BTreeMap<String, Cached>,
    /// Each region's cache generation counter (`None`: never bumped, or a build without
    /// generations).
    pub generations: [Option<String>; 2],
    pub unpublished: i64,
    pub relay_dead_letters: Vec<String>,
    pub dead_letters: Vec<String>,
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn documents(url: &str) -> anyhow::Result<BTreeMap<String, Stored>> {
    let client = connect(url).await?;
    Ok(client
        .query(
            "SELECT id, version, deleted, data FROM documents WHERE collection = $1",
            &[&COLLECTION],
        )
        .await?
        .iter()
        .map(|r| {
            (
                r.get(0),
                Stored {
                    version: r.get(1),
                    deleted: r.get(2),
                    data: r.get(3),
                },
            )
        })
        .collect())
}

/// Every document of every collection, for the convergence wait.
async fn all_documents(
    url: &str,
) -> anyhow::Result<Vec<(String, String, i64, bool, Option<Value>)>> {
    let client = connect(url).await?;
    Ok(client
        .query(
            "SELECT collection, id, version, deleted, data FROM documents ORDER BY collection, id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect())
}

async fn unpublished(url: &str) -> anyhow::Result<i64> {
    let client = connect(url).await?;
    Ok(client
        .query_one(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await?
        .get(0))
}

/// Waits until Region 1's outbox is drained and Region 2's documents equal Region 1's, row
/// for row; returns how long that took, or what still differs at the deadline.
pub async fn wait_converged(system: &ChaosSystem, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::from("never compared (database errors)");
    while started.elapsed() < timeout {
        let compared = async {
            let waiting = unpublished(&system.database1_url).await?;
            let one = all_documents(&system.database1_url).await?;
            let two = all_documents(&system.database2_url).await?;
            anyhow::Ok((waiting, one, two))
        }
        .await;
        match compared {
            Ok((0, one, two)) if one == two => return Ok(started.elapsed()),
            Ok((waiting, one, two)) => {
                let differ = one.iter().filter(|row| !two.contains(row)).count()
                    + two.iter().filter(|row| !one.contains(row)).count();
                last = format!(
                    "{waiting} outbox rows unpublished; {} documents in Region 1, {} in Region 2, {differ} rows differ",
                    one.len(),
                    two.len()
                );
            }
            Err(e) => last = format!("database error: {e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last)
}

/// Reads the final state (retrying briefly: a database restarted last may still recover).
pub async fn gather(system: &ChaosSystem) -> anyhow::Result<FinalState> {
    let mut attempt = 0;
    loop {
        match gather_once(system).await {
            Ok(state) => return Ok(state),
            Err(e) if attempt < 20 => {
                attempt += 1;
                eprintln!("reading the final state failed, retrying: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn gather_once(system: &ChaosSystem) -> anyhow::Result<FinalState> {
    let one = connect(&system.database1_url).await?;
    let mut committed: BTreeMap<String, Vec<Committed>> = BTreeMap::new();
    for row in one
        .query(
            "SELECT document_id, seq, version, operation, payload, traceparent, published_at IS NOT NULL, \
                    extract(epoch FROM created_at)::float8 * 1000 \
             FROM outbox WHERE collection = $1 ORDER BY document_id, version, seq",
            &[&COLLECTION],
        )
        .await?
    {
        let payload: Value = row.get(4);
        let traceparent: Option<String> = row.get(5);
        committed.entry(row.get(0)).or_default().push(Committed {
            seq: row.get(1),
            version: row.get(2),
            deleted: row.get::<_, String>(3) == "delete",
            data: payload.get("data").cloned(),
            trace_id: traceparent.and_then(|t| t.get(3..35).map(str::to_owned)),
            published: row.get(6),
            created_unix_ms: row.get(7),
        });
    }
    let relay_dead_letters = one
        .query(
            "SELECT seq, collection, document_id, version, reason FROM relay_dead_letters ORDER BY seq",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            format!(
                "outbox seq {} ({}/{} v{}): {}",
                r.get::<_, i64>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, i64>(3),
                r.get::<_, String>(4)
            )
        })
        .collect();
    let two = connect(&system.database2_url).await?;
    let dead_letters = two
        .query(
            "SELECT id, partition, \"offset\", reason FROM dead_letters WHERE redriven_at IS NULL ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            format!(
                "dead letter {} (partition {} offset {}): {}",
                r.get::<_, i64>(0),
                r.get::<_, i32>(1),
                r.get::<_, i64>(2),
                r.get::<_, String>(3)
            )
        })
        .collect();
    let (cache1, generation1) = cache_entries(&system.redis1.url()).await?;
    let (cache2, generation2) = cache_entries(&system.redis2.url()).await?;
    Ok(FinalState {
        committed,
        region1: documents(&system.database1_url).await?,
        region2: documents(&system.database2_url).await?,
        cache1,
        cache2,
        generations: [generation1, generation2],
        unpublished: unpublished(&system.database1_url).await?,
        relay_dead_letters,
        dead_letters,
    })
}

/// Every live cache entry of the chaos collection, read straight from Redis, and the cache's
/// generation. The layout is `shared/store/src/cache.rs`'s: entries of the current generation
/// (`{prefix}:gen`, 0 when absent) are `{prefix}:g{generation}:doc:{collection}/{id}`, entries of
/// older generations are dead (every lookup misses them). Entries in the layout before
/// generations (`{prefix}:doc:{collection}/{id}`) are read too, so the check also judges
/// builds from before them.
async fn cache_entries(url: &str) -> anyhow::Result<(BTreeMap<String, Cached>, Option<String>)> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let generation: Option<String> = redis::cmd("GET")
        .arg(format!("{KEY_PREFIX}:gen"))
        .query_async(&mut connection)
        .await?;
    let current = format!(
        "{KEY_PREFIX}:g{}:doc:{COLLECTION}/",
        generation.as_deref().unwrap_or("0")
    );
    let legacy = format!("{KEY_PREFIX}:doc:{COLLECTION}/");
    let mut entries = BTreeMap::new();
    for prefix in [current, legacy] {
        for key in scan(&mut connection, &format!("{prefix}*")).await? {
            let (version, state, body): (Option<i64>, Option<String>, Option<Vec<u8>>) =
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg("v")
                    .arg("s")
                    .arg("b")
                    .query_async(&mut connection)
                    .await?;
            let Some(version) = version else {
                continue; // expired between SCAN and HMGET
            };
            entries.insert(
                key[prefix.len()..].to_owned(),
                Cached {
                    version,
                    state: state.unwrap_or_default(),
                    body: body
                        .filter(|b| !b.is_empty())
                        .and_then(|b| serde_json::from_slice(&b).ok()),
                },
            );
        }
    }
    Ok((entries, generation))
}

async fn scan(
    connection: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> anyhow::Result<Vec<String>> {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            return Ok(keys);
        }
    }
}

//! The Read API's near cache ([`tandem_store::near`]), against a real Redis: what memory
//! answers, and when it must not.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tandem_core::document::{Collection, DocumentId, DocumentKey};
use tandem_store::cache::{Cache, CacheSettings, Entry, Lookup};
use tandem_tests::Redis;

fn key(id: &str) -> DocumentKey {
    DocumentKey::new(
        Collection::parse("near").expect("collection"),
        DocumentId::parse(id).expect("id"),
    )
}

fn live(version: i64) -> Entry {
    Entry::Live {
        version,
        body: Bytes::from(format!("{{\"version\":{version}}}")),
    }
}

/// A reader with a near cache and a writer without, sharing one key prefix (returned too).
fn pair(redis: &Redis, max_bytes: usize) -> (Cache, Cache, String) {
    let prefix = format!("near-{}", rand::random::<u32>());
    let settings = |near_cache_bytes| CacheSettings {
        key_prefix: prefix.clone(),
        near_cache_bytes,
        ..CacheSettings::from_url(&redis.url())
    };
    let reader = Cache::new(settings(max_bytes)).expect("reader");
    let writer = Cache::new(settings(0)).expect("writer");
    (reader, writer, prefix)
}

async fn lookup(cache: &Cache, id: &str) -> Lookup {
    cache.lookup_near(&key(id)).await.expect("lookup")
}

#[tokio::test]
async fn memory_answers_until_redis_says_the_entry_changed() {
    let (reader, writer, _) = pair(Redis::shared(), 1 << 20);
    writer.put(&key("a"), &live(1)).await.expect("put");
    let first = lookup(&reader, "a").await;
    assert_eq!((first.entry, first.from_memory), (Some(live(1)), false));
    let second = lookup(&reader, "a").await;
    assert_eq!((second.entry, second.from_memory), (Some(live(1)), true));

    writer.put(&key("a"), &live(2)).await.expect("put");
    // Any reply read after the change proves its invalidation was applied: a lookup of another
    // document goes to Redis, and from then on memory no longer holds version 1.
    assert!(!lookup(&reader, "other").await.from_memory);
    let after = lookup(&reader, "a").await;
    assert_eq!((after.entry, after.from_memory), (Some(live(2)), false));
    assert!(lookup(&reader, "a").await.from_memory);

    // A generation bump (another process's fault, a consumer's new term) empties memory.
    writer.invalidate_all().await;
    assert!(!lookup(&reader, "other").await.from_memory);
    let bumped = lookup(&reader, "a").await;
    assert_eq!((bumped.entry, bumped.from_memory), (None, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_after_a_write_is_acknowledged_answers_that_write() {
    let (reader, writer, _) = pair(Redis::shared(), 1 << 20);
    writer.put(&key("b"), &live(1)).await.expect("put");
    lookup(&reader, "b").await;
    // Readers keep memory busy (and barriers in flight) while the writer changes the document.
    let busy = {
        let reader = reader.clone();
        tokio::spawn(async move {
            for _ in 0..2000 {
                let _ = reader.lookup_near(&key("b")).await;
            }
        })
    };
    let mut from_memory = 0;
    for version in 2..=200 {
        writer.put(&key("b"), &live(version)).await.expect("put");
        // Acknowledged: from now on, no lookup answers an older version.
        let found = lookup(&reader, "b").await;
        assert_eq!(
            found.entry,
            Some(live(version)),
            "after version {version} was acknowledged"
        );
        let again = lookup(&reader, "b").await;
        assert_eq!(again.entry, Some(live(version)));
        from_memory += usize::from(again.from_memory);
    }
    busy.await.expect("readers");
    assert!(
        from_memory > 100,
        "memory answered {from_memory} of 199 repeated lookups"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_does_not_answer_while_redis_does_not_reply() {
    let redis = Redis::start().expect("redis");
    let (reader, writer, _) = pair(&redis, 1 << 20);
    writer.put(&key("c"), &live(1)).await.expect("put");
    lookup(&reader, "c").await;
    assert!(lookup(&reader, "c").await.from_memory);

    redis.pause(true);
    let during = reader.lookup_near(&key("c")).await;
    redis.pause(false);
    assert!(
        during.is_err(),
        "answered while Redis was frozen: {:?}",
        during.map(|l| (l.entry, l.from_memory))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_tracking_connection_takes_memory_with_it() {
    let redis = Redis::start().expect("redis");
    let (reader, writer, prefix) = pair(&redis, 1 << 20);
    writer.put(&key("d"), &live(1)).await.expect("put");
    lookup(&reader, "d").await;
    assert!(lookup(&reader, "d").await.from_memory);

    // The reader's tracking connection alone is cut off (the rest of the cache keeps working,
    // so nothing is bumped), then version 2 is written by another connection in the same
    // generation: the invalidation is lost with the connection.
    let client = redis::Client::open(redis.url()).expect("client");
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .expect("list the clients");
    let tracking: Vec<&str> = clients
        .lines()
        .filter(|line| {
            line.split(' ')
                .any(|f| f.starts_with("flags=") && f.contains('t'))
        })
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .collect();
    assert_eq!(tracking.len(), 1, "one tracking connection: {clients}");
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(tracking[0])
        .query_async(&mut admin)
        .await
        .map(|_: i64| ())
        .expect("kill the tracking connection");
    tandem_tests::plant_cache_entry(&redis.url(), &prefix, "near", "d", 2, &json!({})).await;

    // Whatever happens next (a reconnect, lookups of other documents proving the new
    // connection fresh), version 1 is never answered again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        let _ = reader.lookup_near(&key("elsewhere")).await;
        if let Ok(found) = reader.lookup_near(&key("d")).await {
            assert_ne!(
                found.entry,
                Some(live(1)),
                "the version the lost connection hid"
            );
        }
    }
}

/// Barrier `PING`s Redis has run.
async fn pings(redis: &Redis) -> u64 {
    let client = redis::Client::open(redis.url()).expect("client");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .expect("commandstats");
    stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_ping:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_dropped_while_waiting_leave_no_pinging_behind() {
    use futures_util::FutureExt as _;
    let redis = Redis::start().expect("redis");
    let (reader, writer, _) = pair(&redis, 1 << 20);
    writer.put(&key("g"), &live(1)).await.expect("put");
    lookup(&reader, "g").await;
    assert!(lookup(&reader, "g").await.from_memory);
    // Requests given up while they wait for their barrier (a client gone, a timeout).
    for _ in 0..10 {
        assert!(reader.lookup_near(&key("g")).now_or_never().is_none());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = pings(&redis).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pings(&redis).await,
        before,
        "the barrier pings went on for requests long gone"
    );
}

#[tokio::test]
async fn memory_stays_within_its_bound() {
    let max = 8 * 1024;
    let (reader, writer, _) = pair(Redis::shared(), max);
    for n in 0..200 {
        let id = format!("e{n}");
        writer.put(&key(&id), &live(n)).await.expect("put");
        lookup(&reader, &id).await;
        let (_, bytes) = reader.near_cache_usage().expect("near cache on");
        assert!(bytes <= max, "{bytes} bytes held, bound {max}");
    }
    let (entries, _) = reader.near_cache_usage().expect("near cache on");
    assert!(entries > 10 && entries < 200, "{entries} entries held");
}

//! Measurement 7, `tandem verify`: the same documents loaded into both regions, ten differences
//! planted (every kind verify reports), then the release `tandem verify --json` run through a
//! byte-counting proxy in front of each region's PostgreSQL, against the obvious alternative:
//! dump both tables in key order through the same proxies and compare them row by row.
//!
//! The documents are written with SQL straight into both `documents` tables (the same
//! deterministic content in each, both regions at once), not through the Write API and the
//! outbox: replicating a million documents would time the relay and the consumer, not verify.
//! The relay and the consumer still run, because verify re-checks each difference once Region 2
//! has applied a heartbeat later than Region 1's clock.

use std::cmp::Ordering;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls};

use crate::cpu::{CpuSplit, Meter, Probe};
use crate::proxy::{CountingProxy, Traffic};
use crate::stack::{Probes, Stack};

/// The collection the documents go to (verify and the dump look at it alone: the other
/// measurements' documents were never replicated).
pub const COLLECTION: &str = "vbench";
/// Rows per `INSERT` while loading (each region loads its chunks one after the other).
const CHUNK: u64 = 50_000;
/// Rows per message from a dump to the comparison.
const BATCH: usize = 256;
/// The kinds, as `tandem verify --json` names them.
const MISSING: &str = "missing_in_region2";
const EXTRA: &str = "extra_in_region2";
const VERSION: &str = "different_version";
const CONTENT: &str = "same_version_different_content";

/// One way of comparing the regions, as measured.
#[derive(Debug, Default)]
pub struct Pass {
    pub wall: Duration,
    /// Through Region 1's and Region 2's proxy.
    pub traffic: [Traffic; 2],
    /// Rows read on both sides: hashed in the database (verify) or shipped (the dump).
    pub rows: u64,
    /// `(id, kind)`, sorted.
    pub found: Vec<(String, String)>,
    pub cpu: CpuSplit,
}

impl Pass {
    pub fn bytes(&self) -> u64 {
        self.traffic[0].plus(self.traffic[1]).total()
    }

    pub fn rows_per_second(&self) -> f64 {
        self.rows as f64 / self.wall.as_secs_f64().max(1e-6)
    }
}

/// What the CLI reported about its own run.
#[derive(Debug, Default)]
pub struct CliFigures {
    pub rows_hashed: u64,
    pub rows_hashed_per_second: u64,
    pub ranges_compared: u64,
    pub rows_compared: u64,
    pub bytes_estimated: u64,
    pub in_flight: u64,
    pub elapsed_ms: u64,
}

#[derive(Debug, Default)]
pub struct VerifyFigures {
    pub documents: u64,
    /// Mean size of one document's JSON text.
    pub document_bytes: u64,
    pub load: Duration,
    /// Stored size of the collection's rows (`pg_column_size` of each column), per region.
    pub data_bytes: [u64; 2],
    /// `pg_total_relation_size('documents')` (TOAST and indexes included), per region.
    pub table_bytes: [u64; 2],
    pub planted: Vec<(String, String)>,
    pub verify: Pass,
    pub cli: CliFigures,
    pub dump: Pass,
}

impl VerifyFigures {
    /// Bytes a pass exchanged as a fraction of the data both regions hold.
    pub fn fraction(&self, pass: &Pass) -> f64 {
        pass.bytes() as f64 / (self.data_bytes[0] + self.data_bytes[1]).max(1) as f64
    }
}

pub async fn run(stack: &Stack, documents: u64, probes: &Probes) -> anyhow::Result<VerifyFigures> {
    let (one, two) = (connect(&stack.db1).await?, connect(&stack.db2).await?);
    let started = Instant::now();
    tokio::try_join!(load(&one, documents), load(&two, documents))?;
    // As autovacuum would leave a table this size: hint bits set, visibility map and
    // statistics current (else the first pass to read the rows would pay for setting them).
    tokio::try_join!(
        one.batch_execute("VACUUM (ANALYZE) documents"),
        two.batch_execute("VACUUM (ANALYZE) documents")
    )?;
    let load_time = started.elapsed();
    let planted = plant(&one, &two, documents).await?;
    let (size1, size2) = tokio::try_join!(sizes(&one), sizes(&two))?;

    let proxy1 = CountingProxy::start(address(stack.pg1.port)).await?;
    let proxy2 = CountingProxy::start(address(stack.pg2.port)).await?;
    let url1 = through(&stack.db1, proxy1.port())?;
    let url2 = through(&stack.db2, proxy2.port())?;
    let traffic = || [proxy1.traffic(), proxy2.traffic()];

    let meter = Meter::default()
        .with("PostgreSQL 1", probes.pg1)
        .with("PostgreSQL 2", probes.pg2);
    let before = traffic();
    let cpu = meter
        .clone()
        .with("tandem verify", Some(Probe::WaitedChildren))
        .with("proxies (this process)", Some(Probe::LoadGenerator))
        .start();
    let started = Instant::now();
    let (report, found) = run_cli(&url1, &url2).await?;
    let mut verify = Pass {
        wall: started.elapsed(),
        cpu: cpu.stop(),
        ..Pass::default()
    };
    verify.traffic = [traffic()[0].since(before[0]), traffic()[1].since(before[1])];
    let number = |field: &str| report[field].as_u64().unwrap_or(0);
    let cli = CliFigures {
        rows_hashed: number("rows_hashed"),
        rows_hashed_per_second: number("rows_hashed_per_second"),
        ranges_compared: number("ranges_compared"),
        rows_compared: number("rows_compared"),
        bytes_estimated: number("bytes_exchanged"),
        in_flight: number("in_flight"),
        elapsed_ms: number("elapsed_ms"),
    };
    verify.rows = cli.rows_hashed;
    verify.found = found;
    anyhow::ensure!(
        verify.found == planted,
        "tandem verify did not report exactly the planted differences:\nplanted: {planted:?}\n\
         found:   {:?}\nreport: {report:#}",
        verify.found
    );

    let before = traffic();
    let cpu = meter
        .with(
            "dump and compare (this process)",
            Some(Probe::LoadGenerator),
        )
        .start();
    let started = Instant::now();
    let (rows, found) = dump_and_compare(&url1, &url2).await?;
    let mut dump = Pass {
        wall: started.elapsed(),
        cpu: cpu.stop(),
        rows,
        found,
        ..Pass::default()
    };
    dump.traffic = [traffic()[0].since(before[0]), traffic()[1].since(before[1])];
    anyhow::ensure!(
        dump.found == planted,
        "the dump-and-compare baseline did not find exactly the planted differences:\n\
         planted: {planted:?}\nfound:   {:?}",
        dump.found
    );

    Ok(VerifyFigures {
        documents,
        document_bytes: size1.2,
        load: load_time,
        data_bytes: [size1.0, size2.0],
        table_bytes: [size1.1, size2.1],
        planted,
        verify,
        cli,
        dump,
    })
}

/// A plain connection (no statement timeout: loading and dumping take a while).
async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("Failed to connect to {url}"))?;
    tokio::spawn(connection);
    Ok(client)
}

fn address(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The database URL with the proxy's port instead of the server's.
fn through(url: &str, port: u16) -> anyhow::Result<String> {
    let database = url
        .rsplit_once('/')
        .map(|(_, d)| d)
        .context("a database URL without a database")?;
    Ok(format!("postgres://postgres@127.0.0.1:{port}/{database}"))
}

/// The document key of number `i`: ids sort as the numbers do.
fn id(i: u64) -> String {
    format!("v{i:08}")
}

/// Writes documents 1..=n into one region, [`CHUNK`] rows per statement. Each is about 2 KiB of
/// JSON whose `body` is 2 KiB of hex MD5 digests: too little repetition for TOAST's
/// compression to shrink it, so the tables hold what the figures say they do.
async fn load(client: &Client, n: u64) -> anyhow::Result<()> {
    let statement = client
        .prepare(
            "INSERT INTO documents (collection, id, version, data, deleted, created_at, updated_at) \
             SELECT $1::text, 'v' || lpad(i::text, 8, '0'), 1 + i % 5, \
                    jsonb_build_object('n', i, 'title', 'verify benchmark document ' || i, \
                      'tags', jsonb_build_array('alpha', 'beta', i % 97), 'body', pool.body), \
                    false, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z' \
             FROM generate_series($2::bigint, $3::bigint) i \
             JOIN (SELECT k, string_agg(md5(k::text || ':' || j::text), '' ORDER BY j) AS body \
                   FROM generate_series(0, 63) k, generate_series(1, 64) j GROUP BY k) pool \
               ON pool.k = i % 64",
        )
        .await?;
    let mut first = 1;
    while first <= n {
        let last = (first + CHUNK - 1).min(n);
        client
            .execute(
                &statement,
                &[&COLLECTION, &i64::try_from(first)?, &i64::try_from(last)?],
            )
            .await
            .context("Failed to load the verify documents")?;
        first = last + 1;
    }
    Ok(())
}

/// Plants ten differences, spread over the key range (the first key among them), and returns
/// them as verify should report them: `(id, kind)`, sorted.
async fn plant(one: &Client, two: &Client, n: u64) -> anyhow::Result<Vec<(String, String)>> {
    anyhow::ensure!(
        n >= 100,
        "the verify measurement needs at least 100 documents"
    );
    let at = |k: u64| id((k * n / 10).max(1));
    let where_id = |i: &str| format!("WHERE collection = '{COLLECTION}' AND id = '{i}'");
    let extra_middle = format!("{}x", at(2));
    let extra_last = "w00000000".to_owned();
    one.batch_execute(&format!(
        // A newer write that never reached Region 2, and a delete that never did.
        "UPDATE documents SET version = version + 1, data = data || '{{\"edited\": true}}' {};
         UPDATE documents SET version = version + 1, deleted = true, data = NULL {};",
        where_id(&at(3)),
        where_id(&at(9)),
    ))
    .await?;
    two.batch_execute(&format!(
        "DELETE FROM documents {};
         DELETE FROM documents {};
         INSERT INTO documents (collection, id, version, data, deleted, created_at, updated_at)
           VALUES ('{COLLECTION}', '{extra_middle}', 1, '{{\"stray\": true}}', false, now(), now()),
                  ('{COLLECTION}', '{extra_last}', 1, '{{\"stray\": true}}', false, now(), now());
         UPDATE documents SET version = version + 3 {};
         UPDATE documents SET data = data || '{{\"drift\": true}}' {};
         UPDATE documents SET data = jsonb_set(data, '{{n}}', '-1') {};
         UPDATE documents SET deleted = true, data = NULL {};",
        where_id(&at(0)),
        where_id(&at(1)),
        where_id(&at(4)),
        where_id(&at(5)),
        where_id(&at(6)),
        where_id(&at(7)),
    ))
    .await?;
    let mut planted = vec![
        (at(0), MISSING),
        (at(1), MISSING),
        (extra_middle, EXTRA),
        (extra_last, EXTRA),
        (at(3), VERSION),
        (at(4), VERSION),
        (at(5), CONTENT),
        (at(6), CONTENT),
        // A tombstone against a live row: same version, so different content.
        (at(7), CONTENT),
        (at(9), VERSION),
    ];
    planted.sort();
    Ok(planted
        .into_iter()
        .map(|(i, k)| (i, k.to_owned()))
        .collect())
}

/// `(stored bytes of the collection's rows, documents table size, mean JSON text size)`.
async fn sizes(client: &Client) -> anyhow::Result<(u64, u64, u64)> {
    let row = client
        .query_one(
            "SELECT coalesce(sum(pg_column_size(collection) + pg_column_size(id) \
                       + pg_column_size(version) + pg_column_size(deleted) \
                       + coalesce(pg_column_size(data), 0)), 0)::bigint, \
                    pg_total_relation_size('documents'), \
                    coalesce(avg(data_bytes), 0)::bigint \
             FROM documents WHERE collection = $1",
            &[&COLLECTION],
        )
        .await?;
    let number =
        |i: usize| -> anyhow::Result<u64> { Ok(u64::try_from(row.try_get::<_, i64>(i)?)?) };
    Ok((number(0)?, number(1)?, number(2)?))
}

/// Runs the release `tandem verify --json` against the proxies; returns its report and the
/// `(id, kind)` pairs it found, sorted.
async fn run_cli(
    url1: &str,
    url2: &str,
) -> anyhow::Result<(serde_json::Value, Vec<(String, String)>)> {
    let output = tokio::process::Command::new(tandem_tests::binary("tandem"))
        .args([
            "--stack-file",
            "none",
            "--region1-database-url",
            url1,
            "--region2-database-url",
            url2,
            "verify",
            "--collection",
            COLLECTION,
            "--json",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("Failed to run tandem verify")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    anyhow::ensure!(
        output.status.code() == Some(1),
        "tandem verify exited with {} (1 = differences found):\n{stderr}",
        output.status
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("tandem verify's --json output is not JSON:\n{stderr}"))?;
    let mut found: Vec<(String, String)> = report["differences"]
        .as_array()
        .context("no differences in the report")?
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap_or_default().to_owned(),
                d["kind"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    found.sort();
    Ok((report, found))
}

/// One row of the dump, its fields as sent (COPY's binary format).
struct Row {
    collection: Bytes,
    id: Bytes,
    version: i64,
    deleted: bool,
    /// `jsonb` in COPY's binary format: a version byte, then the canonical text.
    data: Option<Bytes>,
}

impl Row {
    fn key(&self) -> (&[u8], &[u8]) {
        (&self.collection, &self.id)
    }
}

/// The baseline: both regions' rows of the collection streamed in key order (`COPY … TO
/// STDOUT`, binary) and merged here. Returns the rows read and the differences, classified as
/// verify classifies them.
async fn dump_and_compare(url1: &str, url2: &str) -> anyhow::Result<(u64, Vec<(String, String)>)> {
    let (tx1, mut rx1) = mpsc::channel(8);
    let (tx2, mut rx2) = mpsc::channel(8);
    let dump1 = tokio::spawn(dump(url1.to_owned(), tx1));
    let dump2 = tokio::spawn(dump(url2.to_owned(), tx2));
    let (mut rows1, mut rows2) = (Rows::default(), Rows::default());
    let mut x = rows1.next(&mut rx1).await;
    let mut y = rows2.next(&mut rx2).await;
    let mut found = Vec::new();
    let name = |row: &Row| String::from_utf8_lossy(&row.id).into_owned();
    loop {
        let order = match (&x, &y) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(a), Some(b)) => a.key().cmp(&b.key()),
        };
        match (order, &x, &y) {
            (Ordering::Less, Some(a), _) => {
                found.push((name(a), MISSING.to_owned()));
                x = rows1.next(&mut rx1).await;
            }
            (Ordering::Greater, _, Some(b)) => {
                found.push((name(b), EXTRA.to_owned()));
                y = rows2.next(&mut rx2).await;
            }
            (_, Some(a), Some(b)) => {
                if a.version != b.version {
                    found.push((name(a), VERSION.to_owned()));
                } else if a.deleted != b.deleted || a.data != b.data {
                    found.push((name(a), CONTENT.to_owned()));
                }
                x = rows1.next(&mut rx1).await;
                y = rows2.next(&mut rx2).await;
            }
            _ => unreachable!("the order is taken from the rows present"),
        }
    }
    // A dump that failed half-way closed its channel early: its error is the answer.
    let read = dump1.await?? + dump2.await??;
    found.sort();
    Ok((read, found))
}

/// Batches of rows from one dump, one at a time.
#[derive(Default)]
struct Rows {
    batch: std::vec::IntoIter<Row>,
}

impl Rows {
    async fn next(&mut self, rx: &mut mpsc::Receiver<Vec<Row>>) -> Option<Row> {
        loop {
            if let Some(row) = self.batch.next() {
                return Some(row);
            }
            self.batch = rx.recv().await?.into_iter();
        }
    }
}

/// Streams one region's rows into `tx` in batches; returns how many.
async fn dump(url: String, tx: mpsc::Sender<Vec<Row>>) -> anyhow::Result<u64> {
    let client = connect(&url).await?;
    let stream = client
        .copy_out(
            format!(
                "COPY (SELECT collection, id, version, deleted, data FROM documents \
                       WHERE collection = '{COLLECTION}' ORDER BY collection, id) \
                 TO STDOUT (FORMAT binary)"
            )
            .as_str(),
        )
        .await?;
    futures_util::pin_mut!(stream);
    let mut parser = CopyParser::default();
    let mut rows = 0;
    let mut batch = Vec::with_capacity(BATCH);
    // PostgreSQL sends a row per message: batches keep the channel out of the way.
    while let Some(chunk) = stream.next().await {
        parser.buffer.extend_from_slice(&chunk?);
        while let Some(row) = parser.next_row()? {
            batch.push(row);
        }
        if batch.len() >= BATCH {
            rows += batch.len() as u64;
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            if tx.send(full).await.is_err() {
                break;
            }
        }
    }
    rows += batch.len() as u64;
    let _ = tx.send(batch).await;
    anyhow::ensure!(parser.ended, "the COPY stream ended without its trailer");
    Ok(rows)
}

/// COPY's binary format: a header, then per row a field count and each field as a length
/// (-1: NULL) and its bytes, then a field count of -1.
#[derive(Default)]
struct CopyParser {
    buffer: BytesMut,
    header_read: bool,
    ended: bool,
}

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl CopyParser {
    fn next_row(&mut self) -> anyhow::Result<Option<Row>> {
        if !self.header_read {
            if self.buffer.len() < SIGNATURE.len() + 8 {
                return Ok(None);
            }
            anyhow::ensure!(
                self.buffer.starts_with(SIGNATURE),
                "not a binary COPY stream"
            );
            let extension = u32::from_be_bytes(<[u8; 4]>::try_from(&self.buffer[15..19])?) as usize;
            if self.buffer.len() < 19 + extension {
                return Ok(None);
            }
            self.buffer.advance(19 + extension);
            self.header_read = true;
        }
        if self.ended || self.buffer.len() < 2 {
            return Ok(None);
        }
        let fields = i16::from_be_bytes([self.buffer[0], self.buffer[1]]);
        if fields == -1 {
            self.ended = true;
            self.buffer.advance(2);
            return Ok(None);
        }
        anyhow::ensure!(fields == 5, "a row of {fields} fields, 5 expected");
        // Find where the row ends before taking anything out of the buffer.
        let mut at = 2;
        let mut spans = [None; 5];
        for span in &mut spans {
            let Some(length) = self.buffer.get(at..at + 4) else {
                return Ok(None);
            };
            let length = i32::from_be_bytes(length.try_into()?);
            at += 4;
            if length >= 0 {
                let length = length as usize;
                *span = Some((at, length));
                at += length;
            }
        }
        if self.buffer.len() < at {
            return Ok(None);
        }
        let row = self.buffer.split_to(at).freeze();
        let field = |i: usize| spans[i].map(|(start, length)| row.slice(start..start + length));
        let required = |i: usize| field(i).context("a NULL in a NOT NULL column");
        let version = required(2)?;
        let deleted = required(3)?;
        Ok(Some(Row {
            collection: required(0)?,
            id: required(1)?,
            version: i64::from_be_bytes(version.as_ref().try_into()?),
            deleted: deleted.first() == Some(&1),
            data: field(4),
        }))
    }
}

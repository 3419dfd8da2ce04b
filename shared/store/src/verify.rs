//! What `tandem verify` asks of each region's `documents` table, without shipping the data:
//! per key range, the number of rows and the XOR of their 64-bit row hashes, computed inside
//! the database (for many ranges in one statement); the number of keys in a range and the keys
//! that split it; and, for small ranges only, each row's `(id, version, deleted, md5 of the
//! data)`.
//!
//! A row hash covers the collection, the id (length-prefixed, so no two keys render alike),
//! the version, the tombstone flag and a 64-bit hash of the data's `jsonb` text. `jsonb`
//! renders canonically (keys sorted, no insignificant whitespace, numbers normalised), so equal
//! documents hash equal in both regions. XOR makes a range's hash independent of row order;
//! two differences can cancel out only if their 64-bit hashes collide. The hash is
//! PostgreSQL's `hashtextextended` (the one hash partitioning relies on staying the same across
//! versions), several times cheaper than MD5 over a document of a few KiB; its value depends on
//! the byte order, so both regions must run on the same one (every platform RDS offers is
//! little-endian). Collisions are not a security concern here: verify looks for drift, not for
//! an adversary.
//!
//! Read-only, on both regions; every statement here reads `documents` in key order
//! (`(collection, id)`, the primary key, collation "C"), so ranges are index scans.

use deadpool_postgres::Pool;

use crate::documents::StoreError;

/// A document's key: `(collection, id)`.
pub type Key = (String, String);

/// A key range `(after, upto]`: open at either end when `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Range {
    pub after: Option<Key>,
    pub upto: Option<Key>,
}

/// A range's summary: how many rows, and the XOR of their hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    pub count: i64,
    pub xor: i64,
}

/// One row as verify compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowDigest {
    pub collection: String,
    pub id: String,
    pub version: i64,
    pub deleted: bool,
    /// MD5 (hex) of the data's `jsonb` text; empty for a tombstone.
    pub md5: String,
}

/// The row hash, as SQL over `documents`.
const ROW_HASH: &str = "hashtextextended(length(collection)::text || ':' || collection || \
     id || '/' || version::text || '/' || deleted::text || '/' || \
     coalesce(hashtextextended(data::text, 0)::text, ''), 0)";

type Params<'a> = Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>;

/// The `WHERE` clause of a range (and collection), adding the parameters it takes to `params`
/// (numbered from `params.len() + 1`); `collection` is the number of the parameter holding it.
fn range_clause<'a>(
    range: &'a Range,
    collection: Option<usize>,
    params: &mut Params<'a>,
) -> String {
    let mut push = |value: &'a String| {
        params.push(value);
        params.len()
    };
    // Under a collection filter every bound is a key of that collection (split points are),
    // and bounds that share a collection hold the range within it: `collection = $c` with
    // scalar bounds on `id` then lets btree start at the lower bound and stop at the upper
    // one. Row comparisons do neither well here (PostgreSQL 15): next to `collection = $c`
    // the scan starts at the collection's first key, and a scan ends on a row comparison
    // only once its first column is past the bound, so each range would walk the rest of
    // its collection.
    let within = match (collection, &range.after, &range.upto) {
        (Some(n), _, _) => Some(n),
        (None, Some((after, _)), Some((upto, _))) if after == upto => Some(push(after)),
        _ => None,
    };
    let mut clauses = Vec::new();
    if let Some(c) = within {
        clauses.push(format!("collection = ${c}::text"));
        if let Some((_, id)) = &range.after {
            clauses.push(format!("id > ${}::text", push(id)));
        }
        if let Some((_, id)) = &range.upto {
            clauses.push(format!("id <= ${}::text", push(id)));
        }
    } else {
        // Bounds in different collections (no filter): the scan may run on through the
        // upper bound's collection, filtering.
        for (bound, operator) in [(&range.after, ">"), (&range.upto, "<=")] {
            if let Some((c, i)) = bound {
                let (c, i) = (push(c), push(i));
                clauses.push(format!(
                    "(collection, id) {operator} (${c}::text, ${i}::text)"
                ));
            }
        }
    }
    if clauses.is_empty() {
        "true".to_owned()
    } else {
        clauses.join(" AND ")
    }
}

/// The parameters of a statement over `collection` (if any, as `$1`).
fn collection_param(collection: Option<&String>) -> (Params<'_>, Option<usize>) {
    match collection {
        Some(c) => (vec![c], Some(1)),
        None => (Vec::new(), None),
    }
}

/// Runs one of verify's reads in a read-only transaction with the planner settings they need,
/// in as many round trips as a plain query (two: `BEGIN` travels with the statement's parse,
/// `COMMIT` with its execution). No JIT: compiling the row hash of 256 parts took PostgreSQL
/// longer than hashing a million rows (10.8 s of 24.7 s in one process, and again in every
/// parallel worker); the work is in the hash and TOAST functions, which JIT does not speed
/// up. No sequential scans: the planner misjudges how many rows a key range holds and chose
/// a scan of the whole table for a part; every range here is an index range scan.
async fn read(
    pool: &Pool,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let client = pool.get().await?;
    let begun = tokio::try_join!(
        client
            .batch_execute("BEGIN READ ONLY; SET LOCAL jit = off; SET LOCAL enable_seqscan = off"),
        client.prepare(sql)
    );
    let statement = match begun {
        Ok((_, statement)) => statement,
        Err(e) => {
            // Leave no transaction open on a pooled connection.
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e.into());
        }
    };
    // A failed statement makes PostgreSQL answer the COMMIT with a rollback.
    let (rows, _) = tokio::try_join!(
        client.query(&statement, params),
        client.batch_execute("COMMIT")
    )?;
    Ok(rows)
}

impl Range {
    /// The consecutive parts `(after, p1], (p1, p2], …, (pn, upto]` of this range; points at or
    /// beyond its end are ignored.
    pub fn split(&self, points: Vec<Key>) -> Vec<Range> {
        let mut after = self.after.clone();
        let mut parts = Vec::new();
        for point in points {
            if self.upto.as_ref().is_some_and(|upto| &point >= upto) {
                break;
            }
            parts.push(Range {
                after: after.clone(),
                upto: Some(point.clone()),
            });
            after = Some(point);
        }
        parts.push(Range {
            after,
            upto: self.upto.clone(),
        });
        parts
    }
}

/// How many rows the range holds: keys only, no row is hashed (an index-only scan once the
/// table has been vacuumed).
pub async fn count(
    pool: &Pool,
    range: &Range,
    collection: Option<&String>,
) -> Result<i64, StoreError> {
    let (mut params, c) = collection_param(collection);
    let clause = range_clause(range, c, &mut params);
    let rows = read(
        pool,
        &format!("SELECT count(*) FROM documents WHERE {clause}"),
        &params,
    )
    .await?;
    match rows.first() {
        Some(row) => Ok(row.try_get(0)?),
        None => Ok(0),
    }
}

/// The summary (row count and XOR of row hashes, computed in the database) of each of
/// `ranges`, in one statement: each range is an index range scan, every row is hashed once.
pub async fn summarise_each(
    pool: &Pool,
    ranges: &[Range],
    collection: Option<&String>,
) -> Result<Vec<Summary>, StoreError> {
    let (mut params, c) = collection_param(collection);
    let parts: Vec<String> = ranges
        .iter()
        .enumerate()
        .map(|(n, range)| {
            format!(
                "SELECT {n} AS part, collection, id, version, deleted, data FROM documents \
                 WHERE {}",
                range_clause(range, c, &mut params)
            )
        })
        .collect();
    let sql = format!(
        "SELECT part, count(*), coalesce(bit_xor({ROW_HASH}), 0) \
         FROM ({}) parts GROUP BY part",
        parts.join(" UNION ALL ")
    );
    let rows = read(pool, &sql, &params).await?;
    let mut summaries = vec![Summary::default(); ranges.len()];
    for row in rows {
        let part: i32 = row.try_get(0)?;
        if let Some(summary) = usize::try_from(part)
            .ok()
            .and_then(|p| summaries.get_mut(p))
        {
            *summary = Summary {
                count: row.try_get(1)?,
                xor: row.try_get(2)?,
            };
        }
    }
    Ok(summaries)
}

/// Keys that split the range into parts of `step` rows each (every `step`-th key in order),
/// at most `limit` of them. Each key is found by skipping `step` keys of the index from the
/// previous one (a recursive query), rather than numbering every row of the range.
pub async fn split_points(
    pool: &Pool,
    range: &Range,
    collection: Option<&String>,
    step: i64,
    limit: i64,
) -> Result<Vec<Key>, StoreError> {
    let rest = Range {
        after: None,
        upto: range.upto.clone(),
    };
    let (mut params, c) = collection_param(collection);
    let first = range_clause(range, c, &mut params);
    let next = range_clause(&rest, c, &mut params);
    // As in `range_clause`: within the filter's collection, a scalar bound on `id`.
    let after_point = if c.is_some() {
        "id > points.i"
    } else {
        "(collection, id) > (points.c, points.i)"
    };
    params.push(&step);
    params.push(&limit);
    let (step, limit) = (params.len() - 1, params.len());
    let sql = format!(
        "WITH RECURSIVE points (c, i, n) AS ( \
           (SELECT collection, id, 1 FROM documents WHERE {first} \
            ORDER BY collection, id OFFSET ${step}::bigint - 1 LIMIT 1) \
           UNION ALL \
           SELECT hop.collection, hop.id, points.n + 1 FROM points, LATERAL ( \
             SELECT collection, id FROM documents \
             WHERE {after_point} AND {next} \
             ORDER BY collection, id OFFSET ${step}::bigint - 1 LIMIT 1) hop \
           WHERE points.n < ${limit}::bigint) \
         SELECT c, i FROM points ORDER BY n"
    );
    let rows = read(pool, &sql, &params).await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// Every row of the range, in key order, as verify compares them.
pub async fn digests(
    pool: &Pool,
    range: &Range,
    collection: Option<&String>,
) -> Result<Vec<RowDigest>, StoreError> {
    let (mut params, c) = collection_param(collection);
    let clause = range_clause(range, c, &mut params);
    let sql = format!(
        "SELECT collection, id, version, deleted, coalesce(md5(data::text), '') \
         FROM documents WHERE {clause} ORDER BY collection, id"
    );
    let rows = read(pool, &sql, &params).await?;
    rows.iter().map(digest).collect()
}

/// The rows of exactly these keys (those present), in key order.
pub async fn digests_of(pool: &Pool, keys: &[Key]) -> Result<Vec<RowDigest>, StoreError> {
    let collections: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let ids: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let rows = read(
        pool,
        "SELECT d.collection, d.id, d.version, d.deleted, coalesce(md5(d.data::text), '') \
         FROM documents d JOIN unnest($1::text[], $2::text[]) AS k (collection, id) \
           ON d.collection = k.collection COLLATE \"C\" AND d.id = k.id COLLATE \"C\" \
         ORDER BY d.collection, d.id",
        &[&collections, &ids],
    )
    .await?;
    rows.iter().map(digest).collect()
}

fn digest(r: &tokio_postgres::Row) -> Result<RowDigest, StoreError> {
    Ok(RowDigest {
        collection: r.try_get(0)?,
        id: r.try_get(1)?,
        version: r.try_get(2)?,
        deleted: r.try_get(3)?,
        md5: r.try_get(4)?,
    })
}

/// The database's clock (`clock_timestamp()`): Region 1's is the one heartbeats carry.
pub async fn clock(pool: &Pool) -> Result<time::OffsetDateTime, StoreError> {
    let client = pool.get().await?;
    Ok(client
        .query_one("SELECT clock_timestamp()", &[])
        .await?
        .try_get(0)?)
}

/// The `documents` table's columns: `name type nullable [collation] [generated expression]`,
/// in column order, to compare the two regions' schemas.
pub async fn columns(pool: &Pool) -> Result<Vec<String>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT column_name::text || ' ' || data_type::text || ' ' || \
               (CASE WHEN is_nullable = 'YES' THEN 'null' ELSE 'not null' END) || \
               coalesce(' collate ' || collation_name::text, '') || \
               coalesce(' generated ' || generation_expression::text, '') \
             FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = 'documents' \
             ORDER BY ordinal_position",
            &[],
        )
        .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

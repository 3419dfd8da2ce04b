//! What `tandem verify` asks of each region's `documents` table, without shipping the data:
//! per key range, the number of rows and the XOR of their 64-bit row hashes, computed inside
//! the database; the keys that split a range; and, for small ranges only, each row's
//! `(id, version, deleted, md5 of the data)`.
//!
//! A row hash covers the collection, the id (length-prefixed, so no two keys render alike),
//! the version, the tombstone flag and the MD5 of the data's `jsonb` text. `jsonb` renders
//! canonically (keys sorted, no insignificant whitespace, numbers normalised), so equal
//! documents hash equal in both regions. XOR makes a range's hash independent of row order;
//! two differences can cancel out only if their 64-bit hashes collide.
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
const ROW_HASH: &str = "('x' || substr(md5(length(collection)::text || ':' || collection || \
     id || '/' || version::text || '/' || deleted::text || '/' || \
     coalesce(md5(data::text), '')), 1, 16))::bit(64)::bigint";

/// The `WHERE` clause of a range (and collection), with the parameters it takes from `$1`.
fn range_clause<'a>(
    range: &'a Range,
    collection: Option<&'a String>,
) -> (String, Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>) {
    let mut clauses = Vec::new();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
    if let Some((c, i)) = &range.after {
        params.push(c);
        params.push(i);
        clauses.push(format!(
            "(collection, id) > (${}::text, ${}::text)",
            params.len() - 1,
            params.len()
        ));
    }
    if let Some((c, i)) = &range.upto {
        params.push(c);
        params.push(i);
        clauses.push(format!(
            "(collection, id) <= (${}::text, ${}::text)",
            params.len() - 1,
            params.len()
        ));
    }
    if let Some(c) = collection {
        params.push(c);
        clauses.push(format!("collection = ${}::text", params.len()));
    }
    let clause = if clauses.is_empty() {
        "true".to_owned()
    } else {
        clauses.join(" AND ")
    };
    (clause, params)
}

/// The range's row count and XOR of row hashes, computed in the database.
pub async fn summarise(
    pool: &Pool,
    range: &Range,
    collection: Option<&String>,
) -> Result<Summary, StoreError> {
    let (clause, params) = range_clause(range, collection);
    let sql =
        format!("SELECT count(*), coalesce(bit_xor({ROW_HASH}), 0) FROM documents WHERE {clause}");
    let client = pool.get().await?;
    let row = client.query_one(&sql, &params).await?;
    Ok(Summary {
        count: row.try_get(0)?,
        xor: row.try_get(1)?,
    })
}

/// Keys that split the range into parts of about `step` rows each (every `step`-th key in
/// order), at most `parts - 1` of them.
pub async fn split_points(
    pool: &Pool,
    range: &Range,
    collection: Option<&String>,
    step: i64,
) -> Result<Vec<Key>, StoreError> {
    let (clause, mut params) = range_clause(range, collection);
    params.push(&step);
    let n = params.len();
    let sql = format!(
        "SELECT collection, id FROM (SELECT collection, id, \
           row_number() OVER (ORDER BY collection, id) AS rn \
           FROM documents WHERE {clause}) numbered \
         WHERE rn % ${n}::bigint = 0 ORDER BY collection, id"
    );
    let client = pool.get().await?;
    let rows = client.query(&sql, &params).await?;
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
    let (clause, params) = range_clause(range, collection);
    let sql = format!(
        "SELECT collection, id, version, deleted, coalesce(md5(data::text), '') \
         FROM documents WHERE {clause} ORDER BY collection, id"
    );
    let client = pool.get().await?;
    let rows = client.query(&sql, &params).await?;
    rows.iter().map(digest).collect()
}

/// The rows of exactly these keys (those present), in key order.
pub async fn digests_of(pool: &Pool, keys: &[Key]) -> Result<Vec<RowDigest>, StoreError> {
    let collections: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let ids: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let client = pool.get().await?;
    let rows = client
        .query(
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

//! `tandem verify`: does Region 2 equal Region 1? Decided without shipping the data: each
//! database summarises a key range as (row count, XOR of 64-bit row hashes)
//! ([`tandem_store::verify`]). A range is split into about [`FANOUT`] parts ([`FIRST_FANOUT`]
//! for the whole table) at keys chosen from the side holding more of its rows (a cheap walk
//! through the primary key's index), and both sides summarise all the parts in one statement
//! each, so every row is hashed once per level it is looked at, and only in ranges that
//! differ: equal summaries end a part, different ones are split again until a part holds at
//! most [`LEAF`] rows on either side; only then are both sides' rows `(id, version, deleted,
//! md5)` fetched and compared.
//!
//! Writes keep flowing meanwhile, so a first difference may be replication in flight. Each
//! one is re-checked: Region 1's rows are read, then Region 1's clock `t`; verify waits until
//! Region 2 has applied a heartbeat later than `t` from every partition (everything Region 1
//! committed before `t` is then applied), reads Region 2's rows, and reads Region 1's again.
//! A Region 2 row equal to either Region 1 reading is in flight, not drift; a difference
//! while Region 1's row did not change in between is reported; a row Region 1 changed in
//! between is re-checked again (a few rounds).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use serde::Serialize;
use tandem_store::verify::{self, Key, Range, RowDigest, Summary};

use crate::output::{self, Progress, bad, good};

/// A range holding at most this many rows on each side is compared row by row.
pub const LEAF: i64 = 100;
/// How many parts a differing range is split into.
pub const FANOUT: i64 = 16;
/// How many parts the whole table is split into first: the rows of every part holding a
/// difference are hashed again at the next level, so ten differences in a million rows have
/// 40,000 rows hashed again instead of 625,000 (with [`FANOUT`]).
pub const FIRST_FANOUT: i64 = 256;
/// Rounds of re-checking a document Region 1 keeps changing.
const RECHECK_ROUNDS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    MissingInRegion2,
    ExtraInRegion2,
    DifferentVersion,
    SameVersionDifferentContent,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Self::MissingInRegion2 => "missing in region2",
            Self::ExtraInRegion2 => "extra in region2",
            Self::DifferentVersion => "different version",
            Self::SameVersionDifferentContent => "same version, different content",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub collection: String,
    pub id: String,
    pub kind: Kind,
    pub region1_version: Option<i64>,
    pub region2_version: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub equal: bool,
    pub collection: Option<String>,
    /// `documents` columns that differ between the regions (`region1: …` / `region2: …`).
    pub schema_differences: Vec<String>,
    pub differences: Vec<Difference>,
    pub counts: BTreeMap<Kind, usize>,
    /// First-pass differences that turned out to be replication in flight.
    pub in_flight: usize,
    pub rows_hashed: i64,
    pub ranges_compared: u64,
    pub rows_compared: u64,
    pub bytes_exchanged: u64,
    pub elapsed_ms: u64,
    pub rows_hashed_per_second: u64,
}

/// The state of one document in one region (`None`: no row).
type Seen = Option<(i64, bool, String)>;

fn seen(row: Option<&RowDigest>) -> Seen {
    row.map(|r| (r.version, r.deleted, r.md5.clone()))
}

fn classify(key: &Key, one: &Seen, two: &Seen) -> Option<Difference> {
    let kind = match (one, two) {
        (None, None) => return None,
        (Some(_), None) => Kind::MissingInRegion2,
        (None, Some(_)) => Kind::ExtraInRegion2,
        (Some(a), Some(b)) if a == b => return None,
        (Some(a), Some(b)) if a.0 != b.0 => Kind::DifferentVersion,
        (Some(_), Some(_)) => Kind::SameVersionDifferentContent,
    };
    Some(Difference {
        collection: key.0.clone(),
        id: key.1.clone(),
        kind,
        region1_version: one.as_ref().map(|s| s.0),
        region2_version: two.as_ref().map(|s| s.0),
    })
}

fn by_key(rows: &[RowDigest]) -> BTreeMap<Key, Seen> {
    rows.iter()
        .map(|r| ((r.collection.clone(), r.id.clone()), seen(Some(r))))
        .collect()
}

/// An approximate wire size of one digest row (key, version, flag, md5, framing).
fn row_bytes(r: &RowDigest) -> u64 {
    (r.collection.len() + r.id.len() + 8 + 1 + 32 + 20) as u64
}

pub struct Verifier<'a> {
    pub one: &'a Pool,
    pub two: &'a Pool,
    pub collection: Option<String>,
    pub catch_up_timeout: Duration,
    rows_hashed: i64,
    ranges: u64,
    rows_compared: u64,
    bytes: u64,
}

impl<'a> Verifier<'a> {
    pub fn new(
        one: &'a Pool,
        two: &'a Pool,
        collection: Option<String>,
        catch_up_timeout: Duration,
    ) -> Self {
        Self {
            one,
            two,
            collection,
            catch_up_timeout,
            rows_hashed: 0,
            ranges: 0,
            rows_compared: 0,
            bytes: 0,
        }
    }

    pub async fn run(mut self) -> anyhow::Result<Report> {
        let started = Instant::now();
        let (c1, c2) = tokio::join!(verify::columns(self.one), verify::columns(self.two));
        let (c1, c2) = (c1?, c2?);
        let mut schema_differences = Vec::new();
        if c1 != c2 {
            schema_differences.extend(
                c1.iter()
                    .filter(|c| !c2.contains(c))
                    .map(|c| format!("region1: {c}")),
            );
            schema_differences.extend(
                c2.iter()
                    .filter(|c| !c1.contains(c))
                    .map(|c| format!("region2: {c}")),
            );
            if schema_differences.is_empty() {
                schema_differences.push("the columns are in a different order".to_owned());
            }
        }
        let first = self.first_pass().await?;
        let found = first.len();
        let differences = self.recheck(first).await?;
        let elapsed = started.elapsed();
        let mut counts = BTreeMap::new();
        for d in &differences {
            *counts.entry(d.kind).or_insert(0) += 1;
        }
        Ok(Report {
            equal: differences.is_empty() && schema_differences.is_empty(),
            collection: self.collection.clone(),
            schema_differences,
            in_flight: found - differences.len(),
            counts,
            differences,
            rows_hashed: self.rows_hashed,
            ranges_compared: self.ranges,
            rows_compared: self.rows_compared,
            bytes_exchanged: self.bytes,
            elapsed_ms: elapsed.as_millis() as u64,
            rows_hashed_per_second: (self.rows_hashed as f64 / elapsed.as_secs_f64().max(1e-3))
                as u64,
        })
    }

    /// The range bisection: every key whose rows differ at the moment its range was read.
    async fn first_pass(&mut self) -> anyhow::Result<Vec<Key>> {
        let collection = self.collection.clone();
        let collection = collection.as_ref();
        let root = Range::default();
        let (n1, n2) = tokio::try_join!(
            verify::count(self.one, &root, collection),
            verify::count(self.two, &root, collection)
        )?;
        self.bytes += 2 * 8;
        let mut progress = Progress::new("verify: rows", n1.max(n2) as u64);
        let mut done = 0;
        let mut differing = Vec::new();
        if n1.max(n2) <= LEAF {
            // Small enough to hash whole: equal sums end the verify without fetching rows.
            let summaries = self.summarise(std::slice::from_ref(&root)).await?;
            if summaries[0].0 == summaries[0].1 {
                progress.finish();
                return Ok(differing);
            }
        }
        // Ranges whose summaries differ (the root: not known yet), with each side's rows.
        let mut pending = vec![(root, n1, n2)];
        while let Some((range, c1, c2)) = pending.pop() {
            if c1.max(c2) <= LEAF {
                differing.extend(self.compare_rows(&range).await?);
                done += c1.max(c2) as u64;
                progress.update(done);
                continue;
            }
            // Split at keys of the side with more rows here (Region 1's, unless Region 2
            // holds extra rows in this range: its keys are the ones to separate), then
            // summarise every part on both sides, one statement each: every row of the range
            // is hashed once at this level.
            let (side, count) = if c1 >= c2 {
                (self.one, c1)
            } else {
                (self.two, c2)
            };
            let fanout = if range == Range::default() {
                FIRST_FANOUT
            } else {
                FANOUT
            };
            let step = (count + fanout - 1) / fanout;
            let points = verify::split_points(side, &range, collection, step, fanout - 1).await?;
            self.bytes += points
                .iter()
                .map(|(c, i)| (c.len() + i.len() + 8) as u64)
                .sum::<u64>();
            let parts = range.split(points);
            let summaries = self.summarise(&parts).await?;
            let mut differ = Vec::new();
            for (part, (s1, s2)) in parts.into_iter().zip(summaries) {
                if s1 == s2 {
                    done += s1.count as u64;
                } else {
                    differ.push((part, s1.count, s2.count));
                }
            }
            progress.update(done);
            // Depth first, in key order.
            pending.extend(differ.into_iter().rev());
        }
        progress.finish();
        Ok(differing)
    }

    /// Both regions' summaries of each range.
    async fn summarise(&mut self, ranges: &[Range]) -> anyhow::Result<Vec<(Summary, Summary)>> {
        let collection = self.collection.as_ref();
        let (s1, s2) = tokio::try_join!(
            verify::summarise_each(self.one, ranges, collection),
            verify::summarise_each(self.two, ranges, collection)
        )?;
        self.ranges += ranges.len() as u64;
        self.rows_hashed += s1.iter().chain(&s2).map(|s| s.count).sum::<i64>();
        // Two (count, xor) answers per range and the bounds sent with each query.
        let bound_bytes: u64 = ranges
            .iter()
            .flat_map(|r| [&r.after, &r.upto])
            .filter_map(|b| b.as_ref())
            .map(|(c, i)| (c.len() + i.len()) as u64)
            .sum();
        self.bytes += 2 * (16 * ranges.len() as u64 + bound_bytes);
        Ok(s1.into_iter().zip(s2).collect())
    }

    /// The keys of a small range whose rows differ: both sides' rows, compared here.
    async fn compare_rows(&mut self, range: &Range) -> anyhow::Result<Vec<Key>> {
        let collection = self.collection.as_ref();
        let (r1, r2) = tokio::try_join!(
            verify::digests(self.one, range, collection),
            verify::digests(self.two, range, collection)
        )?;
        self.rows_compared += (r1.len() + r2.len()) as u64;
        self.bytes += r1.iter().chain(&r2).map(row_bytes).sum::<u64>();
        let (m1, m2) = (by_key(&r1), by_key(&r2));
        let mut keys: Vec<&Key> = m1.keys().chain(m2.keys()).collect();
        keys.sort();
        keys.dedup();
        Ok(keys
            .into_iter()
            .filter(|key| {
                let (a, b) = (
                    m1.get(*key).cloned().flatten(),
                    m2.get(*key).cloned().flatten(),
                );
                classify(key, &a, &b).is_some()
            })
            .cloned()
            .collect())
    }

    /// Keeps the differences that persist once Region 2 caught up (see the module's doc).
    async fn recheck(&mut self, mut keys: Vec<Key>) -> anyhow::Result<Vec<Difference>> {
        let mut confirmed = Vec::new();
        for round in 0..RECHECK_ROUNDS {
            if keys.is_empty() {
                break;
            }
            let before = by_key(&verify::digests_of(self.one, &keys).await?);
            let t = verify::clock(self.one).await?;
            self.wait_caught_up(t).await?;
            let two = by_key(&verify::digests_of(self.two, &keys).await?);
            let after = by_key(&verify::digests_of(self.one, &keys).await?);
            self.bytes += 3 * keys
                .iter()
                .map(|(c, i)| (c.len() + i.len() + 70) as u64)
                .sum::<u64>();
            let mut again = Vec::new();
            for key in keys {
                let a = before.get(&key).cloned().flatten();
                let b = after.get(&key).cloned().flatten();
                let r2 = two.get(&key).cloned().flatten();
                if r2 == a || r2 == b {
                    continue;
                }
                if a == b || round + 1 == RECHECK_ROUNDS {
                    confirmed.extend(classify(&key, &b, &r2));
                } else {
                    again.push(key);
                }
            }
            keys = again;
        }
        confirmed.sort_by(|x, y| (&x.collection, &x.id).cmp(&(&y.collection, &y.id)));
        Ok(confirmed)
    }

    /// Waits until Region 2 applied a heartbeat later than `t` on every partition.
    async fn wait_caught_up(&self, t: time::OffsetDateTime) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.catch_up_timeout;
        loop {
            let reached = tandem_store::lag::caught_up_to(self.two).await?;
            if reached.is_some_and(|r| r > t) {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "Region 2 did not catch up past {t} within {:?} (caught up to {reached:?}): \
                     are the relay and the consumer running? Differences cannot be confirmed",
                    self.catch_up_timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn print(report: &Report) {
    if report.equal {
        output::line(&good(&format!(
            "Region 2 equals Region 1{}",
            report
                .collection
                .as_ref()
                .map(|c| format!(" (collection {c})"))
                .unwrap_or_default()
        )));
    } else {
        for s in &report.schema_differences {
            output::line(&bad(&format!("documents column differs: {s}")));
        }
        if !report.differences.is_empty() {
            let rows: Vec<Vec<String>> = report
                .differences
                .iter()
                .map(|d| {
                    vec![
                        d.collection.clone(),
                        d.id.clone(),
                        bad(d.kind.label()),
                        d.region1_version.map_or("–".to_owned(), |v| v.to_string()),
                        d.region2_version.map_or("–".to_owned(), |v| v.to_string()),
                    ]
                })
                .collect();
            output::table(
                &["COLLECTION", "ID", "DIFFERENCE", "R1 VERSION", "R2 VERSION"],
                &rows,
            );
        }
        let counts: Vec<String> = report
            .counts
            .iter()
            .map(|(k, n)| format!("{n} {}", k.label()))
            .collect();
        output::line(&format!(
            "{} differences: {}",
            report.differences.len(),
            counts.join(", ")
        ));
    }
    output::line(&format!(
        "{} rows hashed in {} ranges ({} rows/s), {} rows compared, ~{} bytes exchanged, {} in flight re-checked, {:.1} s",
        report.rows_hashed,
        report.ranges_compared,
        report.rows_hashed_per_second,
        report.rows_compared,
        report.bytes_exchanged,
        report.in_flight,
        report.elapsed_ms as f64 / 1000.0
    ));
}

//! The checker: judges the whole history and the final state against Tandem's guarantees, and
//! names every violation with its document, versions and times.
//!
//! Region 1's outbox is the ground truth of what was committed: one row per committed write,
//! carrying the version, the state written and the `traceparent` of the request, whose trace
//! id names the operation. So every committed version is tied to the operation that wrote it,
//! including writes whose client never learned their fate.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use base64::Engine;
use serde_json::{Map, Value};

use crate::history::{
    COLLECTION, History, ReadOp, ReadOutcome, Region, WriteKind, WriteOp, WriteOutcome,
};
use crate::state::{Cached, FinalState, Stored};

/// Every kind of violation, with what it means.
pub const KINDS: &[(&str, &str)] = &[
    (
        "lost-write",
        "an acknowledged write is not in Region 1's committed history",
    ),
    (
        "ack-mismatch",
        "an acknowledgement (version, ETag, token or data) differs from what was committed",
    ),
    (
        "version-gap",
        "a document's committed versions skip a number",
    ),
    (
        "duplicate-version",
        "two committed writes of a document carry the same version",
    ),
    ("phantom-write", "a committed write that no client sent"),
    (
        "applied-twice",
        "one write (one idempotency key, or one request) committed more than once",
    ),
    (
        "refused-write-applied",
        "a write answered with a 4xx or never sent was committed",
    ),
    (
        "wrong-operation",
        "a committed row's operation differs from the request's (delete vs upsert)",
    ),
    ("wrong-data", "a PUT committed other data than it sent"),
    (
        "wrong-merge",
        "a PATCH's committed state is not the RFC 7396 merge of the previous state",
    ),
    (
        "patch-of-deleted",
        "a PATCH was applied to an absent or deleted document",
    ),
    (
        "delete-of-deleted",
        "a DELETE was applied to an absent or deleted document",
    ),
    (
        "write-order",
        "a write that began after another was acknowledged got an older version",
    ),
    (
        "region1-final-state",
        "Region 1's document differs from its last committed write",
    ),
    (
        "read-lie",
        "a read answered a version or data Region 1 never committed (or an ETag that disagrees)",
    ),
    (
        "future-read",
        "a read answered a version whose write had not even been sent",
    ),
    (
        "non-monotonic-read",
        "a region answered an older version after answering a newer one",
    ),
    (
        "resurrection",
        "a deleted document was answered alive, older than an acknowledged delete the reader had to see",
    ),
    (
        "stale-token-read",
        "a read with a consistency token answered older than the token's write",
    ),
    (
        "region1-stale-read",
        "a Region 1 read answered older than a write acknowledged before the read began",
    ),
    (
        "lag-understated",
        "Region 2 answered older than a write acknowledged longer ago than the replication lag it reported (plus 0.5 s)",
    ),
    (
        "unexpected-refusal",
        "a write was refused with a status the workload never provokes",
    ),
    (
        "no-convergence",
        "Region 2 did not converge within the bound after healing",
    ),
    (
        "partition-reread",
        "the consumer re-read a partition from the beginning (a broker restart taken for data loss)",
    ),
    (
        "region2-differs",
        "after convergence, Region 2's database differs from Region 1's",
    ),
    (
        "unpublished-outbox",
        "outbox rows still unpublished at the end",
    ),
    ("relay-dead-letter", "the relay set an outbox row aside"),
    ("dead-letter", "Region 2's consumer dead-lettered an event"),
    (
        "region1-cache-stale",
        "a Region 1 Redis entry differs from Region 1's database at the end",
    ),
    (
        "region2-cache-stale",
        "a Region 2 Redis entry differs from Region 1's database at the end",
    ),
    (
        "region1-final-read-stale",
        "after convergence, Region 1's Read API answered other than its database",
    ),
    (
        "region2-final-read-stale",
        "after convergence, Region 2's Read API answered other than Region 1's database",
    ),
    ("final-read-unavailable", "after healing, a read failed"),
];

#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: &'static str,
    pub doc: String,
    /// When (run time, seconds) it was observed; infinite for what the final state shows.
    pub at: f64,
    pub detail: String,
}

/// The reads made after convergence carry this reader name prefix.
pub const FINAL_READER: &str = "final";

struct Checker<'a> {
    violations: Vec<Violation>,
    ops_by_trace: HashMap<&'a str, &'a WriteOp>,
}

impl Checker<'_> {
    fn flag(&mut self, kind: &'static str, doc: &str, at: f64, detail: String) {
        debug_assert!(KINDS.iter().any(|(k, _)| *k == kind), "{kind}");
        self.violations.push(Violation {
            kind,
            doc: doc.to_owned(),
            at,
            detail,
        });
    }
}

/// A committed version of a document, with the operation that wrote it (if known).
#[derive(Debug, Clone)]
struct Version<'a> {
    deleted: bool,
    data: Option<Value>,
    op: Option<&'a WriteOp>,
}

impl Version<'_> {
    fn invoked(&self) -> f64 {
        self.op.map_or(0.0, |op| op.invoked)
    }
}

/// Checks everything; returns the violations, in document and time order.
pub fn check(history: &History, state: &FinalState) -> Vec<Violation> {
    let mut checker = Checker {
        violations: Vec::new(),
        ops_by_trace: history
            .writes
            .iter()
            .map(|op| (op.trace_id.as_str(), op))
            .collect(),
    };
    let mut writes_by_doc: BTreeMap<&str, Vec<&WriteOp>> = BTreeMap::new();
    for op in &history.writes {
        writes_by_doc.entry(op.doc.as_str()).or_default().push(op);
        check_refusal(&mut checker, op);
    }
    let mut reads_by_doc: BTreeMap<&str, Vec<&ReadOp>> = BTreeMap::new();
    for read in &history.reads {
        reads_by_doc
            .entry(read.doc.as_str())
            .or_default()
            .push(read);
    }
    let mut docs: Vec<&str> = writes_by_doc.keys().copied().collect();
    docs.extend(state.committed.keys().map(String::as_str));
    docs.extend(state.region1.keys().map(String::as_str));
    docs.sort_unstable();
    docs.dedup();
    let empty = Vec::new();
    for doc in docs {
        let writes = writes_by_doc.get(doc).unwrap_or(&empty);
        let versions = check_committed(&mut checker, doc, state, writes);
        check_acknowledged(&mut checker, doc, state, writes, &versions);
        let reads = reads_by_doc.remove(doc).unwrap_or_default();
        check_reads(&mut checker, doc, &reads, writes, &versions);
        check_final(&mut checker, doc, state, &reads);
    }
    check_system(&mut checker, state);
    let mut violations = checker.violations;
    violations.sort_by(|a, b| {
        a.doc
            .cmp(&b.doc)
            .then(a.at.total_cmp(&b.at))
            .then(a.kind.cmp(b.kind))
    });
    // One read found by two checks (say a delete's token and the region's monotonicity) is
    // one violation of its kind.
    violations
        .dedup_by(|a, b| a.kind == b.kind && a.doc == b.doc && a.at.is_finite() && a.at == b.at);
    violations
}

fn check_refusal(checker: &mut Checker<'_>, op: &WriteOp) {
    if let WriteOutcome::Refused { status, detail } = &op.outcome {
        let expected = matches!(
            (status, &op.kind),
            (None, _) | (Some(404), WriteKind::Patch(_) | WriteKind::Delete)
        );
        if !expected {
            checker.flag(
                "unexpected-refusal",
                &op.doc,
                op.completed,
                format!("{} op {} answered {detail}", op.kind.name(), op.id),
            );
        }
    }
}

/// Region 1's committed history of one document: contiguous versions, each written by a
/// request some client sent, once, with the state that request asked for.
fn check_committed<'a>(
    checker: &mut Checker<'a>,
    doc: &str,
    state: &FinalState,
    writes: &[&'a WriteOp],
) -> BTreeMap<i64, Version<'a>> {
    let mut versions = BTreeMap::new();
    let rows = state.committed.get(doc).map(Vec::as_slice).unwrap_or(&[]);
    let mut expected = 1;
    // The state before the row: (deleted, data); `None` before the first version.
    let mut previous: Option<(bool, Option<Value>)> = None;
    let mut applied: HashMap<u64, usize> = HashMap::new();
    for row in rows {
        if row.version < expected {
            checker.flag(
                "duplicate-version",
                doc,
                f64::INFINITY,
                format!("outbox seq {} repeats v{}", row.seq, row.version),
            );
            continue;
        }
        if row.version > expected {
            checker.flag(
                "version-gap",
                doc,
                f64::INFINITY,
                format!(
                    "versions v{expected}..v{} were never committed; the next is v{} (outbox seq {})",
                    row.version - 1,
                    row.version,
                    row.seq
                ),
            );
        }
        expected = row.version + 1;
        let op = row
            .trace_id
            .as_deref()
            .and_then(|t| checker.ops_by_trace.get(t).copied())
            .filter(|op| op.doc == doc);
        match op {
            None => checker.flag(
                "phantom-write",
                doc,
                f64::INFINITY,
                format!(
                    "v{} (outbox seq {}, trace {:?}) was written by no request of the run",
                    row.version, row.seq, row.trace_id
                ),
            ),
            Some(op) => {
                *applied.entry(op.id).or_default() += 1;
                check_row(
                    checker,
                    doc,
                    op,
                    row.version,
                    row.deleted,
                    row.data.as_ref(),
                    previous.as_ref(),
                );
            }
        }
        previous = Some((row.deleted, row.data.clone()));
        versions.insert(
            row.version,
            Version {
                deleted: row.deleted,
                data: row.data.clone(),
                op,
            },
        );
    }
    for op in writes {
        if applied.get(&op.id).is_some_and(|n| *n > 1) {
            checker.flag(
                "applied-twice",
                doc,
                op.completed,
                format!(
                    "{} op {} (idempotency key {:?}, {} attempts) committed {} times",
                    op.kind.name(),
                    op.id,
                    op.idempotency_key,
                    op.attempts,
                    applied[&op.id]
                ),
            );
        }
    }
    // Region 1's document is its last committed write.
    let last = versions.iter().next_back().map(|(v, s)| Stored {
        version: *v,
        deleted: s.deleted,
        data: s.data.clone(),
    });
    let held = state.region1.get(doc);
    if last.as_ref() != held {
        checker.flag(
            "region1-final-state",
            doc,
            f64::INFINITY,
            format!(
                "Region 1 holds {} but its last committed write is {}",
                describe_stored(held),
                describe_stored(last.as_ref())
            ),
        );
    }
    versions
}

fn check_row(
    checker: &mut Checker<'_>,
    doc: &str,
    op: &WriteOp,
    version: i64,
    deleted: bool,
    data: Option<&Value>,
    previous: Option<&(bool, Option<Value>)>,
) {
    let what = format!(
        "v{version} written by {} op {} (t={:.3}s)",
        op.kind.name(),
        op.id,
        op.invoked
    );
    if matches!(op.outcome, WriteOutcome::Refused { .. }) {
        checker.flag(
            "refused-write-applied",
            doc,
            op.completed,
            format!("{what} was answered {:?} yet committed", op.outcome),
        );
    }
    let previous_live = previous
        .and_then(|(deleted, data)| (!deleted).then_some(data.as_ref()))
        .flatten();
    match &op.kind {
        WriteKind::Delete => {
            if !deleted {
                checker.flag(
                    "wrong-operation",
                    doc,
                    op.invoked,
                    format!("{what}: committed as an upsert"),
                );
            } else if previous_live.is_none() {
                checker.flag(
                    "delete-of-deleted",
                    doc,
                    op.invoked,
                    format!("{what}: the document was already absent or deleted"),
                );
            }
        }
        WriteKind::Put(body) => {
            if deleted {
                checker.flag(
                    "wrong-operation",
                    doc,
                    op.invoked,
                    format!("{what}: committed as a delete"),
                );
            } else if data != Some(body) {
                checker.flag(
                    "wrong-data",
                    doc,
                    op.invoked,
                    format!("{what}: committed {} but sent {body}", show(data)),
                );
            }
        }
        WriteKind::Patch(patch) => {
            if deleted {
                checker.flag(
                    "wrong-operation",
                    doc,
                    op.invoked,
                    format!("{what}: committed as a delete"),
                );
            } else if let Some(before) = previous_live {
                let merged = merge_patch(before, patch);
                if data != Some(&merged) {
                    checker.flag(
                        "wrong-merge",
                        doc,
                        op.invoked,
                        format!(
                            "{what}: {before} merged with {patch} is {merged}, but {} was committed",
                            show(data)
                        ),
                    );
                }
            } else {
                checker.flag(
                    "patch-of-deleted",
                    doc,
                    op.invoked,
                    format!("{what}: the document was absent or deleted"),
                );
            }
        }
    }
}

/// Every acknowledged write was committed, at the version and with the state it reported, and
/// in the order the writes happened.
fn check_acknowledged(
    checker: &mut Checker<'_>,
    doc: &str,
    state: &FinalState,
    writes: &[&WriteOp],
    versions: &BTreeMap<i64, Version<'_>>,
) {
    let version_of: HashMap<u64, i64> = versions
        .iter()
        .filter_map(|(v, s)| s.op.map(|op| (op.id, *v)))
        .collect();
    let last_committed = versions.keys().next_back().copied().unwrap_or(0);
    for op in writes {
        let Some(ack) = op.ack() else { continue };
        let what = format!(
            "{} op {} acknowledged {} v{} at t={:.3}s",
            op.kind.name(),
            op.id,
            ack.status,
            ack.version,
            op.completed
        );
        let Some(committed) = version_of.get(&op.id) else {
            checker.flag(
                "lost-write",
                doc,
                op.completed,
                format!(
                    "{what}; Region 1's history has no version written by it (its last is v{last_committed}; the document {})",
                    describe_stored(state.region1.get(doc))
                ),
            );
            continue;
        };
        let mut wrong = Vec::new();
        if *committed != ack.version {
            wrong.push(format!("committed as v{committed}"));
        }
        if ack.etag != Some(ack.version) {
            wrong.push(format!("ETag {:?}", ack.etag));
        }
        match ack.token.as_deref().map(decode_token) {
            Some(Some((token_doc, token_version)))
                if token_doc == format!("{COLLECTION}/{doc}") && token_version == ack.version => {}
            other => wrong.push(format!("consistency token {other:?}")),
        }
        let committed_data = versions.get(committed).and_then(|v| v.data.as_ref());
        if !matches!(op.kind, WriteKind::Delete) && ack.data.as_ref() != committed_data {
            wrong.push(format!(
                "answered data {} but committed {}",
                show(ack.data.as_ref()),
                show(committed_data)
            ));
        }
        if !wrong.is_empty() {
            checker.flag(
                "ack-mismatch",
                doc,
                op.completed,
                format!("{what}: {}", wrong.join("; ")),
            );
        }
    }
    // Real-time order: a write invoked after another was acknowledged has a newer version.
    let applied: Vec<(&WriteOp, i64)> = writes
        .iter()
        .filter_map(|op| version_of.get(&op.id).map(|v| (*op, *v)))
        .collect();
    for (a, va) in applied.iter().filter(|(op, _)| op.ack().is_some()) {
        for (b, vb) in &applied {
            if a.completed < b.invoked && va >= vb {
                checker.flag(
                    "write-order",
                    doc,
                    b.invoked,
                    format!(
                        "op {} (acknowledged t={:.3}s) is v{va}, but op {} (sent t={:.3}s) is v{vb}",
                        a.id, a.completed, b.id, b.invoked
                    ),
                );
            }
        }
    }
}

/// Reads answer only committed states, never from the future; each region is monotonic;
/// tokens are honoured; Region 1 answers every acknowledged write.
fn check_reads(
    checker: &mut Checker<'_>,
    doc: &str,
    reads: &[&ReadOp],
    writes: &[&WriteOp],
    versions: &BTreeMap<i64, Version<'_>>,
) {
    // Tombstones as (version, when their delete was sent).
    let tombstones: Vec<(i64, f64)> = versions
        .iter()
        .filter(|(_, s)| s.deleted)
        .map(|(v, s)| (*v, s.invoked()))
        .collect();
    // A 404 is explained by a tombstone at `floor` or newer whose delete was sent before the
    // read completed (or by the document not existing yet, when nothing is required).
    let explains_404 = |floor: i64, read: &ReadOp| -> Option<i64> {
        if floor == 0 {
            return Some(0);
        }
        tombstones
            .iter()
            .filter(|(v, sent)| *v >= floor && *sent <= read.completed)
            .map(|(v, _)| *v)
            .min()
    };
    // Acknowledged writes by completion, for Region 1's read-after-write check.
    let mut acked: Vec<(f64, i64, bool)> = writes
        .iter()
        .filter_map(|op| {
            op.ack().map(|ack| {
                (
                    op.completed,
                    ack.version,
                    matches!(op.kind, WriteKind::Delete),
                )
            })
        })
        .collect();
    acked.sort_by(|a, b| a.0.total_cmp(&b.0));

    for read in reads {
        if let ReadOutcome::Live {
            version,
            etag,
            data,
        } = &read.outcome
        {
            let lie = match versions.get(version) {
                _ if *etag != Some(*version) => Some(format!("its ETag says {etag:?}")),
                None => Some("Region 1 never committed that version".to_owned()),
                Some(s) if s.deleted => Some("that version is a tombstone".to_owned()),
                Some(s) if s.data.as_ref() != Some(data) => Some(format!(
                    "it answered data {data} but v{version} is {}",
                    show(s.data.as_ref())
                )),
                Some(s) if s.invoked() > read.completed => {
                    checker.flag(
                        "future-read",
                        doc,
                        read.invoked,
                        format!(
                            "{}, but v{version}'s write was sent only at t={:.3}s",
                            read.describe(),
                            s.invoked()
                        ),
                    );
                    None
                }
                Some(_) => None,
            };
            if let Some(lie) = lie {
                checker.flag(
                    "read-lie",
                    doc,
                    read.invoked,
                    format!("{}: {lie}", read.describe()),
                );
            }
        }
        match read.region {
            Region::One => {
                // The newest write acknowledged before this read began.
                let before = acked.partition_point(|(completed, _, _)| *completed < read.invoked);
                let Some((acknowledged, floor)) = acked[..before]
                    .iter()
                    .max_by_key(|(_, v, _)| *v)
                    .map(|(t, v, _)| (*t, *v))
                else {
                    continue;
                };
                let when = format!(
                    "at t={acknowledged:.3}s, {:.0} ms before it began",
                    (read.invoked - acknowledged) * 1000.0
                );
                let delete_missed = |seen: i64| {
                    acked[..before]
                        .iter()
                        .filter(|(_, v, deleted)| *deleted && *v > seen)
                        .map(|(_, v, _)| *v)
                        .max()
                };
                match &read.outcome {
                    ReadOutcome::Live { version, .. } if *version < floor => {
                        let (kind, note) = match delete_missed(*version) {
                            Some(d) => ("resurrection", format!(" (deleted at v{d})")),
                            None => ("region1-stale-read", String::new()),
                        };
                        checker.flag(
                            kind,
                            doc,
                            read.invoked,
                            format!("{}, but v{floor} was acknowledged {when}{note}", read.describe()),
                        );
                    }
                    ReadOutcome::NotFound if explains_404(floor, read).is_none() => checker.flag(
                        "region1-stale-read",
                        doc,
                        read.invoked,
                        format!(
                            "{}, but v{floor} (live) was acknowledged {when} and no later delete was sent",
                            read.describe()
                        ),
                    ),
                    _ => {}
                }
            }
            Region::Two => {
                check_reported_lag(checker, doc, read, &acked, &explains_404);
                let Some(token) = &read.token else { continue };
                match &read.outcome {
                    ReadOutcome::Live { version, .. } if *version < token.version => {
                        let kind = if token.delete {
                            "resurrection"
                        } else {
                            "stale-token-read"
                        };
                        checker.flag(kind, doc, read.invoked, read.describe());
                    }
                    ReadOutcome::NotFound if explains_404(token.version, read).is_none() => {
                        checker.flag(
                            "stale-token-read",
                            doc,
                            read.invoked,
                            format!(
                                "{} (v{} is live and no later delete was sent)",
                                read.describe(),
                                token.version
                            ),
                        );
                    }
                    _ => {}
                }
            }
        }
    }
    for region in [Region::One, Region::Two] {
        let in_region: Vec<&ReadOp> = reads
            .iter()
            .copied()
            .filter(|r| r.region == region)
            .collect();
        check_monotonic(checker, doc, &in_region, &explains_404);
    }
}

/// How much older than its reported lag a Region 2 answer may be: the Read API refreshes the
/// figure every 250 ms; the rest is scheduling slack.
const LAG_SLACK_SECONDS: f64 = 0.5;

/// Region 2's `X-Tandem-Replication-Lag-Ms` bounds how old its answers are: every write
/// acknowledged (hence committed) longer than that before the read began must show. (Commit
/// times are bounded by the acknowledgement's arrival, so a write still in flight when a
/// heartbeat was taken, which the README allows to be missed, is never counted.)
fn check_reported_lag(
    checker: &mut Checker<'_>,
    doc: &str,
    read: &ReadOp,
    acked: &[(f64, i64, bool)],
    explains_404: &dyn Fn(i64, &ReadOp) -> Option<i64>,
) {
    let Some(lag_ms) = read.lag_ms else { return };
    let horizon = read.invoked - lag_ms as f64 / 1000.0 - LAG_SLACK_SECONDS;
    let before = acked.partition_point(|(completed, _, _)| *completed < horizon);
    let Some((acknowledged, floor)) = acked[..before]
        .iter()
        .max_by_key(|(_, v, _)| *v)
        .map(|(t, v, _)| (*t, *v))
    else {
        return;
    };
    let stale = match &read.outcome {
        ReadOutcome::Live { version, .. } => *version < floor,
        ReadOutcome::NotFound => explains_404(floor, read).is_none(),
        ReadOutcome::Lagging | ReadOutcome::Unavailable { .. } => false,
    };
    if stale {
        checker.flag(
            "lag-understated",
            doc,
            read.invoked,
            format!(
                "{} reporting a lag of {lag_ms} ms, but v{floor} was acknowledged at t={acknowledged:.3}s, {:.0} ms before the read began",
                read.describe(),
                (read.invoked - acknowledged) * 1000.0
            ),
        );
    }
}

/// A region never answers an older state after answering a newer one: a read that began after
/// another completed answers that one's version or newer. A 404 counts as the oldest tombstone
/// (or absence) that can explain it.
fn check_monotonic(
    checker: &mut Checker<'_>,
    doc: &str,
    reads: &[&ReadOp],
    explains_404: &dyn Fn(i64, &ReadOp) -> Option<i64>,
) {
    let mut order: Vec<&ReadOp> = reads.to_vec();
    order.sort_by(|a, b| a.invoked.total_cmp(&b.invoked));
    let micros = |t: f64| (t * 1e6) as u64;
    // Completed reads not yet folded into the floor, by completion time.
    let mut pending: BinaryHeap<Reverse<(u64, usize, i64)>> = BinaryHeap::new();
    // The newest state some completed read answered, and that read.
    let mut floor: (i64, Option<usize>) = (0, None);
    for (i, read) in order.iter().enumerate() {
        while let Some(Reverse((completed, j, value))) = pending.peek().copied() {
            if completed >= micros(read.invoked) {
                break;
            }
            pending.pop();
            if value > floor.0 {
                floor = (value, Some(j));
            }
        }
        let witness = || floor.1.map(|j| order[j].describe()).unwrap_or_default();
        let value = match &read.outcome {
            ReadOutcome::Live { version, .. } => {
                if *version < floor.0 {
                    let after_delete = floor
                        .1
                        .is_some_and(|j| matches!(order[j].outcome, ReadOutcome::NotFound));
                    checker.flag(
                        if after_delete {
                            "resurrection"
                        } else {
                            "non-monotonic-read"
                        },
                        doc,
                        read.invoked,
                        format!("{}, after {}", read.describe(), witness()),
                    );
                }
                *version
            }
            ReadOutcome::NotFound => match explains_404(floor.0, read) {
                Some(tombstone) => tombstone,
                None => {
                    checker.flag(
                        "non-monotonic-read",
                        doc,
                        read.invoked,
                        format!(
                            "{}, after {} (no later delete had been sent)",
                            read.describe(),
                            witness()
                        ),
                    );
                    floor.0
                }
            },
            ReadOutcome::Lagging | ReadOutcome::Unavailable { .. } => continue,
        };
        pending.push(Reverse((micros(read.completed), i, value)));
    }
}

/// After convergence: both caches and both Read APIs agree with Region 1's database.
fn check_final(checker: &mut Checker<'_>, doc: &str, state: &FinalState, reads: &[&ReadOp]) {
    let truth = state.region1.get(doc);
    for (kind, cache) in [
        ("region1-cache-stale", &state.cache1),
        ("region2-cache-stale", &state.cache2),
    ] {
        if let Some(entry) = cache.get(doc) {
            if !cache_matches(entry, truth) {
                checker.flag(
                    kind,
                    doc,
                    f64::INFINITY,
                    format!(
                        "Redis holds {} while Region 1's database holds {}",
                        describe_cached(entry),
                        describe_stored(truth)
                    ),
                );
            }
        }
    }
    for read in reads.iter().filter(|r| r.reader.starts_with(FINAL_READER)) {
        let kind = match read.region {
            Region::One => "region1-final-read-stale",
            Region::Two => "region2-final-read-stale",
        };
        let agrees = match (&read.outcome, truth) {
            (ReadOutcome::Live { version, data, .. }, Some(t)) => {
                !t.deleted && t.version == *version && t.data.as_ref() == Some(data)
            }
            (ReadOutcome::NotFound, None) => true,
            (ReadOutcome::NotFound, Some(t)) => t.deleted,
            (ReadOutcome::Live { .. }, None) => false,
            (ReadOutcome::Lagging | ReadOutcome::Unavailable { .. }, _) => {
                checker.flag("final-read-unavailable", doc, read.invoked, read.describe());
                continue;
            }
        };
        if !agrees {
            checker.flag(
                kind,
                doc,
                read.invoked,
                format!(
                    "{} while Region 1's database holds {}",
                    read.describe(),
                    describe_stored(truth)
                ),
            );
        }
    }
    if state.region2.get(doc) != truth {
        checker.flag(
            "region2-differs",
            doc,
            f64::INFINITY,
            format!(
                "Region 2's database holds {} while Region 1's holds {}",
                describe_stored(state.region2.get(doc)),
                describe_stored(truth)
            ),
        );
    }
}

fn check_system(checker: &mut Checker<'_>, state: &FinalState) {
    if state.unpublished > 0 {
        checker.flag(
            "unpublished-outbox",
            "-",
            f64::INFINITY,
            format!("{} outbox rows were never published", state.unpublished),
        );
    }
    for letter in &state.relay_dead_letters {
        checker.flag("relay-dead-letter", "-", f64::INFINITY, letter.clone());
    }
    for letter in &state.dead_letters {
        checker.flag("dead-letter", "-", f64::INFINITY, letter.clone());
    }
}

fn cache_matches(entry: &Cached, truth: Option<&Stored>) -> bool {
    let Some(truth) = truth else {
        return false;
    };
    if entry.version != truth.version {
        return false;
    }
    match entry.state.as_str() {
        "D" => truth.deleted,
        "L" => {
            !truth.deleted
                && entry.body.as_ref().is_some_and(|b| {
                    b.get("data") == truth.data.as_ref() && b["version"] == truth.version
                })
        }
        _ => false,
    }
}

/// RFC 7396 JSON Merge Patch.
pub fn merge_patch(target: &Value, patch: &Value) -> Value {
    let Value::Object(members) = patch else {
        return patch.clone();
    };
    let mut result = match target {
        Value::Object(object) => object.clone(),
        _ => Map::new(),
    };
    for (name, value) in members {
        if value.is_null() {
            result.remove(name);
        } else {
            let current = result.get(name).cloned().unwrap_or(Value::Null);
            result.insert(name.clone(), merge_patch(&current, value));
        }
    }
    Value::Object(result)
}

/// `(collection/id, version)` from a consistency token.
fn decode_token(token: &str) -> Option<(String, i64)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let parts: Vec<&str> = text.split(':').collect();
    let ["t1", collection, id, version, _committed] = parts.as_slice() else {
        return None;
    };
    Some((format!("{collection}/{id}"), version.parse().ok()?))
}

fn show(value: Option<&Value>) -> String {
    value.map_or_else(|| "nothing".to_owned(), Value::to_string)
}

fn describe_stored(stored: Option<&Stored>) -> String {
    match stored {
        None => "no row".to_owned(),
        Some(s) if s.deleted => format!("v{} (deleted)", s.version),
        Some(s) => format!("v{} {}", s.version, show(s.data.as_ref())),
    }
}

fn describe_cached(entry: &Cached) -> String {
    match entry.state.as_str() {
        "D" => format!("v{} (deleted)", entry.version),
        _ => format!(
            "v{} {}",
            entry.version,
            show(entry.body.as_ref().and_then(|b| b.get("data")))
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{check, merge_patch};
    use crate::history::{
        Ack, History, ReadOp, ReadOutcome, Region, TokenRef, WriteKind, WriteOp, WriteOutcome,
    };
    use crate::state::{Committed, FinalState, Stored};

    const DOC: &str = "w0-d000";

    /// An acknowledged write of `DOC` as op `id`, sent at `t` and answered 0.1 s later.
    fn write(id: u64, t: f64, kind: WriteKind, version: i64, data: Option<Value>) -> WriteOp {
        let token = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            format!("t1:chaos:{DOC}:{version}:0"),
        );
        WriteOp {
            id,
            writer: 0,
            doc: DOC.to_owned(),
            kind,
            idempotency_key: None,
            trace_id: format!("{id:032x}"),
            invoked: t,
            completed: t + 0.1,
            attempts: 1,
            outcome: WriteOutcome::Acknowledged(Ack {
                status: 200,
                version,
                etag: Some(version),
                token: Some(token),
                data,
                replayed: false,
            }),
            learned: None,
        }
    }

    fn read(region: Region, t: f64, outcome: ReadOutcome, token: Option<i64>) -> ReadOp {
        ReadOp {
            region,
            reader: "reader".to_owned(),
            doc: DOC.to_owned(),
            token: token.map(|version| TokenRef {
                token: String::new(),
                version,
                op: 0,
                delete: false,
            }),
            invoked: t,
            completed: t + 0.01,
            outcome,
            lag_ms: None,
        }
    }

    fn live(version: i64, data: Value) -> ReadOutcome {
        ReadOutcome::Live {
            version,
            etag: Some(version),
            data,
        }
    }

    /// PUT v1, PATCH v2, DELETE v3, committed as acknowledged, both regions at v3.
    fn clean() -> (History, FinalState) {
        let v1 = json!({"a": 1, "b": {"c": 2}});
        let patch = json!({"a": null, "b": {"d": 3}});
        let v2 = json!({"b": {"c": 2, "d": 3}});
        let writes = vec![
            write(1, 1.0, WriteKind::Put(v1.clone()), 1, Some(v1.clone())),
            write(2, 2.0, WriteKind::Patch(patch), 2, Some(v2.clone())),
            write(3, 3.0, WriteKind::Delete, 3, None),
        ];
        let rows = [
            (1, false, Some(v1.clone())),
            (2, false, Some(v2.clone())),
            (3, true, None),
        ];
        let mut state = FinalState::default();
        state.committed.insert(
            DOC.to_owned(),
            rows.iter()
                .map(|(version, deleted, data)| Committed {
                    seq: *version,
                    version: *version,
                    deleted: *deleted,
                    data: data.clone(),
                    trace_id: Some(format!("{version:032x}")),
                    published: true,
                    created_unix_ms: 0.0,
                })
                .collect(),
        );
        let last = Stored {
            version: 3,
            deleted: true,
            data: None,
        };
        state.region1.insert(DOC.to_owned(), last.clone());
        state.region2.insert(DOC.to_owned(), last);
        let reads = vec![
            read(Region::Two, 0.5, ReadOutcome::NotFound, None),
            read(Region::Two, 1.5, live(1, v1), None),
            read(Region::Two, 2.5, live(2, v2.clone()), Some(2)),
            read(Region::One, 2.5, live(2, v2), None),
            read(Region::Two, 3.5, ReadOutcome::NotFound, None),
        ];
        (History { writes, reads }, state)
    }

    fn kinds(history: &History, state: &FinalState) -> Vec<&'static str> {
        check(history, state).iter().map(|v| v.kind).collect()
    }

    #[test]
    fn a_history_that_keeps_every_guarantee_has_no_violation() {
        let (history, state) = clean();
        assert_eq!(
            check(&history, &state).len(),
            0,
            "{:?}",
            check(&history, &state)
        );
    }

    #[test]
    fn an_acknowledged_write_missing_from_region1_is_lost() {
        let (mut history, mut state) = clean();
        state.committed.get_mut(DOC).expect("rows").truncate(2);
        state.region1.insert(
            DOC.to_owned(),
            Stored {
                version: 2,
                deleted: false,
                data: Some(json!({"b": {"c": 2, "d": 3}})),
            },
        );
        state.region2 = state.region1.clone();
        // (A 404 after v2 would now be unexplained too: no delete was committed.)
        history.reads.retain(|r| r.invoked < 3.0);
        assert_eq!(kinds(&history, &state), ["lost-write"]);
    }

    #[test]
    fn a_wrong_merge_is_named() {
        let (mut history, mut state) = clean();
        let wrong = json!({"b": {"d": 3}});
        state.committed.get_mut(DOC).expect("rows")[1].data = Some(wrong.clone());
        if let WriteOutcome::Acknowledged(ack) = &mut history.writes[1].outcome {
            ack.data = Some(wrong.clone());
        }
        history
            .reads
            .retain(|r| !matches!(r.outcome, ReadOutcome::Live { version: 2, .. }));
        assert_eq!(kinds(&history, &state), ["wrong-merge"]);
    }

    #[test]
    fn stale_and_backward_reads_are_named() {
        let (mut history, state) = clean();
        let v1 = json!({"a": 1, "b": {"c": 2}});
        // Older than the token it carried; then older than what the region already answered.
        history
            .reads
            .push(read(Region::Two, 2.7, live(1, v1.clone()), Some(2)));
        // Alive again after the region answered the delete.
        history
            .reads
            .push(read(Region::Two, 3.7, live(1, v1), None));
        assert_eq!(
            kinds(&history, &state),
            ["non-monotonic-read", "stale-token-read", "resurrection"]
        );
    }

    #[test]
    fn merge_patch_follows_the_rfc_7396_examples() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (target, patch, expected) in cases {
            assert_eq!(merge_patch(&target, &patch), expected, "{target} + {patch}");
        }
    }
}

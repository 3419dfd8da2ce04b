//! The run's report: what was done (faults, writes, reads), how the system came back, and every
//! violation by kind with examples, each placed next to the fault that preceded it.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::checker::{FINAL_READER, KINDS, Violation};
use crate::history::{
    COLLECTION, Learned, ReadOp, ReadOutcome, Region, WriteKind, WriteOp, WriteOutcome,
};
use crate::nemesis::FaultRecord;
use crate::state::Committed;
use crate::{Config, Run};

/// How many examples each kind of violation shows.
const EXAMPLES: usize = 3;

/// The violations' kinds with their counts, in the order of [`KINDS`].
pub fn kinds(violations: &[Violation]) -> Vec<(&'static str, usize)> {
    KINDS
        .iter()
        .map(|(kind, _)| (*kind, violations.iter().filter(|v| v.kind == *kind).count()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

pub fn render(config: &Config, run: &Run) -> String {
    let mut out = String::new();
    let shape = &config.shape;
    let _ = writeln!(
        out,
        "\n==== chaos run{}: seed {}, {} s of faults, {} documents ({} writers), {} Region 2 readers, {} Region 1 reader(s); {:.0} s in all",
        if config.partitioned {
            " (partitioned: 2 relays × 3 shares, 3 consumer lanes)"
        } else {
            ""
        },
        config.seed,
        config.fault_time.as_secs(),
        shape.writers * shape.documents_per_writer,
        shape.writers,
        shape.region2_readers,
        shape.region1_readers,
        run.elapsed.as_secs_f64()
    );

    // Faults.
    let mut by_fault: BTreeMap<String, usize> = BTreeMap::new();
    for record in &run.nemesis.faults {
        *by_fault.entry(record.fault.name()).or_default() += 1;
    }
    let _ = writeln!(
        out,
        "faults injected: {} ({})",
        run.nemesis.faults.len(),
        by_fault
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "broker proxy: {} connections forwarded, {} refused and {} dropped by cuts",
        run.proxy.forwarded, run.proxy.refused, run.proxy.dropped
    );
    if !run.nemesis.unplanned_exits.is_empty() {
        let _ = writeln!(
            out,
            "services that exited on their own (restarted): {}",
            run.nemesis
                .unplanned_exits
                .iter()
                .map(|(t, name)| format!("{name} at t={t:.1}s"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // Writes.
    let writes = &run.history.writes;
    let acked: Vec<_> = writes.iter().filter(|w| w.ack().is_some()).collect();
    let keyed = writes
        .iter()
        .filter(|w| w.idempotency_key.is_some())
        .count();
    let retried = writes.iter().filter(|w| w.attempts > 1).count();
    let replayed = acked
        .iter()
        .filter(|w| w.ack().is_some_and(|a| a.replayed))
        .count();
    let refused: Vec<_> = writes
        .iter()
        .filter_map(|w| match &w.outcome {
            WriteOutcome::Refused { status, .. } => Some(*status),
            _ => None,
        })
        .collect();
    let indeterminate: Vec<_> = writes
        .iter()
        .filter(|w| matches!(w.outcome, WriteOutcome::Indeterminate { .. }))
        .collect();
    let committed_by: BTreeMap<&str, i64> = run
        .final_state
        .committed
        .values()
        .flatten()
        .filter_map(|c| c.trace_id.as_deref().map(|t| (t, c.version)))
        .collect();
    let applied = indeterminate
        .iter()
        .filter(|w| committed_by.contains_key(w.trace_id.as_str()))
        .count();
    let missed = indeterminate
        .iter()
        .filter(|w| {
            let Some(version) = committed_by.get(w.trace_id.as_str()) else {
                return false;
            };
            match (&w.learned, &w.kind) {
                (
                    Some(Learned::Live { version: seen }),
                    WriteKind::Put(_) | WriteKind::Patch(_),
                ) => seen < version,
                (Some(Learned::Absent), WriteKind::Delete) => false,
                _ => true,
            }
        })
        .count();
    let by_kind = |kind: &str| writes.iter().filter(|w| w.kind.name() == kind).count();
    let _ = writeln!(
        out,
        "writes: {} sent (PUT {}, PATCH {}, DELETE {}); {} acknowledged; {} with an Idempotency-Key ({} needed retries, {} answered by a replay)",
        writes.len(),
        by_kind("PUT"),
        by_kind("PATCH"),
        by_kind("DELETE"),
        acked.len(),
        keyed,
        retried,
        replayed
    );
    let _ = writeln!(
        out,
        "        {} refused (404 {}, never sent {}, other {}); {} indeterminate, of which {} were committed ({} of those the writer's re-read of Region 1 did not show)",
        refused.len(),
        refused.iter().filter(|s| **s == Some(404)).count(),
        refused.iter().filter(|s| s.is_none()).count(),
        refused
            .iter()
            .filter(|s| s.is_some_and(|s| s != 404))
            .count(),
        indeterminate.len(),
        applied,
        missed
    );
    committed_indeterminate(&mut out, run, &indeterminate);
    let _ = writeln!(
        out,
        "committed versions in Region 1 (outbox rows of {COLLECTION}): {}",
        run.final_state
            .committed
            .values()
            .map(Vec::len)
            .sum::<usize>()
    );

    // Reads.
    for region in [Region::One, Region::Two] {
        let reads: Vec<_> = run
            .history
            .reads
            .iter()
            .filter(|r| r.region == region && !r.reader.starts_with(FINAL_READER))
            .collect();
        let count =
            |f: &dyn Fn(&ReadOutcome) -> bool| reads.iter().filter(|r| f(&r.outcome)).count();
        let with_token: Vec<_> = reads.iter().filter(|r| r.token.is_some()).collect();
        let _ = writeln!(
            out,
            "{} reads: {} (live {}, 404 {}, 503 replication-lag {}, unavailable {}); with a token {} (refused {})",
            region.name(),
            reads.len(),
            count(&|o| matches!(o, ReadOutcome::Live { .. })),
            count(&|o| matches!(o, ReadOutcome::NotFound)),
            count(&|o| matches!(o, ReadOutcome::Lagging)),
            count(&|o| matches!(o, ReadOutcome::Unavailable { .. })),
            with_token.len(),
            with_token
                .iter()
                .filter(|r| matches!(r.outcome, ReadOutcome::Lagging))
                .count(),
        );
    }
    let lags: Vec<u64> = run
        .history
        .reads
        .iter()
        .filter(|r| r.region == Region::Two && !r.reader.starts_with(FINAL_READER))
        .filter_map(|r| r.lag_ms)
        .collect();
    if !lags.is_empty() {
        let mut sorted = lags;
        sorted.sort_unstable();
        let _ = writeln!(
            out,
            "region2 reported lag (X-Tandem-Replication-Lag-Ms on {} answers): median {} ms, p99 {} ms, max {} ms",
            sorted.len(),
            sorted[sorted.len() / 2],
            sorted[sorted.len() * 99 / 100],
            sorted[sorted.len() - 1]
        );
    }
    let checked = run
        .history
        .reads
        .iter()
        .filter(|r| matches!(r.outcome, ReadOutcome::Live { .. } | ReadOutcome::NotFound))
        .count();
    let _ = writeln!(
        out,
        "reads checked: {checked} (every answered read, the final ones included)"
    );
    let _ = match &run.converged {
        Ok(d) => writeln!(
            out,
            "converged: {:.1} s after the last fault was healed",
            d.as_secs_f64()
        ),
        Err(e) => writeln!(
            out,
            "converged: NO, not within {} s: {e}",
            config.converge_within.as_secs()
        ),
    };
    let state = &run.final_state;
    let _ = writeln!(
        out,
        "final state: {} unpublished outbox rows, {} relay dead letters, {} Region 2 dead letters; live Redis entries: region1 {}, region2 {} (cache generations: {}, {})",
        state.unpublished,
        state.relay_dead_letters.len(),
        state.dead_letters.len(),
        state.cache1.len(),
        state.cache2.len(),
        state.generations[0].as_deref().unwrap_or("none"),
        state.generations[1].as_deref().unwrap_or("none"),
    );

    // Violations.
    if run.violations.is_empty() {
        let _ = writeln!(out, "violations: none");
        return out;
    }
    let kinds = kinds(&run.violations);
    let _ = writeln!(
        out,
        "violations: {} of {} kinds",
        run.violations.len(),
        kinds.len()
    );
    for (kind, count) in kinds {
        let meaning = KINDS
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or("", |(_, m)| m);
        let _ = writeln!(out, "  {kind} ({count}): {meaning}");
        let of_kind: Vec<&Violation> = run.violations.iter().filter(|v| v.kind == kind).collect();
        let mut after: BTreeMap<String, usize> = BTreeMap::new();
        for violation in &of_kind {
            let fault = last_fault(&run.nemesis.faults, violation.at)
                .map_or_else(|| "no fault yet".to_owned(), |f| f.fault.name());
            *after.entry(fault).or_default() += 1;
        }
        if of_kind.iter().any(|v| v.at.is_finite()) {
            let _ = writeln!(
                out,
                "    by the last fault before it: {}",
                after
                    .iter()
                    .map(|(f, n)| format!("{f} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for violation in of_kind.iter().take(EXAMPLES) {
            let context = last_fault(&run.nemesis.faults, violation.at)
                .map(|f| {
                    format!(
                        " [last fault: {} t={:.3}–{:.3}s]",
                        f.fault.name(),
                        f.injected,
                        f.healed
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "    {COLLECTION}/{}: {}{context}",
                violation.doc, violation.detail
            );
        }
        if of_kind.len() > EXAMPLES {
            let _ = writeln!(out, "    … and {} more", of_kind.len() - EXAMPLES);
        }
    }
    out
}

/// Each indeterminate write that was committed: when, what the writer's re-read of Region 1
/// answered, and how long Region 1 went on answering the version before it.
fn committed_indeterminate(out: &mut String, run: &Run, indeterminate: &[&WriteOp]) {
    let committed: BTreeMap<&str, &Committed> = run
        .final_state
        .committed
        .values()
        .flatten()
        .filter_map(|c| c.trace_id.as_deref().map(|t| (t, c)))
        .collect();
    for write in indeterminate
        .iter()
        .filter(|w| committed.contains_key(w.trace_id.as_str()))
    {
        let row = committed[write.trace_id.as_str()];
        let at = run.clock.at_unix_ms(row.created_unix_ms);
        let writer = format!("writer-{}", write.writer);
        let reread = run
            .history
            .reads
            .iter()
            .filter(|r| r.reader == writer && r.doc == write.doc && r.invoked >= write.completed)
            .find(|r| matches!(r.outcome, ReadOutcome::Live { .. } | ReadOutcome::NotFound))
            .map_or_else(|| "none".to_owned(), ReadOp::describe);
        // Region 1 answers older than the committed version, after it was committed and
        // before the document's next version.
        let next = run
            .final_state
            .committed
            .get(&write.doc)
            .and_then(|rows| rows.iter().find(|c| c.version == row.version + 1))
            .map_or(f64::INFINITY, |c| run.clock.at_unix_ms(c.created_unix_ms));
        let older: Vec<&ReadOp> = run
            .history
            .reads
            .iter()
            .filter(|r| r.region == Region::One && r.doc == write.doc)
            .filter(|r| r.invoked > at && r.completed < next)
            .filter(|r| match r.outcome {
                ReadOutcome::Live { version, .. } => version < row.version,
                // Deleted at this version: an older 404 cannot be told apart.
                ReadOutcome::NotFound => !row.deleted,
                _ => false,
            })
            .collect();
        let until = older.iter().map(|r| r.completed).fold(f64::NAN, f64::max);
        let _ = writeln!(
            out,
            "        committed though indeterminate: {} op {} on {COLLECTION}/{} sent t={:.3}s, answered t={:.3}s ({}), committed as v{} at t≈{at:.3}s; the writer's re-read: {reread}; before the next version{}, Region 1 answered older than v{} {} times{}",
            write.kind.name(),
            write.id,
            write.doc,
            write.invoked,
            write.completed,
            match &write.outcome {
                WriteOutcome::Indeterminate { detail } => detail.as_str(),
                _ => "",
            },
            row.version,
            if next.is_finite() {
                format!(" (t≈{next:.3}s)")
            } else {
                " (none)".to_owned()
            },
            row.version,
            older.len(),
            if older.is_empty() {
                String::new()
            } else {
                format!(", the last at t={until:.3}s")
            }
        );
    }
}

/// The fault injected most recently before `at` (none for the final checks).
fn last_fault(faults: &[FaultRecord], at: f64) -> Option<&FaultRecord> {
    if !at.is_finite() {
        return None;
    }
    faults.iter().rev().find(|f| f.injected <= at)
}

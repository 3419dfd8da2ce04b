//! The existing operations, reachable from the CLI: the same functions the relay's and the
//! consumer's sub-commands call (`tandem_store::outbox::replay_since`,
//! `tandem_store::replica::redrive`, `tandem_store::migrations::run`).

use serde_json::json;
use tandem_store::cache::{Cache, CacheSettings};
use tandem_store::{migrations, outbox, replica};
use time::OffsetDateTime;

use crate::Outcome;
use crate::config::Connections;
use crate::output::{self, bad, good};

pub async fn replay(
    connections: &Connections,
    since: OffsetDateTime,
    json: bool,
) -> anyhow::Result<Outcome> {
    let pool = connections.region(1).await?;
    let rows = outbox::replay_since(&pool, since).await?;
    if json {
        output::json(&json!({ "since": since.to_string(), "rows": rows }))?;
    } else {
        output::line(&format!(
            "{rows} outbox rows since {since} marked for replay; the active relay publishes them now"
        ));
    }
    Ok(Outcome::Ok)
}

pub async fn redrive(
    connections: &Connections,
    only: Option<i64>,
    json: bool,
) -> anyhow::Result<Outcome> {
    let pool = connections.region(2).await?;
    let cache = match &connections.region2_redis {
        Some(url) => {
            let mut settings = CacheSettings::from_url(url);
            if let Some(prefix) = &connections.redis_key_prefix {
                settings.key_prefix = prefix.clone();
            }
            Some(Cache::new(settings)?)
        }
        None => {
            tracing::warn!(
                "no Region 2 Redis configured (--region2-redis-url): its cache is not updated"
            );
            None
        }
    };
    let results = replica::redrive(&pool, cache.as_ref(), only).await?;
    let still = results
        .iter()
        .filter(|(_, r)| r.starts_with("still poison"))
        .count();
    if json {
        let letters: Vec<_> = results
            .iter()
            .map(|(id, result)| json!({ "id": id, "result": result }))
            .collect();
        output::json(&json!({ "redriven": letters, "still_poison": still }))?;
    } else if results.is_empty() {
        output::line("no dead letters pending");
    } else {
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|(id, result)| {
                let shown = if result.starts_with("still poison") {
                    bad(result)
                } else {
                    good(result)
                };
                vec![id.to_string(), shown]
            })
            .collect();
        output::table(&["ID", "RESULT"], &rows);
    }
    Ok(if still == 0 {
        Outcome::Ok
    } else {
        Outcome::Findings
    })
}

pub async fn dead_letters(connections: &Connections, json: bool) -> anyhow::Result<Outcome> {
    let (one, two) = (connections.region(1).await?, connections.region(2).await?);
    let relay = outbox::relay_dead_letters(&one).await?;
    let apply = replica::list_pending_dead_letters(&two).await?;
    if json {
        output::json(&json!({ "region1_relay": relay, "region2_apply": apply }))?;
    } else {
        output::line(&format!("Region 1 (relay): {} pending", relay.len()));
        if !relay.is_empty() {
            let rows: Vec<Vec<String>> = relay
                .iter()
                .map(|d| {
                    vec![
                        d.seq.to_string(),
                        format!("{}/{}", d.collection, d.document_id),
                        d.version.to_string(),
                        d.dead_lettered_at.to_string(),
                        d.reason.clone(),
                    ]
                })
                .collect();
            output::table(&["SEQ", "DOCUMENT", "VERSION", "AT", "REASON"], &rows);
        }
        output::line(&format!("Region 2 (apply): {} pending", apply.len()));
        if !apply.is_empty() {
            let rows: Vec<Vec<String>> = apply
                .iter()
                .map(|d| {
                    vec![
                        d.id.to_string(),
                        format!("{}[{}]@{}", d.topic, d.partition, d.offset),
                        d.received_at.to_string(),
                        d.reason.clone(),
                    ]
                })
                .collect();
            output::table(&["ID", "RECORD", "AT", "REASON"], &rows);
        }
    }
    Ok(if relay.is_empty() && apply.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Findings
    })
}

pub async fn migrate(connections: &Connections, region: u8) -> anyhow::Result<Outcome> {
    let pool = connections.region(region).await?;
    migrations::run(&pool).await?;
    let version = migrations::applied_version(&pool).await?;
    output::line(&format!(
        "Region {region}'s schema is at version {}",
        version.unwrap_or(0)
    ));
    Ok(Outcome::Ok)
}

/// `tandem lost-writes`: the quarantined events of both regions (a region that does not answer
/// is reported, the other still listed), with the failover's measured RPO per write epoch.
pub async fn lost_writes(connections: &Connections, json: bool) -> anyhow::Result<Outcome> {
    let mut all = Vec::new();
    let mut unreachable = Vec::new();
    for region in [1u8, 2] {
        let listed = async {
            let pool = connections.region(region).await?;
            anyhow::Ok(replica::lost_writes(&pool).await?)
        }
        .await;
        match listed {
            Ok(writes) => all.extend(writes.into_iter().map(|w| (format!("region{region}"), w))),
            Err(e) => unreachable.push((format!("region{region}"), format!("{e:#}"))),
        }
    }
    // Per superseding write epoch: how many writes were lost and over which span.
    let mut rpo: std::collections::BTreeMap<
        i64,
        (usize, time::OffsetDateTime, time::OffsetDateTime),
    > = std::collections::BTreeMap::new();
    for (_, w) in &all {
        let slot = rpo
            .entry(w.superseded_by)
            .or_insert((0, w.event_time, w.event_time));
        slot.0 += 1;
        slot.1 = slot.1.min(w.event_time);
        slot.2 = slot.2.max(w.event_time);
    }
    if json {
        output::json(&json!({
            "lost_writes": all.iter().map(|(region, w)| json!({"quarantined_in": region, "write": w})).collect::<Vec<_>>(),
            "by_write_epoch": rpo.iter().map(|(epoch, (n, first, last))| json!({
                "superseded_by": epoch,
                "writes": n,
                "first": first.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                "last": last.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            })).collect::<Vec<_>>(),
            "unreachable": unreachable.iter().map(|(r, e)| json!({"region": r, "error": e})).collect::<Vec<_>>(),
        }))?;
    } else {
        for (region, error) in &unreachable {
            output::line(&format!("{region}: not reachable ({error})"));
        }
        output::line(&format!("{} lost writes quarantined", all.len()));
        for (epoch, (n, first, last)) in &rpo {
            output::line(&format!(
                "  superseded by write epoch {epoch}: {n} writes committed from {first} to {last}"
            ));
        }
        if !all.is_empty() {
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|(region, w)| {
                    vec![
                        w.event_id.to_string(),
                        format!("{}/{}", w.collection, w.document_id),
                        w.version.to_string(),
                        format!("{} @ {}", w.origin, w.write_epoch),
                        w.event_time.to_string(),
                        region.clone(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "EVENT",
                    "DOCUMENT",
                    "VERSION",
                    "WRITTEN IN",
                    "AT",
                    "KEPT IN",
                ],
                &rows,
            );
        }
    }
    if let Some((region, _)) = unreachable.first() {
        anyhow::bail!("{region}'s database did not answer: its quarantine is not listed");
    }
    Ok(if all.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Findings
    })
}

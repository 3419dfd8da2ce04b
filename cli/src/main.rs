//! `tandem`, the operator's CLI: one binary for what an operator asks of a two-region system.
//! Is it healthy (`status`), are the regions really equal (`verify`, `repair`), and the
//! existing operations (`replay`, `redrive`, `dead-letters`, `migrate`).
//!
//! # Layout
//!
//! A top layer, like the functions and consumers: it uses `tandem-store` (every SQL statement
//! it runs lives there), `tandem-runtime` and `tandem-core`, and never another binary's crate
//! (`scripts/check-layers.py`). Output goes to stdout (tables, or JSON with `--json`);
//! errors, logs and the progress line go to stderr.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod broker;
mod config;
mod ops;
mod output;
mod repair;
mod status;
mod switchover;
mod verify;

use config::Connections;

/// What the exit code says: scripts rely on it (README, "The tandem CLI").
pub enum Outcome {
    /// 0: all is well (healthy, equal, done).
    Ok,
    /// 1: the command ran and found something (differences, unhealthy, dead letters).
    Findings,
}

const EXIT_CODES: &str = "\
Exit codes:
  0  ok: healthy, regions equal, operation done
  1  findings: differences, unhealthy, dead letters pending, something not repaired
  2  usage error (bad arguments or configuration)
  3  could not reach a dependency (a database, Redis, the Kafka broker), or an operation failed

Configuration: flags, else their environment variables, else `.tandem/stack.json` (written by
`make up`, looked up from the current directory upwards), so `tandem status` just works
against `make up`.";

#[derive(Parser)]
#[command(name = "tandem", version, about = "Operate a Tandem two-region system", after_help = EXIT_CODES)]
struct Cli {
    #[command(flatten)]
    connections: config::Args,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per region: role, leader epochs, replication lag, relay backlog, each partition's applied
    /// position against the broker's high watermark, dead letters, the last housekeeping pass,
    /// schema version. Exit 1 when lag is over the limit or dead letters wait; 3 when a
    /// database or the broker cannot be reached (after printing everything else).
    Status {
        #[arg(long)]
        json: bool,
        /// Replication lag above which Region 2 counts as unhealthy.
        #[arg(
            long,
            env = "TANDEM_MAX_REPLICATION_LAG_MS",
            default_value_t = 5000,
            value_name = "MS"
        )]
        max_lag_ms: i64,
    },
    /// Republish the retained outbox rows written since T (after a broker lost its data).
    Replay {
        /// RFC 3339 time, e.g. 2026-11-25T08:00:00Z.
        #[arg(long, value_name = "T", value_parser = parse_time)]
        since: time::OffsetDateTime,
        #[arg(long)]
        json: bool,
    },
    /// Decide whether Region 2 equals Region 1 (range hashes in each database; only differing
    /// ranges are descended), re-checking each difference after Region 2 caught up. Exit 1
    /// when they differ.
    Verify {
        /// Only this collection.
        #[arg(long, value_name = "C")]
        collection: Option<String>,
        #[arg(long)]
        json: bool,
        /// How long to wait for Region 2 to catch up before re-checking a difference.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        catch_up_timeout: u64,
    },
    /// Verify, then fix only the differing documents: re-emit Region 1's current state of
    /// each through the outbox as a repair event (a purge for a document only Region 2 has),
    /// which Region 2's apply takes under its usual guards. Never writes Region 2. Exit 1 when
    /// something could not be repaired.
    Repair {
        /// Only this collection.
        #[arg(long, value_name = "C")]
        collection: Option<String>,
        /// Report what would be repaired; enqueue nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        /// How long verify waits for Region 2 to catch up before re-checking a difference.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        catch_up_timeout: u64,
    },
    /// Re-apply Region 2's dead letters (all pending, or one) under the usual guards.
    Redrive {
        #[arg(long, value_name = "N")]
        id: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// List the dead letters pending on each side (relay in Region 1, apply in Region 2).
    /// Exit 1 when there are any.
    DeadLetters {
        #[arg(long)]
        json: bool,
    },
    /// Move the write region to the other region with no acknowledged write lost: fence the
    /// write region's writes, wait until the target applied everything before the fence, then
    /// record the target as the write region of the next write epoch in both databases. Writes
    /// get 503 with Retry-After meanwhile. Exit 3 when it cannot (nothing changed, or run it
    /// again to finish).
    Switchover {
        /// The region that becomes the write region.
        #[arg(long, value_parser = ["region1", "region2"], value_name = "region1|region2")]
        to: String,
        /// How long to wait for the target to apply the fenced region's last writes before
        /// giving up (the fence is then lifted).
        #[arg(long, default_value_t = 30, value_name = "SECONDS")]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Promote a region while the write region is lost, accepting the loss of what it
    /// committed and the target never applied (an operator's decision: a health check alone
    /// never promotes). The old write region is fenced if its database still answers; when it
    /// returns it learns the new write epoch from the target's stream and becomes a follower,
    /// and its lost writes are quarantined (`tandem lost-writes`).
    Failover {
        /// The region that becomes the write region.
        #[arg(long, value_parser = ["region1", "region2"], value_name = "region1|region2")]
        to: String,
        /// Required: the writes the target never received are lost to it (quarantined).
        #[arg(long)]
        allow_data_loss: bool,
        /// How long to try the old write region's database before going on without it.
        #[arg(long, default_value_t = 5, value_name = "SECONDS")]
        reach_timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// List the quarantined writes: events of a deposed write region that the write region
    /// never applied (its lost tail after a failover), with their original payloads (`--json`
    /// exports them whole). Exit 1 when there are any.
    LostWrites {
        #[arg(long)]
        json: bool,
    },
    /// Apply pending schema migrations to one region's database.
    Migrate {
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2), value_name = "1|2")]
        region: u8,
    },
}

/// The write region's database and the follower's: Region 1's and Region 2's, unless Region
/// 2's database records itself as the write region (after a switchover or failover). Verify
/// and repair compare the follower against the write region and repair it through the write
/// region's outbox, whichever region that is.
async fn by_role(
    connections: &Connections,
) -> anyhow::Result<(deadpool_postgres::Pool, deadpool_postgres::Pool)> {
    let (one, two) = (connections.region(1).await?, connections.region(2).await?);
    let two_writes = tandem_store::roles::current(&two)
        .await?
        .is_some_and(|r| r.write_region == r.region);
    Ok(if two_writes { (two, one) } else { (one, two) })
}

fn parse_time(value: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time ({e})"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tandem_runtime::telemetry::init_cli();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let connections = match Connections::resolve(&cli.connections) {
        Ok(connections) => connections,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli.command, connections)) {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::Findings) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
    }
}

async fn run(command: Command, connections: Connections) -> anyhow::Result<Outcome> {
    match command {
        Command::Status { json, max_lag_ms } => status::run(&connections, json, max_lag_ms).await,
        Command::Verify {
            collection,
            json,
            catch_up_timeout,
        } => {
            let (one, two) = by_role(&connections).await?;
            let report = verify::Verifier::new(
                &one,
                &two,
                collection,
                std::time::Duration::from_secs(catch_up_timeout),
            )
            .run()
            .await?;
            if json {
                output::json(&report)?;
            } else {
                verify::print(&report);
            }
            Ok(if report.equal {
                Outcome::Ok
            } else {
                Outcome::Findings
            })
        }
        Command::Repair {
            collection,
            dry_run,
            json,
            catch_up_timeout,
        } => {
            let (one, two) = by_role(&connections).await?;
            let report = repair::run(
                &one,
                &two,
                collection,
                std::time::Duration::from_secs(catch_up_timeout),
                dry_run,
            )
            .await?;
            if json {
                output::json(&report)?;
            } else {
                repair::print(&report);
            }
            Ok(repair::outcome(&report))
        }
        Command::Replay { since, json } => ops::replay(&connections, since, json).await,
        Command::Redrive { id, json } => ops::redrive(&connections, id, json).await,
        Command::DeadLetters { json } => ops::dead_letters(&connections, json).await,
        Command::Migrate { region } => ops::migrate(&connections, region).await,
        Command::Failover {
            to,
            allow_data_loss,
            reach_timeout,
            json,
        } => {
            if !allow_data_loss {
                anyhow::bail!(
                    "a failover loses what the write region committed and {to} never applied: pass --allow-data-loss \
                     to accept that, or use `tandem switchover --to {to}` while the write region is up (no loss)"
                );
            }
            let (to_n, from_n, from) = if to == "region1" {
                (1, 2, "region2")
            } else {
                (2, 1, "region1")
            };
            let to_pool = connections.region(to_n).await?;
            let from_pool = connections.region(from_n).await.ok();
            let report = switchover::failover(
                from_pool.as_ref(),
                &to_pool,
                from,
                &to,
                std::time::Duration::from_secs(reach_timeout),
            )
            .await?;
            if json {
                output::json(&report)?;
            } else {
                switchover::print_failover(&report);
            }
            Ok(Outcome::Ok)
        }
        Command::LostWrites { json } => ops::lost_writes(&connections, json).await,
        Command::Switchover { to, timeout, json } => {
            let (one, two) = (connections.region(1).await?, connections.region(2).await?);
            let (from_pool, to_pool, from) = if to == "region1" {
                (&two, &one, "region2")
            } else {
                (&one, &two, "region1")
            };
            let report = switchover::run(
                from_pool,
                to_pool,
                from,
                &to,
                std::time::Duration::from_secs(timeout),
            )
            .await?;
            if json {
                output::json(&report)?;
            } else {
                switchover::print(&report);
            }
            Ok(Outcome::Ok)
        }
    }
}

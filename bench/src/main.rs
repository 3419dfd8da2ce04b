//! `tandem-bench [--quick] [--out docs/benchmarks.md]`: starts the whole two-region system from
//! the release (or debug) binaries next to it, measures what issue 5 (and issue 13, for write
//! forwarding, and issue 14, for `tandem verify`) asks for, each figure next to a baseline
//! measured in the same run on the same machine, and prints the table.
//!
//! `--quick` runs the same code with tiny sizes (the test suite runs it so the benchmark never
//! rots); its figures are not meant to be read. `--out` writes the Markdown report, replacing
//! only the generated part of an existing file so the analysis written around it stays.
#![allow(clippy::print_stdout)]

mod backlog;
mod cpu;
mod footprint;
mod forward;
mod lag;
mod load;
mod profile;
mod proxy;
mod read;
mod report;
mod scale;
mod stack;
mod verify;
mod write;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use load::Amount;
use stack::{Kind, Stack};

/// How much each measurement sends.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub quick: bool,
    pub write_amount: Amount,
    pub write_keys: u64,
    pub read_amount: Amount,
    pub read_docs: u64,
    pub miss_docs: u64,
    pub backlog: u64,
    pub lag_rate: f64,
    pub lag_duration: Duration,
    pub startup_runs: usize,
    /// Documents in each region for `tandem verify`.
    pub verify_docs: u64,
}

impl Sizes {
    fn full() -> Self {
        Self {
            quick: false,
            write_amount: Amount::For(Duration::from_secs(15)),
            write_keys: 10_000,
            read_amount: Amount::For(Duration::from_secs(15)),
            read_docs: 1_000,
            miss_docs: 20_000,
            backlog: 100_000,
            lag_rate: 200.0,
            lag_duration: Duration::from_secs(30),
            startup_runs: 3,
            verify_docs: 1_000_000,
        }
    }

    fn quick() -> Self {
        Self {
            quick: true,
            write_amount: Amount::Requests(200),
            write_keys: 200,
            read_amount: Amount::Requests(500),
            read_docs: 100,
            miss_docs: 200,
            backlog: 1_000,
            lag_rate: 100.0,
            lag_duration: Duration::from_secs(2),
            startup_runs: 1,
            verify_docs: 3_000,
        }
    }
}

/// The ~1 KiB JSON object every benchmark writes (no `:` before a letter, so that pgbench
/// takes it literally).
pub fn document_json() -> String {
    serde_json::json!({
        "title": "benchmark document",
        "kind": "bench",
        "n": 42,
        "tags": ["alpha", "beta", "gamma"],
        "text": "The quick brown fox jumps over the lazy dog. ".repeat(20),
    })
    .to_string()
}

fn say(message: &str) {
    eprintln!("\x1b[1m==> {message}\x1b[0m");
}

fn usage() -> ! {
    eprintln!("usage: tandem-bench [--quick] [--out <file.md>]");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if args.first().map(String::as_str) == Some("bare-server") {
        let (Some(port), Some(body)) = (args.get(1).and_then(|p| p.parse().ok()), args.get(2))
        else {
            usage()
        };
        if let Err(e) = runtime.block_on(read::bare_server(port, body)) {
            eprintln!("bare-server: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let mut quick = false;
    let mut out: Option<PathBuf> = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => out = Some(rest.next().unwrap_or_else(|| usage()).into()),
            _ => usage(),
        }
    }
    let mut sizes = if quick { Sizes::quick() } else { Sizes::full() };
    // Experiments: another lag rate or duration, another number of documents to verify.
    let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<f64>().ok());
    if let Some(rate) = number("TANDEM_BENCH_LAG_RATE").filter(|r| *r > 0.0) {
        sizes.lag_rate = rate;
    }
    if let Some(seconds) = number("TANDEM_BENCH_LAG_SECONDS").filter(|s| *s > 0.0) {
        sizes.lag_duration = Duration::from_secs_f64(seconds);
    }
    if let Some(docs) = number("TANDEM_BENCH_VERIFY_DOCS").filter(|d| *d >= 100.0) {
        sizes.verify_docs = docs as u64;
    }
    let started = Instant::now();
    match runtime.block_on(bench(&sizes)) {
        Ok(report) => {
            let elapsed = started.elapsed();
            let markdown = report.markdown(&sizes, elapsed);
            println!("{markdown}");
            if let Some(path) = out {
                if let Err(e) = report::write(&path, &markdown) {
                    eprintln!("cannot write {}: {e:#}", path.display());
                    std::process::exit(1);
                }
                say(&format!("report written to {}", path.display()));
            }
            say(&format!(
                "benchmark finished in {:.0} s{}",
                elapsed.as_secs_f64(),
                if quick {
                    " (quick mode: sizes too small for the figures to mean anything)"
                } else {
                    ""
                }
            ));
        }
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            std::process::exit(1);
        }
    }
    // Watchdogs stop every server when this process exits.
    runtime.shutdown_timeout(Duration::from_secs(5));
}

async fn bench(sizes: &Sizes) -> anyhow::Result<report::Report> {
    let mut report = report::Report {
        machine: footprint::machine(),
        ..report::Report::default()
    };
    say("starting PostgreSQL ×2, Redis ×2 and the Kafka broker");
    let mut stack = Stack::start().await?;
    if profile::enabled() {
        say("TANDEM_BENCH_PROFILE: restarting PostgreSQL with pg_stat_statements");
        profile::enable(&mut stack).await?;
        report
            .machine
            .push("- profiling: pg_stat_statements loaded (TANDEM_BENCH_PROFILE)".to_owned());
    }
    let stack = stack;

    say("6. start-up times (exec → first 200 on /healthz)");
    for kind in [Kind::Write, Kind::Read1, Kind::Relay, Kind::Consumer] {
        let mut runs = Vec::new();
        for _ in 0..sizes.startup_runs {
            let (time, idle) = stack.startup_time(kind).await?;
            runs.push(time);
            if let Some(idle) = idle {
                report.idle.retain(|(k, _)| *k != kind);
                report.idle.push((kind, idle));
            }
        }
        runs.sort();
        report.startup.push((kind, runs[runs.len() / 2]));
    }

    say("starting Region 1's Write and Read APIs");
    let write_api = stack.spawn(Kind::Write).await?;
    let read1 = stack.spawn(Kind::Read1).await?;

    let probes = stack.probes();
    report.extra_env = stack::extra_env();

    // TANDEM_BENCH_ONLY=write,forward,read,backlog,lag,verify runs only those measurements (experiments).
    let only = std::env::var("TANDEM_BENCH_ONLY").unwrap_or_default();
    let runs = |phase: &str| only.trim().is_empty() || only.split(',').any(|p| p.trim() == phase);

    if runs("write") {
        say("1. write throughput: Write API vs pgbench with the same transaction");
    }
    if runs("write") || runs("forward") {
        write::prepare(&stack, sizes.write_keys).await?;
    }
    let api_meter = cpu::Meter::default()
        .with("Write API", write_api.probe())
        .with("PostgreSQL", probes.pg1)
        .with("Redis", probes.redis1)
        .with("load generator", Some(cpu::Probe::LoadGenerator));
    let pgbench_meter = cpu::Meter::default()
        .with("PostgreSQL", probes.pg1)
        .with("pgbench", Some(cpu::Probe::WaitedChildren));
    for concurrency in [16, 64].into_iter().filter(|_| runs("write")) {
        report
            .writes
            .push(write::run(&stack, sizes, concurrency, &api_meter, &pgbench_meter).await?);
    }

    // Before the outbox is cleared: the forwarded writes commit in Region 1 like the others.
    if runs("forward") {
        say("8. write forwarding: Region 2's Write API forwarding to Region 1's vs Region 1's");
        let write2 = stack.spawn(Kind::Write2).await?;
        report.forward = Some(forward::run(&stack, sizes, &write_api, &write2, &probes).await?);
        report.loaded_memory(&write2);
    }

    if runs("read") {
        say("3. read throughput: cache hits vs a bare server, cache misses vs a point SELECT");
        report.read = Some(read::run(&stack, sizes, &read1, &probes).await?);
    }

    // Nothing relayed the benchmark writes so far: they are not part of what follows.
    write::clear_outbox(&stack).await?;
    let relay = stack.spawn(Kind::Relay).await?;
    wait_leader(&stack, &relay).await?;
    let mut consumer = stack.spawn(Kind::Consumer).await?;
    let read2 = stack.spawn(Kind::Read2).await?;

    if let Some(read) = report.read.as_mut() {
        say("3. read throughput in Region 2: cache hits of replicated documents");
        read.near = Some(read::region2_hits(&stack, sizes, &read2, &probes).await?);
    }

    // The lag is measured on a short topic: the broker's memory engine gets slower per request
    // as a partition grows, so measuring after the 100k-event backlog would time the broker.
    if runs("lag") {
        say("2. replication lag: open-loop writes vs a raw produce → consume round trip");
        let meter = cpu::Meter::default()
            .with("Write API", write_api.probe())
            .with("relay", relay.probe())
            .with("consumer", consumer.probe())
            .with("Read API 2 (polled)", read2.probe())
            .with("PostgreSQL 1", probes.pg1)
            .with("PostgreSQL 2", probes.pg2)
            .with("Redis 1", probes.redis1)
            .with("Redis 2", probes.redis2)
            .with("broker", probes.broker)
            .with("load generator", Some(cpu::Probe::LoadGenerator));
        report.lag = Some(
            lag::run(
                &stack,
                sizes.lag_rate,
                sizes.lag_duration,
                &meter,
                probes.broker,
            )
            .await?,
        );
    }

    if runs("backlog") {
        // The consumer stops so that the relay's output piles up in Kafka as a backlog.
        drop(consumer);
        say("4. relay drain: outbox backlog vs a raw producer");
        let (drain, states) = backlog::relay_drain(&stack, sizes.backlog, &relay, &probes).await?;
        report.drain = Some(drain);

        say("5. Region 2 catch-up: consumer on the backlog vs batched INSERT … ON CONFLICT");
        let (catch_up, restarted) = backlog::catch_up(&stack, &states, &probes).await?;
        report.catch_up = Some(catch_up);
        consumer = restarted;
    }

    if runs("scale") {
        report.scale = scale::run(&stack, sizes.backlog, &probes).await?;
    }

    // Last: verify re-checks its differences through the running relay and consumer.
    if runs("verify") {
        say(&format!(
            "7. verify: tandem verify of {} documents vs dumping and comparing both tables",
            sizes.verify_docs
        ));
        report.verify = Some(verify::run(&stack, sizes.verify_docs, &probes).await?);
    }

    for service in [&write_api, &read1, &relay, &consumer, &read2] {
        report.loaded_memory(service);
    }
    report.sizes(&stack.dir);
    stack::keep_logs(&stack.dir);
    Ok(report)
}

/// Waits until the relay holds the leader lock (its `/readyz` says so).
async fn wait_leader(stack: &Stack, relay: &stack::Service) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = stack
            .http
            .get(format!("{}/readyz", relay.url))
            .send()
            .await?
            .text()
            .await?;
        if body.contains("\"leader\"") {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay never became leader:\n{}",
            relay.process.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

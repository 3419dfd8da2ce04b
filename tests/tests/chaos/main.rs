//! "Region 2 never lies": a Jepsen-style check of the whole two-region system.
//!
//! A dedicated system (its own PostgreSQL clusters, Redis servers, broker and every Tandem
//! service as a real process; `tandem_tests::chaos`) takes a seeded workload of writers and
//! readers while a seeded nemesis kills, freezes and cuts off its parts one at a time. Every
//! operation is recorded; after healing and converging, the checker judges the whole history and
//! the final state against the guarantees (see `checker::KINDS` and docs/chaos.md) and prints
//! a report naming every violation.
//!
//! `make test` runs the one-minute run; `make chaos` the long one (`TANDEM_CHAOS_SEED`,
//! `TANDEM_CHAOS_SECONDS`).

mod checker;
mod history;
mod nemesis;
mod report;
mod state;
mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use history::{Clock, History, Region};
use tandem_tests::chaos::ChaosSystem;
use workload::{Context, Shape};

/// One run's parameters.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    /// How long the workload and the nemesis run.
    pub fault_time: Duration,
    /// The nemesis goes on (up to twice `fault_time`) until it injected this many faults.
    pub min_faults: usize,
    pub shape: Shape,
    /// The bound on Region 2's convergence after healing.
    pub converge_within: Duration,
    /// Two relays sharing the outbox and a consumer with lanes
    /// (`ChaosSystem::start_partitioned`); `TANDEM_CHAOS_PARTITIONED=1` for `make chaos`.
    pub partitioned: bool,
}

impl Config {
    fn with(seed: u64, fault_time: Duration) -> Self {
        Self {
            seed,
            fault_time,
            min_faults: 0,
            shape: Shape {
                writers: 4,
                documents_per_writer: 60,
                region2_readers: 3,
                region1_readers: 1,
                keyed_share: 0.3,
                token_share: 0.5,
                max_writes_per_writer: 200_000,
            },
            converge_within: Duration::from_secs(120),
            partitioned: false,
        }
    }

    /// `make test`'s run: a minute of faults, every kind once at least, a fixed seed
    /// (`TANDEM_CHAOS_SEED` overrides).
    fn short() -> Self {
        let seed = env_u64("TANDEM_CHAOS_SEED").unwrap_or(20_261_125);
        Self {
            min_faults: tandem_tests::chaos::Fault::all().len(),
            ..Self::with(seed, Duration::from_secs(60))
        }
    }

    /// `make chaos`'s run: `TANDEM_CHAOS_SEED` (default: random, printed) and
    /// `TANDEM_CHAOS_SECONDS` (default 300).
    fn long() -> Self {
        let seed = env_u64("TANDEM_CHAOS_SEED").unwrap_or_else(|| u64::from(rand::random::<u32>()));
        let seconds = env_u64("TANDEM_CHAOS_SECONDS").unwrap_or(300);
        Self {
            partitioned: env_u64("TANDEM_CHAOS_PARTITIONED").is_some_and(|p| p != 0),
            ..Self::with(seed, Duration::from_secs(seconds))
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={value:?} is not a number"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn region2_never_lies_through_a_minute_of_faults() {
    run_and_judge(Config::short()).await;
}

/// The same minute in the partitioned mode: two relays sharing the outbox (the faults hit one;
/// the other takes its shares) and a consumer applying in three lanes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn region2_never_lies_with_partitioned_relays_and_consumer_lanes() {
    let config = Config::short();
    run_and_judge(Config {
        seed: config.seed + 1,
        partitioned: true,
        ..config
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "minutes long; `make chaos` runs it"]
async fn region2_never_lies_through_a_long_seeded_run() {
    run_and_judge(Config::long()).await;
}

/// Runs, checks, prints the report (also to `TANDEM_CHAOS_REPORT` when set) and fails on any
/// violation.
async fn run_and_judge(config: Config) {
    eprintln!(
        "chaos: seed {} ({} s of faults); rerun with TANDEM_CHAOS_SEED={}",
        config.seed,
        config.fault_time.as_secs(),
        config.seed
    );
    let starting = Instant::now();
    let mut system = if config.partitioned {
        ChaosSystem::start_partitioned().await
    } else {
        ChaosSystem::start().await
    }
    .expect("the chaos system did not start");
    eprintln!(
        "chaos: system up in {:.1} s (logs in {})",
        starting.elapsed().as_secs_f64(),
        system.dir.display()
    );
    let run = run(&mut system, &config).await;
    let text = report::render(&config, &run);
    eprintln!("{text}");
    if let Some(path) = std::env::var_os("TANDEM_CHAOS_REPORT") {
        std::fs::write(&path, &text).expect("write the chaos report");
    }
    if !run.violations.is_empty() {
        system.keep_logs = true;
        panic!(
            "Region 2 lied (or Region 1 did): {} violations of {} kinds; the report above names each. Seed {}.",
            run.violations.len(),
            report::kinds(&run.violations).len(),
            config.seed
        );
    }
}

/// Everything a run produced.
pub struct Run {
    pub history: History,
    pub nemesis: nemesis::NemesisLog,
    pub converged: Result<Duration, String>,
    pub final_state: state::FinalState,
    pub violations: Vec<checker::Violation>,
    pub proxy: tandem_tests::proxy::ProxyStats,
    pub clock: Clock,
    pub elapsed: Duration,
}

async fn run(system: &mut ChaosSystem, config: &Config) -> Run {
    let started = Instant::now();
    warm_up(system).await;
    let clock = Clock::new();
    let context = Context::new(
        clock,
        config.seed,
        config.shape.clone(),
        [system.write.url(), system.read1.url(), system.read2.url()],
        system.token.clone(),
    )
    .expect("HTTP clients");
    let writers: Vec<_> = (0..config.shape.writers)
        .map(|w| tokio::spawn(workload::run_writer(context.clone(), w)))
        .collect();
    let mut readers: Vec<_> = (0..config.shape.region2_readers)
        .map(|i| tokio::spawn(workload::run_reader(context.clone(), Region::Two, i)))
        .collect();
    readers.extend(
        (0..config.shape.region1_readers)
            .map(|i| tokio::spawn(workload::run_reader(context.clone(), Region::One, i))),
    );

    let nemesis = nemesis::run(
        system,
        config.seed,
        clock,
        config.fault_time,
        config.min_faults,
    )
    .await;
    context.stop();
    let nemesis = match nemesis {
        Ok(log) => log,
        Err(e) => panic!("the nemesis failed: {e:#}\n{}", system.log_tails()),
    };
    let mut history = History::default();
    for writer in writers {
        let (mut writes, mut reads) = writer.await.expect("a writer panicked");
        history.writes.append(&mut writes);
        history.reads.append(&mut reads);
    }
    for reader in readers {
        history
            .reads
            .append(&mut reader.await.expect("a reader panicked"));
    }
    eprintln!(
        "[t={:7.3}s] workload over: {} writes, {} reads; waiting for Region 2 to converge",
        clock.now(),
        history.writes.len(),
        history.reads.len()
    );
    let mut nemesis = nemesis;
    for name in system
        .revive_exited()
        .await
        .expect("restart exited services")
    {
        nemesis.unplanned_exits.push((clock.now(), name));
    }
    let converged = state::wait_converged(system, config.converge_within).await;
    if let Err(e) = &converged {
        eprintln!("Region 2 did not converge: {e}\n{}", system.log_tails());
    }
    final_reads(&context, &mut history).await;
    let final_state = state::gather(system)
        .await
        .expect("could not read the final state");
    let violations = checker::check(&history, &final_state);
    let mut violations = violations;
    // The broker is durable (killed and restarted, never wiped) and nothing here replays: a
    // consumer that re-read a partition from the beginning took a restart for data loss.
    let rereads = std::fs::read_to_string(&system.consumer.log)
        .unwrap_or_default()
        .matches("reading it from the beginning")
        .count();
    if rereads > 0 {
        violations.push(checker::Violation {
            kind: "partition-reread",
            doc: "-".to_owned(),
            at: f64::INFINITY,
            detail: format!("the consumer re-read a partition {rereads} times; nothing was lost"),
        });
    }
    if let Err(e) = &converged {
        violations.push(checker::Violation {
            kind: "no-convergence",
            doc: "-".to_owned(),
            at: f64::INFINITY,
            detail: format!("not within {:?}: {e}", config.converge_within),
        });
    }
    Run {
        history,
        nemesis,
        converged,
        final_state,
        violations,
        proxy: system.proxy.stats(),
        clock,
        elapsed: started.elapsed(),
    }
}

/// One write replicated end to end before any fault, so that a broken set-up is not mistaken
/// for a finding.
async fn warm_up(system: &ChaosSystem) {
    let client = reqwest::Client::new();
    let written = client
        .put(format!("{}/v1/warmup/first", system.write.url()))
        .bearer_auth(&system.token)
        .json(&serde_json::json!({"warm": true}))
        .send()
        .await
        .expect("the warm-up write");
    assert!(
        written.status().is_success(),
        "the warm-up write failed: {}\n{}",
        written.status(),
        system.log_tails()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let read = client
            .get(format!("{}/v1/warmup/first", system.read2.url()))
            .send()
            .await;
        if read.is_ok_and(|r| r.status() == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the warm-up write never reached Region 2 (before any fault)\n{}",
            system.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After convergence: every document read from both Read APIs, twice (the second read is a
/// cache hit if the first filled the cache), and from Region 2 with its latest token.
async fn final_reads(context: &Arc<Context>, history: &mut History) {
    let reader = checker::FINAL_READER;
    for doc in context.documents() {
        for region in [Region::One, Region::One, Region::Two, Region::Two] {
            history
                .reads
                .push(context.read(region, reader, &doc, None).await);
        }
        if let Some(token) = context.latest_token(&doc) {
            history
                .reads
                .push(context.read(Region::Two, reader, &doc, Some(token)).await);
        }
    }
}

//! The nemesis: one fault at a time, each held for 1–3 s and then healed, in an order fixed by
//! the seed. Every fault the system supports comes once per round, in a shuffled order, so a
//! one-minute run meets each of them.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tandem_tests::chaos::{ChaosSystem, Fault};

use crate::history::Clock;

/// One planned fault.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub fault: Fault,
    pub hold: Duration,
    /// The quiet time after healing, before the next fault.
    pub gap: Duration,
}

/// The seed's endless sequence of faults.
pub fn schedule(seed: u64) -> impl Iterator<Item = Step> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x004e_454d_4553_4953);
    let mut round: Vec<Fault> = Vec::new();
    std::iter::from_fn(move || {
        if round.is_empty() {
            round = Fault::all();
            round.shuffle(&mut rng);
        }
        let fault = round.pop()?;
        Some(Step {
            fault,
            hold: Duration::from_millis(rng.random_range(1000..=3000)),
            gap: Duration::from_millis(rng.random_range(300..=800)),
        })
    })
}

/// What the nemesis did.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub fault: Fault,
    pub injected: f64,
    pub healed: f64,
}

#[derive(Debug, Default)]
pub struct NemesisLog {
    pub faults: Vec<FaultRecord>,
    /// Services that exited on their own and were restarted (`(time, name)`).
    pub unplanned_exits: Vec<(f64, &'static str)>,
}

/// Injects faults for `duration` (no fault starts that would outlast it), healing each; goes
/// on past it (up to twice as long) until at least `min_faults` were injected.
pub async fn run(
    system: &mut ChaosSystem,
    seed: u64,
    clock: Clock,
    duration: Duration,
    min_faults: usize,
) -> anyhow::Result<NemesisLog> {
    let started = Instant::now();
    let mut log = NemesisLog::default();
    // A calm start: the clients' first writes see a healthy system.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for step in schedule(seed) {
        let end = started.elapsed() + step.hold;
        let enough = log.faults.len() >= min_faults;
        if (enough && end > duration) || end > duration * 2 {
            break;
        }
        let injected = clock.now();
        eprintln!(
            "[t={injected:7.3}s] nemesis: {} for {:?}",
            step.fault.name(),
            step.hold
        );
        system.inject(step.fault).await?;
        tokio::time::sleep(step.hold).await;
        heal(system, step.fault).await?;
        let healed = clock.now();
        log.faults.push(FaultRecord {
            fault: step.fault,
            injected,
            healed,
        });
        for name in system.revive_exited().await? {
            eprintln!(
                "[t={:7.3}s] nemesis: {name} had exited on its own; restarted",
                clock.now()
            );
            log.unplanned_exits.push((clock.now(), name));
        }
        tokio::time::sleep(step.gap).await;
    }
    Ok(log)
}

/// Heals a fault, retrying a few times: a restart can fail while a dependency recovers.
async fn heal(system: &mut ChaosSystem, fault: Fault) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..3 {
        match system.heal(fault).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                eprintln!("nemesis: healing {} failed, retrying: {e:#}", fault.name());
                last = Some(e);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    Err(last
        .unwrap_or_else(|| anyhow::anyhow!("no attempt"))
        .context(format!("could not heal {}", fault.name())))
}

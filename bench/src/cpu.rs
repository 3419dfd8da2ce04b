//! Where the CPU goes during a measurement: CPU time per process (or process tree) from
//! `/proc`, so each figure comes with "µs of CPU per operation" for every component (the
//! service, PostgreSQL, Redis, the broker, the load generator) and for the machine as a whole;
//! the remainder is everything else running on the machine (noise).

use std::time::Instant;

/// Linux reports CPU times in USER_HZ ticks, 100 per second on every mainstream architecture.
const TICKS_PER_SECOND: f64 = 100.0;

/// What one probe measures.
#[derive(Debug, Clone, Copy)]
pub enum Probe {
    /// One process, all its threads.
    Process(u32),
    /// A server and every child it forked, live or reaped (PostgreSQL's backends).
    Tree(u32),
    /// This benchmark process: the load generator (and in-process clients).
    LoadGenerator,
    /// Programs this process ran and waited for (pgbench).
    WaitedChildren,
    /// All CPUs of the machine, busy time.
    Machine,
}

/// `(ppid, utime + stime, cutime + cstime)` in ticks.
fn stat(pid: &str) -> Option<(u32, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text
        .get(text.rfind(')')? + 2..)?
        .split_whitespace()
        .collect();
    let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some((
        u32::try_from(number(1)?).ok()?,
        number(11)? + number(12)?,
        number(13)? + number(14)?,
    ))
}

fn ticks(probe: Probe) -> u64 {
    match probe {
        Probe::Process(pid) => stat(&pid.to_string()).map_or(0, |(_, own, _)| own),
        Probe::Tree(root) => {
            let Some((_, own, reaped)) = stat(&root.to_string()) else {
                return 0;
            };
            let children: u64 = std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
                .filter_map(|pid| stat(&pid))
                .filter(|(ppid, _, _)| *ppid == root)
                .map(|(_, own, reaped)| own + reaped)
                .sum();
            own + reaped + children
        }
        Probe::LoadGenerator => stat("self").map_or(0, |(_, own, _)| own),
        Probe::WaitedChildren => stat("self").map_or(0, |(_, _, reaped)| reaped),
        Probe::Machine => std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| {
                let line = text.lines().next()?.to_owned();
                let values: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal guest guest_nice: busy is
                // user + nice + system + irq + softirq (steal is the hypervisor's, guest time
                // is already in user).
                Some([0, 1, 2, 5, 6].iter().filter_map(|&i| values.get(i)).sum())
            })
            .unwrap_or(0),
    }
}

/// A set of named probes.
#[derive(Debug, Clone, Default)]
pub struct Meter {
    probes: Vec<(String, Probe)>,
}

impl Meter {
    pub fn with(mut self, name: &str, probe: Option<Probe>) -> Self {
        if let Some(probe) = probe {
            self.probes.push((name.to_owned(), probe));
        }
        self
    }

    pub fn start(&self) -> Running {
        Running {
            meter: self.clone(),
            machine: ticks(Probe::Machine),
            before: self.probes.iter().map(|(_, p)| ticks(*p)).collect(),
            started: Instant::now(),
        }
    }
}

pub struct Running {
    meter: Meter,
    machine: u64,
    before: Vec<u64>,
    started: Instant,
}

impl Running {
    pub fn stop(self) -> CpuSplit {
        let parts = self
            .meter
            .probes
            .iter()
            .zip(&self.before)
            .map(|((name, probe), before)| {
                (
                    name.clone(),
                    ticks(*probe).saturating_sub(*before) as f64 / TICKS_PER_SECOND,
                )
            })
            .collect();
        CpuSplit {
            parts,
            machine: ticks(Probe::Machine).saturating_sub(self.machine) as f64 / TICKS_PER_SECOND,
            wall: self.started.elapsed().as_secs_f64(),
        }
    }
}

/// CPU seconds per component over one measurement.
#[derive(Debug, Clone, Default)]
pub struct CpuSplit {
    pub parts: Vec<(String, f64)>,
    /// Busy CPU seconds of the whole machine over the same time.
    pub machine: f64,
    pub wall: f64,
}

impl CpuSplit {
    /// µs of CPU per operation, the whole machine's (or the probes' sum, if larger).
    pub fn total_us(&self, ops: u64) -> f64 {
        let known: f64 = self.parts.iter().map(|(_, s)| s).sum();
        self.machine.max(known) / ops.max(1) as f64 * 1e6
    }

    /// "service 210 + PostgreSQL 180 + … + other 30 = 560 µs/op (machine 1.9 of 2 cores busy)".
    pub fn per_op(&self, ops: u64) -> String {
        if self.wall <= 0.0 || ops == 0 {
            return "n/a".to_owned();
        }
        let us = |seconds: f64| seconds / ops as f64 * 1e6;
        let known: f64 = self.parts.iter().map(|(_, s)| s).sum();
        let mut text: Vec<String> = self
            .parts
            .iter()
            .map(|(name, s)| format!("{name} {:.0}", us(*s)))
            .collect();
        text.push(format!("other {:.0}", us((self.machine - known).max(0.0))));
        let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
        format!(
            "{} = {:.0} µs of CPU per operation; machine {:.1} of {cores} cores busy",
            text.join(" + "),
            self.total_us(ops),
            self.machine / self.wall
        )
    }
}

/// The pid of the live process whose command name is `comm` and whose command line contains
/// `needle` (a server started by the harness's watchdog).
pub fn find_process(comm: &str, needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let line = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            name.trim() == comm && String::from_utf8_lossy(&line).contains(needle)
        })
}

/// The postmaster of a cluster, from its `postmaster.pid`.
pub fn postmaster(data_dir: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

//! The load generator: closed-loop (N workers, each sending its next request when the previous
//! one answered) and open-loop (requests started on a fixed schedule, whatever the answers),
//! with latencies in HDR histograms (microseconds, 3 significant digits).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How much load a closed-loop run sends.
#[derive(Debug, Clone, Copy)]
pub enum Amount {
    /// Exactly this many requests (quick mode, and "each key once" runs).
    Requests(u64),
    /// As many as fit in this time.
    For(Duration),
}

/// A latency histogram in microseconds, from 1 µs to 10 minutes.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Records a duration (saturating at the histogram's bounds).
pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, 600_000_000);
    histogram.saturating_record(micros);
}

/// Milliseconds at quantile `q` (0.0–1.0; 1.0 is the maximum).
pub fn quantile_ms(histogram: &Histogram<u64>, q: f64) -> f64 {
    if histogram.is_empty() {
        return f64::NAN;
    }
    let micros = if q >= 1.0 {
        histogram.max()
    } else {
        histogram.value_at_quantile(q)
    };
    micros as f64 / 1000.0
}

/// What a closed-loop run measured.
#[derive(Debug)]
pub struct Outcome {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Latency of the successful requests, µs.
    pub latency: Histogram<u64>,
}

impl Outcome {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    pub fn ms(&self, q: f64) -> f64 {
        quantile_ms(&self.latency, q)
    }

    /// Refuses a run where more than 1 % of the requests failed: its figure would be a lie.
    pub fn checked(self, what: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(self.ok > 0, "{what}: no request succeeded");
        anyhow::ensure!(
            self.errors * 100 <= self.ok + self.errors,
            "{what}: {} of {} requests failed",
            self.errors,
            self.ok + self.errors
        );
        Ok(self)
    }
}

/// `concurrency` workers send requests back to back; `request(i)` sends the request numbered
/// `i` (0, 1, 2… across all workers) and says whether it succeeded.
pub async fn closed_loop<F, Fut>(concurrency: usize, amount: Amount, request: F) -> Outcome
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let request = Arc::new(request);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (deadline, limit) = match amount {
        Amount::Requests(n) => (None, n),
        Amount::For(duration) => (Some(started + duration), u64::MAX),
    };
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let request = request.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut latency = histogram();
                let (mut ok, mut errors) = (0u64, 0u64);
                loop {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= limit {
                        break;
                    }
                    let sent = Instant::now();
                    if request(i).await {
                        record(&mut latency, sent.elapsed());
                        ok += 1;
                    } else {
                        errors += 1;
                    }
                }
                (latency, ok, errors)
            })
        })
        .collect();
    let mut outcome = Outcome {
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: histogram(),
    };
    for worker in workers {
        if let Ok((latency, ok, errors)) = worker.await {
            outcome.latency.add(&latency).expect("same bounds");
            outcome.ok += ok;
            outcome.errors += errors;
        } else {
            outcome.errors += 1;
        }
    }
    outcome.elapsed = started.elapsed();
    outcome
}

/// Starts `request(i)` at `start + i / rate` for `count` requests, whatever the previous ones
/// are doing (open loop: a slow system gets no breather, as with real users), and returns every
/// result in order.
pub async fn open_loop<F, Fut, T>(rate: f64, count: u64, request: F) -> Vec<T>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for i in 0..count {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        tasks.push(tokio::spawn(request(i)));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.expect("an open-loop request panicked"));
    }
    results
}

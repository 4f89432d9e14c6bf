//! Latency samples and their summary: nearest-rank percentiles over every
//! sample (no histogram buckets, so p99 of 2,000 calls is a real call), and
//! the human units the table prints.

use std::time::Duration;

/// A set of latencies, kept sorted once complete: the summary reads
/// percentiles from it and the plot draws its CDF.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    sorted: Vec<Duration>,
}

/// The figures the table prints for one set of samples.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: usize,
    pub min: Duration,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Samples {
    pub fn new(mut values: Vec<Duration>) -> Samples {
        values.sort_unstable();
        Samples { sorted: values }
    }

    pub fn sorted(&self) -> &[Duration] {
        &self.sorted
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// The nearest-rank percentile: the smallest sample with at least `q`
    /// of all samples at or below it.
    pub fn percentile(&self, q: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = (q * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    pub fn summary(&self) -> Summary {
        Summary {
            count: self.sorted.len(),
            min: self.sorted.first().copied().unwrap_or_default(),
            p50: self.percentile(0.50),
            p90: self.percentile(0.90),
            p99: self.percentile(0.99),
            max: self.sorted.last().copied().unwrap_or_default(),
        }
    }
}

/// A latency in the unit that keeps three significant digits readable:
/// `87 µs`, `1.24 ms`, `101 ms`, `2.10 s`.
pub fn duration(d: Duration) -> String {
    let micros = d.as_secs_f64() * 1e6;
    if micros < 1_000.0 {
        format!("{micros:.0} µs")
    } else if micros < 10_000.0 {
        format!("{:.2} ms", micros / 1e3)
    } else if micros < 1_000_000.0 {
        format!("{:.1} ms", micros / 1e3)
    } else {
        format!("{:.2} s", micros / 1e6)
    }
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

/// Bytes as KiB with one decimal.
pub fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

/// CPU time over wall time, as a percentage of one core (200% = two cores).
pub fn cpu_percent(cpu: Duration, wall: Duration) -> f64 {
    if wall.is_zero() {
        return 0.0;
    }
    100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
}

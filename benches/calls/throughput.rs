//! Scenario 3, throughput: complete call set-ups per second (incoming call
//! → push handed to the pipe → call-response → `status=ACK`) with enough
//! calls under way to keep both cores busy, and where the CPU went: the
//! server, the generator (this process), Redis, and the rest of the
//! machine (PostgreSQL, and whatever else runs).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::generator::{self, Budget, Plan};
use crate::server_process::{with_server, Mode, ServerProcess, Settings};
use crate::services::Backend;
use crate::stats::{self, Samples};
use crate::sys;

/// How big the scenario is.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    pub duration: Duration,
    pub concurrency: usize,
    pub devices: usize,
    /// Devices per account: each call pushes every one, the first answers.
    pub per_account: usize,
}

/// CPU used during the measurement, each as % of one core.
#[derive(Debug, Clone, Copy)]
pub struct CpuShares {
    pub server: f64,
    pub generator: f64,
    pub redis: Option<f64>,
    /// The machine's busy time less the above: PostgreSQL, the kernel's
    /// softirq work not charged to a process, anything else running.
    pub rest: f64,
}

/// What one run measured.
pub struct Throughput {
    pub backend: &'static str,
    pub concurrency: usize,
    pub calls: usize,
    pub elapsed: Duration,
    /// Set-up time of each call: PBX request out → `status=ACK` in.
    pub setups: Samples,
    pub cpu: CpuShares,
    /// Pushes resent because a call took longer than the resend interval.
    pub resends: u64,
}

impl Throughput {
    pub fn per_second(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs the scenario against `backend` on a fresh server with its defaults.
pub async fn run(backend: &Backend, key_prefix: &str, size: Size) -> Result<Throughput> {
    let label = match size.per_account {
        1 => format!("throughput {}", backend.name()),
        n => format!("throughput {} ({n} devices per account)", backend.name()),
    };
    let result = measure(backend, key_prefix, size)
        .await
        .with_context(|| label.clone())?;
    eprintln!(
        "bench: {label}: {:.0} set-ups/s, server {:.0}% CPU, generator {:.0}% CPU",
        result.per_second(),
        result.cpu.server,
        result.cpu.generator
    );
    Ok(result)
}

async fn measure(backend: &Backend, key_prefix: &str, size: Size) -> Result<Throughput> {
    let settings = Settings {
        devices_per_account: size.per_account,
        ..Settings::defaults(backend, Mode::PubSub)
    };
    with_server(&settings, async |server| {
        on_server(server, backend, key_prefix, size).await
    })
    .await
}

/// Registers, warms up, and drives calls on `server` for the duration.
async fn on_server(
    server: &mut ServerProcess,
    backend: &Backend,
    key_prefix: &str,
    size: Size,
) -> Result<Throughput> {
    generator::register_devices(server.target.addr, size.devices, size.per_account).await?;
    let plan = |prefix: String, budget: Budget| Plan {
        prefix,
        budget,
        concurrency: size.concurrency,
        devices: size.devices,
        per_account: size.per_account,
        delay_period: Duration::ZERO,
    };
    generator::drive(
        &server.target,
        &plan(
            format!("{key_prefix}warm-"),
            Budget::Count(4 * size.concurrency),
        ),
    )
    .await?;

    let generator_pid = std::process::id();
    let server_before = server.cpu()?;
    let generator_before = sys::cpu_time(generator_pid)?;
    let machine_before = sys::machine_busy()?;
    let redis_before = match backend.redis() {
        Some(redis) => Some(redis.counters().await?),
        None => None,
    };
    let resends_before = server.target.pushes.resends();
    let started = Instant::now();
    let timings = generator::drive(
        &server.target,
        &plan(
            key_prefix.to_owned(),
            Budget::Until(started + size.duration),
        ),
    )
    .await?;
    let elapsed = started.elapsed();
    let server_cpu = server.cpu()? - server_before;
    let generator_cpu = sys::cpu_time(generator_pid)? - generator_before;
    let machine_cpu = sys::machine_busy()?.saturating_sub(machine_before);
    let redis_cpu = match (backend.redis(), redis_before) {
        (Some(redis), Some(before)) => Some(redis.counters().await?.cpu.saturating_sub(before.cpu)),
        _ => None,
    };
    let resends = server.target.pushes.resends() - resends_before;

    server.check()?;
    server.wait_idle(Duration::from_secs(10)).await?;
    if let Some(redis) = backend.redis() {
        redis
            .wait_clean(key_prefix, Duration::from_secs(10))
            .await?;
    }

    let rest = machine_cpu
        .saturating_sub(server_cpu)
        .saturating_sub(generator_cpu)
        .saturating_sub(redis_cpu.unwrap_or_default());
    Ok(Throughput {
        backend: backend.name(),
        concurrency: size.concurrency,
        calls: timings.len(),
        elapsed,
        setups: Samples::new(timings.iter().map(|t| t.setup).collect()),
        cpu: CpuShares {
            server: stats::cpu_percent(server_cpu, elapsed),
            generator: stats::cpu_percent(generator_cpu, elapsed),
            redis: redis_cpu.map(|cpu| stats::cpu_percent(cpu, elapsed)),
            rest: stats::cpu_percent(rest, elapsed),
        },
        resends,
    })
}

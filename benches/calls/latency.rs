//! Scenario 1, wake-up latency: how long the PBX waits after the app has
//! answered. Measured from the app's call-response leaving the generator to
//! `status=ACK` read on the PBX's connection, per broker mode: pub/sub (the
//! answer is delivered to the waiting request) against polling every
//! 100 ms and 10 ms (the waiting request reads the stored state).

use std::time::Duration;

use anyhow::{Context, Result};

use crate::generator::{self, Budget, Plan};
use crate::server_process::{with_server, Mode, Settings};
use crate::services::Backend;
use crate::stats::{self, Samples};

/// The modes compared: the one this service uses and the polling it replaces.
pub const MODES: [Mode; 3] = [
    Mode::PubSub,
    Mode::Poll { interval_ms: 100 },
    Mode::Poll { interval_ms: 10 },
];

/// Phones answer within this period of their push, each at its own phase
/// (see [`generator::app_delay`]): one period of the slowest poll interval.
const APP_DELAY_PERIOD: Duration = Duration::from_millis(100);
/// Calls before the measured ones, so pools and caches are warm.
const WARM_UP_CALLS: usize = 32;

/// How big the scenario is.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    pub calls: usize,
    pub concurrency: usize,
    pub devices: usize,
}

/// The wake-up latencies of one backend and mode.
pub struct Latency {
    pub backend: &'static str,
    pub mode: Mode,
    pub samples: Samples,
}

/// Runs every mode against `backend`, each on a fresh server.
pub async fn run(backend: &Backend, key_prefix: &str, size: Size) -> Result<Vec<Latency>> {
    let mut results = Vec::new();
    for mode in MODES {
        let label = format!("latency {} {}", backend.name(), mode.label());
        let samples = one_mode(
            backend,
            mode,
            &format!("{key_prefix}{}-", results.len()),
            size,
        )
        .await
        .with_context(|| label.clone())?;
        let summary = samples.summary();
        eprintln!(
            "bench: {label}: {} calls, p50 {}, p99 {}",
            summary.count,
            stats::duration(summary.p50),
            stats::duration(summary.p99)
        );
        results.push(Latency {
            backend: backend.name(),
            mode,
            samples,
        });
    }
    Ok(results)
}

async fn one_mode(backend: &Backend, mode: Mode, key_prefix: &str, size: Size) -> Result<Samples> {
    let plan = |prefix: String, calls: usize| Plan {
        prefix,
        budget: Budget::Count(calls),
        concurrency: size.concurrency,
        devices: size.devices,
        per_account: 1,
        delay_period: APP_DELAY_PERIOD,
    };
    with_server(&Settings::defaults(backend, mode), async |server| {
        generator::register_devices(server.target.addr, size.devices, 1).await?;
        generator::drive(
            &server.target,
            &plan(format!("{key_prefix}warm-"), WARM_UP_CALLS),
        )
        .await?;
        let timings =
            generator::drive(&server.target, &plan(key_prefix.to_owned(), size.calls)).await?;
        server.check()?;
        server.wait_idle(Duration::from_secs(5)).await?;
        if let Some(redis) = backend.redis() {
            redis.wait_clean(key_prefix, Duration::from_secs(5)).await?;
        }
        Ok(Samples::new(timings.iter().map(|t| t.wake_up).collect()))
    })
    .await
}

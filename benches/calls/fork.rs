//! Scenario 4, a call's whole life with three devices per account (two
//! phones and a tablet, say): every device is pushed, the first answers,
//! and the others are told the call is over.
//!
//! - Wake-up latency with three devices: from the first device's
//!   call-response leaving the generator to `status=ACK` read by the PBX,
//!   the phone answering after 0 to 200 ms (each call at its own phase,
//!   see [`generator::app_delay`]), both processes idle in between, as in
//!   production.
//! - Hang-up to notice: from the PBX closing its parked request (its
//!   caller hung up) to each device's `call_ended` notice leaving the
//!   server (its line read from the push pipe).
//! - Throughput with three devices: the throughput scenario's set-ups per
//!   second, every call pushing three devices.
//! - The floor for the wake-up (see [`floor`]): the same answers timed by
//!   the same client against a plain thread and, on Redis, one script, in
//!   blocks that alternate with the server's (see [`ROUNDS`]).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::{self, Http1};
use crate::floor::{self, RedisNode};
use crate::generator::{self, Budget, Plan, INCOMING_CALL};
use crate::server_process::{with_server, Mode, ServerProcess, Settings};
use crate::services::Backend;
use crate::stats::{self, Samples};
use crate::throughput;

/// Devices per account, unless `--devices` says otherwise.
pub const DEVICES: usize = 3;
/// Phones answer within this period of their push.
const APP_DELAY_PERIOD: Duration = Duration::from_millis(200);
/// How long a notice may take to come once the PBX has hung up.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers timed for the floor, at most.
const FLOOR_CALLS: usize = 300;
/// Blocks the wake-up and its floor are timed in, alternating: a block of
/// answers through the stand-in, then a block through the server, this
/// many times. The share is the difference of two medians; timed a minute
/// apart, each saw another machine (a neighbour's load, the host's clock
/// speed), and runs of one build differed by 100 µs in process. Side by
/// side, both see the same.
const ROUNDS: usize = 10;

#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Calls answered, one at a time.
    pub calls: usize,
    /// Calls the PBX hangs up on, one at a time.
    pub hang_ups: usize,
    pub devices: usize,
    /// Devices per account: every call pushes this many.
    pub per_account: usize,
    pub throughput: throughput::Size,
}

pub struct Fork {
    pub backend: &'static str,
    pub per_account: usize,
    pub wake_up: Samples,
    /// The same wake-up with a plain thread for the server.
    pub floor: Samples,
    pub notice: Samples,
    pub throughput: throughput::Throughput,
}

pub async fn run(backend: &Backend, key_prefix: &str, size: Size) -> Result<Fork> {
    let label = format!("fork {}", backend.name());
    let node = backend.redis_url().map(RedisNode::of).transpose()?;
    let settings = Settings {
        devices_per_account: size.per_account,
        ..Settings::defaults(backend, Mode::PubSub)
    };
    let (wake_up, floor, notice) = with_server(&settings, async |server| {
        on_server(server, backend, node.as_ref(), key_prefix, size).await
    })
    .await
    .with_context(|| label.clone())?;
    for (what, samples) in [
        ("wake-up", &wake_up),
        ("the machine's floor for the wake-up", &floor),
        ("hang-up to notice", &notice),
    ] {
        let summary = samples.summary();
        eprintln!(
            "bench: {label}: {what}: {} samples, p50 {}, p99 {}",
            summary.count,
            stats::duration(summary.p50),
            stats::duration(summary.p99)
        );
    }
    let throughput = throughput::run(
        backend,
        &format!("{key_prefix}tp-"),
        throughput::Size {
            per_account: size.per_account,
            ..size.throughput
        },
    )
    .await?;
    Ok(Fork {
        backend: backend.name(),
        per_account: size.per_account,
        wake_up,
        floor,
        notice,
        throughput,
    })
}

async fn on_server(
    server: &mut ServerProcess,
    backend: &Backend,
    node: Option<&RedisNode>,
    key_prefix: &str,
    size: Size,
) -> Result<(Samples, Samples, Samples)> {
    generator::register_devices(server.target.addr, size.devices, size.per_account).await?;
    let plan = |prefix: String, calls: usize| Plan {
        prefix,
        budget: Budget::Count(calls),
        concurrency: 1,
        devices: size.devices,
        per_account: size.per_account,
        delay_period: APP_DELAY_PERIOD,
    };
    generator::drive_alone(&server.target, &plan(format!("{key_prefix}warm-"), 16)).await?;
    let rounds = ROUNDS.min(size.calls).max(1);
    let floor_calls = size.calls.min(FLOOR_CALLS);
    let (mut wake_up, mut floor) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let block = |total: usize| total * (round + 1) / rounds - total * round / rounds;
        let stand_in = floor::measure(node.cloned(), block(floor_calls), APP_DELAY_PERIOD)
            .await
            .context("the machine's floor")?;
        floor.extend_from_slice(stand_in.sorted());
        let timings = generator::drive_alone(
            &server.target,
            &plan(format!("{key_prefix}ack-{round}-"), block(size.calls)),
        )
        .await?;
        wake_up.extend(timings.iter().map(|t| t.wake_up));
    }

    let mut notices = Vec::with_capacity(size.hang_ups * size.per_account);
    for n in 0..size.hang_ups {
        let key = format!("{key_prefix}hup-{n}");
        let sip_user_id = generator::sip_user_id(n, size.devices);
        notices.extend(hang_up(server, &key, sip_user_id, size.per_account).await?);
    }
    server.check()?;
    server.wait_idle(Duration::from_secs(5)).await?;
    if let Some(redis) = backend.redis() {
        redis.wait_clean(key_prefix, Duration::from_secs(5)).await?;
    }
    Ok((
        Samples::new(wake_up),
        Samples::new(floor),
        Samples::new(notices),
    ))
}

/// Places a call, waits until every device is pushed, closes the PBX's
/// connection, and times each device's `call_ended` notice.
async fn hang_up(
    server: &ServerProcess,
    key: &str,
    sip_user_id: u64,
    per_account: usize,
) -> Result<Vec<Duration>> {
    let pushes = &server.target.pushes;
    let keys = generator::device_keys(key, per_account);
    let pushed: Vec<_> = keys.iter().map(|k| pushes.expect(k)).collect();
    let ended: Vec<_> = keys.iter().map(|k| pushes.expect_end(k)).collect();
    let mut pbx = Http1::connect(server.target.addr, client::source_address(0)).await?;
    let form = generator::incoming_call_form(key, sip_user_id);
    let mut ring = Box::pin(pbx.post_form(INCOMING_CALL, form));
    for (push, device) in pushed.into_iter().zip(&keys) {
        tokio::select! {
            push = generator::first_push(push, device) => { push?; }
            early = &mut ring => bail!("the PBX got {:?} for call {key} before its pushes", early.map(|r| r.text().into_owned())),
        }
    }
    // The caller hangs up: the PBX drops its request and its connection.
    let closed = Instant::now();
    drop(ring);
    drop(pbx);
    let mut took = Vec::with_capacity(per_account);
    for (notice, device) in ended.into_iter().zip(&keys) {
        let at = tokio::time::timeout(NOTICE_TIMEOUT, notice)
            .await
            .with_context(|| {
                format!("no call_ended notice for {device} within {NOTICE_TIMEOUT:?}")
            })?
            .with_context(|| format!("the push pipe closed before the notice for {device}"))?;
        took.push(at.saturating_duration_since(closed));
    }
    Ok(took)
}

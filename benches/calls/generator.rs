//! The PBX and the phones: register devices, place a call, wait for its
//! push, answer it as the app would, and time what the PBX hears.
//!
//! Every call is checked: a push must come for it, the app's answer must be
//! accepted (202), and the PBX must hear `status=ACK`. Anything else fails
//! the run, which is what the quick mode in CI relies on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::task::JoinSet;

use crate::client::{self, Http1, Reply};
use crate::pushes::Push;
use crate::server_process::Target;
use crate::server_role::{APP_ID, PLATFORM};

pub const INCOMING_CALL: &str = "/api/incoming-call/";
pub const CALL_RESPONSE: &str = "/api/call-response/";

/// How long a call's first push may take once the PBX request is sent.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one whole call may take: the server's default wait is 4 s.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The SIP account of device 0; device `n` is this plus `n`.
const FIRST_SIP_USER_ID: u64 = 100_000;
/// Devices registered at once.
const REGISTER_CONCURRENCY: usize = 16;

/// The SIP account the `n`th call rings, spread over `devices` accounts.
pub fn sip_user_id(n: usize, devices: usize) -> u64 {
    FIRST_SIP_USER_ID + (n % devices.max(1)) as u64
}

/// How long the `n`th phone takes to wake before it answers, within
/// `period`. Real phones take 0.5 to 3 s, which lands them in any phase of
/// a polling server's tick; what a poll interval costs depends only on that
/// phase. A golden-ratio sequence spreads the phases evenly over one period
/// without randomness, so runs are repeatable.
pub fn app_delay(n: usize, period: Duration) -> Duration {
    const GOLDEN: f64 = 0.618_033_988_749_895;
    period.mul_f64((n as f64 * GOLDEN).fract())
}

/// Registers `per_account` Android devices for each of `count` accounts
/// over HTTP, as the phones would (the server must keep that many).
pub async fn register_devices(addr: SocketAddr, count: usize, per_account: usize) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for w in 0..REGISTER_CONCURRENCY.min(count) {
        let mut conn = Http1::connect(addr, client::source_address(w)).await?;
        let next = next.clone();
        workers.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count * per_account {
                    return Ok::<_, anyhow::Error>(());
                }
                let id = sip_user_id(n / per_account, count).to_string();
                let token = match n % per_account {
                    0 => format!("bench-token-{id}"),
                    d => format!("bench-token-{id}-{d}"),
                };
                let form = serde_urlencoded::to_string([
                    ("sip_user_id", id.as_str()),
                    ("token", &token),
                    ("app", APP_ID),
                ])?;
                let reply = conn
                    .post_form(&format!("/api/{PLATFORM}-device/"), form)
                    .await?;
                if !matches!(reply.status.as_u16(), 200 | 201) {
                    bail!(
                        "registering device {id} got {}: {}",
                        reply.status,
                        reply.text()
                    );
                }
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(())
}

/// The PBX's form for a call whose `call_id` (and so `unique_key`) is `key`.
pub fn incoming_call_form(key: &str, sip_user_id: u64) -> String {
    serde_urlencoded::to_string([
        ("sip_user_id", sip_user_id.to_string().as_str()),
        ("phonenumber", "+31 50 123 4567"),
        ("caller_id", "Bench"),
        ("call_id", key),
    ])
    .expect("strings are form-encodable")
}

/// Waits for the first push of `key` (registered before the PBX request left).
pub async fn first_push(pushed: tokio::sync::oneshot::Receiver<Push>, key: &str) -> Result<Push> {
    match tokio::time::timeout(PUSH_TIMEOUT, pushed).await {
        Ok(Ok(push)) => Ok(push),
        Ok(Err(_)) => bail!("the server closed its push pipe before pushing {key} (did it die?)"),
        Err(_) => bail!("no push for call {key} within {PUSH_TIMEOUT:?}"),
    }
}

/// The app's answer: available, with the push's `message_start_time` echoed.
pub async fn answer(phone: &mut Http1, key: &str, push: &Push) -> Result<()> {
    let form = serde_urlencoded::to_string([
        ("unique_key", key),
        ("message_start_time", push.message_start_time.as_str()),
        ("available", "true"),
    ])?;
    let reply = phone.post_form(CALL_RESPONSE, form).await?;
    if reply.status.as_u16() != 202 {
        bail!(
            "call-response for {key} got {}: {}",
            reply.status,
            reply.text()
        );
    }
    Ok(())
}

/// Fails unless the PBX heard `status=ACK`.
pub fn expect_ack(reply: &Reply, key: &str) -> Result<()> {
    if reply.status.as_u16() != 200 || reply.body.as_ref() != b"status=ACK" {
        bail!(
            "the PBX got {} {:?} for answered call {key}, not status=ACK",
            reply.status,
            reply.text()
        );
    }
    Ok(())
}

/// One call's timings.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The app's call-response leaving the generator → `status=ACK` read by the PBX.
    pub wake_up: Duration,
    /// The PBX's request leaving → `status=ACK` read, less the app's delay.
    pub setup: Duration,
}

/// A PBX trunk and a phone, with one keep-alive connection each, opened
/// before any clock starts.
pub struct Line {
    pbx: Http1,
    phone: Http1,
}

impl Line {
    pub async fn open(addr: SocketAddr, n: usize) -> Result<Line> {
        Ok(Line {
            pbx: Http1::connect(addr, client::source_address(2 * n)).await?,
            phone: Http1::connect(addr, client::source_address(2 * n + 1)).await?,
        })
    }

    /// Places one call, answers it after `app_delay` from its first
    /// device (the account has `per_account`, each pushed under its own
    /// key), and times it.
    pub async fn call(
        &mut self,
        target: &Target,
        key: &str,
        sip_user_id: u64,
        app_delay: Duration,
        per_account: usize,
    ) -> Result<Timing> {
        let Line { pbx, phone } = self;
        let keys = device_keys(key, per_account);
        let pushed = target.pushes.expect(&keys[0]);
        // The other devices ring too; their pushes are expected, not timed.
        for other in &keys[1..] {
            drop(target.pushes.expect(other));
        }
        // The first device answers, under its own key.
        let answering = keys[0].as_str();
        let started = Instant::now();
        let ring = pbx.post_form(INCOMING_CALL, incoming_call_form(key, sip_user_id));
        tokio::pin!(ring);
        let push = tokio::select! {
            push = first_push(pushed, answering) => push?,
            early = &mut ring => bail!(
                "the PBX got {:?} for call {key} before any push",
                early.map(|r| r.text().into_owned())
            ),
        };
        if !app_delay.is_zero() {
            tokio::time::sleep(app_delay).await;
        }
        let sent = Instant::now();
        let (answered, (reply, acked)) = tokio::join!(answer(phone, answering, &push), async {
            let reply = ring.await;
            (reply, Instant::now())
        });
        answered?;
        expect_ack(&reply?, key)?;
        Ok(Timing {
            wake_up: acked - sent,
            setup: (acked - started).saturating_sub(app_delay),
        })
    }
}

/// How many calls a [`drive`] places.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    Count(usize),
    /// Calls start until then; the ones under way finish.
    Until(Instant),
}

/// The push keys of a call rung on `per_account` devices: the call's key for
/// one, `<key>.<n>` for several.
pub fn device_keys(key: &str, per_account: usize) -> Vec<String> {
    (0..per_account)
        .map(|index| call_notifier::broker::push_key(key, index, per_account))
        .collect()
}

/// Calls placed in parallel, each worker on its own [`Line`].
#[derive(Debug, Clone)]
pub struct Plan {
    /// Call keys are `<prefix><n>`.
    pub prefix: String,
    pub budget: Budget,
    pub concurrency: usize,
    /// Accounts the calls are spread over (registered already).
    pub devices: usize,
    /// Devices each account has: every one is pushed, the first answers.
    pub per_account: usize,
    /// Phones answer after [`app_delay`] within this period; zero: at once.
    pub delay_period: Duration,
}

/// Runs `plan` as [`drive`] does, on a thread of its own with a
/// single-threaded runtime (see [`alone`]), for the scenarios that time
/// one call at a time between idle spells.
pub async fn drive_alone(target: &Target, plan: &Plan) -> Result<Vec<Timing>> {
    let (target, plan) = (target.clone(), plan.clone());
    alone(async move { drive(&target, &plan).await }).await
}

/// Runs `work` on a thread of its own, with a single-threaded runtime.
///
/// On the shared two-worker runtime a reply is read by the task driving
/// its connection, often on one worker, and handed to the task waiting for
/// it on the other, parked one: after an idle spell that costs the timed
/// path a thread wake-up or two on each side, a few hundred microseconds
/// on this project's machine, which a PBX reading its socket never pays.
/// On one thread the timed task and its connections' drivers run in turn,
/// so the clock measures the server and the kernel, not the harness.
pub async fn alone<T, F>(work: F) -> Result<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-alone".to_owned())
        .spawn(move || {
            let ran = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start a single-threaded runtime")
                .and_then(|runtime| runtime.block_on(work));
            let _ = done.send(ran);
        })
        .context("cannot start the timing thread")?;
    result.await.context("the timing thread panicked")?
}

/// Runs `plan` against the server; returns every call's timing. The lines
/// are opened before the first call, so set-up costs are not measured.
pub async fn drive(target: &Target, plan: &Plan) -> Result<Vec<Timing>> {
    let mut lines = Vec::with_capacity(plan.concurrency);
    for w in 0..plan.concurrency {
        lines.push(Line::open(target.addr, w).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for mut line in lines {
        let (target, plan, next) = (target.clone(), plan.clone(), next.clone());
        workers.spawn(async move {
            let mut timings = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let more = match plan.budget {
                    Budget::Count(count) => n < count,
                    Budget::Until(until) => Instant::now() < until,
                };
                if !more {
                    return Ok::<_, anyhow::Error>(timings);
                }
                let key = format!("{}{n}", plan.prefix);
                let call = line.call(
                    &target,
                    &key,
                    sip_user_id(n, plan.devices),
                    app_delay(n, plan.delay_period),
                    plan.per_account,
                );
                let timing = tokio::time::timeout(CALL_TIMEOUT, call)
                    .await
                    .with_context(|| format!("call {key} took over {CALL_TIMEOUT:?}"))??;
                timings.push(timing);
            }
        });
    }
    let mut all = Vec::new();
    while let Some(done) = workers.join_next().await {
        // Returning drops the set, which aborts the other workers.
        all.extend(done.context("a call worker panicked")??);
    }
    Ok(all)
}

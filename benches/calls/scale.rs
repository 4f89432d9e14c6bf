//! Scenario 2, parked-call scale: what thousands of PBX requests held open
//! at once cost the server (memory, CPU) and Redis (commands, CPU) while
//! they wait, whether an answer still wakes its call at once, and whether
//! every wait cleans up after the PBX hangs up.
//!
//! Each call is one PBX request parked on a server with a 120 s wait and
//! one push per call (resend interval = wait). Calls go out in waves, each
//! wave's pushes awaited before the next, so the listener's backlog never
//! overflows. One socket per call (HTTP/1.1, from 127.0.0.1 to .8) when
//! both processes may hold that many open files; above that, the calls are
//! multiplexed over HTTP/2 cleartext connections, 200 streams each (the
//! server's per-connection limit), as a load balancer in front would.
//!
//! With pub/sub every call must park, every answer must be accepted and
//! wake its call with `status=ACK`, and every dropped call must be cleaned
//! up; anything else fails the run. The polling mode is only the
//! comparison, and it breaks down at these sizes (its reads exhaust the
//! Redis connections, so calls are refused, answers get 503, and keys are
//! left to their TTL): its rows say what broke instead of failing the run.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::task::{JoinHandle, JoinSet};

use crate::client::{self, Http1, Http2, Reply};
use crate::generator::{self, Budget, Plan, INCOMING_CALL};
use crate::pushes::Push;
use crate::server_process::{with_server, Mode, ServerProcess, Settings, Target};
use crate::services::{Backend, Redis, RedisLoad};
use crate::stats::{self, Samples};

/// Calls placed before their pushes are awaited: below the server's
/// listen backlog (128, see docs/performance.md), so no SYN is dropped and
/// placing measures the server, not the kernel's 1 s SYN retransmit.
const WAVE: usize = 100;
/// Streams per HTTP/2 connection: hyper's server default.
const STREAMS_PER_CONNECTION: usize = 200;
/// Open files a process needs beside one per parked call.
const SPARE_FILES: u64 = 1_000;
/// Phones answering the sampled calls at once.
const PHONES: usize = 16;
/// Phones answer within this period of when the harness turns to them.
const APP_DELAY_PERIOD: Duration = Duration::from_millis(100);
/// The server's wait and resend interval: long, and one push per call.
const WAIT_MS: u64 = 120_000;
/// How long Redis's background load is measured before each run.
const BACKGROUND_WINDOW: Duration = Duration::from_secs(2);
/// How long the server and Redis get to forget dropped calls.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How big the scenario is.
#[derive(Debug, Clone)]
pub struct Size {
    /// Broker mode and number of parked calls of each run.
    pub runs: Vec<(Mode, usize)>,
    /// How long CPU and Redis commands are counted while the calls wait.
    pub window: Duration,
    /// Calls answered (and timed) while the rest stay parked.
    pub answered: usize,
    pub devices: usize,
    /// The open-files limit of this process and the server's.
    pub open_files: u64,
}

/// How the parked calls reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One HTTP/1.1 connection per call, as PBXes connect directly.
    Http1,
    /// HTTP/2 cleartext, 200 calls per connection.
    H2c,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Http1 => "HTTP/1.1, 1 call/conn",
            Transport::H2c => "h2c, 200 calls/conn",
        }
    }
}

/// What one run measured.
pub struct Scale {
    pub backend: &'static str,
    pub mode: Mode,
    pub transport: Transport,
    pub parked: usize,
    /// Calls the server answered NAK instead of parking (polling only).
    pub refused: usize,
    /// How long placing all calls took, until the last push.
    pub park_time: Duration,
    pub rss_idle: u64,
    pub rss_parked: u64,
    /// Server CPU while the calls wait, % of one core.
    pub cpu_percent: f64,
    /// Redis's load while the calls wait, less its background load.
    pub redis: Option<RedisLoad>,
    /// Redis's load from other clients, measured while the server was idle
    /// just before the calls were placed: Redis may be shared (other test
    /// suites on a development machine), and its counters are global.
    pub redis_background: Option<RedisLoad>,
    /// Wake-up latencies of the calls answered while the rest waited.
    pub wake_up: Samples,
    /// Answers that were refused or did not wake their call (polling only).
    pub failed_answers: usize,
    /// From the PBX hanging up on the rest to the server (and Redis)
    /// holding nothing of them; `None` when that did not happen in time
    /// (polling only).
    pub cleanup: Option<Duration>,
    /// What broke, in words, for the notes under the table (polling only).
    pub notes: Vec<String>,
}

impl Scale {
    pub fn rss_per_call(&self) -> f64 {
        let held = self.parked - self.refused;
        (self.rss_parked as f64 - self.rss_idle as f64) / held.max(1) as f64
    }
}

/// Runs every size against `backend`, each on a fresh server.
pub async fn run(backend: &Backend, key_prefix: &str, size: &Size) -> Result<Vec<Scale>> {
    let mut results = Vec::new();
    for (i, &(mode, parked)) in size.runs.iter().enumerate() {
        let label = format!("scale {} {} {parked}", backend.name(), mode.label());
        let result = one_run(backend, mode, parked, &format!("{key_prefix}{i}-"), size)
            .await
            .with_context(|| label.clone())?;
        eprintln!(
            "bench: {label}: {}/call, CPU {:.1}%, wake-up p99 {}, cleanup {}",
            stats::kib(result.rss_per_call()),
            result.cpu_percent,
            stats::duration(result.wake_up.percentile(0.99)),
            result.cleanup.map_or("incomplete".into(), stats::duration)
        );
        results.push(result);
    }
    Ok(results)
}

async fn one_run(
    backend: &Backend,
    mode: Mode,
    parked: usize,
    key_prefix: &str,
    size: &Size,
) -> Result<Scale> {
    let settings = Settings {
        wait_ms: WAIT_MS,
        resend_interval_ms: WAIT_MS,
        ..Settings::defaults(backend, mode)
    };
    with_server(&settings, async |server| {
        on_server(server, backend, mode, parked, key_prefix, size).await
    })
    .await
}

/// Parks the calls on `server`, measures them waiting, answers some, drops
/// the rest.
async fn on_server(
    server: &mut ServerProcess,
    backend: &Backend,
    mode: Mode,
    parked: usize,
    key_prefix: &str,
    size: &Size,
) -> Result<Scale> {
    let target = server.target.clone();
    generator::register_devices(target.addr, size.devices, 1).await?;
    generator::drive(
        &target,
        &Plan {
            prefix: format!("{key_prefix}warm-"),
            budget: Budget::Count(20),
            concurrency: 4,
            devices: size.devices,
            per_account: 1,
            delay_period: Duration::ZERO,
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = server.rss()?;
    let redis_background = match backend.redis() {
        Some(redis) => Some(redis.load_over(size.window.min(BACKGROUND_WINDOW)).await?),
        None => None,
    };

    let transport = if parked as u64 + SPARE_FILES <= size.open_files {
        Transport::Http1
    } else {
        Transport::H2c
    };
    let started = Instant::now();
    let (calls, refused) = park(&target, transport, key_prefix, parked, size.devices).await?;
    let park_time = started.elapsed();
    let strict = mode == Mode::PubSub;
    let mut notes = Vec::new();
    if refused > 0 {
        if strict {
            bail!("the server refused {refused} of {parked} calls (status=NAK before any push)");
        }
        notes.push(format!(
            "{refused} of {parked} calls were answered NAK at once instead of parking"
        ));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let health = server.health().await?;
    if health.parked_calls != calls.len() as u64 {
        bail!(
            "the server reports {} parked calls, not {}",
            health.parked_calls,
            calls.len()
        );
    }

    let (cpu_percent, redis) =
        quiet_window(server, backend.redis(), redis_background, size.window).await?;
    let rss_parked = server.rss()?;

    let (sampled, rest) = sample(calls, size.answered);
    let answering = sampled.len();
    let (wake_up, failed_answers) = answer_all(&target, sampled, strict).await?;
    if failed_answers > 0 {
        notes.push(format!(
            "{failed_answers} of {answering} answers were refused or did not wake their call"
        ));
    }
    // The PBX hangs up on the rest: their tasks and sockets go.
    let hung_up = Instant::now();
    drop(rest);
    let cleanup = match clean_up(server, backend.redis(), key_prefix).await {
        Ok(()) => Some(hung_up.elapsed()),
        Err(e) if !strict => {
            notes.push(format!("clean-up incomplete: {e:#}"));
            None
        }
        Err(e) => return Err(e),
    };
    server.check()?;
    Ok(Scale {
        backend: backend.name(),
        mode,
        transport,
        parked,
        refused,
        park_time,
        rss_idle,
        rss_parked,
        cpu_percent,
        redis,
        redis_background,
        wake_up,
        failed_answers,
        cleanup,
        notes,
    })
}

/// Server CPU (% of one core) and Redis's load less `background` over
/// `window`, while the parked calls only wait.
async fn quiet_window(
    server: &ServerProcess,
    redis: Option<&Redis>,
    background: Option<RedisLoad>,
    window: Duration,
) -> Result<(f64, Option<RedisLoad>)> {
    let cpu_before = server.cpu()?;
    let redis_before = match redis {
        Some(redis) => Some(redis.counters().await?),
        None => None,
    };
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let window = started.elapsed();
    let cpu_percent = stats::cpu_percent(server.cpu()? - cpu_before, window);
    let load = match (redis, redis_before, background) {
        (Some(redis), Some(before), Some(background)) => Some(
            redis
                .counters()
                .await?
                .load_since(&before, window)
                .less(background),
        ),
        _ => None,
    };
    Ok((cpu_percent, load))
}

/// Waits until the server, and Redis when there is one, hold nothing of the
/// calls whose keys start with `key_prefix`.
async fn clean_up(server: &ServerProcess, redis: Option<&Redis>, key_prefix: &str) -> Result<()> {
    server.wait_idle(CLEANUP_TIMEOUT).await?;
    if let Some(redis) = redis {
        redis.wait_clean(key_prefix, CLEANUP_TIMEOUT).await?;
    }
    Ok(())
}

/// One parked call: its first push, and the task that holds its PBX
/// request. Dropping it aborts the task, which closes its socket (HTTP/1.1)
/// or resets its stream (HTTP/2): the PBX hung up.
struct Parked {
    key: String,
    push: Push,
    /// Resolves with the PBX's reply and when it was read.
    reply: JoinHandle<Result<(Reply, Instant)>>,
    /// The HTTP/2 connection this call's stream is on, kept open while the
    /// call is.
    _connection: Option<Http2>,
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.reply.abort();
    }
}

/// Places `count` calls and returns once every one of them has its push
/// or was refused; returns the parked calls and the number refused.
async fn park(
    target: &Target,
    transport: Transport,
    key_prefix: &str,
    count: usize,
    devices: usize,
) -> Result<(Vec<Parked>, usize)> {
    let mut connections = Vec::new();
    if transport == Transport::H2c {
        for c in 0..count.div_ceil(STREAMS_PER_CONNECTION) {
            connections.push(Http2::connect(target.addr, client::source_address(c)).await?);
        }
    }
    let mut calls = Vec::with_capacity(count);
    let mut refused = 0;
    for wave in (0..count).step_by(WAVE) {
        let mut placed = Vec::with_capacity(WAVE);
        for n in wave..count.min(wave + WAVE) {
            let key = format!("{key_prefix}{n}");
            let pushed = target.pushes.expect(&key);
            let form = generator::incoming_call_form(&key, generator::sip_user_id(n, devices));
            let connection = connections.get(n / STREAMS_PER_CONNECTION).cloned();
            let reply = match connection.clone() {
                None => {
                    let addr = target.addr;
                    tokio::spawn(async move {
                        let mut conn = Http1::connect(addr, client::source_address(n)).await?;
                        let reply = conn.post_form(INCOMING_CALL, form).await?;
                        Ok((reply, Instant::now()))
                    })
                }
                Some(conn) => tokio::spawn(async move {
                    let reply = conn.post_form(INCOMING_CALL, form).await?;
                    Ok((reply, Instant::now()))
                }),
            };
            placed.push((key, pushed, reply, connection));
        }
        for (key, pushed, mut reply, connection) in placed {
            let push = tokio::select! {
                push = generator::first_push(pushed, &key) => push?,
                early = &mut reply => match early {
                    Ok(Ok((reply, _))) if reply.body.as_ref() == b"status=NAK" => {
                        refused += 1;
                        continue;
                    }
                    other => bail!("call {key} ended before its push: {:?}",
                        other.map(|r| r.map(|(reply, _)| reply.text().into_owned()))),
                },
            };
            calls.push(Parked {
                key,
                push,
                reply,
                _connection: connection,
            });
        }
    }
    Ok((calls, refused))
}

/// Splits `calls` into `count` evenly spread ones to answer and the rest.
fn sample(calls: Vec<Parked>, count: usize) -> (Vec<Parked>, Vec<Parked>) {
    let step = (calls.len() / count.max(1)).max(1);
    let (sampled, rest): (Vec<_>, Vec<_>) = calls
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % step == 0 && i / step < count);
    (
        sampled.into_iter().map(|(_, c)| c).collect(),
        rest.into_iter().map(|(_, c)| c).collect(),
    )
}

/// Answers every call in `calls` as its phone would and times each wake-up.
/// Unless `strict`, an answer that is refused or does not wake its call is
/// counted instead of failing the run; returns the wake-ups and that count.
async fn answer_all(target: &Target, calls: Vec<Parked>, strict: bool) -> Result<(Samples, usize)> {
    let queue = Arc::new(Mutex::new(
        calls.into_iter().enumerate().collect::<Vec<_>>(),
    ));
    let mut phones = JoinSet::new();
    for p in 0..PHONES {
        let mut phone = Http1::connect(target.addr, client::source_address(p)).await?;
        let queue = queue.clone();
        phones.spawn(async move {
            let mut wake_ups = Vec::new();
            let mut failed = 0;
            loop {
                let next = queue.lock().expect("queue lock").pop();
                let Some((n, call)) = next else {
                    return Ok::<_, anyhow::Error>((wake_ups, failed));
                };
                tokio::time::sleep(generator::app_delay(n, APP_DELAY_PERIOD)).await;
                match wake(&mut phone, call).await {
                    Ok(wake_up) => wake_ups.push(wake_up),
                    Err(_) if !strict => failed += 1,
                    Err(e) => return Err(e),
                }
            }
        });
    }
    let mut all = Vec::new();
    let mut failed = 0;
    while let Some(done) = phones.join_next().await {
        let (wake_ups, failures) = done.context("a phone task panicked")??;
        all.extend(wake_ups);
        failed += failures;
    }
    Ok((Samples::new(all), failed))
}

/// Answers one parked call and returns how long its PBX waited after that.
async fn wake(phone: &mut Http1, mut call: Parked) -> Result<Duration> {
    let sent = Instant::now();
    generator::answer(phone, &call.key, &call.push).await?;
    let (reply, acked) = tokio::time::timeout(generator::PUSH_TIMEOUT, &mut call.reply)
        .await
        .with_context(|| format!("no answer to the PBX for answered call {}", call.key))?
        .context("a parked call's task failed")??;
    generator::expect_ack(&reply, &call.key)?;
    Ok(acked - sent)
}

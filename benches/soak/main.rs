//! `cargo bench --bench soak`: a long run of mixed calls against a real
//! server process on PostgreSQL + Redis, and what it must leave behind:
//! nothing. Not part of CI.
//!
//! ```text
//! cargo bench --bench soak                       # 500,000 calls over 10 minutes, then 10 M device lookups
//! cargo bench --bench soak -- --calls 50000      # the same rate, shorter
//! cargo bench --bench soak -- --minutes 30       # the same rate, longer
//! cargo bench --bench soak -- --skip-lookup      # only the soak
//! ```
//!
//! Calls are 60 % answered available (ACK), 10 % each answered not
//! available, never answered (NAK at a 500 ms wait), for an account with no
//! device, and hung up by the PBX once the phone was pushed. Every call must
//! end as its kind says. Afterwards the server must hold no parked call and
//! no wait, Redis no state key and no channel of the run, and the server's
//! memory must be within 10 % of what it was after warm-up.
//!
//! Then a store of 10 million devices (a fresh PostgreSQL schema filled by
//! `generate_series`) is asked for random devices by `sip_user_id` through
//! the `Store` trait, one at a time, for the lookup latency.
//!
//! Services: `TEST_DATABASE_URL` and `TEST_REDIS_URL`, else the development
//! defaults (127.0.0.1:5432 and :6379). The summary is printed and written
//! to `target/bench-results/soak.md`.

mod load;
mod lookup;
/// The server role's polling broker, unused by the soak (pub/sub only).
#[allow(dead_code)]
#[path = "../calls/polling.rs"]
mod polling;
#[allow(dead_code)] // The soak uses only part of what the calls bench shares.
#[path = "../calls/pushes.rs"]
mod pushes;
mod server;
/// The server role is the calls bench's: one copy of the child server.
#[path = "../calls/server_role.rs"]
mod server_role;
#[allow(dead_code)]
#[path = "../calls/sys.rs"]
mod sys;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};

use crate::load::{Ctx, Kind, Tally};
use crate::server::ServerProcess;

/// The default run: this many calls over [`DEFAULT_MINUTES`].
const DEFAULT_CALLS: u64 = 500_000;
const DEFAULT_MINUTES: f64 = 10.0;
/// How much the server's memory may grow from after warm-up to the end.
const RSS_TOLERANCE: f64 = 0.10;

#[derive(Parser, Debug)]
#[command(about = "call-notifier soak: mixed calls for minutes, then nothing may be left")]
struct Options {
    /// Calls to place (default 500,000, or the default rate times --minutes).
    #[arg(long)]
    calls: Option<u64>,
    /// Minutes to place them over (default 10, or --calls at the default rate).
    #[arg(long)]
    minutes: Option<f64>,
    /// SIP accounts with a device, rung in turn.
    #[arg(long, default_value_t = 1000)]
    devices: u64,
    /// The server's --wait-ms: how long an unanswered call waits.
    #[arg(long, default_value_t = 500)]
    wait_ms: u64,
    /// Most calls in flight at once; beyond it arrivals wait.
    #[arg(long, default_value_t = 5000)]
    max_in_flight: usize,
    /// Devices in the store of the lookup measurement.
    #[arg(long, default_value_t = 10_000_000)]
    lookup_devices: u64,
    /// Random lookups to time.
    #[arg(long, default_value_t = 10_000)]
    lookups: usize,
    /// Skip the lookup measurement.
    #[arg(long)]
    skip_lookup: bool,
    /// Skip the soak (only the lookup measurement).
    #[arg(long)]
    skip_soak: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Options {
    /// Calls and duration, from whichever was given.
    fn plan(&self) -> (u64, Duration) {
        let rate = DEFAULT_CALLS as f64 / (DEFAULT_MINUTES * 60.0);
        let (calls, minutes) = match (self.calls, self.minutes) {
            (Some(calls), Some(minutes)) => (calls, minutes),
            (Some(calls), None) => (calls, calls as f64 / rate / 60.0),
            (None, Some(minutes)) => ((rate * minutes * 60.0) as u64, minutes),
            (None, None) => (DEFAULT_CALLS, DEFAULT_MINUTES),
        };
        (
            calls.max(1),
            Duration::from_secs_f64((minutes * 60.0).max(1.0)),
        )
    }
}

fn main() -> ExitCode {
    if std::env::var_os(server_role::ROLE_VAR).is_some() {
        return server_role::main();
    }
    let options = Options::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(options)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("soak: FAILED (see the summary)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn service_urls() -> (String, String) {
    (
        std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into()),
    )
}

/// Runs what was asked; says whether every check held.
async fn run(options: Options) -> Result<bool> {
    let run_id = format!("{:08x}", rand::random::<u32>());
    let (database_url, redis_url) = service_urls();
    let mut report = String::new();
    let mut ok = true;
    writeln!(report, "# Soak run {run_id}\n")?;
    if !options.skip_soak {
        ok &= soak(&options, &run_id, &database_url, &redis_url, &mut report).await?;
    }
    if !options.skip_lookup {
        let lookups = lookup::measure(
            &database_url,
            &run_id,
            options.lookup_devices,
            options.lookups,
        )
        .await?;
        let us = &lookups.latencies_us;
        writeln!(
            report,
            "## Device lookup in a store of {} devices\n",
            thousands(lookups.devices)
        )?;
        writeln!(report, "PostgreSQL, one `devices` table ({}), filled in {:.0?} by `generate_series`; random `sip_user_id`s through `Store::device`, one at a time.\n", lookups.table_size, lookups.fill)?;
        writeln!(report, "| lookups | p50 | p90 | p99 | max |")?;
        writeln!(report, "|---|---|---|---|---|")?;
        writeln!(
            report,
            "| {} | {} | {} | {} | {} |\n",
            thousands(lookups.lookups as u64),
            micros(percentile(us, 0.50)),
            micros(percentile(us, 0.90)),
            micros(percentile(us, 0.99)),
            micros(us.last().copied().unwrap_or(0)),
        )?;
    }
    writeln!(
        report,
        "Result: {}",
        if ok { "**pass**" } else { "**FAIL**" }
    )?;
    println!("{report}");
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("soak.md"), &report)?;
    eprintln!("soak: summary written to {}", dir.join("soak.md").display());
    Ok(ok)
}

/// The soak itself; appends its section to `report`; says whether it passed.
async fn soak(
    options: &Options,
    run_id: &str,
    database_url: &str,
    redis_url: &str,
    report: &mut String,
) -> Result<bool> {
    let (calls, duration) = options.plan();
    let rate = calls as f64 / duration.as_secs_f64();
    let schema = format!("soak_{run_id}");
    let mut admin = AsyncPgConnection::establish(database_url)
        .await
        .with_context(|| format!("PostgreSQL at {database_url} does not answer"))?;
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await?;
    let separator = if database_url.contains('?') { '&' } else { '?' };
    let server_database = format!("{database_url}{separator}options=-c%20search_path%3D{schema}");
    let flags: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        &server_database,
        "--redis-url",
        redis_url,
        "--wait-ms",
        &options.wait_ms.to_string(),
        "--resend-interval-ms",
        &(options.wait_ms / 2).max(1).to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let result = soak_with_server(
        options, run_id, redis_url, &flags, calls, duration, rate, report,
    )
    .await;
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await?;
    result
}

#[allow(clippy::too_many_arguments)]
async fn soak_with_server(
    options: &Options,
    run_id: &str,
    redis_url: &str,
    flags: &[String],
    calls: u64,
    duration: Duration,
    rate: f64,
    report: &mut String,
) -> Result<bool> {
    let mut server = ServerProcess::start(flags).await?;
    let ctx = Arc::new(Ctx {
        base: format!("http://{}", server.addr),
        client: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(usize::MAX)
            .build_http(),
        pushes: server.pushes.clone(),
        first_user: 7_000_000_000 + u64::from(rand::random::<u16>()) * 100_000,
        devices: options.devices.max(1),
        key_prefix: format!("soak-{run_id}-"),
        wait: Duration::from_millis(options.wait_ms),
    });
    ctx.register_devices().await?;
    eprintln!(
        "soak: {} calls over {duration:.0?} ({rate:.0}/s) against pid {}",
        thousands(calls),
        server.pid
    );

    let tally = Arc::new(Tally::default());
    let samples: Arc<Mutex<Vec<(f64, u64)>>> = Arc::default();
    let started = Instant::now();
    let pid_rss = {
        let samples = samples.clone();
        let tally = tally.clone();
        let server = &mut server;
        move |placed: u64| -> Result<()> {
            server.check_alive()?;
            let rss = server.rss()?;
            let t = started.elapsed().as_secs_f64();
            samples.lock().expect("samples lock").push((t, rss));
            if (t as u64) % 10 == 0 {
                eprintln!(
                    "soak: {t:>5.0} s  placed {placed}  done {}  failed {}  RSS {}",
                    tally.done.load(std::sync::atomic::Ordering::Relaxed),
                    tally.failed(),
                    mib(rss)
                );
            }
            Ok(())
        }
    };
    let load_time = load::run(
        ctx.clone(),
        tally.clone(),
        calls,
        rate,
        options.max_in_flight,
        pid_rss,
    )
    .await?;
    server.check_alive()?;

    // What must be left: nothing.
    let health = wait_idle(&ctx, Duration::from_secs(10)).await?;
    let redis_left =
        redis_leftovers(redis_url, &ctx.key_prefix, calls, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = server.rss()?;
    let strays = server.pushes.strays();
    server.stop().await?;

    let samples = samples.lock().expect("samples lock").clone();
    let warm = (duration.as_secs_f64() * 0.1).max(5.0);
    let window = |from: f64, to: f64| -> Option<u64> {
        let inside: Vec<u64> = samples
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, r)| *r)
            .collect();
        (!inside.is_empty()).then(|| inside.iter().sum::<u64>() / inside.len() as u64)
    };
    let end = samples.last().map_or(0.0, |(t, _)| *t);
    let warm_rss =
        window(warm, warm + 5.0).context("no memory samples after warm-up (run longer)")?;
    let end_rss = window(end - 5.0, end + 1.0).unwrap_or(idle_rss);
    let peak_rss = samples.iter().map(|(_, r)| *r).max().unwrap_or(0);
    let rss_ok = |rss: u64| rss as f64 <= warm_rss as f64 * (1.0 + RSS_TOLERANCE);

    let failed = tally.failed();
    let mut checks: Vec<(String, String, bool)> = vec![
        (
            "every call ended as its kind says".into(),
            format!("{failed} failed"),
            failed == 0,
        ),
        (
            "pushes for calls nobody placed".into(),
            strays.to_string(),
            strays == 0,
        ),
        (
            "`/health` parked_calls / waiting_keys after".into(),
            format!("{} / {}", health.0, health.1),
            health == (0, 0),
        ),
        (
            format!(
                "Redis live call records left (`SCAN cn:{{{}*`)",
                ctx.key_prefix
            ),
            redis_left.keys.to_string(),
            redis_left.keys == 0,
        ),
        (
            "Redis answer channels left (`PUBSUB CHANNELS`, `NUMSUB` of the last keys)".into(),
            format!("{} / {}", redis_left.channels, redis_left.numsub),
            redis_left.channels == 0 && redis_left.numsub == 0,
        ),
        (
            format!("RSS after warm-up ({warm:.0} s) → end of load"),
            format!(
                "{} → {} ({:+.1} %)",
                mib(warm_rss),
                mib(end_rss),
                growth(warm_rss, end_rss)
            ),
            rss_ok(end_rss),
        ),
        (
            "RSS idle after the run (peak during it)".into(),
            format!(
                "{} ({:+.1} %; peak {})",
                mib(idle_rss),
                growth(warm_rss, idle_rss),
                mib(peak_rss)
            ),
            rss_ok(idle_rss),
        ),
    ];
    let placed_rate = calls as f64 / load_time.as_secs_f64();
    checks.insert(
        0,
        (
            "calls placed / rate achieved".into(),
            format!(
                "{} in {load_time:.0?} ({placed_rate:.0}/s of {rate:.0}/s asked)",
                thousands(calls)
            ),
            placed_rate >= rate * 0.9,
        ),
    );

    writeln!(
        report,
        "## Soak: {} calls over {:.1} min, PostgreSQL + Redis, --wait-ms {}\n",
        thousands(calls),
        duration.as_secs_f64() / 60.0,
        options.wait_ms
    )?;
    writeln!(
        report,
        "| outcome | calls | failed | PBX waited p50 | p99 |"
    )?;
    writeln!(report, "|---|---|---|---|---|")?;
    for (kind, mut stats) in tally.per_kind() {
        stats.waited_us.sort_unstable();
        let p = |q| micros(percentile(&stats.waited_us, q));
        let waited = if kind == Kind::HangUp {
            ("(hung up)".into(), String::new())
        } else {
            (p(0.5), p(0.99))
        };
        writeln!(
            report,
            "| {} | {} | {} | {} | {} |",
            kind.name(),
            thousands(stats.calls),
            stats.failed,
            waited.0,
            waited.1
        )?;
    }
    writeln!(report, "\n| check | value | |\n|---|---|---|")?;
    for (check, value, passed) in &checks {
        writeln!(
            report,
            "| {check} | {value} | {} |",
            if *passed { "ok" } else { "**FAIL**" }
        )?;
    }
    let failures = tally.failures();
    if !failures.is_empty() {
        writeln!(report, "\nFirst failures:\n")?;
        for failure in failures {
            writeln!(report, "- {failure}")?;
        }
    }
    writeln!(report)?;
    Ok(checks.iter().all(|(_, _, passed)| *passed))
}

/// Waits until `/health` reports no parked call and no wait; returns what
/// it last reported.
async fn wait_idle(ctx: &Ctx, within: Duration) -> Result<(u64, u64)> {
    use http_body_util::BodyExt;
    let started = Instant::now();
    loop {
        let request = hyper::Request::get(format!("{}/health", ctx.base))
            .body(http_body_util::Full::new(bytes::Bytes::new()))?;
        let response = ctx.client.request(request).await?;
        let body = response.into_body().collect().await?.to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body)?;
        let counts = (
            json["parked_calls"].as_u64().context("no parked_calls")?,
            json["waiting_keys"].as_u64().context("no waiting_keys")?,
        );
        if counts == (0, 0) || started.elapsed() > within {
            return Ok(counts);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct RedisLeft {
    keys: usize,
    channels: usize,
    numsub: i64,
}

/// What the run left in Redis, once it stops shrinking (the retirer works
/// off the call path), for at most `within`.
async fn redis_leftovers(
    url: &str,
    prefix: &str,
    calls: u64,
    within: Duration,
) -> Result<RedisLeft> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("Redis at {url} does not answer"))?;
    let pattern = format!("cn:{{{prefix}*");
    let started = Instant::now();
    loop {
        let mut keys = 0;
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut conn)
                .await?;
            // An ended call's tombstone stays its 70 s by design; a live
            // record (ringing or won) after the run is a leak.
            if !batch.is_empty() {
                let records: Vec<Option<String>> = redis::cmd("MGET")
                    .arg(&batch)
                    .query_async(&mut conn)
                    .await?;
                keys += records
                    .iter()
                    .flatten()
                    .filter(|r| r.starts_with("ring ") || r.starts_with("won "))
                    .count();
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await?;
        // The last keys of the run, whose subscriptions were the last to go.
        let mut numsub = redis::cmd("PUBSUB");
        numsub.arg("NUMSUB");
        for n in calls.saturating_sub(10)..calls {
            numsub.arg(format!("cn:{{{prefix}{n}}}:answer"));
        }
        let counts: Vec<(String, i64)> = numsub.query_async(&mut conn).await?;
        let numsub: i64 = counts.iter().map(|(_, n)| n).sum();
        if (keys == 0 && channels.is_empty() && numsub == 0) || started.elapsed() > within {
            return Ok(RedisLeft {
                keys,
                channels: channels.len(),
                numsub,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn micros(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.0} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} ms", us as f64 / 1000.0)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn growth(from: u64, to: u64) -> f64 {
    (to as f64 / from.max(1) as f64 - 1.0) * 100.0
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

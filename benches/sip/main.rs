//! `cargo bench --bench sip`: the SIP set-up time of a call to a sleeping
//! phone through real Kamailio (`examples/kamailio/kamailio.cfg`), from
//! the caller's INVITE sent to its 200 OK received, with the phone behind
//! a simulated mobile link (issue #13).
//!
//! ```text
//! cargo bench --bench sip               # 20 calls per mode
//! cargo bench --bench sip -- --quick    # 3 calls per mode
//! cargo bench --bench sip -- --calls N  # N calls per mode
//! ```
//!
//! Two ways for the woken phone to answer:
//!
//! - **app-driven**: the phone REGISTERs (no RFC 8599 parameters), waits
//!   for the 200, and its app posts `/api/call-response/` over a new TCP
//!   connection; the device was registered through the app API.
//! - **REGISTER answers** (RFC 8599): the phone REGISTERs with
//!   `pn-provider`/`pn-prid`/`pn-param`; Kamailio posts them to
//!   `/api/sip-registration/`, which answers the parked call.
//!
//! Then Kamailio relays the INVITE to the phone's contact, and the phone
//! answers 200 at once. Everything runs on 127.0.0.1 in this process, but
//! Kamailio: call-notifier (embedded defaults, pushing through its real
//! FCM pusher to an FCM stand-in), the caller and the phone (a few lines
//! of SIP over UDP each, [`sip`]), and the relays ([`relay`]): the phone's
//! SIP and HTTP cross a link that delays each way by [`ONE_WAY`], and a
//! tap between Kamailio and call-notifier times what call-notifier adds.
//! Every call is checked; one that is not set up fails the run.

#[path = "../../tests/common/mod.rs"]
mod common;
mod kamailio;
mod relay;
mod sip;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use common::fcm::{fcm_accepts, FcmServer, PROJECT};
use common::stand_in::Received;
use common::{sip_user_id, Backend};
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::kamailio::Kamailio;
use crate::relay::{Tap, TcpRelay, UdpRelay};
use crate::sip::{Caller, Phone, PushParameters};

/// The mobile link's delay each way: a 150 ms round trip.
const ONE_WAY: Duration = Duration::from_millis(75);
/// call-notifier's `--wait-ms`.
const WAIT_MS: u64 = 8_000;
/// The bound on each step of a call.
const STEP: Duration = Duration::from_secs(10);

const USAGE: &str = "usage: cargo bench --bench sip [-- [--quick] [--calls N]]
  --quick    3 calls per mode (default 20)
  --calls N  N calls per mode";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// REGISTER, its 200, then the app's call-response.
    AppDriven,
    /// A REGISTER with RFC 8599 parameters answers the call.
    RegisterAnswers,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::AppDriven => "app-driven (REGISTER, then call-response)",
            Mode::RegisterAnswers => "REGISTER answers (RFC 8599)",
        }
    }

    /// The part of the set-up the mobile link alone takes, in one-way
    /// trips: app-driven, the REGISTER and its 200 (2), the app's new
    /// connection (2) and its request (1), the INVITE and the 200 (2);
    /// REGISTER answers, the REGISTER (1), the INVITE and the 200 (2).
    fn link_floor(self) -> Duration {
        match self {
            Mode::AppDriven => ONE_WAY * 7,
            Mode::RegisterAnswers => ONE_WAY * 3,
        }
    }
}

/// One call, measured.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The caller's INVITE sent to its 200 OK received.
    setup: Duration,
    /// Kamailio's incoming-call request into call-notifier to the push at
    /// the FCM stand-in.
    to_push: Duration,
    /// The answer (call-response or sip-registration) into call-notifier
    /// to the incoming-call's `status=ACK` out of it.
    to_ack: Duration,
    /// Kamailio: the caller's INVITE sent to the incoming-call request into
    /// call-notifier.
    kamailio_wake: Duration,
    /// Kamailio: `status=ACK` out of call-notifier to the INVITE at the
    /// phone's end of the link (the relay).
    kamailio_relay: Duration,
}

struct Options {
    calls: usize,
    quick: bool,
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> Result<Options> {
        let mut options = Options {
            calls: 20,
            quick: false,
        };
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => {
                    options.quick = true;
                    options.calls = 3;
                }
                "--calls" => {
                    options.calls = args
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|n| *n > 0)
                        .ok_or_else(|| anyhow!("--calls takes a positive number\n{USAGE}"))?;
                }
                // cargo passes `--bench` to every bench binary.
                "--bench" => {}
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        Ok(options)
    }
}

fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sip bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sip bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Everything a call needs.
struct Bench {
    server: FcmServer,
    /// The accounts Kamailio has credentials for, one taken per call.
    accounts: std::sync::Mutex<Vec<String>>,
    /// Each push as it reached the FCM stand-in.
    pushes: tokio::sync::Mutex<mpsc::UnboundedReceiver<(Instant, Received)>>,
    tap: Tap,
    udp: UdpRelay,
    tcp: TcpRelay,
    caller: Arc<Caller>,
    phone: Phone,
}

async fn run(options: Options) -> Result<()> {
    let started = std::time::Instant::now();
    let server = FcmServer::start(&Backend::embedded(), |c| c.wait_ms = WAIT_MS).await;
    let (tx, pushes) = mpsc::unbounded_channel();
    server.fcm.answer_with(move |request| {
        let _ = tx.send((Instant::now(), request.clone()));
        fcm_accepts()
    });
    let call_notifier: SocketAddr = server.running.addr;
    let tap = Tap::start(call_notifier).await?;
    let dir = tempfile::tempdir().context("a temp dir")?;
    // Every call has an account of its own, with credentials Kamailio
    // must know from the start: a warm-up and `calls` per mode.
    let accounts: Vec<String> = (0..2 * (options.calls + 1))
        .map(|_| sip_user_id())
        .collect();
    let names: Vec<&str> = accounts.iter().map(String::as_str).collect();
    let mut kamailio = Kamailio::start(dir.path(), &format!("http://{}", tap.addr), &names).await?;
    let udp = UdpRelay::start(kamailio.addr, ONE_WAY).await?;
    let tcp = TcpRelay::start(call_notifier, ONE_WAY).await?;
    let bench = Bench {
        accounts: std::sync::Mutex::new(accounts),
        caller: Arc::new(Caller::bind(kamailio.addr).await?),
        phone: Phone::bind(udp.inner, udp.outer, kamailio.addr).await?,
        server,
        pushes: tokio::sync::Mutex::new(pushes),
        tap,
        udp,
        tcp,
    };

    let measured = measure(&bench, &options).await;
    if let Err(e) = &measured {
        eprintln!("kamailio's log (last lines):\n{}", kamailio.log_tail());
        kamailio.stop().await;
        bail!("{e:#}");
    }
    kamailio.stop().await;
    let results = measured?;
    print_report(&bench, &options, &results, started.elapsed());
    Ok(())
}

async fn measure(bench: &Bench, options: &Options) -> Result<Vec<(Mode, Vec<Sample>)>> {
    let mut results = Vec::new();
    for mode in [Mode::AppDriven, Mode::RegisterAnswers] {
        // One call first, not counted: the first push fetches an OAuth
        // token, and every path warms up.
        call(bench, mode)
            .await
            .with_context(|| format!("{}: the warm-up call", mode.label()))?;
        let mut samples = Vec::new();
        for n in 1..=options.calls {
            let sample = call(bench, mode)
                .await
                .with_context(|| format!("{}: call {n} of {}", mode.label(), options.calls))?;
            eprintln!(
                "{:<45} call {n:>2}: set-up {:>7.1} ms, call-notifier {:.2} ms + {:.2} ms",
                mode.label(),
                ms(sample.setup),
                ms(sample.to_push),
                ms(sample.to_ack)
            );
            samples.push(sample);
        }
        results.push((mode, samples));
    }
    Ok(results)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// One call to a fresh account whose phone sleeps (a device; behind the
/// proxy, a binding with push parameters too), checked from end to end.
async fn call(bench: &Bench, mode: Mode) -> Result<Sample> {
    let user = bench
        .accounts
        .lock()
        .expect("accounts lock")
        .pop()
        .context("more calls than accounts")?;
    let token = format!("sip-bench-token-{user}");
    let phone = &bench.phone;
    phone.forget().await;
    let push_parameters = || PushParameters {
        token: &token,
        project: PROJECT,
    };

    // The phone is known and asleep.
    match mode {
        Mode::AppDriven => {
            let status = bench.server.client.register("android", &user, &token).await;
            ensure!(
                status == StatusCode::CREATED,
                "registering the device through the app API: {status}"
            );
        }
        Mode::RegisterAnswers => {
            let status = phone.register(&user, Some(push_parameters()), 60).await?;
            ensure!(
                status == 200,
                "the RFC 8599 REGISTER that makes the device: {status}"
            );
            ensure!(
                bench.server.device(&user).await.is_some(),
                "the RFC 8599 REGISTER stored no device"
            );
            // Asleep with its binding alive: the proxy pushes it all the
            // same (RFC 8599). (`Contact: *` would remove the device too.)
        }
    }
    let mut pushes = bench.pushes.lock().await;
    while pushes.try_recv().is_ok() {}

    // The caller INVITEs.
    let call_id = format!("sip-bench-{}", &call_notifier::calls::random_key()[..16]);
    let caller = tokio::spawn({
        let (caller, user, call_id) = (bench.caller.clone(), user.clone(), call_id.clone());
        async move { caller.call(&user, &call_id, STEP).await }
    });

    // The push wakes the phone (the moment it reaches the FCM stand-in:
    // push delivery to a phone is not simulated, the same in both modes).
    let (pushed_at, push) = tokio::time::timeout(STEP, async {
        loop {
            let (at, push) = pushes.recv().await.ok_or_else(|| anyhow!("no pushes"))?;
            // The account's token: the key is a hash of the Call-ID now,
            // which only Kamailio can make.
            if push.json()["message"]["token"] == token.as_str() {
                return Ok::<_, anyhow::Error>((at, push));
            }
        }
    })
    .await
    .map_err(|_| {
        anyhow!("the push for {call_id} did not reach the FCM stand-in within {STEP:?}")
    })??;
    drop(pushes);
    let data = &push.json()["message"]["data"];
    let text = |key: &str| data[key].as_str().unwrap_or_default().to_owned();
    let (unique_key, start_time) = (text("unique_key"), text("message_start_time"));

    // The phone answers.
    let app = match mode {
        Mode::AppDriven => {
            let status = phone.register(&user, None, 60).await?;
            ensure!(status == 200, "the woken phone's REGISTER: {status}");
            let relay = bench.tcp.addr;
            let (key, start) = (unique_key.clone(), start_time.clone());
            Some(tokio::spawn(async move {
                call_response(relay, &key, &start).await
            }))
        }
        Mode::RegisterAnswers => {
            let status = phone.register(&user, Some(push_parameters()), 60).await?;
            ensure!(
                status == 200,
                "the woken phone's RFC 8599 REGISTER: {status}"
            );
            None
        }
    };
    let answered = phone.answer(&user, &call_id, STEP).await;
    let caller = caller.await.context("the caller's task")?;
    let answered_by_caller = caller?;
    answered?;
    if let Some(app) = app {
        let status = app.await.context("the app's task")??;
        ensure!(status == 202, "the app's call-response: {status}");
    }

    // What call-notifier added, from the tap's stamps.
    let exchanges = bench.tap.exchanges();
    let incoming = exchanges
        .iter()
        .find(|e| {
            // The account, not the Call-ID: Kamailio posts a hash of it.
            e.request.starts_with("POST /api/incoming-call/")
                && e.request.contains(&format!("sip_user_id={user}&"))
        })
        .ok_or_else(|| anyhow!("the tap saw no incoming-call for {user}"))?;
    ensure!(
        incoming.response.contains("status=ACK"),
        "the incoming-call was answered {:?}",
        incoming.response
    );
    let acked_at = incoming
        .response_at
        .ok_or_else(|| anyhow!("the incoming-call has no answer"))?;
    let answer_in = match mode {
        Mode::AppDriven => bench
            .tcp
            .delivered
            .lock()
            .expect("lock")
            .iter()
            .find(|d| d.at > pushed_at && d.request.contains(&unique_key))
            .map(|d| d.at)
            .ok_or_else(|| anyhow!("the relay delivered no call-response for {unique_key}"))?,
        Mode::RegisterAnswers => exchanges
            .iter()
            .find(|e| {
                e.request_at > pushed_at
                    && e.request.starts_with("POST /api/sip-registration/")
                    && e.request.contains(&format!("sip_user_id={user}&"))
            })
            .map(|e| e.request_at)
            .ok_or_else(|| anyhow!("the tap saw no sip-registration of {user} after the push"))?,
    };
    let invite_at_link = bench
        .udp
        .from_kamailio
        .lock()
        .expect("lock")
        .iter()
        .find(|(_, text)| text.starts_with("INVITE ") && text.contains(&call_id))
        .map(|(at, _)| *at)
        .ok_or_else(|| anyhow!("the relay saw no INVITE of {call_id}"))?;
    let invite_sent = answered_by_caller.invite_sent;
    ensure!(
        invite_sent < incoming.request_at
            && incoming.request_at < pushed_at
            && answer_in < acked_at
            && acked_at < invite_at_link,
        "the stamps are out of order: from the INVITE sent, incoming-call in {:?}, push {:?}, answer in {:?}, status=ACK out {:?}, INVITE at the link {:?}",
        incoming.request_at.checked_duration_since(invite_sent),
        pushed_at.checked_duration_since(invite_sent),
        answer_in.checked_duration_since(invite_sent),
        acked_at.checked_duration_since(invite_sent),
        invite_at_link.checked_duration_since(invite_sent),
    );
    Ok(Sample {
        setup: answered_by_caller.ok_received - invite_sent,
        to_push: pushed_at - incoming.request_at,
        to_ack: acked_at - answer_in,
        kamailio_wake: incoming.request_at - invite_sent,
        kamailio_relay: invite_at_link - acked_at,
    })
}

/// The woken app's `POST /api/call-response/`, on a new connection
/// through the delaying relay: the answer's status.
async fn call_response(relay: SocketAddr, unique_key: &str, start_time: &str) -> Result<u16> {
    let body = serde_urlencoded::to_string([
        ("unique_key", unique_key),
        ("message_start_time", start_time),
        ("available", "true"),
    ])?;
    let request = format!(
        "POST /api/call-response/ HTTP/1.1\r\n\
         Host: {relay}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, async {
        let mut stream = TcpStream::connect(relay).await?;
        stream.set_nodelay(true)?;
        stream.write_all(request.as_bytes()).await?;
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|_| anyhow!("the app's call-response: no answer within {STEP:?}"))??;
    let answer = String::from_utf8_lossy(&answer);
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("the app's call-response: not HTTP: {answer:?}"))
}

/// The nearest-rank percentile `p` of sorted `values`.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.1} ms", ms(d))
}

fn fmt_fine(d: Duration) -> String {
    format!("{:.2} ms", ms(d))
}

fn print_report(bench: &Bench, options: &Options, results: &[(Mode, Vec<Sample>)], took: Duration) {
    let (udp_n, udp_mean, udp_max) = bench.udp.applied.summary();
    let (tcp_n, tcp_mean, tcp_max) = bench.tcp.applied.summary();
    let (conn_n, conn_mean, conn_max) = bench.tcp.first_bytes.summary();
    println!();
    println!(
        "SIP set-up through Kamailio: {} calls per mode{}, {:.0} s in all",
        options.calls,
        if options.quick { " (--quick)" } else { "" },
        took.as_secs_f64()
    );
    println!(
        "Mobile link: {} ms each way ({} ms round trip). Applied: SIP {} datagrams, mean {}, max {}; HTTP {} chunks, mean {}, max {}; a new connection's first bytes ({}), accept to delivery (one round trip + one way), mean {}, max {}",
        ms(ONE_WAY),
        ms(ONE_WAY * 2),
        udp_n,
        fmt_fine(udp_mean),
        fmt_fine(udp_max),
        tcp_n,
        fmt_fine(tcp_mean),
        fmt_fine(tcp_max),
        conn_n,
        fmt_fine(conn_mean),
        fmt_fine(conn_max),
    );
    println!();
    println!("| mode | calls | set-up p50 | set-up p90 | set-up max | mobile link alone | call-notifier p50 | call-notifier max |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (mode, samples) in results {
        let mut setup: Vec<Duration> = samples.iter().map(|s| s.setup).collect();
        let mut own: Vec<Duration> = samples.iter().map(|s| s.to_push + s.to_ack).collect();
        setup.sort();
        own.sort();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            mode.label(),
            samples.len(),
            fmt_ms(percentile(&setup, 50.0)),
            fmt_ms(percentile(&setup, 90.0)),
            fmt_ms(percentile(&setup, 100.0)),
            fmt_ms(mode.link_floor()),
            fmt_fine(percentile(&own, 50.0)),
            fmt_fine(percentile(&own, 100.0)),
        );
    }
    println!();
    println!("call-notifier's share in two parts, and Kamailio's before and after it (p50 / max):");
    println!();
    println!("| mode | call-notifier: incoming-call in → push at FCM | call-notifier: answer in → status=ACK out | Kamailio: INVITE sent → incoming-call in | Kamailio: status=ACK out → INVITE at the link |");
    println!("|---|---:|---:|---:|---:|");
    for (mode, samples) in results {
        let column = |part: fn(&Sample) -> Duration| {
            let mut values: Vec<Duration> = samples.iter().map(part).collect();
            values.sort();
            format!(
                "{} / {}",
                fmt_fine(percentile(&values, 50.0)),
                fmt_fine(percentile(&values, 100.0))
            )
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            mode.label(),
            column(|s| s.to_push),
            column(|s| s.to_ack),
            column(|s| s.kamailio_wake),
            column(|s| s.kamailio_relay),
        );
    }
    let p50 = |mode: Mode| {
        results.iter().find(|(m, _)| *m == mode).map(|(_, s)| {
            let mut setup: Vec<Duration> = s.iter().map(|s| s.setup).collect();
            setup.sort();
            percentile(&setup, 50.0)
        })
    };
    if let (Some(app), Some(register)) = (p50(Mode::AppDriven), p50(Mode::RegisterAnswers)) {
        println!();
        println!(
            "REGISTER answers sets up {:.0} ms sooner at the median ({:.1} mobile round trips).",
            ms(app.saturating_sub(register)),
            app.saturating_sub(register).as_secs_f64() / (ONE_WAY * 2).as_secs_f64()
        );
    }
}

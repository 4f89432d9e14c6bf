//! The server role: the bench binary re-executed as a child process that
//! runs the real call-notifier server, so the generator measures it from
//! outside, over loopback, as a PBX and phones would, and reads its memory
//! and CPU from `/proc` without counting its own.
//!
//! The one thing stood in for is the push service: [`PipePusher`] writes one
//! line per call push to stdout, which is how the generator learns that a
//! call's wait is open and what to answer with. The protocol on stdout:
//!
//! ```text
//! 127.0.0.1:40123                     first line: the bound address
//! bench-ab12cd34-lat-7 1718000000.123 1   then: unique_key message_start_time attempt
//! ```
//!
//! The server's flags come as arguments (the same flags as `call-notifier`);
//! with [`POLL_VAR`] set, its parked calls poll (see `polling.rs`);
//! the process exits when its stdin closes, so it never outlives the harness.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use call_notifier::config::Cli;
use call_notifier::push::{Payload, PushOutcome, PushTarget, Pusher};
use call_notifier::server::open_broker;
use call_notifier::store::{App, Platform};
use call_notifier::Server;
use clap::Parser;

use crate::polling::{PollingBroker, POLL_VAR};
use tracing_subscriber::EnvFilter;

/// The environment variable that selects this role in the bench binary.
pub const ROLE_VAR: &str = "CALL_NOTIFIER_BENCH_ROLE";
/// Its value for the server role.
pub const ROLE_SERVER: &str = "server";
/// The app every bench device registers with.
pub const APP_ID: &str = "com.example.bench";
/// The platform every bench device registers on: Android resends every
/// resend interval, the general case of the schedule.
pub const PLATFORM: Platform = Platform::Android;

/// How long open requests get to finish once the harness is done; parked
/// calls would otherwise hold the shutdown for their whole wait.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Hands every call push to the generator as one line on stdout.
///
/// `std`'s stdout is line-buffered: each line leaves in one `write(2)`, under
/// stdout's lock, so lines never interleave. The write happens on the
/// runtime's worker thread, which is fine because the pipe holds 1 MiB and
/// the generator reads it continuously; it costs a few microseconds, less
/// than a real push's TLS write.
struct PipePusher;

#[async_trait]
impl Pusher for PipePusher {
    async fn send(&self, _target: &PushTarget, payload: &Payload) -> PushOutcome {
        if let Payload::Call {
            unique_key,
            message_start_time,
            attempt,
            ..
        } = payload
        {
            // A closed pipe means the harness is gone; the stdin watcher
            // ends the process.
            let _ = writeln!(
                std::io::stdout().lock(),
                "{unique_key} {message_start_time} {attempt}"
            );
        }
        if let Payload::CallEnded {
            unique_key, reason, ..
        } = payload
        {
            let _ = writeln!(std::io::stdout().lock(), "{unique_key} ended {reason}");
        }
        PushOutcome::Delivered
    }
}

/// Runs the server role until stdin closes.
pub fn main() -> ExitCode {
    let args = std::iter::once("call-notifier".into()).chain(std::env::args_os().skip(1));
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("bench server: bad flags: {e}");
            return ExitCode::FAILURE;
        }
    };
    let filter =
        EnvFilter::try_from_env("CALL_NOTIFIER_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    crate::sys::raise_open_files_limit();
    crate::sys::enlarge_pipe(libc::STDOUT_FILENO);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bench server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(cli.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: call_notifier::config::Config) -> anyhow::Result<()> {
    let mut server = Server::new(config.clone()).with_pusher(Arc::new(PipePusher));
    if let Ok(ms) = std::env::var(POLL_VAR) {
        let interval = Duration::from_millis(ms.parse().context("bad poll interval")?);
        let inner = open_broker(&config).await?;
        let polling = PollingBroker::new(inner, config.redis_url.as_deref(), interval).await?;
        server = server.with_broker(Arc::new(polling));
    }
    let running = server.start().await?;
    running
        .state
        .store
        .put_app(&App {
            platform: PLATFORM,
            app_id: APP_ID.into(),
            credentials: None,
        })
        .await
        .context("cannot add the bench app")?;
    writeln!(std::io::stdout().lock(), "{}", running.addr).context("stdout is closed")?;
    stdin_closed().await;
    // Whatever is still parked is cut off: the harness has stopped listening.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, running.stop()).await;
    Ok(())
}

/// Resolves when stdin reaches its end: the harness closed it or died.
/// A plain thread, since a blocking read has no place on the runtime.
async fn stdin_closed() {
    let (closed, on_close) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin().lock();
        while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
        let _ = closed.send(());
    });
    let _ = on_close.await;
}

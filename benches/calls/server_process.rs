//! The harness's handle on one server process: start it in the server role
//! with a configuration, route its push lines to the calls waiting for
//! them, read its memory and CPU, and stop it, failing when it died.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use crate::client::{self, Http1};
use crate::polling::POLL_VAR;
use crate::pushes::Pushes;
use crate::server_role::{ROLE_SERVER, ROLE_VAR};
use crate::services::Backend;
use crate::sys;

/// How long a server may take to start (migrations included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to exit once its stdin closes.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The executable run in the server role instead of this one, when set:
/// `call-notifier-bench-server` (`server_bin.rs`), the server role built as
/// the product is, without the bench's dev-dependencies; with it two builds
/// of the server (one with profile-guided optimisation, contrib/pgo-build)
/// are measured by one generator.
pub const SERVER_EXE_VAR: &str = "CALL_NOTIFIER_BENCH_SERVER_EXE";

/// The executable a server process runs: [`SERVER_EXE_VAR`], or this one.
pub fn server_exe() -> Result<std::path::PathBuf> {
    match std::env::var_os(SERVER_EXE_VAR).filter(|exe| !exe.is_empty()) {
        Some(exe) => Ok(exe.into()),
        None => std::env::current_exe().context("cannot find the bench binary"),
    }
}

/// The code measured, for the report: [`sys::revision`], and the server
/// executable when it is not this binary.
pub fn revision() -> String {
    match std::env::var(SERVER_EXE_VAR) {
        Ok(exe) if !exe.is_empty() => format!("{}, servers run by {exe}", sys::revision()),
        _ => sys::revision(),
    }
}

/// How a parked call learns of its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Event-driven (the default).
    PubSub,
    /// Every parked call reads its state every `interval_ms`, as the
    /// service this one replaces did (the bench's `PollingBroker`).
    Poll { interval_ms: u64 },
}

impl Mode {
    pub fn label(self) -> String {
        match self {
            Mode::PubSub => "pub/sub".into(),
            Mode::Poll { interval_ms } => format!("poll@{interval_ms}ms"),
        }
    }

    /// The environment the server role reads it from.
    fn env(self) -> Option<(&'static str, String)> {
        match self {
            Mode::PubSub => None,
            Mode::Poll { interval_ms } => Some((POLL_VAR, interval_ms.to_string())),
        }
    }
}

/// What a bench server runs with.
#[derive(Clone)]
pub struct Settings {
    pub backend: Backend,
    pub mode: Mode,
    /// `--wait-ms`: how long a PBX request is held.
    pub wait_ms: u64,
    /// `--resend-interval-ms`.
    pub resend_interval_ms: u64,
    /// `--max-devices-per-account`.
    pub devices_per_account: usize,
}

impl Settings {
    /// The server's defaults (4 s wait, resend every second) on `backend`.
    pub fn defaults(backend: &Backend, mode: Mode) -> Settings {
        Settings {
            backend: backend.clone(),
            mode,
            wait_ms: 4_000,
            resend_interval_ms: 1_000,
            devices_per_account: 1,
        }
    }
}

/// What the calls of a scenario need of the server; cheap to clone into tasks.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub pushes: Arc<Pushes>,
}

/// One running server process.
pub struct ServerProcess {
    pub target: Target,
    pub pid: u32,
    child: Child,
    /// Closing it tells the server to exit.
    stdin: Option<ChildStdin>,
    reader: tokio::task::JoinHandle<()>,
    /// The SQLite file's directory, removed when the server is gone.
    _dir: tempfile::TempDir,
}

/// The server's `/health` verdict, as far as the harness reads it.
#[derive(Debug, Clone, Copy)]
pub struct Health {
    pub parked_calls: u64,
    pub waiting_keys: u64,
}

/// Runs `scenario` on a fresh server started with `settings`, then stops the
/// server, failing if it did not exit cleanly. When the scenario fails and
/// the server has died, the error says that first: what the generator saw
/// (a refused connection, a closed pipe) is only the symptom.
pub async fn with_server<T>(
    settings: &Settings,
    scenario: impl AsyncFnOnce(&mut ServerProcess) -> Result<T>,
) -> Result<T> {
    let mut server = ServerProcess::start(settings).await?;
    match scenario(&mut server).await {
        Ok(result) => {
            server.stop().await?;
            Ok(result)
        }
        Err(e) => match server.child.try_wait() {
            Ok(Some(status)) => Err(e.context(format!("the server process died ({status})"))),
            // Dropping the server kills it.
            _ => Err(e),
        },
    }
}

impl ServerProcess {
    /// Starts a server process and waits until it listens.
    pub async fn start(settings: &Settings) -> Result<ServerProcess> {
        let dir = tempfile::tempdir().context("cannot make a temporary directory")?;
        let mut args: Vec<String> = vec!["--listen".into(), "127.0.0.1:0".into()];
        args.extend(settings.backend.server_args(dir.path()));
        args.extend([
            "--wait-ms".into(),
            settings.wait_ms.to_string(),
            "--resend-interval-ms".into(),
            settings.resend_interval_ms.to_string(),
            "--max-devices-per-account".into(),
            settings.devices_per_account.to_string(),
        ]);
        let mut command = Command::new(server_exe()?);
        // Only the flags above configure it, whatever this shell exports.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CALL_NOTIFIER_") {
                command.env_remove(name);
            }
        }
        if let Some((name, value)) = settings.mode.env() {
            command.env(name, value);
        }
        let mut child = command
            .args(&args)
            .env(ROLE_VAR, ROLE_SERVER)
            .env("CALL_NOTIFIER_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a server process")?;
        let pid = child.id().context("the server process has no pid")?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout pipe")?);
        let mut first = String::new();
        let read = tokio::time::timeout(START_TIMEOUT, stdout.read_line(&mut first)).await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            let status = child.try_wait().ok().flatten();
            bail!(
                "the server did not start ({}); its error is above",
                status.map_or("no answer".to_owned(), |s| s.to_string())
            );
        }
        let addr: SocketAddr = first
            .trim()
            .parse()
            .with_context(|| format!("the server's first line is not an address: {first:?}"))?;
        let pushes = Arc::new(Pushes::default());
        let reader = tokio::spawn(pushes.clone().read(stdout));
        Ok(ServerProcess {
            target: Target { addr, pushes },
            pid,
            child,
            stdin,
            reader,
            _dir: dir,
        })
    }

    /// Resident memory now, in bytes.
    pub fn rss(&self) -> Result<u64> {
        sys::rss_bytes(self.pid)
    }

    /// CPU time used so far.
    pub fn cpu(&self) -> Result<Duration> {
        sys::cpu_time(self.pid)
    }

    /// Fails when the server has exited, or a push came that nobody placed.
    pub fn check(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the server process died ({status})");
        }
        let strays = self.target.pushes.strays();
        if strays > 0 {
            bail!("{strays} pushes for calls the generator never placed (or pushed twice)");
        }
        Ok(())
    }

    /// Asks `/health` how many calls are parked.
    pub async fn health(&self) -> Result<Health> {
        let mut conn = Http1::connect(self.target.addr, client::source_address(0)).await?;
        let reply = conn.get("/health").await?;
        let json: serde_json::Value = serde_json::from_slice(&reply.body)
            .with_context(|| format!("/health is not JSON: {}", reply.text()))?;
        let number = |field: &str| {
            json[field]
                .as_u64()
                .with_context(|| format!("/health has no {field}: {json}"))
        };
        Ok(Health {
            parked_calls: number("parked_calls")?,
            waiting_keys: number("waiting_keys")?,
        })
    }

    /// Waits until the server holds no call and no key, for at most
    /// `within`: every way out of a wait must clean up after itself.
    pub async fn wait_idle(&self, within: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let health = self.health().await?;
            if health.parked_calls == 0 && health.waiting_keys == 0 {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                bail!(
                    "the server still holds {} parked calls and {} keys after {within:?}",
                    health.parked_calls,
                    health.waiting_keys
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes the server's stdin and waits for it to exit cleanly.
    pub async fn stop(mut self) -> Result<()> {
        self.check()?;
        drop(self.stdin.take());
        let status = match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("the server did not exit within {STOP_TIMEOUT:?} of its stdin closing");
            }
        };
        let _ = (&mut self.reader).await;
        if !status.success() {
            bail!("the server exited with {status}");
        }
        Ok(())
    }
}

//! The server under soak: the bench binary re-executed as a child process
//! that runs the real call-notifier server, so its memory is its own and
//! the load reaches it over loopback as a PBX's and phones' would.
//!
//! The child is the calls bench's server role (`benches/calls/server_role.rs`):
//! every call push becomes one line on its stdout, `unique_key
//! message_start_time attempt`, after a first line with the bound address,
//! and it exits when its stdin closes. This side starts it and routes the
//! push lines to the calls waiting for them.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use crate::pushes::Pushes;
/// The app every soak device registers with: the one the shared server
/// role adds.
pub use crate::server_role::APP_ID;
use crate::server_role::{ROLE_SERVER, ROLE_VAR};

/// The running server process.
pub struct ServerProcess {
    pub addr: SocketAddr,
    pub pid: u32,
    pub pushes: Arc<Pushes>,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl ServerProcess {
    pub async fn start(flags: &[String]) -> Result<ServerProcess> {
        let mut command = Command::new(std::env::current_exe()?);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CALL_NOTIFIER_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .args(flags)
            .env(ROLE_VAR, ROLE_SERVER)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the server process")?;
        let pid = child.id().context("no pid")?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut first = String::new();
        let read =
            tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut first)).await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            bail!("the server did not start; its error is above");
        }
        let addr = first.trim().parse().context("the server's first line")?;
        let pushes = Arc::new(Pushes::default());
        tokio::spawn(pushes.clone().read(stdout));
        Ok(ServerProcess {
            addr,
            pid,
            pushes,
            child,
            stdin,
        })
    }

    /// Resident memory now, in bytes.
    pub fn rss(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("cannot read the server's /proc status (did it die?)")?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .context("no VmRSS")?;
        Ok(kib * 1024)
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the server process died ({status})");
        }
        Ok(())
    }

    pub async fn stop(mut self) -> Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("the server exited with {status}");
                }
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("the server did not exit within 10 s of its stdin closing")
            }
        }
    }
}

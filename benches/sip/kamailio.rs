//! Kamailio running `examples/kamailio/kamailio.cfg`, as tests/kamailio.rs
//! runs it, stopped (with its children) when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::net::UdpSocket;
use tokio::process::{Child, Command};

use crate::common::digest::credentials;

const CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/kamailio/kamailio.cfg"
);

pub struct Kamailio {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: PathBuf,
}

impl Kamailio {
    /// Starts Kamailio on a free loopback UDP port, posting to
    /// `call_notifier` (a base URL), logging into `dir`, with digest
    /// credentials for `accounts`; returns once it answers SIP. The caller
    /// sends from loopback, which is the PBX here: its INVITEs are not
    /// challenged (the phone's REGISTERs are).
    pub async fn start(dir: &Path, call_notifier: &str, accounts: &[&str]) -> Result<Kamailio> {
        let db = credentials(dir, accounts);
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = std::fs::File::create(dir.join("kamailio.log"))?;
        let child = Command::new("kamailio")
            .args(["-f", CONFIG, "-DD", "-E", "-Y"])
            .arg(dir)
            .args(["-A", &format!("LISTEN=udp:{addr}")])
            .args(["-A", &format!("CALL_NOTIFIER=\"{call_notifier}\"")])
            .args(["-A", &format!("DBURL=\"text://{}\"", db.display())])
            .args(["-A", "PBX_NETWORK=\"127.0.0.1/32\""])
            // Longer than the bench's --wait-ms (8 s).
            .args(["-A", "HTTP_TIMEOUT=10"])
            .args(["-A", "CALL_KEY_SECRET=\"sip-bench-call-key-secret\""])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("kamailio does not run (apt-get install kamailio kamailio-utils-modules)")?;
        let mut kamailio = Kamailio {
            addr,
            child: Some(child),
            dir: dir.to_owned(),
        };
        kamailio.ready().await?;
        Ok(kamailio)
    }

    /// Waits until Kamailio answers an OPTIONS (any answer will do).
    async fn ready(&mut self) -> Result<()> {
        let probe = UdpSocket::bind("127.0.0.1:0").await?;
        let me = probe.local_addr()?;
        let addr = self.addr;
        let mut buf = vec![0u8; 65_536];
        for n in 0..100 {
            if let Some(child) = &mut self.child {
                if let Some(status) = child.try_wait()? {
                    bail!("kamailio exited {status}:\n{}", self.log_tail());
                }
            }
            let options = format!(
                "OPTIONS sip:probe@{addr} SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {me};branch=z9hG4bK-probe{n}\r\n\
                 From: <sip:probe@{me}>;tag=probe\r\n\
                 To: <sip:probe@{addr}>\r\n\
                 Call-ID: probe-{n}\r\n\
                 CSeq: 1 OPTIONS\r\n\
                 Max-Forwards: 70\r\n\
                 Content-Length: 0\r\n\r\n"
            );
            probe.send_to(options.as_bytes(), addr).await?;
            let answered =
                tokio::time::timeout(Duration::from_millis(100), probe.recv_from(&mut buf)).await;
            if answered.is_ok() {
                return Ok(());
            }
        }
        bail!(
            "kamailio did not answer SIP within 10 s:\n{}",
            self.log_tail()
        )
    }

    /// The end of Kamailio's log, for a failure message.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("kamailio.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Stops Kamailio: SIGTERM, which its main process passes to its
    /// children, then SIGKILL if it is still there after 5 s.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            // SAFETY: a plain kill(2) of our own child's pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        // Not stopped (a failure unwinding): SIGTERM for the children's
        // sake; kill_on_drop then SIGKILLs the main process.
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            // SAFETY: a plain kill(2) of our own child's pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

//! A real `call-notifier` process: the binary as an operator runs it, for
//! what only a process shows (signals, exit codes, its file limit).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::bounded;

/// What a test's server logs: info, why a REGISTER answered no call (debug
/// in `http::sip`) and which keys Redis lost were stored again (debug in
/// `broker::redis::restore`), so a failing chaos seed's logs say them.
const LOG_FILTER: &str =
    "info,call_notifier::http::sip=debug,call_notifier::broker::redis::restore=debug";

/// A running `call-notifier`, its address read from its first log line.
pub struct Process {
    child: Child,
    pub url: String,
    /// Every log line it wrote, as it writes them.
    logs: Arc<Mutex<Vec<String>>>,
}

impl Process {
    pub async fn start(args: &[&str]) -> Process {
        Process::start_limited(args, None).await
    }

    /// Starts it with at most `open_files` file descriptors
    /// (`RLIMIT_NOFILE`), when given.
    pub async fn start_limited(args: &[&str], open_files: Option<u64>) -> Process {
        Process::start_program(
            Path::new(env!("CARGO_BIN_EXE_call-notifier")),
            args,
            open_files,
        )
        .await
    }

    /// Starts another build of call-notifier than this one, e.g. the
    /// previous release beside this build in the rolling-upgrade test.
    pub async fn start_binary(binary: &Path, args: &[&str]) -> Process {
        Process::start_program(binary, args, None).await
    }

    async fn start_program(binary: &Path, args: &[&str], open_files: Option<u64>) -> Process {
        let mut command = Command::new(binary);
        command
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .env("CALL_NOTIFIER_LOG", LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(limit) = open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; it only lowers the
            // child's own limit between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("start call-notifier");
        let stderr = child.stderr.take().expect("stderr");
        // Its logs are read on a thread of their own, so it never blocks on
        // a full pipe; the first line that says where it listens is passed on.
        let logs = Arc::new(Mutex::new(Vec::new()));
        let kept = logs.clone();
        let (listening, addr) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut listening = Some(listening);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if listening.is_some() {
                    let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    if event["message"] == "call-notifier listening" {
                        let addr = event["addr"].as_str().expect("an address").to_owned();
                        let _ = listening.take().expect("not sent yet").send(addr);
                    }
                }
                kept.lock().expect("logs lock").push(line);
            }
        });
        let addr = bounded("call-notifier listening", addr)
            .await
            .expect("the process logs until it listens");
        Process {
            child,
            url: format!("http://{addr}"),
            logs,
        }
    }

    /// Its process id, for signals and `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line so far, as written (JSON).
    pub fn log_lines(&self) -> Vec<String> {
        self.logs.lock().expect("logs lock").clone()
    }

    /// How many log lines so far carry `message`.
    pub fn logged(&self, message: &str) -> usize {
        self.logs
            .lock()
            .expect("logs lock")
            .iter()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .is_ok_and(|event| event["message"].as_str() == Some(message))
            })
            .count()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status();
        assert!(status.expect("kill runs").success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn exit_code(mut self, within: Duration) -> Option<i32> {
        let until = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!("the process did not exit within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

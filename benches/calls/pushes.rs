//! The push lines a bench server writes (see `server_role.rs`), routed to
//! the calls waiting for them. Shared by the calls and the soak benches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::ChildStdout;
use tokio::sync::oneshot;

/// The first push of a call, as the server handed it to the pipe pusher
/// (resends are only counted).
#[derive(Debug)]
pub struct Push {
    /// Exactly as pushed: the app echoes it back unchanged.
    pub message_start_time: String,
}

/// Routes push lines to the calls waiting for them. A call registers its
/// key before the PBX request leaves, so no push can arrive unclaimed.
#[derive(Default)]
pub struct Pushes {
    waiting: Mutex<HashMap<String, oneshot::Sender<Push>>>,
    /// Pushes with `attempt > 1`: calls not answered within a resend interval.
    resends: AtomicU64,
    /// First pushes nobody waited for: a call the generator never placed,
    /// or one pushed twice. Any is a failure.
    strays: AtomicU64,
    /// `call_ended` notices, by the device key they end, for the scenario
    /// that times them: when each line was read.
    ended: Mutex<HashMap<String, oneshot::Sender<Instant>>>,
}

// Each bench binary uses its own part of this (the calls bench counts
// resends, the soak forgets keys whose call failed).
#[allow(dead_code)]
impl Pushes {
    /// Returns the receiver of the first push of `key`.
    pub fn expect(&self, key: &str) -> oneshot::Receiver<Push> {
        let (sender, receiver) = oneshot::channel();
        self.waiting
            .lock()
            .expect("push map lock")
            .insert(key.to_owned(), sender);
        receiver
    }

    /// Returns the receiver of the `call_ended` notice of the device key `key`.
    pub fn expect_end(&self, key: &str) -> oneshot::Receiver<Instant> {
        let (sender, receiver) = oneshot::channel();
        self.ended
            .lock()
            .expect("notice map lock")
            .insert(key.to_owned(), sender);
        receiver
    }

    pub fn resends(&self) -> u64 {
        self.resends.load(Ordering::Relaxed)
    }

    pub fn strays(&self) -> u64 {
        self.strays.load(Ordering::Relaxed)
    }

    /// Forgets a key whose push never came (the call failed otherwise).
    pub fn forget(&self, key: &str) {
        self.waiting.lock().expect("push map lock").remove(key);
    }

    fn deliver(&self, line: &str) -> Result<()> {
        let mut fields = line.split(' ');
        let (Some(key), Some(message_start_time), Some(attempt), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            bail!("malformed push line from the server: {line:?}");
        };
        if message_start_time == "ended" {
            // A phone told the call is over: timed by whoever waits for it,
            // else only a consequence of how its call ended.
            let waiter = self.ended.lock().expect("notice map lock").remove(key);
            if let Some(waiter) = waiter {
                let _ = waiter.send(Instant::now());
            }
            return Ok(());
        }
        let attempt: u32 = attempt
            .parse()
            .with_context(|| format!("malformed attempt in push line {line:?}"))?;
        if attempt > 1 {
            self.resends.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let waiter = self.waiting.lock().expect("push map lock").remove(key);
        match waiter {
            // A waiter that gave up already has its own error to report.
            Some(waiter) => {
                let _ = waiter.send(Push {
                    message_start_time: message_start_time.to_owned(),
                });
            }
            None => {
                self.strays.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Reads push lines until the server closes its stdout. Dropping the
    /// waiters then fails every call still waiting for a push.
    pub async fn read(self: Arc<Self>, stdout: BufReader<ChildStdout>) {
        let mut lines = stdout.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Err(e) = self.deliver(&line) {
                eprintln!("bench: {e:#}");
                self.strays.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.waiting.lock().expect("push map lock").clear();
    }
}

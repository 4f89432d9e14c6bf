//! The three call-notifier processes: started with the run's flags, picked
//! at random for each request, stopped (SIGTERM, a drain) and started again
//! by a fault, and measured (memory, descriptors) after warm-up and at the
//! end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::StatusCode;
use rand::Rng;

use crate::common::process::Process;
use crate::common::TestClient;
use crate::events::{Lifetime, Usage};
use crate::recorder::Recorder;

/// How long a drain may take: the longest wait plus the notices.
const DRAIN: Duration = Duration::from_secs(30);

struct Slot {
    process: Option<Process>,
    /// `None` while the instance is stopping or down: no traffic goes there.
    client: Option<TestClient>,
    lifetime: usize,
}

pub struct Fleet {
    args: Vec<String>,
    /// Where each lifetime's log is written when it ends
    /// (`lifetime-<n>.log`, JSON lines), to read a failing seed by.
    logs: std::path::PathBuf,
    slots: Mutex<Vec<Slot>>,
    rec: Arc<Recorder>,
    /// When a lifetime's memory and descriptors are taken as its level.
    warm_up: Duration,
}

impl Fleet {
    /// Starts `count` instances with `args`, each ready.
    pub async fn start(
        count: usize,
        args: Vec<String>,
        rec: Arc<Recorder>,
        warm_up: Duration,
        logs: std::path::PathBuf,
    ) -> Arc<Fleet> {
        // A rerun of the seed starts from no logs.
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::create_dir_all(&logs).expect("the run's log directory");
        let fleet = Arc::new(Fleet {
            args,
            logs,
            slots: Mutex::new(Vec::new()),
            rec,
            warm_up,
        });
        for instance in 0..count {
            let slot = fleet.launch(instance).await;
            fleet.slots.lock().expect("slots").push(slot);
        }
        fleet
    }

    /// Starts instance `instance` and waits until it is ready. A start that
    /// fails (the process exits: it cannot reach PostgreSQL while a fault
    /// cuts it) is tried again a second later, as systemd's `Restart=`
    /// would, for up to two minutes.
    async fn launch(self: &Arc<Self>, instance: usize) -> Slot {
        let mut tries = 0;
        let (process, client) = loop {
            tries += 1;
            let args = self.args.clone();
            // Process::start panics when the process exits before it
            // listens: caught here, in a task of its own.
            let started = tokio::spawn(async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Process::start(&args).await
            })
            .await;
            if let Ok(process) = started {
                let client = TestClient::new(process.url.clone());
                if ready(&client, Duration::from_secs(20)).await {
                    break (process, client);
                }
            }
            assert!(
                tries < 120,
                "instance {}: did not start in {tries} tries",
                instance + 1
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let lifetime = self.rec.with(|o| {
            o.lifetimes.push(Lifetime {
                instance,
                started: self.rec.now(),
                tries,
                ..Lifetime::default()
            });
            o.lifetimes.len() - 1
        });
        let pid = process.pid();
        let fleet = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(fleet.warm_up).await;
            let alive = fleet
                .slots
                .lock()
                .expect("slots")
                .iter()
                .any(|s| s.lifetime == lifetime && s.client.is_some());
            if alive {
                if let Some(usage) = usage(pid) {
                    fleet.rec.with(|o| o.lifetimes[lifetime].warm = Some(usage));
                }
            }
        });
        Slot {
            process: Some(process),
            client: Some(client),
            lifetime,
        }
    }

    /// A live instance at random: its client and lifetime.
    pub fn pick(&self, rng: &mut impl Rng) -> Option<(TestClient, usize)> {
        let slots = self.slots.lock().expect("slots");
        let live: Vec<&Slot> = slots.iter().filter(|s| s.client.is_some()).collect();
        if live.is_empty() {
            return None;
        }
        let slot = live[rng.random_range(0..live.len())];
        Some((slot.client.clone().expect("live"), slot.lifetime))
    }

    pub fn live(&self) -> usize {
        let slots = self.slots.lock().expect("slots");
        slots.iter().filter(|s| s.client.is_some()).count()
    }

    /// SIGTERM instance `instance` (no traffic reaches it from then on),
    /// waits for its drain, keeps it down for `down`, starts it again.
    pub async fn restart(self: &Arc<Self>, instance: usize, down: Duration) {
        let (process, lifetime) = {
            let mut slots = self.slots.lock().expect("slots");
            let slot = &mut slots[instance];
            slot.client = None;
            (slot.process.take(), slot.lifetime)
        };
        let Some(process) = process else { return };
        self.rec
            .with(|o| o.lifetimes[lifetime].signalled = Some(self.rec.now()));
        process.signal("TERM");
        let lines = process.log_lines();
        let exit = process.exit_code(DRAIN).await;
        self.keep_logs(lifetime, &lines);
        self.rec.with(|o| o.lifetimes[lifetime].exit = Some(exit));
        tokio::time::sleep(down).await;
        let slot = self.launch(instance).await;
        self.slots.lock().expect("slots")[instance] = slot;
    }

    /// Fresh clients for the instances: the traffic's pooled connections
    /// are dropped with the old ones, so the servers' descriptors can be
    /// counted.
    pub fn fresh_clients(&self) {
        for slot in self.slots.lock().expect("slots").iter_mut() {
            if let (Some(process), Some(_)) = (&slot.process, &slot.client) {
                slot.client = Some(TestClient::new(process.url.clone()));
            }
        }
    }

    /// Stops every instance (SIGKILL as their handles drop): the run is
    /// over, and tasks still holding the fleet must not keep them alive.
    pub fn stop_all(&self) {
        let processes: Vec<(usize, Process)> = self
            .slots
            .lock()
            .expect("slots")
            .iter_mut()
            .filter_map(|s| {
                s.client = None;
                Some((s.lifetime, s.process.take()?))
            })
            .collect();
        for (lifetime, process) in processes {
            self.keep_logs(lifetime, &process.log_lines());
        }
    }

    /// Writes a lifetime's log lines to `lifetime-<n>.log`.
    fn keep_logs(&self, lifetime: usize, lines: &[String]) {
        let path = self.logs.join(format!("lifetime-{lifetime}.log"));
        if let Err(e) = std::fs::write(&path, lines.join("\n")) {
            eprintln!("chaos: cannot write {}: {e}", path.display());
        }
    }

    /// Which instance (from 0) process `pid` is.
    pub fn instance_of(&self, pid: u32) -> Option<usize> {
        self.slots
            .lock()
            .expect("slots")
            .iter()
            .position(|s| s.process.as_ref().is_some_and(|p| p.pid() == pid))
    }

    /// Every live instance: its client, lifetime and pid.
    pub fn instances(&self) -> Vec<(TestClient, usize, u32)> {
        let slots = self.slots.lock().expect("slots");
        slots
            .iter()
            .filter_map(|s| Some((s.client.clone()?, s.lifetime, s.process.as_ref()?.pid())))
            .collect()
    }
}

/// Whether `/health/ready` says 200 within `within`; false too when the
/// process stops answering.
async fn ready(client: &TestClient, within: Duration) -> bool {
    let until = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < until {
        let request = hyper::Request::get(format!("{}/health/ready", client.base()))
            .body(http_body_util::Full::default())
            .expect("a request");
        match client.try_request(request).await {
            Ok(reply) if reply.status == StatusCode::OK => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Resident memory and open descriptors of `pid`.
pub fn usage(pid: u32) -> Option<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |field: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Usage {
        anon_bytes: kib("RssAnon:")? * 1024,
        file_bytes: kib("RssFile:")? * 1024,
        fds,
    })
}

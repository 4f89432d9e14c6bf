//! The faults: a seeded schedule (every 20-60 s, one or two at a time,
//! each healed after 5-30 s) and what each does to the run's own services
//! (its Redis Cluster, its PostgreSQL proxy, the FCM stand-in, its
//! instances). Nothing here touches a service another test uses.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::fault::{cluster_nodes, node_pid, FaultCluster, TcpProxy};
use crate::events::{Fault, FaultKind, Ms};
use crate::fleet::Fleet;
use crate::recorder::Recorder;

/// One fault of the schedule.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub at: Ms,
    pub kind: FaultKind,
    pub heal_after: Ms,
    pub seed: u64,
}

/// Gaps between faults and how long each lasts, in ms.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub first: (Ms, Ms),
    pub gap: (Ms, Ms),
    pub heal: (Ms, Ms),
}

impl Pace {
    /// The issue's: every 20-60 s, healed after 5-30 s (the bench's; the
    /// test's minute runs a faster pace).
    #[allow(dead_code)]
    pub const FULL: Pace = Pace {
        first: (10_000, 30_000),
        gap: (20_000, 60_000),
        heal: (5_000, 30_000),
    };
}

/// The faults of a run of `duration`, none opening in its last 10 s,
/// each of one of `kinds` (a schedule of fewer kinds is not a subset of
/// the full one's: the seed draws from the kinds it is given).
pub fn schedule(seed: u64, duration: Ms, pace: Pace, kinds: &[FaultKind]) -> Vec<Plan> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xfa17);
    let mut plans = Vec::new();
    let mut at = rng.random_range(pace.first.0..=pace.first.1);
    while at + 10_000 < duration {
        let count = if rng.random_bool(0.3) { 2 } else { 1 };
        let mut kinds = kinds.to_vec();
        for _ in 0..count {
            if kinds.is_empty() {
                break;
            }
            let kind = kinds.remove(rng.random_range(0..kinds.len()));
            // Two at a time: never two on Redis, nor two on FCM.
            kinds.retain(|k| !(k.redis() && kind.redis() || k.fcm() && kind.fcm()));
            plans.push(Plan {
                at,
                kind,
                heal_after: rng.random_range(pace.heal.0..=pace.heal.1),
                seed: rng.random(),
            });
        }
        at += rng.random_range(pace.gap.0..=pace.gap.1);
    }
    plans
}

/// What FCM does now (the stand-in reads it for every push).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FcmMode {
    Accept = 0,
    Errors = 1,
    Slow = 2,
}

impl FcmMode {
    pub fn read(mode: &AtomicU8) -> FcmMode {
        match mode.load(Ordering::Relaxed) {
            1 => FcmMode::Errors,
            2 => FcmMode::Slow,
            _ => FcmMode::Accept,
        }
    }
}

/// The services the faults break.
pub struct Faults {
    pub rec: Arc<Recorder>,
    pub cluster: FaultCluster,
    pub postgres: TcpProxy,
    pub fleet: Arc<Fleet>,
    /// The [`FcmMode`] the FCM stand-in answers in.
    fcm: Arc<AtomicU8>,
    /// One fault per service at a time.
    busy: [AtomicBool; 4],
    /// The pid of a Redis node paused now: woken when the run ends early,
    /// or nothing could shut the cluster down.
    paused: std::sync::Mutex<Option<i32>>,
}

impl Drop for Faults {
    fn drop(&mut self) {
        if let Some(pid) = self.paused.lock().map(|mut p| p.take()).ok().flatten() {
            signal(pid, libc::SIGCONT);
        }
    }
}

impl Faults {
    pub fn new(
        rec: Arc<Recorder>,
        cluster: FaultCluster,
        postgres: TcpProxy,
        fleet: Arc<Fleet>,
        fcm: Arc<AtomicU8>,
    ) -> Arc<Faults> {
        Arc::new(Faults {
            rec,
            cluster,
            postgres,
            fleet,
            fcm,
            busy: Default::default(),
            paused: std::sync::Mutex::new(None),
        })
    }

    /// Opens and heals every fault of `plans` at its time; returns once
    /// every one is healed.
    pub async fn drive(self: &Arc<Self>, plans: Vec<Plan>) -> usize {
        let mut tasks = Vec::new();
        for plan in plans {
            tokio::time::sleep_until(self.rec.instant(plan.at).into()).await;
            tasks.push(tokio::spawn(self.clone().one(plan)));
        }
        let mut skipped = 0;
        for task in tasks {
            if !task.await.expect("a fault task") {
                skipped += 1;
            }
        }
        skipped
    }

    fn service(kind: FaultKind) -> usize {
        match kind {
            FaultKind::KillMaster | FaultKind::PauseMaster | FaultKind::CutInstanceRedis => 0,
            FaultKind::PostgresCut => 1,
            FaultKind::FcmErrors | FaultKind::FcmSlow => 2,
            FaultKind::RestartInstance => 3,
        }
    }

    /// One fault: opened, held, healed, recorded. False when its service
    /// was still broken (or healing) from the one before: skipped.
    async fn one(self: Arc<Self>, plan: Plan) -> bool {
        let busy = &self.busy[Self::service(plan.kind)];
        if busy.swap(true, Ordering::AcqRel) {
            return false;
        }
        let mut rng = StdRng::seed_from_u64(plan.seed);
        let hold = Duration::from_millis(plan.heal_after);
        let start = self.rec.now();
        let target = match plan.kind {
            FaultKind::KillMaster | FaultKind::PauseMaster => {
                let Some(port) = self.healthy_master(&mut rng).await else {
                    busy.store(false, Ordering::Release);
                    return false;
                };
                let pid = node_pid(port).await;
                let kill = plan.kind == FaultKind::KillMaster;
                if !kill {
                    *self.paused.lock().expect("paused") = Some(pid);
                }
                signal(pid, if kill { libc::SIGKILL } else { libc::SIGSTOP });
                let start = self.rec.now();
                tokio::time::sleep(hold).await;
                if kill {
                    self.start_node(port).await;
                } else {
                    signal(pid, libc::SIGCONT);
                    *self.paused.lock().expect("paused") = None;
                }
                self.record(plan.kind, format!("Redis :{port}"), start);
                // Healed once every replica is back in sync.
                self.cluster.synced(Duration::from_secs(60)).await;
                self.settle().await;
                busy.store(false, Ordering::Release);
                return true;
            }
            FaultKind::PostgresCut => {
                self.postgres.cut();
                tokio::time::sleep(hold).await;
                self.postgres.restore().await;
                "PostgreSQL".to_owned()
            }
            FaultKind::FcmErrors | FaultKind::FcmSlow => {
                let mode = if plan.kind == FaultKind::FcmErrors {
                    FcmMode::Errors
                } else {
                    FcmMode::Slow
                };
                self.fcm.store(mode as u8, Ordering::Relaxed);
                tokio::time::sleep(hold).await;
                self.fcm.store(FcmMode::Accept as u8, Ordering::Relaxed);
                "FCM".to_owned()
            }
            FaultKind::RestartInstance => {
                if self.fleet.live() < 3 {
                    busy.store(false, Ordering::Release);
                    return false;
                }
                let instance = rng.random_range(0..3);
                self.fleet.restart(instance, hold).await;
                format!("instance {}", instance + 1)
            }
            FaultKind::CutInstanceRedis => {
                let live = self.fleet.instances();
                if live.is_empty() {
                    busy.store(false, Ordering::Release);
                    return false;
                }
                let (_, _, pid) = live[rng.random_range(0..live.len())];
                let instance = self.fleet.instance_of(pid).map_or(0, |i| i + 1);
                let healed = tokio::time::Instant::now() + hold;
                let mut cut = 0;
                while tokio::time::Instant::now() < healed {
                    cut += self.cut_redis(pid).await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                format!("instance {instance} ({cut} connections killed)")
            }
        };
        self.record(plan.kind, target, start);
        busy.store(false, Ordering::Release);
        true
    }

    /// Has the Redis nodes kill every connection process `pid` holds to
    /// them (`CLIENT KILL ADDR`, by the local ports of its sockets); says
    /// how many were killed. A cluster client connects to every node by the
    /// address the cluster announces, so no proxy in front of the seed
    /// addresses could cut them.
    async fn cut_redis(&self, pid: u32) -> usize {
        let mut killed = 0;
        for (local, remote) in tcp_connections(pid) {
            if !self.cluster.ports.contains(&remote) {
                continue;
            }
            let mut kill = redis::cmd("CLIENT");
            kill.arg("KILL")
                .arg("ADDR")
                .arg(format!("127.0.0.1:{local}"));
            if crate::common::fault::node_command::<()>(remote, &kill)
                .await
                .is_ok()
            {
                killed += 1;
            }
        }
        killed
    }

    fn record(&self, kind: FaultKind, target: String, start: Ms) {
        let end = self.rec.now();
        self.rec.with(|o| {
            o.faults.push(Fault {
                kind,
                target,
                start,
                end,
            })
        });
    }

    /// A master whose replica is in sync, at random; `None` while the
    /// cluster is not whole (three masters, each with a live replica).
    async fn healthy_master(&self, rng: &mut StdRng) -> Option<u16> {
        let nodes = self.nodes().await?;
        let masters: Vec<_> = nodes
            .iter()
            .filter(|n| n.master && !n.failed && !n.slots.is_empty())
            .collect();
        let whole = masters.len() == 3
            && masters.iter().all(|m| {
                nodes
                    .iter()
                    .any(|r| !r.failed && r.master_id.as_deref() == Some(m.id.as_str()))
            });
        if !whole {
            return None;
        }
        Some(masters[rng.random_range(0..masters.len())].port)
    }

    /// The cluster as a live node sees it.
    pub async fn nodes(&self) -> Option<Vec<crate::common::fault::ClusterNode>> {
        for port in self.cluster.ports {
            let alive = crate::common::fault::node_command::<String>(port, &redis::cmd("PING"))
                .await
                .is_ok();
            if alive {
                return Some(cluster_nodes(port).await);
            }
        }
        None
    }

    /// Waits (up to a minute) until the cluster is whole again.
    pub async fn settle(&self) {
        let mut rng = StdRng::seed_from_u64(0);
        for _ in 0..600 {
            if self.healthy_master(&mut rng).await.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the chaos cluster did not become whole again within a minute");
    }

    /// Starts a killed node again, as `.ci/redis-cluster` started it: it
    /// rejoins from its nodes.conf, as a replica of the node that took over.
    async fn start_node(&self, port: u16) {
        let dir = self.cluster.dir.join(port.to_string());
        let status = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "yes",
            ])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1500"])
            .arg("--cluster-config-file")
            .arg(dir.join("nodes.conf"))
            .arg("--dir")
            .arg(&dir)
            .args(["--save", "", "--appendonly", "no"])
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .status()
            .await
            .expect("run redis-server");
        assert!(
            status.success(),
            "redis-server on {port} did not start again"
        );
    }
}

fn signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) on the pid of a redis-server of this run's cluster.
    let done = unsafe { libc::kill(pid, signal) };
    assert_eq!(done, 0, "signal {signal} to redis-server {pid}");
}

/// The (local port, remote port) of every IPv4 TCP connection process
/// `pid` holds: its socket descriptors' inodes, looked up in
/// `/proc/<pid>/net/tcp`.
fn tcp_connections(pid: u32) -> Vec<(u16, u16)> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            let inode = link.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(inode.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let port = |address: &str| {
        address
            .rsplit_once(':')
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
            inodes
                .contains(*inode)
                .then_some((port(local)?, port(remote)?))
        })
        .collect()
}

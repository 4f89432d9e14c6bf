//! One chaos run: starts its services (a Redis Cluster on ports of its own,
//! a fresh PostgreSQL schema behind a proxy it can cut, the FCM stand-in,
//! three instances), drives the traffic and the faults, reads what was
//! left once the load stopped, and hands everything to the oracle.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;

use crate::common::fault::{proxied_database_at, FaultCluster};
use crate::common::fcm::{fcm_accepts, StandIns};
use crate::common::stand_in::{Answer, Received};
use crate::common::APP;
use crate::events::{FaultKind, Key, Ms, Observations, Push};
use crate::faults::{self, Faults, FcmMode, Pace};
use crate::fleet::{usage, Fleet};
use crate::oracle::{judge, Verdict};
use crate::recorder::Recorder;
use crate::traffic::{self, Traffic, Woken};

/// The PostgreSQL a run makes its schema in, unless `TEST_DATABASE_URL`
/// names another.
const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The tombstone: how long an ended call's record stays (README).
const TOMBSTONE_MS: Ms = 70_000;

/// What a run does.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub duration: Ms,
    /// Calls a second.
    pub rate: f64,
    pub pace: Pace,
    /// The kinds of fault the schedule draws from.
    pub faults: Vec<FaultKind>,
    pub accounts: usize,
    pub wait_ms: Ms,
    /// The run's Redis Cluster.
    pub ports: [u16; 6],
    /// When an instance's memory and descriptors are taken as its level.
    pub warm_up: Duration,
}

/// What a run saw, and the oracle's verdict on it.
pub struct Run {
    pub options: Options,
    pub observations: Observations,
    pub verdict: Verdict,
    pub skipped_calls: usize,
    pub skipped_faults: usize,
}

/// Where a run of `seed` keeps its instances' logs and its violations:
/// `target/tmp/chaos-<seed>/`.
pub fn logs_dir(seed: u64) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{seed}"))
}

pub async fn run(options: Options) -> Run {
    let database_url = std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DATABASE_URL.into());
    let cluster_dir = format!("/tmp/chaos-cluster-{}", options.ports[0]);
    let cluster = FaultCluster::start_on(options.ports, &cluster_dir).await;
    let (postgres, database_url) = proxied_database_at(&database_url).await;
    let rec = Arc::new(Recorder::new(Observations {
        seed: options.seed,
        wait_ms: options.wait_ms,
        tombstone_ms: TOMBSTONE_MS,
        ..Observations::default()
    }));
    let mode = Arc::new(AtomicU8::new(FcmMode::Accept as u8));
    let (woken, phones) = mpsc::unbounded_channel();
    let stand_ins = StandIns::start(fcm(rec.clone(), mode.clone(), woken)).await;
    add_apps(&database_url, &stand_ins);
    let wait = options.wait_ms.to_string();
    let fcm_url = stand_ins.fcm.url();
    let args: Vec<String> = [
        "serve",
        "--database-url",
        &database_url,
        "--redis-url",
        &cluster.url(),
        "--fcm-base-url",
        &fcm_url,
        "--wait-ms",
        &wait,
        "--max-devices-per-account",
        "4",
    ]
    .map(str::to_owned)
    .to_vec();
    let fleet = Fleet::start(
        3,
        args,
        rec.clone(),
        options.warm_up,
        logs_dir(options.seed),
    )
    .await;
    let traffic = Traffic::new(
        rec.clone(),
        fleet.clone(),
        options.wait_ms,
        traffic::accounts(options.seed, options.accounts),
    );
    traffic.register_all(options.seed).await;
    let faults = Faults::new(rec.clone(), cluster, postgres, fleet.clone(), mode);

    let start = rec.now();
    let mut calls = traffic::schedule(options.seed, options.rate, options.duration);
    calls.iter_mut().for_each(|c| c.at += start);
    let mut breaks = faults::schedule(
        options.seed,
        options.duration,
        options.pace,
        &options.faults,
    );
    breaks.iter_mut().for_each(|f| f.at += start);
    eprintln!(
        "chaos: seed {}, {} calls and {} faults scheduled over {} s",
        options.seed,
        calls.len(),
        breaks.len(),
        options.duration / 1000
    );
    tokio::spawn(traffic.clone().phones(phones));
    let breaking = tokio::spawn({
        let faults = faults.clone();
        async move { faults.drive(breaks).await }
    });
    traffic.drive(calls, 5_000).await;
    // The last calls end, late answers and notices come.
    tokio::time::sleep(Duration::from_millis(options.wait_ms + 8_000)).await;
    let skipped_faults = breaking.await.expect("the faults task");
    faults.settle().await;
    // Calls a heal woke end; then the traffic's connections close.
    tokio::time::sleep(Duration::from_millis(options.wait_ms + 1_000)).await;
    fleet.fresh_clients();
    tokio::time::sleep(Duration::from_secs(2)).await;

    leftovers_of_instances(&rec, &fleet).await;
    leftovers_in_redis(&rec, &faults).await;
    fleet.stop_all();
    let observations = rec.take();
    let verdict = judge(&observations);
    // Every violation, where the report shows the first few of each rule.
    let listed: Vec<String> = verdict
        .violations
        .iter()
        .map(|v| match v.call.map(|i| (i, &observations.calls[i])) {
            Some((i, call)) => format!(
                "rule {} call {i} ({:?}, call_id {}, sent {} ms, lifetime {}): {}",
                v.rule, call.kind, call.call_id, call.sent, call.lifetime, v.what
            ),
            None => format!("rule {}: {}", v.rule, v.what),
        })
        .collect();
    let path = logs_dir(options.seed).join("violations.txt");
    if let Err(e) = std::fs::write(&path, listed.join("\n")) {
        eprintln!("chaos: cannot write {}: {e}", path.display());
    }
    let skipped_calls = *traffic.skipped.lock().expect("skipped");
    Run {
        options,
        observations,
        verdict,
        skipped_calls,
        skipped_faults,
    }
}

/// The FCM stand-in's script: answers as the fault mode says, records
/// every push, and wakes the phone a call push was delivered to.
fn fcm(
    rec: Arc<Recorder>,
    mode: Arc<AtomicU8>,
    woken: mpsc::UnboundedSender<Woken>,
) -> impl Fn(&Received) -> Answer + Send + Sync + 'static {
    let errors = AtomicUsize::new(0);
    move |request| {
        let answer = match FcmMode::read(&mode) {
            FcmMode::Accept => fcm_accepts(),
            FcmMode::Slow => fcm_accepts().after(Duration::from_secs(1)),
            FcmMode::Errors if errors.fetch_add(1, Ordering::Relaxed) % 2 == 0 => {
                Answer::json(500, json!({"error": {"code": 500, "status": "INTERNAL"}}))
            }
            FcmMode::Errors => Answer::json(
                429,
                json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}),
            )
            .header("retry-after", "1"),
        };
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let message = &body["message"];
        let data = &message["data"];
        let text = |value: &serde_json::Value| value.as_str().map(str::to_owned);
        let push = Push {
            at: rec.now(),
            token: text(&message["token"]).unwrap_or_default(),
            kind: text(&data["type"]).unwrap_or_default(),
            unique_key: text(&data["unique_key"]).unwrap_or_default(),
            call_id: text(&data["call_id"]),
            reason: text(&data["reason"]),
            attempt: data["attempt"].as_str().and_then(|a| a.parse().ok()),
            delivered: answer.status == 200,
        };
        rec.with(|o| o.pushes.push(push.clone()));
        if push.delivered && push.kind == "call" {
            let _ = woken.send(Woken {
                message_start_time: text(&data["message_start_time"]).unwrap_or_default(),
                push,
            });
        }
        answer
    }
}

/// The app, through the binary: Android pushing to the FCM stand-in, and
/// iOS without credentials (log-only).
fn add_apps(database_url: &str, stand_ins: &StandIns) {
    let account = stand_ins.account.to_str().expect("a UTF-8 path");
    for extra in [
        &["--platform", "android", "--fcm-service-account", account][..],
        &["--platform", "apns"][..],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_call-notifier"))
            .args([
                "app",
                "add",
                "--app-id",
                APP,
                "--database-url",
                database_url,
            ])
            .args(extra)
            .output()
            .expect("run call-notifier app add");
        assert!(
            out.status.success(),
            "app add {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every live instance's parked calls, call counts, memory and descriptors.
async fn leftovers_of_instances(rec: &Recorder, fleet: &Fleet) {
    for (client, lifetime, pid) in fleet.instances() {
        let health = client.get("/health").await.json();
        let metrics = client.get("/metrics").await.body;
        let counts: BTreeMap<String, u64> = metrics
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("call_notifier_incoming_calls_total{outcome=\"")?;
                let (outcome, value) = rest.split_once("\"} ")?;
                Some((outcome.to_owned(), value.trim().parse().ok()?))
            })
            .collect();
        let now = usage(pid);
        rec.with(|o| {
            let life = &mut o.lifetimes[lifetime];
            life.parked = health["parked_calls"].as_u64();
            life.metrics = Some(counts);
            life.end = now;
        });
    }
}

/// Every `cn:*` key on the masters with its TTL, and every channel left on
/// any node (a replica's apart).
async fn leftovers_in_redis(rec: &Recorder, faults: &Faults) {
    let nodes = faults.nodes().await.expect("a live node");
    let mut keys = Vec::new();
    let mut channels = Vec::new();
    let mut stranded = Vec::new();
    for node in &nodes {
        let client = redis::Client::open(node.url()).expect("a node URL");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("the node answers");
        if node.master {
            let names: Vec<String> = redis::cmd("KEYS")
                .arg("cn:*")
                .query_async(&mut conn)
                .await
                .expect("KEYS");
            for chunk in names.chunks(500) {
                let mut pipe = redis::pipe();
                for name in chunk {
                    pipe.cmd("PTTL").arg(name);
                }
                let ttls: Vec<i64> = pipe.query_async(&mut conn).await.expect("PTTL");
                let seen_at = rec.now();
                for (name, pttl) in chunk.iter().zip(ttls) {
                    if pttl != -2 {
                        keys.push(Key {
                            name: name.clone(),
                            pttl_ms: pttl,
                            seen_at,
                        });
                    }
                }
            }
        }
        for kind in ["CHANNELS", "SHARDCHANNELS"] {
            let names: Vec<String> = redis::cmd("PUBSUB")
                .arg(kind)
                .arg("cn:*")
                .query_async(&mut conn)
                .await
                .expect("PUBSUB");
            let left = names.into_iter().map(|n| format!("{n} on :{}", node.port));
            if node.master {
                channels.extend(left);
            } else {
                stranded.extend(left);
            }
        }
    }
    rec.with(|o| {
        o.keys = keys;
        o.channels = channels;
        o.stranded = stranded;
    });
}

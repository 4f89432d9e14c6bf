//! The results as a markdown report: the machine, one table per scenario,
//! and the targets with an honest verdict each.

use std::fmt::Write;
use std::time::Duration;

use crate::fork::Fork;
use crate::latency::Latency;
use crate::scale::{Scale, Transport};
use crate::server_process::Mode;
use crate::stats::{self, Samples};
use crate::sys::Machine;
use crate::throughput::Throughput;

/// Everything one run measured, and its context.
pub struct Results {
    pub machine: Machine,
    /// The code measured (see [`crate::sys::revision`]).
    pub revision: String,
    pub quick: bool,
    /// The flags after `--`, as given (e.g. ` -- --quick`).
    pub flags: String,
    /// PostgreSQL's and Redis's versions, when the shared half ran.
    pub services: Option<String>,
    pub open_files: u64,
    pub latency_concurrency: usize,
    pub latency: Vec<Latency>,
    pub scale: Vec<Scale>,
    pub throughput: Vec<Throughput>,
    pub fork: Vec<Fork>,
    pub clients: Vec<crate::clients::Client>,
    pub took: Duration,
}

const POLL_100: Mode = Mode::Poll { interval_ms: 100 };
const REDIS: &str = "postgres+redis";
const CLUSTER: &str = "postgres+redis-cluster";
const EMBEDDED: &str = "sqlite+memory";

impl Results {
    fn latency(&self, backend: &str, mode: Mode) -> Option<&Samples> {
        self.latency
            .iter()
            .find(|l| l.backend == backend && l.mode == mode)
            .map(|l| &l.samples)
    }

    /// `poll@N` over pub/sub at quantile `q`, for `backend`.
    fn ratio(&self, backend: &str, poll: Mode, q: f64) -> Option<f64> {
        let pubsub = self.latency(backend, Mode::PubSub)?.percentile(q);
        let poll = self.latency(backend, poll)?.percentile(q);
        Some(poll.as_secs_f64() / pubsub.as_secs_f64().max(1e-9))
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# call-notifier benchmark results\n");
        let _ = writeln!(
            md,
            "- Run: `cargo bench --bench calls{}` on {}, {} in all.",
            self.flags,
            self.revision,
            minutes(self.took)
        );
        let _ = writeln!(
            md,
            "- Machine: {}, {} cores, {:.0} GiB RAM, Linux {}; load average at start {}.",
            m.cpu, m.cores, m.memory_gib, m.kernel, m.load_at_start
        );
        let _ = writeln!(
            md,
            "- Services on loopback: {}. Open-files limit: {}.",
            self.services.as_deref().unwrap_or("none (--no-shared)"),
            self.open_files
        );
        let _ = writeln!(
            md,
            "- Server and generator are separate processes on the same cores; the server logs at `warn`; pushes go to a pipe instead of APNs/FCM.\n"
        );
        if !self.latency.is_empty() {
            self.latency_tables(&mut md);
        }
        if !self.scale.is_empty() {
            self.scale_table(&mut md);
        }
        if !self.throughput.is_empty() {
            self.throughput_table(&mut md);
        }
        if !self.fork.is_empty() {
            self.fork_table(&mut md);
        }
        if !self.clients.is_empty() {
            self.clients_table(&mut md);
        }
        self.targets_table(&mut md);
        md
    }

    fn latency_tables(&self, md: &mut String) {
        let _ = writeln!(md, "## Wake-up latency\n");
        let _ = writeln!(
            md,
            "From the app's call-response leaving the generator to `status=ACK` read on the PBX's connection. \
             {} calls in flight at a time, each phone answering at its own phase within 100 ms of its push.\n",
            self.latency_concurrency
        );
        let _ = writeln!(
            md,
            "| backend | broker mode | calls | min | p50 | p90 | p99 | max |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
        for l in &self.latency {
            let s = l.samples.summary();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                l.backend,
                l.mode.label(),
                s.count,
                stats::duration(s.min),
                stats::duration(s.p50),
                stats::duration(s.p90),
                stats::duration(s.p99),
                stats::duration(s.max)
            );
        }
        let _ = writeln!(
            md,
            "\nHow much longer the PBX waits when the server polls:\n"
        );
        let _ = writeln!(
            md,
            "| backend | poll@100ms ÷ pub/sub, p50 | p99 | poll@10ms ÷ pub/sub, p50 | p99 |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|");
        for backend in [EMBEDDED, REDIS] {
            let ten = Mode::Poll { interval_ms: 10 };
            let cells: Vec<String> = [(POLL_100, 0.5), (POLL_100, 0.99), (ten, 0.5), (ten, 0.99)]
                .into_iter()
                .map(|(mode, q)| {
                    self.ratio(backend, mode, q)
                        .map_or("–".into(), |r| format!("{r:.0}×"))
                })
                .collect();
            if cells.iter().all(|c| c == "–") {
                continue;
            }
            let _ = writeln!(md, "| {backend} | {} |", cells.join(" | "));
        }
        let _ = writeln!(md);
    }

    fn scale_table(&self, md: &mut String) {
        let _ = writeln!(md, "## Parked calls\n");
        let _ = writeln!(
            md,
            "PBX requests held open at once (120 s wait, one push each). RSS per call = (RSS parked − RSS idle) ÷ calls. \
             CPU and Redis counters over a quiet window while all calls wait. Wake-up: calls answered while the rest stay parked. \
             Clean-up: from the PBX hanging up on the rest until the server (and Redis) hold nothing of them.\n"
        );
        let _ = writeln!(
            md,
            "| backend | mode | parked | refused | transport | placing took | RSS idle | RSS parked | RSS per call | server CPU | Redis cmd/s | Redis CPU | wake-up p99 (answered) | clean-up |"
        );
        let _ = writeln!(
            md,
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for s in &self.scale {
            let (commands, redis_cpu) = s.redis.map_or(("–".into(), "–".into()), |load| {
                (
                    format!("{:.0}", load.commands),
                    format!("{:.1}%", load.cpu_percent),
                )
            });
            let wake_up = if s.wake_up.len() == 0 {
                format!("– (0 of {})", s.failed_answers)
            } else if s.failed_answers > 0 {
                format!(
                    "{} ({} ok, {} failed)",
                    stats::duration(s.wake_up.percentile(0.99)),
                    s.wake_up.len(),
                    s.failed_answers
                )
            } else {
                format!(
                    "{} ({})",
                    stats::duration(s.wake_up.percentile(0.99)),
                    s.wake_up.len()
                )
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1}% | {} | {} | {} | {} |",
                s.backend,
                s.mode.label(),
                s.parked,
                s.refused,
                s.transport.label(),
                stats::duration(s.park_time),
                stats::mib(s.rss_idle as f64),
                stats::mib(s.rss_parked as f64),
                stats::kib(s.rss_per_call()),
                s.cpu_percent,
                commands,
                redis_cpu,
                wake_up,
                s.cleanup.map_or("incomplete".into(), stats::duration)
            );
        }
        let notes: Vec<String> = self
            .scale
            .iter()
            .flat_map(|s| {
                s.notes.iter().map(move |note| {
                    format!("- {} {} {}: {note}.", s.backend, s.mode.label(), s.parked)
                })
            })
            .collect();
        let busiest = self
            .scale
            .iter()
            .filter_map(|s| s.redis_background)
            .max_by(|a, b| a.commands.total_cmp(&b.commands));
        if let Some(background) = busiest {
            let _ = writeln!(
                md,
                "\nRedis columns are net of Redis's load from other clients, measured with the server idle before each run \
                 (at most {:.0} cmd/s and {:.1}% CPU in this run).",
                background.commands, background.cpu_percent
            );
        }
        if !notes.is_empty() {
            let _ = writeln!(md, "\nWhere the polling comparison broke down:\n");
            let _ = writeln!(md, "{}", notes.join("\n"));
        }
        let _ = writeln!(md);
    }

    fn throughput_table(&self, md: &mut String) {
        let _ = writeln!(md, "## Throughput\n");
        let _ = writeln!(
            md,
            "Complete call set-ups (incoming call → push → call-response → `status=ACK`), the app answering at once. \
             CPU as % of one core ({}% is the whole machine): the server, the generator (this harness), Redis (all its clients), \
             and the rest of the machine's busy time (PostgreSQL, the kernel's network work not charged to a process, anything else running).\n",
            self.machine.cores * 100
        );
        let _ = writeln!(
            md,
            "| backend | calls under way | set-ups | seconds | set-ups/s | set-up p50 | set-up p99 | resends | server CPU | generator CPU | Redis CPU | rest |"
        );
        let _ = writeln!(
            md,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for t in &self.throughput {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.1} | **{:.0}** | {} | {} | {} | {:.0}% | {:.0}% | {} | {:.0}% |",
                t.backend,
                t.concurrency,
                t.calls,
                t.elapsed.as_secs_f64(),
                t.per_second(),
                stats::duration(t.setups.percentile(0.5)),
                stats::duration(t.setups.percentile(0.99)),
                t.resends,
                t.cpu.server,
                t.cpu.generator,
                t.cpu.redis.map_or("–".into(), |r| format!("{r:.0}%")),
                t.cpu.rest
            );
        }
        let _ = writeln!(md);
    }

    fn fork_table(&self, md: &mut String) {
        let devices = self
            .fork
            .first()
            .map_or(crate::fork::DEVICES, |f| f.per_account);
        let _ = writeln!(
            md,
            "## A call's whole life, {devices} devices per account\n"
        );
        let _ = writeln!(
            md,
            "Every call pushes {devices} devices of its account. Wake-up: from the first device's call-response leaving the generator to `status=ACK` read \
             by the PBX, calls one at a time, the phone answering at its own phase within 200 ms of its push (both processes idle in between). \
             Hang-up to notice: from the PBX closing its parked request to each device's `call_ended` notice leaving the server. \
             Throughput: as above, every call pushing {devices} devices. \
             Floor: the same wake-up, timed by the same client, against a plain thread standing in for the server that, on Redis, \
             runs one script like the answer script (benches/calls/floor.rs), in blocks alternating with the server's: what the machine and the \
             harness take; the rest is call-notifier's.\n"
        );
        let _ = writeln!(
            md,
            "| backend | wake-up p50 | wake-up p99 | floor p50 | floor p99 | call-notifier's share, p50 | hang-up → notice p50 | hang-up → notice p99 | set-ups/s | server CPU |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for f in &self.fork {
            let (wake_up, floor) = (f.wake_up.percentile(0.5), f.floor.percentile(0.5));
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | **{:.0}** | {:.0}% |",
                f.backend,
                stats::duration(wake_up),
                stats::duration(f.wake_up.percentile(0.99)),
                stats::duration(floor),
                stats::duration(f.floor.percentile(0.99)),
                stats::duration(wake_up.saturating_sub(floor)),
                stats::duration(f.notice.percentile(0.5)),
                stats::duration(f.notice.percentile(0.99)),
                f.throughput.per_second(),
                f.throughput.cpu.server
            );
        }
        let _ = writeln!(md);
    }

    fn clients_table(&self, md: &mut String) {
        let _ = writeln!(md, "## The Redis client\n");
        let _ = writeln!(
            md,
            "The answer script's shape (benches/calls/floor.rs) through each client on a two-worker runtime: idle round trip, one at a time after \
             0 to 200 ms of idleness; throughput, 128 tasks back to back (benches/calls/clients.rs).\n"
        );
        let _ = writeln!(md, "| client | idle p50 | idle p99 | scripts/s |");
        let _ = writeln!(md, "|---|---:|---:|---:|");
        for c in &self.clients {
            let _ = writeln!(
                md,
                "| {} | {} | {} | **{:.0}** |",
                c.client,
                stats::duration(c.idle.percentile(0.5)),
                stats::duration(c.idle.percentile(0.99)),
                c.per_second
            );
        }
        let _ = writeln!(md);
    }

    fn targets_table(&self, md: &mut String) {
        let _ = writeln!(md, "## Targets\n");
        if self.quick {
            let _ = writeln!(md, "A quick run checks that every call completes; its sizes are too small to judge the targets.\n");
        }
        let _ = writeln!(md, "| target | measured | verdict |");
        let _ = writeln!(md, "|---|---|---|");
        for (target, measured, verdict) in self.targets() {
            let verdict = match verdict {
                _ if self.quick => "not judged (quick run)",
                Verdict::Met => "met",
                Verdict::Missed => "**missed**",
                Verdict::NotMeasured => "not measured",
                Verdict::MetWithCaveat(caveat) => caveat,
            };
            let _ = writeln!(md, "| {target} | {measured} | {verdict} |");
        }
    }

    /// Each target: what it asks, what was measured, and whether it was met.
    fn targets(&self) -> Vec<(String, String, Verdict)> {
        let mut targets = Vec::new();
        let p99 = self
            .latency(REDIS, Mode::PubSub)
            .map(|s| s.percentile(0.99));
        targets.push((
            "wake-up p99 < 1 ms, PostgreSQL + Redis, pub/sub".into(),
            p99.map_or("–".into(), stats::duration),
            p99.map(|p| p < Duration::from_millis(1)).into(),
        ));
        for backend in [REDIS, EMBEDDED] {
            let ratios = (
                self.ratio(backend, POLL_100, 0.5),
                self.ratio(backend, POLL_100, 0.99),
            );
            if let (Some(p50), Some(p99)) = ratios {
                targets.push((
                    format!("pub/sub ≥ 50× lower than poll@100ms, {backend}"),
                    format!("p50 {p50:.0}×, p99 {p99:.0}×"),
                    Verdict::from(p50 >= 50.0 && p99 >= 50.0),
                ));
            }
        }
        let biggest = self.scale.iter().map(|s| s.parked).max().unwrap_or(0);
        for s in self
            .scale
            .iter()
            .filter(|s| s.parked == biggest && s.mode == Mode::PubSub)
        {
            let mut measured = format!(
                "{} ({})",
                stats::mib(s.rss_parked as f64),
                s.transport.label()
            );
            let mut verdict = Verdict::from((s.parked >= 50_000).then_some(s.rss_parked < GIB));
            // Where the biggest size had to be multiplexed, say what the
            // largest run with a socket per call implies for it.
            let http1 = self
                .scale
                .iter()
                .filter(|h| h.backend == s.backend && h.mode == Mode::PubSub)
                .filter(|h| h.transport == Transport::Http1)
                .max_by_key(|h| h.parked);
            if let Some(h) = http1.filter(|_| s.transport != Transport::Http1) {
                let projected = h.rss_idle as f64 + h.rss_per_call() * s.parked as f64;
                let _ = write!(
                    measured,
                    "; HTTP/1.1 at {}: {}/call, so ≈ {} at {} sockets",
                    h.parked,
                    stats::kib(h.rss_per_call()),
                    stats::mib(projected),
                    s.parked
                );
                if matches!(verdict, Verdict::Met) && projected >= GIB as f64 {
                    verdict = Verdict::MetWithCaveat(
                        "met over h2c; **missed** (projected) with one HTTP/1.1 connection per call",
                    );
                }
            }
            targets.push((
                format!(
                    "{} parked calls < 1 GiB server RSS, {}",
                    s.parked, s.backend
                ),
                measured,
                verdict,
            ));
        }
        let redis_load: Vec<(usize, f64)> = self
            .scale
            .iter()
            .filter(|s| s.mode == Mode::PubSub)
            .filter_map(|s| s.redis.map(|load| (s.parked, load.commands)))
            .collect();
        if let (Some(first), Some(last)) = (redis_load.first(), redis_load.last()) {
            // "Does not grow": the biggest size costs Redis at most twice
            // what the smallest does, give or take 20 cmd/s of noise (the
            // subscriber's pings, other clients' load changing between
            // the background measurement and the window).
            let flat = last.1 <= first.1 * 2.0 + 20.0;
            targets.push((
                "Redis load while calls wait does not grow with parked calls".into(),
                redis_load
                    .iter()
                    .map(|(n, c)| format!("{n}: {c:.0} cmd/s"))
                    .collect::<Vec<_>>()
                    .join(", "),
                Verdict::from(flat && redis_load.len() > 1),
            ));
        }
        for f in &self.fork {
            let p99 = f.wake_up.percentile(0.99);
            targets.push((
                format!(
                    "wake-up p99 < 1 ms with {} devices per account, {}",
                    f.per_account, f.backend
                ),
                stats::duration(p99),
                Verdict::from(p99 < Duration::from_millis(1)),
            ));
            if f.backend == CLUSTER {
                let (p50, floor) = (f.wake_up.percentile(0.5), f.floor.percentile(0.5));
                targets.push((
                    format!(
                        "wake-up p50 ≤ 0.3 ms with {} devices per account, {}",
                        f.per_account, f.backend
                    ),
                    format!(
                        "{} (floor on this machine: {})",
                        stats::duration(p50),
                        stats::duration(floor)
                    ),
                    Verdict::from(p50 <= Duration::from_micros(300)),
                ));
            }
        }
        for (backend, wanted) in [(EMBEDDED, 5_000.0), (REDIS, 2_000.0)] {
            if let Some(t) = self.throughput.iter().find(|t| t.backend == backend) {
                targets.push((
                    format!("throughput ≥ {wanted:.0} set-ups/s, {backend}"),
                    format!("{:.0} set-ups/s", t.per_second()),
                    Verdict::from(t.per_second() >= wanted),
                ));
            }
        }
        targets
    }
}

const GIB: u64 = 1 << 30;

/// How a target fared.
enum Verdict {
    Met,
    Missed,
    /// The run did not measure it (e.g. a smaller size than the target's).
    NotMeasured,
    /// Met as measured, with a caveat that decides it for some set-ups.
    MetWithCaveat(&'static str),
}

impl From<bool> for Verdict {
    fn from(met: bool) -> Verdict {
        if met {
            Verdict::Met
        } else {
            Verdict::Missed
        }
    }
}

impl From<Option<bool>> for Verdict {
    fn from(met: Option<bool>) -> Verdict {
        met.map_or(Verdict::NotMeasured, Verdict::from)
    }
}

fn minutes(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 {
        format!("{} min {} s", secs / 60, secs % 60)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

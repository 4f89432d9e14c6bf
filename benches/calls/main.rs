//! `cargo bench --bench calls`: call-notifier's wake-up latency, parked-call
//! scale and call throughput, measured from outside real server processes
//! over loopback, the way a PBX and phones see them.
//!
//! The binary plays two roles. Run by cargo it is the load generator: it
//! starts each server by re-executing itself in the server role
//! ([`server_role`], selected by an environment variable), plays the PBX
//! and the phones over HTTP, reads the server's memory and CPU from `/proc`,
//! and writes `results.md` and `wakeup-latency.svg` to
//! `target/bench-results/`. Everything runs against the embedded defaults
//! (SQLite + in-process broker) and against PostgreSQL + Redis.
//!
//! With `CALL_NOTIFIER_BENCH_SERVER_EXE` set, the servers run that
//! executable instead: `call-notifier-bench-server` (`server_bin.rs`, the
//! same server role built as the product is, without the dev-dependencies'
//! features), so two builds of the server, one with profile-guided
//! optimisation say (contrib/pgo-build), meet one generator.
//!
//! ```text
//! cargo bench --bench calls                  # everything, under 10 minutes
//! cargo bench --bench calls -- --quick       # small sizes: checks every call completes (CI)
//! cargo bench --bench calls -- --no-shared   # only the embedded defaults
//! cargo bench --bench calls -- --only scale  # one scenario: latency, scale, throughput or fork
//! ```
//!
//! The modules: [`generator`] (the PBX and the phones), [`client`] (their
//! HTTP), [`server_process`] (the harness's handle on a server),
//! [`services`] (SQLite, PostgreSQL, Redis), one module per scenario
//! ([`latency`], [`scale`], [`throughput`]), and [`stats`], [`report`],
//! [`plot`] and [`sys`] for the numbers.

mod client;
mod clients;
mod floor;
mod fork;
mod generator;
mod latency;
mod plot;
mod polling;
mod pushes;
mod report;
mod scale;
mod server_process;
mod server_role;
mod services;
mod stats;
mod sys;
mod throughput;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::report::Results;
use crate::server_process::Mode;
use crate::services::{Backend, Shared};

const USAGE: &str =
    "usage: cargo bench --bench calls [-- [--quick] [--no-shared] [--only SCENARIO] [--devices N]]
  --quick          small sizes; checks that every call gets its answer (for CI)
  --no-shared      skip the PostgreSQL + Redis half (default: run it; fail if they are down)
  --only SCENARIO  run one scenario: latency, scale, throughput, fork or clients (Redis only)
  --devices N      devices per account in the fork scenario, 1 to 20 (default 3)";

/// The scenarios, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Latency,
    Scale,
    Throughput,
    Fork,
    Clients,
}

/// The command line.
struct Options {
    quick: bool,
    /// Run the PostgreSQL + Redis half too.
    shared: bool,
    /// Run only this scenario (while working on one).
    only: Option<Scenario>,
    /// Devices per account in the fork scenario, if not [`fork::DEVICES`].
    devices: Option<usize>,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options> {
        let mut options = Options {
            quick: false,
            shared: true,
            only: None,
            devices: None,
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => options.quick = true,
                "--no-shared" => options.shared = false,
                "--only" => {
                    options.only = Some(match args.next().as_deref() {
                        Some("latency") => Scenario::Latency,
                        Some("scale") => Scenario::Scale,
                        Some("throughput") => Scenario::Throughput,
                        Some("fork") => Scenario::Fork,
                        Some("clients") => Scenario::Clients,
                        other => bail!(
                        "--only takes latency, scale, throughput, fork or clients, not {other:?}\n{USAGE}"
                    ),
                    })
                }
                "--devices" => {
                    options.devices = match args.next().map(|n| n.parse::<usize>()) {
                        Some(Ok(n)) if (1..=20).contains(&n) => Some(n),
                        other => bail!("--devices takes 1 to 20, not {other:?}\n{USAGE}"),
                    }
                }
                // cargo passes `--bench` to every bench binary.
                "--bench" => {}
                "--help" | "-h" => bail!("{USAGE}"),
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        Ok(options)
    }
}

impl Options {
    /// The flags as they would be given to `cargo bench`, for the report.
    fn flags(&self) -> String {
        let mut flags = Vec::new();
        if self.quick {
            flags.push("--quick".to_owned());
        }
        if !self.shared {
            flags.push("--no-shared".to_owned());
        }
        if let Some(only) = self.only {
            flags.push(format!("--only {}", format!("{only:?}").to_lowercase()));
        }
        if let Some(devices) = self.devices {
            flags.push(format!("--devices {devices}"));
        }
        match flags.is_empty() {
            true => String::new(),
            false => format!(" -- {}", flags.join(" ")),
        }
    }
}

/// How big each scenario is.
struct Sizes {
    latency: latency::Size,
    scale: scale::Size,
    throughput: throughput::Size,
    fork: fork::Size,
    clients: clients::Size,
}

impl Sizes {
    fn full(open_files: u64) -> Sizes {
        let poll = Mode::Poll { interval_ms: 100 };
        Sizes {
            latency: latency::Size {
                calls: 2_000,
                concurrency: 16,
                devices: 1_000,
            },
            scale: scale::Size {
                runs: vec![
                    (Mode::PubSub, 1_000),
                    (Mode::PubSub, 10_000),
                    (Mode::PubSub, 50_000),
                    (poll, 1_000),
                    (poll, 10_000),
                ],
                window: Duration::from_secs(5),
                answered: 200,
                devices: 1_000,
                open_files,
            },
            throughput: throughput::Size {
                duration: Duration::from_secs(10),
                concurrency: 128,
                devices: 1_000,
                per_account: 1,
            },
            fork: fork::Size {
                calls: 1_000,
                hang_ups: 200,
                devices: 1_000,
                per_account: fork::DEVICES,
                throughput: throughput::Size {
                    duration: Duration::from_secs(10),
                    concurrency: 128,
                    devices: 1_000,
                    per_account: fork::DEVICES,
                },
            },
            clients: clients::Size::full(),
        }
    }

    fn quick(open_files: u64) -> Sizes {
        Sizes {
            latency: latency::Size {
                calls: 50,
                concurrency: 16,
                devices: 100,
            },
            scale: scale::Size {
                runs: vec![(Mode::PubSub, 200)],
                window: Duration::from_secs(1),
                answered: 20,
                devices: 100,
                open_files,
            },
            throughput: throughput::Size {
                duration: Duration::from_secs(2),
                concurrency: 64,
                devices: 100,
                per_account: 1,
            },
            fork: fork::Size {
                calls: 30,
                hang_ups: 10,
                devices: 100,
                per_account: fork::DEVICES,
                throughput: throughput::Size {
                    duration: Duration::from_secs(2),
                    concurrency: 32,
                    devices: 100,
                    per_account: fork::DEVICES,
                },
            },
            clients: clients::Size::quick(),
        }
    }
}

fn main() -> ExitCode {
    if std::env::var(server_role::ROLE_VAR).as_deref() == Ok(server_role::ROLE_SERVER) {
        return server_role::main();
    }
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // Two workers like the server's: the generator shares the machine's
    // cores with it, and reports how much of them it took.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> Result<()> {
    let started = Instant::now();
    let open_files = sys::raise_open_files_limit();
    let machine = sys::Machine::read();
    let mut sizes = if options.quick {
        Sizes::quick(open_files)
    } else {
        Sizes::full(open_files)
    };
    if let Some(devices) = options.devices {
        sizes.fork.per_account = devices;
    }
    // Every call key of this run starts with it, so leftovers in Redis are
    // ours to count, and runs never see each other's keys.
    let run_id = call_notifier::calls::random_key()[..8].to_owned();
    let shared = match options.shared {
        true => Some(Arc::new(Shared::open(&run_id).await?)),
        false => None,
    };
    let mut backends = vec![Backend::Embedded];
    backends.extend(shared.clone().map(Backend::Shared));

    let measured = measure(&backends, &run_id, &sizes, options.only).await;
    if let Some(shared) = &shared {
        if let Err(e) = shared.close().await {
            eprintln!("bench: {e:#}");
        }
    }
    let (latency, scale, throughput, fork, clients) = measured?;

    let results = Results {
        machine,
        revision: server_process::revision(),
        quick: options.quick,
        flags: options.flags(),
        services: shared.as_ref().map(|s| s.versions.clone()),
        open_files,
        latency_concurrency: sizes.latency.concurrency,
        latency,
        scale,
        throughput,
        fork,
        clients,
        took: started.elapsed(),
    };
    let markdown = results.markdown();
    let curves: Vec<plot::Curve<'_>> = results
        .latency
        .iter()
        .map(|l| plot::Curve {
            label: format!("{} {}", l.backend, l.mode.label()),
            color: plot::color(
                latency::MODES
                    .iter()
                    .position(|m| *m == l.mode)
                    .unwrap_or(0),
            ),
            dashed: l.backend != Backend::Embedded.name(),
            samples: &l.samples,
        })
        .collect();
    let svg = plot::cdf_svg("call-notifier: wake-up latency (CDF)", &curves);

    let dir = results_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("results.md"), &markdown)?;
    std::fs::write(dir.join("wakeup-latency.svg"), svg)?;
    println!("{markdown}");
    eprintln!("bench: results in {}", dir.display());
    Ok(())
}

type Measured = (
    Vec<latency::Latency>,
    Vec<scale::Scale>,
    Vec<throughput::Throughput>,
    Vec<fork::Fork>,
    Vec<clients::Client>,
);

/// Runs every scenario (or `only` one) on every backend, the embedded one first.
async fn measure(
    backends: &[Backend],
    run_id: &str,
    sizes: &Sizes,
    only: Option<Scenario>,
) -> Result<Measured> {
    let runs = |scenario| only.is_none_or(|only| only == scenario);
    let mut latency = Vec::new();
    let mut scale = Vec::new();
    let mut throughput = Vec::new();
    let mut fork = Vec::new();
    let mut clients = Vec::new();
    for (b, backend) in backends.iter().enumerate() {
        let prefix = |scenario: &str| format!("bench-{run_id}-{b}{scenario}-");
        if runs(Scenario::Latency) {
            latency.extend(latency::run(backend, &prefix("lat"), sizes.latency).await?);
        }
        if runs(Scenario::Scale) {
            scale.extend(scale::run(backend, &prefix("park"), &sizes.scale).await?);
        }
        if runs(Scenario::Throughput) {
            throughput.push(throughput::run(backend, &prefix("tp"), sizes.throughput).await?);
        }
        if runs(Scenario::Fork) {
            fork.push(fork::run(backend, &prefix("fork"), sizes.fork).await?);
        }
        // bb8-redis has no Cluster manager: one server only.
        let server = backend
            .redis_url()
            .filter(|url| url.starts_with("redis://"));
        if let (true, Some(url)) = (runs(Scenario::Clients), server) {
            clients.extend(clients::run(url, &prefix("clients"), sizes.clients).await?);
        }
    }
    Ok((latency, scale, throughput, fork, clients))
}

/// `target/bench-results`, next to the bench binary's own build directory
/// (`target/release/deps/calls-*`), wherever `CARGO_TARGET_DIR` put it.
fn results_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("bench-results")
}

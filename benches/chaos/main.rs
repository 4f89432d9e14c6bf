//! Ten minutes of real traffic while the parts fail, judged call by call
//! by an oracle (issue 25). `cargo bench --bench chaos -- --minutes N --seed S`:
//! three call-notifier processes on a Redis Cluster and PostgreSQL of the
//! run's own, the FCM stand-in recording every push, calls of every kind,
//! faults at random; the last line counts the violated promises, and the
//! run exits non-zero on any. The full run (10 minutes) writes its report
//! to `docs/chaos.md`.

#[path = "../../tests/common/mod.rs"]
mod common;
mod events;
mod faults;
mod fleet;
mod oracle;
mod recorder;
mod report;
mod run;
mod traffic;

use std::time::Duration;

use clap::Parser;

/// Chaos: real traffic while the parts fail, judged by an oracle.
#[derive(Parser, Debug)]
struct Args {
    /// How long the traffic runs.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// The seed of the calls' and faults' schedule (random when absent).
    #[arg(long)]
    seed: Option<u64>,
    /// Calls a second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// The kinds of fault to draw from, comma-separated (default: all):
    /// kill, pause, postgres, fcm-errors, fcm-slow, restart. A run of one
    /// kind reproduces a finding faster; its schedule differs from the
    /// full run's for the same seed.
    #[arg(long, value_delimiter = ',', value_parser = fault_kind)]
    faults: Vec<events::FaultKind>,
    /// Where the report goes (default: docs/chaos.md for a run of 10
    /// minutes or more, else target/chaos.md).
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// `cargo bench` passes `--bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn fault_kind(name: &str) -> Result<events::FaultKind, String> {
    events::FaultKind::ALL
        .into_iter()
        .find(|kind| kind.short() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = events::FaultKind::ALL.iter().map(|k| k.short()).collect();
            format!("unknown fault {name:?}: one of {}", names.join(", "))
        })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("chaos: seed {seed} (rerun with --seed {seed})");
    let duration = (args.minutes * 60_000.0) as u64;
    let options = run::Options {
        seed,
        duration,
        rate: args.rate,
        pace: faults::Pace::FULL,
        faults: if args.faults.is_empty() {
            events::FaultKind::ALL.to_vec()
        } else {
            args.faults.clone()
        },
        accounts: (args.rate * 12.0) as usize + 50,
        wait_ms: 4_000,
        ports: [7301, 7302, 7303, 7304, 7305, 7306],
        warm_up: Duration::from_secs(60).min(Duration::from_millis(duration / 4)),
    };
    let run = run::run(options).await;
    let mut command = format!(
        "cargo bench --bench chaos -- --minutes {} --seed {seed}",
        args.minutes
    );
    if args.rate != 50.0 {
        command += &format!(" --rate {}", args.rate);
    }
    if !args.faults.is_empty() {
        let names: Vec<&str> = args.faults.iter().map(|k| k.short()).collect();
        command += &format!(" --faults {}", names.join(","));
    }
    let path = args.report.unwrap_or_else(|| {
        let dir = env!("CARGO_MANIFEST_DIR");
        if args.minutes >= 10.0 {
            format!("{dir}/docs/chaos.md").into()
        } else {
            format!("{dir}/target/chaos.md").into()
        }
    });
    std::fs::write(&path, report::markdown(&run, &command, "release"))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    eprintln!("chaos: report in {}", path.display());
    for violation in run.verdict.violations.iter().take(20) {
        eprintln!("chaos: rule {}: {}", violation.rule, violation.what);
    }
    println!("{}", report::last_line(&run));
    if !run.verdict.violations.is_empty() {
        std::process::exit(1);
    }
}

//! What the harness asks of the operating system: the open-files limit, a
//! process's memory and CPU time from `/proc`, the machine's busy time, and
//! what machine this is (for the table header, so numbers carry their context).

use std::time::Duration;

use anyhow::{Context, Result};

/// What we ask for: 50,000 parked calls need a socket each in the server
/// and in the generator, plus room for everything else.
const WANTED_OPEN_FILES: u64 = 120_000;

/// Raises this process's `RLIMIT_NOFILE` as far as it is allowed (children
/// inherit it) and returns the soft limit now in force.
///
/// Raising the hard limit needs `CAP_SYS_RESOURCE`; without it the soft
/// limit goes up to the hard one, and the parked-call scenario picks its
/// transport to fit (see `scale.rs`).
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    let wanted: libc::rlim_t = WANTED_OPEN_FILES;
    if limit.rlim_cur >= wanted {
        return limit.rlim_cur;
    }
    let raised = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: wanted.max(limit.rlim_max),
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return wanted;
    }
    let to_hard = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &to_hard) } == 0 {
        limit.rlim_max
    } else {
        limit.rlim_cur
    }
}

/// Lets the pipe on `fd` buffer up to 1 MiB (the usual ceiling for
/// unprivileged processes), so a burst of push lines never blocks the
/// server's worker thread while the generator catches up. Best effort.
pub fn enlarge_pipe(fd: i32) {
    // SAFETY: F_SETPIPE_SZ on a descriptor we own; failure leaves it as it was.
    unsafe {
        libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20);
    }
}

/// Clock ticks per second, the unit of the CPU times in `/proc/<pid>/stat`.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf reads a constant of the running system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

/// Resident memory of a process (`VmRSS`), in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status (did the process die?)"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .context("no VmRSS line in /proc/<pid>/status")?;
    Ok(kib * 1024)
}

/// CPU time a process has used so far, user plus system, all its threads.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat (did the process die?)"))?;
    // The command name (field 2) may hold spaces; the fields after it are
    // plain numbers, starting with the state (field 3).
    let after_name = &stat[stat.rfind(')').context("malformed /proc/<pid>/stat")? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("no field {n} in /proc/<pid>/stat"))
    };
    Ok(ticks_to_duration(field(14)? + field(15)?))
}

/// CPU time every core of the machine has spent busy so far (not idle, not
/// waiting for I/O): what is left after the server and the generator is
/// the databases and whatever else runs.
pub fn machine_busy() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Ok(ticks_to_duration(total.saturating_sub(idle)))
}

/// The code measured: the commit, and whether the work tree differed from it.
pub fn revision() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    match (
        git(&["rev-parse", "--short", "HEAD"]),
        git(&["status", "--porcelain", "--untracked-files=no"]),
    ) {
        (Some(commit), Some(changes)) if changes.is_empty() => commit,
        (Some(commit), Some(_)) => format!("{commit} with uncommitted changes"),
        _ => "unknown (not a git work tree)".into(),
    }
}

/// The machine the numbers were taken on.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    /// The 1-minute load average when the run started: others' builds show here.
    pub load_at_start: String,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, name)| name.trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0);
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into())
        };
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: memory_kib / (1024.0 * 1024.0),
            kernel: read("/proc/sys/kernel/osrelease"),
            load_at_start: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

//! Giving a burst's memory back to the kernel.
//!
//! glibc's malloc keeps what a burst freed in its arenas for the next one:
//! after a slow FCM held hundreds of pushes in flight, or a failover's
//! retries piled up, the heap in use falls back but the resident memory
//! stays at the burst's high-water mark (3 MiB over a 4 MiB idle heap in the
//! chaos minute, seed 15247311396756873692). To an operator watching RSS that
//! is a leak, and the chaos run's rule 5 (RSS back within 10% of its level
//! after warm-up) calls it one. Every [`TRIM_EVERY`], `malloc_trim(0)`
//! returns every arena's free pages. The walk takes each arena's lock;
//! alternating throughput runs with and without it show no difference in
//! set-ups per second (`docs/performance.md`). Other allocators (musl's)
//! return memory on their own, so there it is a no-op.

use std::time::Duration;

use tokio::sync::watch;

use crate::shutdown::{phase_reached, Phase};

/// How often free memory goes back to the kernel.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Trims the heap every [`TRIM_EVERY`] until the server stops serving.
pub async fn trim_periodically(mut phase: watch::Receiver<Phase>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TRIM_EVERY) => {}
            _ = phase_reached(&mut phase, |p| *p != Phase::Serving) => return,
        }
        // Off the workers: the walk holds arena locks a worker's malloc would
        // wait on anyway, but a parked call's wake-up must not queue behind it.
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// This process's anonymous resident memory, in KiB.
    fn anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("RssAnon in /proc/self/status")
    }

    /// A burst of small blocks, freed while one block allocated after them
    /// pins the heap's top: glibc keeps the burst's pages resident until a
    /// trim gives them back (the chaos run's rule 5 caught that as +3 MiB
    /// of heap after a slow FCM; here 64 MiB, so the other tests running
    /// beside this one cannot hide it).
    #[test]
    fn a_freed_burst_leaves_the_resident_memory_at_the_next_trim() {
        let burst: Vec<Box<[u8; 1024]>> = (0..65_536).map(|n| Box::new([n as u8; 1024])).collect();
        let pin = Box::new([1u8; 1024]);
        drop(burst);
        let freed = anon_kib();
        super::trim();
        let trimmed = anon_kib();
        assert!(
            trimmed + 32 * 1024 < freed,
            "RssAnon {freed} KiB with the burst freed, {trimmed} KiB after the trim"
        );
        drop(pin);
    }
}

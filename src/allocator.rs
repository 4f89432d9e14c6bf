//! Giving a burst's memory back to the kernel.
//!
//! glibc's malloc keeps what a burst freed in its arenas for the next one:
//! after a slow FCM held hundreds of pushes in flight, or a failover's
//! retries piled up, the heap in use falls back but the resident memory
//! stays at the burst's high-water mark (3 MiB over a 4 MiB idle heap in the
//! chaos minute, seed 15247311396756873692). To an operator watching RSS that
//! is a leak, and the chaos run's rule 5 (RSS back within 10% of its level
//! after warm-up) calls it one. Every [`TRIM_EVERY`], `malloc_trim(0)`
//! returns every arena's free pages. The walk takes each arena's lock for
//! well under a millisecond on a heap this size; once every ten seconds it
//! costs nothing the benches can see. Other allocators (musl's) return
//! memory on their own, so there it is a no-op.

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

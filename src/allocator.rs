//! The heap: mimalloc for every allocation Rust makes, and a burst's memory
//! given back to the kernel.
//!
//! **Why mimalloc.** Under the throughput load, glibc's `malloc` and `free`
//! were 14% of the server's CPU samples (`malloc_consolidate` alone 2.6%):
//! a call's buffers, futures and records are allocated on one worker and
//! often freed on the other, which glibc pays for with arena locks and
//! consolidation. mimalloc frees into per-page thread-local lists. In
//! alternating runs it took 15-16% off the server's CPU per set-up and gave
//! 19% more set-ups per second on SQLite, 17% on PostgreSQL + Redis
//! (`docs/performance.md`, "The allocator: mimalloc"). It is set here, in
//! the library, so the server, its tests and its benches all run on it.
//! It is built with `no_thp`: asking for transparent huge pages on its
//! arena made the RSS grow in 2 MiB steps (21 to 29 KiB per parked call).
//!
//! **Giving memory back.** An allocator keeps what a burst freed for the
//! next one: after a slow FCM held hundreds of pushes in flight, or a
//! failover's retries piled up, the heap in use falls back but the resident
//! memory can stay at the burst's high-water mark (3 MiB over a 4 MiB idle
//! heap in the chaos minute under glibc, seed 15247311396756873692). To an
//! operator watching RSS that is a leak, and the chaos run's rule 5 (RSS
//! back within 10% of its level after warm-up) calls it one. Every
//! [`TRIM_EVERY`], `mi_collect` purges mimalloc's free pages, and
//! `malloc_trim(0)` returns glibc's, which still serves what C code
//! allocates (the bundled SQLite's page cache).

use std::time::Duration;

use tokio::sync::watch;

use crate::shutdown::{phase_reached, Phase};

#[global_allocator]
static HEAP: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// Gives the free pages of both heaps back to the kernel.
fn trim() {
    // SAFETY: mi_collect purges mimalloc's own free pages under its own
    // synchronisation; `force` also collects what exited threads left.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    trim_glibc();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_glibc() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_glibc() {}

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

    /// A 64 MiB burst of 1 KiB blocks (the chaos run's rule 5 caught +3
    /// MiB after a slow FCM; 64 MiB so the tests running beside this one
    /// cannot hide it), made by `burst` and freed on a thread that stays
    /// alive and idle holding the last block, as a worker does after a
    /// burst of pushes; the trim runs on another thread, as the server's
    /// does on a blocking thread. Returns the resident memory before the
    /// burst, with it, and after the trim.
    fn burst_then_trim<T: Send + 'static>(burst: fn(usize) -> T) -> (u64, u64, u64) {
        // One burst at a time: each reads the process's resident memory.
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let before = anon_kib();
        let (made, was_made) = std::sync::mpsc::channel();
        let (done, finish) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            let mut blocks: Vec<T> = (0..65_536).map(burst).collect();
            let with = anon_kib();
            // The last block pins the heap's top, as a later allocation does.
            let pin = blocks.pop();
            drop(blocks);
            made.send(with).expect("the test waits");
            let _ = finish.recv();
            drop(pin);
        });
        let with = was_made.recv().expect("the burst thread reports");
        super::trim();
        let trimmed = anon_kib();
        done.send(()).expect("the burst thread waits");
        worker.join().expect("the burst thread");
        assert!(
            with > before + 48 * 1024,
            "RssAnon {before} KiB before the burst, {with} KiB with it: the burst was not resident"
        );
        (before, with, trimmed)
    }

    fn assert_given_back((before, with, trimmed): (u64, u64, u64)) {
        assert!(
            trimmed < before + 16 * 1024,
            "RssAnon {before} KiB before the burst, {with} KiB with it, {trimmed} KiB after the trim"
        );
    }

    /// Rust's allocations: mimalloc's pages.
    #[test]
    fn a_freed_burst_of_rust_blocks_leaves_the_resident_memory_at_the_next_trim() {
        assert_given_back(burst_then_trim(|n| Box::new([n as u8; 1024])));
    }

    /// A block from C's `malloc`, freed when dropped.
    struct CBlock(*mut u8);

    // SAFETY: glibc's free may be called from any thread.
    unsafe impl Send for CBlock {}

    impl Drop for CBlock {
        fn drop(&mut self) {
            // SAFETY: the block came from malloc and is freed once, here.
            unsafe { libc::free(self.0.cast()) }
        }
    }

    /// C code's allocations (the bundled SQLite's): glibc's arenas, which
    /// keep a burst's pages while a block allocated after them pins the
    /// heap's top.
    #[test]
    fn a_freed_burst_of_c_blocks_leaves_the_resident_memory_at_the_next_trim() {
        assert_given_back(burst_then_trim(|n| {
            // SAFETY: a fresh 1 KiB block, filled before anything reads it.
            unsafe {
                let block = libc::malloc(1024).cast::<u8>();
                assert!(!block.is_null(), "malloc failed");
                std::ptr::write_bytes(block, n as u8, 1024);
                CBlock(block)
            }
        }));
    }
}

//! How many PBX requests are parked, bounded by `--max-pending-calls`, and
//! how many devices' push schedules still run: counters of their own, so
//! the shared state can hold them without depending on the rest of
//! `calls`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// The count of parked calls, bounded by `--max-pending-calls`, and of the
/// push schedules still running (a call's schedules outlive its request
/// while they tell the phones it is over).
#[derive(Debug, Default)]
pub struct Parking {
    parked: Count,
    schedules: Arc<Count>,
}

/// A count, and who waits for it to reach zero.
#[derive(Debug, Default)]
struct Count {
    running: AtomicUsize,
    /// Notified when the last one counted goes.
    idle: Notify,
}

impl Count {
    fn add(&self) {
        self.running.fetch_add(1, Ordering::AcqRel);
    }

    fn sub(&self) {
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    fn get(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Resolves once the count is zero.
    async fn zero(&self) {
        loop {
            let idle = self.idle.notified();
            if self.get() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// One running push schedule; counted until dropped.
#[derive(Debug)]
pub struct Scheduled(Arc<Count>);

impl Drop for Scheduled {
    fn drop(&mut self) {
        self.0.sub();
    }
}

/// One parked call's place; gives it back on drop.
pub struct Parked<'a>(&'a Parking);

impl Parking {
    /// Takes a place, unless `max` are taken.
    pub fn try_park(&self, max: usize) -> Option<Parked<'_>> {
        self.parked
            .running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Parked(self))
    }

    pub fn parked(&self) -> usize {
        self.parked.get()
    }

    /// Resolves once no call is parked.
    pub async fn calls_done(&self) {
        self.parked.zero().await
    }

    /// Counts one more push schedule, until the guard is dropped.
    pub fn schedule(&self) -> Scheduled {
        self.schedules.add();
        Scheduled(self.schedules.clone())
    }

    /// The push schedules still running.
    pub fn schedules(&self) -> usize {
        self.schedules.get()
    }

    /// Resolves once no push schedule runs: a draining server's last
    /// `call_ended` notices have left.
    pub async fn schedules_done(&self) {
        self.schedules.zero().await
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.parked.sub();
    }
}

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
    parked: AtomicUsize,
    schedules: Arc<Schedules>,
}

#[derive(Debug, Default)]
struct Schedules {
    running: AtomicUsize,
    /// Notified when the last schedule returns.
    idle: Notify,
}

/// One running push schedule; counted until dropped.
#[derive(Debug)]
pub struct Scheduled(Arc<Schedules>);

impl Drop for Scheduled {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// One parked call's place; gives it back on drop.
pub struct Parked<'a>(&'a Parking);

impl Parking {
    /// Takes a place, unless `max` are taken.
    pub fn try_park(&self, max: usize) -> Option<Parked<'_>> {
        self.parked
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Parked(self))
    }

    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Acquire)
    }

    /// Counts one more push schedule, until the guard is dropped.
    pub fn schedule(&self) -> Scheduled {
        self.schedules.running.fetch_add(1, Ordering::AcqRel);
        Scheduled(self.schedules.clone())
    }

    /// The push schedules still running.
    pub fn schedules(&self) -> usize {
        self.schedules.running.load(Ordering::Acquire)
    }

    /// Resolves once no push schedule runs: a draining server's last
    /// `call_ended` notices have left.
    pub async fn schedules_done(&self) {
        loop {
            let idle = self.schedules.idle.notified();
            if self.schedules() == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Ordering::AcqRel);
    }
}

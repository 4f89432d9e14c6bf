//! How many PBX requests are parked, bounded by `--max-pending-calls`: a
//! counter of its own, so the shared state can hold it without depending on
//! the rest of `calls`.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The count of parked calls, bounded by `--max-pending-calls`.
#[derive(Debug, Default)]
pub struct Parking {
    parked: AtomicUsize,
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
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Ordering::AcqRel);
    }
}

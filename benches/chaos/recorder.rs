//! The run's clock and the record every part of the harness writes to.

use std::sync::Mutex;
use std::time::Instant;

use crate::events::{Ms, Observations};

pub struct Recorder {
    started: Instant,
    observations: Mutex<Observations>,
}

impl Recorder {
    pub fn new(observations: Observations) -> Recorder {
        Recorder {
            started: Instant::now(),
            observations: Mutex::new(observations),
        }
    }

    /// Milliseconds since the run started.
    pub fn now(&self) -> Ms {
        self.started.elapsed().as_millis() as Ms
    }

    /// When `at` is, as an instant.
    pub fn instant(&self, at: Ms) -> Instant {
        self.started + std::time::Duration::from_millis(at)
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Observations) -> R) -> R {
        f(&mut self.observations.lock().expect("observations"))
    }

    pub fn take(&self) -> Observations {
        std::mem::take(&mut self.observations.lock().expect("observations"))
    }
}

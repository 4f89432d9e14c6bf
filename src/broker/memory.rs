//! The in-process broker: a map of pending keys and the waiters on them.
//! Used when no `--redis-url` is given; correct only while the PBX's request
//! and the app's answer reach the same process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::time::Instant;

use async_trait::async_trait;

use super::{Answer, BrokerError, CallBroker, CallState, Release, Wait, Waiters};
use crate::store::Platform;

/// Cheap to clone; every clone shares one map.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    waiters: Waiters,
    /// The stored state of every key with a wait open in this process.
    states: Mutex<HashMap<String, CallState>>,
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl CallBroker for MemoryBroker {
    async fn open(
        &self,
        key: &str,
        platform: Platform,
        until: Instant,
    ) -> Result<Wait, BrokerError> {
        // The state goes with the last waiter (see `Release`), exactly when
        // the wait ends: `until` needs no timer here.
        let (answers, _) = self.shared.waiters.join(key, platform, until);
        self.shared
            .states
            .lock()
            .expect("states lock poisoned")
            .entry(key.to_owned())
            .or_insert(CallState::Pending { platform });
        let shared = self.shared.clone();
        let key = key.to_owned();
        Ok(Wait {
            answers,
            _release: Release::new(move || {
                if shared.waiters.leave(&key) {
                    shared
                        .states
                        .lock()
                        .expect("states lock poisoned")
                        .remove(&key);
                }
            }),
        })
    }

    async fn answer(&self, key: &str, available: bool) -> Result<Option<CallState>, BrokerError> {
        let before = {
            let mut states = self.shared.states.lock().expect("states lock poisoned");
            let Some(state) = states.get_mut(key) else {
                return Ok(None);
            };
            let before = *state;
            if let CallState::Pending { platform } = before {
                *state = CallState::Answered {
                    platform,
                    available,
                };
            }
            before
        };
        if before.answer().is_none() {
            let answer = Answer {
                available,
                received_at: Some(SystemTime::now()),
            };
            self.shared.waiters.deliver(key, answer);
        }
        Ok(Some(before))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    fn waiting(&self) -> usize {
        self.shared.waiters.len()
    }
}

//! The [`CallBroker`] boundary: carries an app's answer from the request that
//! receives it (`/api/call-response/`) to the request that waits for it
//! (`/api/incoming-call/`), which may live in another instance.
//!
//! Two implementations: [`memory::MemoryBroker`] (one process, zero set-up)
//! and [`redis::RedisBroker`] (many instances behind a load balancer). Both
//! deliver an answer to the waiting request the moment it is stored; neither
//! polls per call. This module must not know about pushes or HTTP.

pub mod memory;
pub mod redis;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::Platform;

/// What went wrong in the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker's backing service cannot be reached now.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// An app's answer as it reaches a waiting call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer {
    pub available: bool,
    /// When the answer reached a call-notifier instance, for the wake-up
    /// latency metric; `None` when the fallback check found it.
    pub received_at: Option<SystemTime>,
}

/// A key's stored state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallState {
    /// Waiting for the app; `platform` is the device's, for the response log.
    Pending { platform: Platform },
    /// The app answered.
    Answered { platform: Platform, available: bool },
}

impl CallState {
    pub fn platform(self) -> Platform {
        match self {
            CallState::Pending { platform } | CallState::Answered { platform, .. } => platform,
        }
    }

    /// The answer, once there is one.
    pub fn answer(self) -> Option<bool> {
        match self {
            CallState::Pending { .. } => None,
            CallState::Answered { available, .. } => Some(available),
        }
    }

    /// The text stored in Redis: `pending:apns`, `available:android`...
    pub(crate) fn encode(self) -> String {
        let word = match self {
            CallState::Pending { .. } => "pending",
            CallState::Answered {
                available: true, ..
            } => "available",
            CallState::Answered {
                available: false, ..
            } => "unavailable",
        };
        format!("{word}:{}", self.platform())
    }

    /// The state stored as `text`; `None` for text no broker writes.
    pub fn decode(text: &str) -> Option<CallState> {
        let (word, platform) = text.split_once(':')?;
        let platform = Platform::parse(platform)?;
        match word {
            "pending" => Some(CallState::Pending { platform }),
            "available" => Some(CallState::Answered {
                platform,
                available: true,
            }),
            "unavailable" => Some(CallState::Answered {
                platform,
                available: false,
            }),
            _ => None,
        }
    }
}

/// The broker boundary. Implementations are cheap to share (`Arc<dyn CallBroker>`).
#[async_trait]
pub trait CallBroker: Send + Sync + 'static {
    /// Opens a wait for `key` until `until` (the call's deadline):
    /// subscribes to the key's answers and then stores its pending state, in
    /// that order, so no answer can slip between. The stored state lives no
    /// longer than the wait, so an answer after it finds the key unknown
    /// even before the wait's clean-up has run.
    async fn open(
        &self,
        key: &str,
        platform: Platform,
        until: Instant,
    ) -> Result<Wait, BrokerError>;

    /// Stores an answer for `key` and publishes it to whoever waits. Returns
    /// the state the key had before: `None` when the key is unknown (never
    /// issued, or its wait already ended). An already answered key keeps its
    /// first answer.
    async fn answer(&self, key: &str, available: bool) -> Result<Option<CallState>, BrokerError>;

    /// Answers when the broker's backing service does.
    async fn ping(&self) -> Result<(), BrokerError>;

    /// How many keys this process waits on: the parked calls.
    fn waiting(&self) -> usize;
}

/// One open wait. Dropping it, on any path (answer, timeout, the PBX hanging
/// up and hyper dropping the handler's future, an error), removes this
/// process's bookkeeping, the subscription and the stored state.
pub struct Wait {
    answers: watch::Receiver<Option<Answer>>,
    _release: Release,
}

impl Wait {
    /// A wait that resolves when `answers` holds an answer and runs
    /// `release` when dropped: what a broker outside this crate (the
    /// benchmarks' polling one) builds its waits from.
    pub fn new(
        answers: watch::Receiver<Option<Answer>>,
        release: impl FnOnce() + Send + Sync + 'static,
    ) -> Wait {
        Wait {
            answers,
            _release: Release::new(release),
        }
    }

    /// Resolves with the answer when it is delivered. Never resolves when no
    /// answer comes: race it against the deadline.
    pub async fn answered(&mut self) -> Answer {
        let answer = self.answers.wait_for(Option::is_some).await.map(|a| *a);
        match answer {
            Ok(Some(answer)) => answer,
            // Not delivered by `wait_for(is_some)`; here for completeness.
            Ok(None) => std::future::pending().await,
            // The broker went away; only the deadline can end the wait now.
            Err(_) => std::future::pending().await,
        }
    }
}

/// Runs a cleanup once, on drop.
pub(crate) struct Release(Option<Box<dyn FnOnce() + Send + Sync>>);

impl Release {
    pub(crate) fn new(cleanup: impl FnOnce() + Send + Sync + 'static) -> Self {
        Release(Some(Box::new(cleanup)))
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if let Some(cleanup) = self.0.take() {
            cleanup();
        }
    }
}

/// This process's waits, by key: the same shape as mini-redis's pub/sub map.
/// Several requests may wait on one key (a PBX forking one call to several
/// legs with the same `call_id`); all get the answer.
#[derive(Default)]
pub(crate) struct Waiters {
    slots: Mutex<HashMap<Arc<str>, Slot>>,
}

struct Slot {
    answers: watch::Sender<Option<Answer>>,
    waiters: usize,
    /// The device's platform as the first waiter gave it, and until when
    /// the key is waited on (the latest waiter's deadline): what a broker
    /// needs to store the key's pending state again (see
    /// [`Waiters::pending`]).
    platform: Platform,
    until: Instant,
}

impl Waiters {
    /// Registers one more waiter on `key`. Says whether it is the first, i.e.
    /// whether the process must subscribe.
    pub(crate) fn join(
        &self,
        key: &str,
        platform: Platform,
        until: Instant,
    ) -> (watch::Receiver<Option<Answer>>, bool) {
        let mut slots = self.slots.lock().expect("waiters lock poisoned");
        if let Some(slot) = slots.get_mut(key) {
            slot.waiters += 1;
            slot.until = slot.until.max(until);
            return (slot.answers.subscribe(), false);
        }
        let (answers, receiver) = watch::channel(None);
        slots.insert(
            Arc::from(key),
            Slot {
                answers,
                waiters: 1,
                platform,
                until,
            },
        );
        (receiver, true)
    }

    /// Removes one waiter from `key`. Says whether it was the last, i.e.
    /// whether the process must unsubscribe and clean the key up.
    pub(crate) fn leave(&self, key: &str) -> bool {
        let mut slots = self.slots.lock().expect("waiters lock poisoned");
        let Some(slot) = slots.get_mut(key) else {
            return false;
        };
        slot.waiters -= 1;
        if slot.waiters == 0 {
            slots.remove(key);
            true
        } else {
            false
        }
    }

    /// Hands an answer to every waiter on `key`. The first answer stands.
    pub(crate) fn deliver(&self, key: &str, answer: Answer) {
        let slots = self.slots.lock().expect("waiters lock poisoned");
        if let Some(slot) = slots.get(key) {
            slot.answers.send_if_modified(|slot_answer| {
                if slot_answer.is_none() {
                    *slot_answer = Some(answer);
                    true
                } else {
                    false
                }
            });
        }
    }

    /// Whether anyone here still waits on `key`.
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.slots
            .lock()
            .expect("waiters lock poisoned")
            .contains_key(key)
    }

    /// The keys waited on, still unanswered: what the fallback check reads.
    pub(crate) fn unanswered(&self) -> Vec<Arc<str>> {
        let slots = self.slots.lock().expect("waiters lock poisoned");
        slots
            .iter()
            .filter(|(_, slot)| slot.answers.borrow().is_none())
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Every key waited on.
    pub(crate) fn keys(&self) -> Vec<Arc<str>> {
        let slots = self.slots.lock().expect("waiters lock poisoned");
        slots.keys().cloned().collect()
    }

    /// The keys waited on, still unanswered, with their platforms and
    /// deadlines: the pending states a broker whose backing store lost them
    /// puts back.
    pub(crate) fn pending(&self) -> Vec<(Arc<str>, Platform, Instant)> {
        let slots = self.slots.lock().expect("waiters lock poisoned");
        slots
            .iter()
            .filter(|(_, slot)| slot.answers.borrow().is_none())
            .map(|(key, slot)| (key.clone(), slot.platform, slot.until))
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.lock().expect("waiters lock poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_text_round_trips() {
        for platform in Platform::ALL {
            for state in [
                CallState::Pending { platform },
                CallState::Answered {
                    platform,
                    available: true,
                },
                CallState::Answered {
                    platform,
                    available: false,
                },
            ] {
                assert_eq!(CallState::decode(&state.encode()), Some(state));
            }
        }
        assert_eq!(CallState::decode("pending:windows"), None);
        assert_eq!(CallState::decode("garbage"), None);
    }

    #[tokio::test]
    async fn every_waiter_on_a_key_gets_the_first_answer() {
        let waiters = Waiters::default();
        let until = Instant::now();
        let (mut a, first_a) = waiters.join("k", Platform::Android, until);
        let (mut b, first_b) = waiters.join("k", Platform::Apns, until);
        assert!(first_a && !first_b);
        let no = Answer {
            available: false,
            received_at: None,
        };
        let yes = Answer {
            available: true,
            received_at: None,
        };
        waiters.deliver("k", no);
        waiters.deliver("k", yes);
        assert_eq!(*a.wait_for(Option::is_some).await.unwrap(), Some(no));
        assert_eq!(*b.wait_for(Option::is_some).await.unwrap(), Some(no));
        assert!(!waiters.leave("k"));
        assert!(waiters.leave("k"));
        assert_eq!(waiters.len(), 0);
    }
}

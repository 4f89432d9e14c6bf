//! A pusher that records every push and answers from a script: for tests
//! and benchmarks, which assert on what was sent and how often.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{Payload, PushOutcome, PushTarget, Pusher};

/// One push as it was handed over.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub target: PushTarget,
    pub payload: Payload,
    pub at: Instant,
}

/// Cheap to clone; clones share the record.
#[derive(Clone, Default)]
pub struct RecordingPusher {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    sent: Mutex<Vec<Recorded>>,
    /// Outcomes to answer with, in order; `Delivered` once it runs dry.
    script: Mutex<VecDeque<PushOutcome>>,
    /// Outcomes for one token's pushes, in order, before [`Shared::script`].
    scripts_for: Mutex<HashMap<String, VecDeque<PushOutcome>>>,
    arrived: Notify,
}

impl RecordingPusher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers the next sends with these outcomes, in order.
    pub fn script(&self, outcomes: impl IntoIterator<Item = PushOutcome>) {
        self.shared
            .script
            .lock()
            .expect("script lock")
            .extend(outcomes);
    }

    /// Answers the next sends to `token` with these outcomes, in order,
    /// whatever the other tokens' pushes meanwhile.
    pub fn script_for(&self, token: &str, outcomes: impl IntoIterator<Item = PushOutcome>) {
        self.shared
            .scripts_for
            .lock()
            .expect("script lock")
            .entry(token.to_owned())
            .or_default()
            .extend(outcomes);
    }

    /// Everything sent so far.
    pub fn sent(&self) -> Vec<Recorded> {
        self.shared.sent.lock().expect("record lock").clone()
    }

    /// The pushes sent to one token so far.
    pub fn sent_to(&self, token: &str) -> Vec<Recorded> {
        self.sent()
            .into_iter()
            .filter(|r| r.target.token == token)
            .collect()
    }

    /// Waits until at least `count` pushes went to `token`, and returns them.
    pub async fn wait_for(&self, token: &str, count: usize) -> Vec<Recorded> {
        loop {
            let arrived = self.shared.arrived.notified();
            let sent = self.sent_to(token);
            if sent.len() >= count {
                return sent;
            }
            arrived.await;
        }
    }
}

#[async_trait]
impl Pusher for RecordingPusher {
    async fn send(&self, target: &PushTarget, payload: &Payload) -> PushOutcome {
        self.shared
            .sent
            .lock()
            .expect("record lock")
            .push(Recorded {
                target: target.clone(),
                payload: payload.clone(),
                at: Instant::now(),
            });
        self.shared.arrived.notify_waiters();
        let own = (self.shared.scripts_for.lock().expect("script lock"))
            .get_mut(&target.token)
            .and_then(VecDeque::pop_front);
        own.or_else(|| self.shared.script.lock().expect("script lock").pop_front())
            .unwrap_or(PushOutcome::Delivered)
    }
}

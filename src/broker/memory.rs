//! The in-process broker: the calls' records and the waiters on them, in
//! one map. Used when no `--redis-url` is given; correct only while the
//! PBX's request and the app's answer reach the same process.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{
    deadline_millis, push_key, unix_millis, Answer, BrokerError, CallBroker, CallState, Left,
    Phase, Stored, Verdict, Wait, Waiters, TOMBSTONE,
};
use crate::store::{EndReason, Platform};

/// Cheap to clone; every clone shares one map.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    waiters: Waiters,
    records: Mutex<Records>,
}

/// The stored records, each until it expires, like keys with a TTL.
#[derive(Default)]
struct Records {
    map: HashMap<String, (Stored, Instant)>,
    /// Expiry times in the order they were set: the next to go first.
    /// Every record's expiry is set at or after its previous one, so a
    /// stale entry here (a record that was given a later expiry since) is
    /// skipped when its key turns out to live on.
    expiring: VecDeque<(Instant, String)>,
    /// Device aliases and the push key each rings under, until it expires;
    /// a map of its own, as an alias may look like any call key.
    aliases: HashMap<String, (String, Instant)>,
    aliases_expiring: VecDeque<(Instant, String)>,
}

impl Records {
    fn set(&mut self, key: &str, stored: Stored, expires: Instant) {
        self.map.insert(key.to_owned(), (stored, expires));
        self.expiring.push_back((expires, key.to_owned()));
    }

    /// Drops the aliases that have expired.
    fn prune_aliases(&mut self, now: Instant) {
        while self
            .aliases_expiring
            .front()
            .is_some_and(|(at, _)| *at <= now)
        {
            if let Some((_, alias)) = self.aliases_expiring.pop_front() {
                if self.aliases.get(&alias).is_some_and(|(_, at)| *at <= now) {
                    self.aliases.remove(&alias);
                }
            }
        }
    }

    /// Drops what has expired.
    fn prune(&mut self, now: Instant) {
        while let Some((at, _)) = self.expiring.front() {
            if *at > now {
                break;
            }
            if let Some((_, key)) = self.expiring.pop_front() {
                if self
                    .map
                    .get(&key)
                    .is_some_and(|(_, expires)| *expires <= now)
                {
                    self.map.remove(&key);
                }
            }
        }
    }

    /// The call record a key answers for, with the device's index: a
    /// pointer's call, or a lone device's call under its own key.
    fn call_of(&mut self, key: &str) -> Option<(String, usize)> {
        match &self.map.get(key)?.0 {
            Stored::Pointer { call, device } => Some((call.clone(), *device)),
            Stored::Call(state) => (state.devices.len() == 1).then(|| (key.to_owned(), 0)),
        }
    }

    fn call_mut(&mut self, key: &str) -> Option<&mut CallState> {
        match self.map.get_mut(key) {
            Some((Stored::Call(state), _)) => Some(state),
            _ => None,
        }
    }

    /// Ends the call under `key` for `reason`, keeping its tombstone.
    fn end(&mut self, key: &str, reason: EndReason) -> Option<CallState> {
        let state = self.call_mut(key)?;
        let before = state.clone();
        state.end(reason);
        let ended = state.clone();
        self.set(key, Stored::Call(ended), Instant::now() + TOMBSTONE);
        Some(before)
    }
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }

    fn records(&self) -> std::sync::MutexGuard<'_, Records> {
        self.shared.records.lock().expect("records lock poisoned")
    }
}

#[async_trait]
impl CallBroker for MemoryBroker {
    async fn open(
        &self,
        key: &str,
        devices: &[Platform],
        until: Instant,
    ) -> Result<Wait, BrokerError> {
        let (news, _) = self.shared.waiters.join(key, devices, until);
        {
            let mut records = self.records();
            records.prune(Instant::now());
            let rings = records
                .call_mut(key)
                .is_some_and(|s| !matches!(s.phase, Phase::Ended(_)));
            if !rings {
                let expires = until + TOMBSTONE;
                let state = CallState::ringing(devices, deadline_millis(until));
                records.set(key, Stored::Call(state), expires);
                if devices.len() > 1 {
                    for index in 0..devices.len() {
                        let pointer = Stored::Pointer {
                            call: key.to_owned(),
                            device: index,
                        };
                        records.set(&push_key(key, index, devices.len()), pointer, expires);
                    }
                }
            }
        }
        let shared = self.shared.clone();
        let key = key.to_owned();
        Ok(Wait::new(news, move || {
            if let Left::Last { cancel: true, .. } = shared.waiters.leave(&key) {
                // Nobody ended it: the PBX hung up.
                shared
                    .records
                    .lock()
                    .expect("records lock poisoned")
                    .end(&key, EndReason::Cancelled);
            }
        }))
    }

    async fn answer(&self, key: &str, available: bool) -> Result<Verdict, BrokerError> {
        let (call, index, verdict) = {
            let mut records = self.records();
            let Some((call, index)) = records.call_of(key) else {
                return Ok(Verdict::Unknown);
            };
            let Some(state) = records.call_mut(&call) else {
                return Ok(Verdict::Unknown);
            };
            let before = state.clone();
            let counted = state.take_answer(index, available, unix_millis(SystemTime::now()));
            (call, index, before.verdict(index, counted))
        };
        if let Verdict::Taken { .. } = verdict {
            let answer = Answer {
                available,
                received_at: Some(SystemTime::now()),
            };
            self.shared.waiters.deliver(&call, index, answer);
        }
        Ok(verdict)
    }

    async fn end(&self, key: &str, reason: EndReason) -> Result<Option<CallState>, BrokerError> {
        if !self.shared.waiters.ending(key) {
            return Ok(None);
        }
        Ok(self.records().end(key, reason))
    }

    async fn cancel(&self, key: &str) -> Result<bool, BrokerError> {
        let call = {
            let mut records = self.records();
            let Some((call, _)) = records.call_of(key).or_else(|| {
                // The call key of a call rung on several devices.
                records.call_mut(key).map(|_| (key.to_owned(), 0))
            }) else {
                return Ok(false);
            };
            let rings = records
                .call_mut(&call)
                .is_some_and(|s| matches!(s.phase, Phase::Ringing { .. }));
            if !rings {
                return Ok(false);
            }
            records.end(&call, EndReason::Cancelled);
            call
        };
        self.shared.waiters.ended(&call, EndReason::Cancelled);
        Ok(true)
    }

    async fn alias(&self, alias: &str, key: &str, until: Instant) -> Result<(), BrokerError> {
        let mut records = self.records();
        let now = Instant::now();
        records.prune_aliases(now);
        let expires = until + TOMBSTONE;
        records
            .aliases
            .insert(alias.to_owned(), (key.to_owned(), expires));
        records
            .aliases_expiring
            .push_back((expires, alias.to_owned()));
        Ok(())
    }

    async fn resolve(&self, alias: &str) -> Result<Option<String>, BrokerError> {
        let records = self.records();
        Ok(records
            .aliases
            .get(alias)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(key, _)| key.clone()))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    fn waiting(&self) -> usize {
        self.shared.waiters.len()
    }
}

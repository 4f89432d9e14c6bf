//! The in-process broker: the calls' records and the waiters on them, in
//! one map. Used when no `--redis-url` is given; correct only while the
//! PBX's request and the app's answer reach the same process. It runs
//! [`crate::lifecycle`]'s transitions directly on its map.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{
    cancel_mark, cancelled_by, candidates, deadline_millis, next_stamp, push_key, pushed_before,
    unix_millis, Answer, BrokerError, CallBroker, FirstClaim, Held, Joined, Left, Message, Named,
    Opening, Phase, PhoneClaim, Pushed, Record, Release, Stamp, Stored, Verdict, Wait, Waiters,
    CANCEL_REACH, TOMBSTONE,
};
use crate::lifecycle::{claim, Claim};
use crate::store::EndReason;

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

/// Values that expire, like keys with a TTL: a value past its expiry is
/// never seen, however quiet the server, and is dropped on the next write
/// (where values expire in the order they were set; else once every value
/// set before it has expired too).
struct Expiring<V> {
    map: HashMap<String, (V, Instant)>,
    /// Expiry times in the order they were set, read from the front. A
    /// key's expiry is only ever set later, so a stale entry here (a value
    /// given a later expiry since) is skipped when its key turns out to
    /// live on.
    expiring: VecDeque<(Instant, String)>,
}

impl<V> Default for Expiring<V> {
    fn default() -> Self {
        Expiring {
            map: HashMap::new(),
            expiring: VecDeque::new(),
        }
    }
}

impl<V> Expiring<V> {
    fn get(&self, key: &str) -> Option<&V> {
        let (value, expires) = self.map.get(key)?;
        (*expires > Instant::now()).then_some(value)
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        let (value, expires) = self.map.get_mut(key)?;
        (*expires > Instant::now()).then_some(value)
    }

    fn set(&mut self, key: &str, value: V, expires: Instant) {
        self.prune(Instant::now());
        self.map.insert(key.to_owned(), (value, expires));
        self.expiring.push_back((expires, key.to_owned()));
    }

    /// Drops what has expired.
    fn prune(&mut self, now: Instant) {
        while self.expiring.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, key)) = self.expiring.pop_front() {
                if self.map.get(&key).is_some_and(|(_, at)| *at <= now) {
                    self.map.remove(&key);
                }
            }
        }
    }
}

/// A stored key: a call's record or a device's pointer, the account that
/// owns it, and its call's stamp.
struct Entry {
    stored: Stored,
    owner: i64,
    stamp: Stamp,
    /// When its call opened, Unix ms ([`pushed_before`]).
    opened: i64,
}

#[derive(Default)]
struct Records {
    keys: Expiring<Entry>,
    /// Device aliases and the push key each rings under; a map of its own,
    /// as an alias may look like any call key.
    aliases: Expiring<String>,
    /// The leg keys opened for a Call-ID that another account's call held.
    legs: Expiring<Vec<String>>,
    /// The [`cancel_mark`]s left under a Call-ID, for [`CANCEL_REACH`].
    cancels: Expiring<Vec<String>>,
    /// When each `call_ended` notice was first claimed, by call, stamp and
    /// phone ([`CallBroker::claim`]). Each expires by its call's
    /// deadline, not in the order claimed: one past its expiry may stay
    /// until every claim set before it has expired too (at most a wait
    /// later), but is never seen.
    told: Expiring<FirstClaim>,
}

impl Records {
    /// The call record a key answers for, with the device's index: a
    /// pointer's call, or a lone device's call under its own key.
    fn call_of(&self, key: &str) -> Option<(String, usize)> {
        match &self.keys.get(key)?.stored {
            Stored::Pointer { call, device } => Some((call.clone(), *device)),
            Stored::Call(record) => (record.devices.len() == 1).then(|| (key.to_owned(), 0)),
        }
    }

    /// The call record under `key`, and its stamp.
    fn record_mut(&mut self, key: &str) -> Option<(&mut Record, Stamp)> {
        match self.keys.get_mut(key) {
            Some(Entry {
                stored: Stored::Call(record),
                stamp,
                ..
            }) => Some((record, *stamp)),
            _ => None,
        }
    }

    /// Ends the call under `key` for `reason`, keeping its tombstone; only
    /// the call `stamp`, when given.
    fn end(&mut self, key: &str, reason: EndReason, stamp: Option<Stamp>) -> Option<Record> {
        let (record, stored) = self.record_mut(key)?;
        if stamp.is_some_and(|stamp| stamp != stored) {
            return None;
        }
        let before = record.clone();
        record.end(reason);
        self.retouch(key, Instant::now() + TOMBSTONE);
        Some(before)
    }

    /// Ends the call under `key` as `cancelled` if it still rings
    /// ([`Record::cancel`]); says whether it did.
    fn cancel(&mut self, key: &str) -> bool {
        let cancelled = self
            .record_mut(key)
            .is_some_and(|(record, _)| record.cancel());
        if cancelled {
            self.retouch(key, Instant::now() + TOMBSTONE);
        }
        cancelled
    }

    /// Gives `key` a new expiry.
    fn retouch(&mut self, key: &str, expires: Instant) {
        if let Some((entry, _)) = self.keys.map.remove(key) {
            self.keys.set(key, entry, expires);
        }
    }

    /// Stores a new call under `key` for `call`, with its device pointers,
    /// unless one of them is taken; its stamp when it did.
    fn store(&mut self, key: &str, call: &Opening<'_>) -> Option<Stamp> {
        let count = call.devices.len();
        let push_keys: Vec<String> = (0..count)
            .filter(|_| count > 1)
            .map(|index| push_key(key, index, count))
            .collect();
        // A device key holding anything but this call's own pointer (left
        // by its previous call under the same key) is another call's.
        let taken = push_keys.iter().enumerate().any(|(index, push)| {
            self.keys
                .get(push)
                .is_some_and(|entry| match &entry.stored {
                    Stored::Pointer { call, device } => (call.as_str(), *device) != (key, index),
                    Stored::Call(_) => true,
                })
        });
        if taken {
            return None;
        }
        let last = self.keys.get(key).map(|entry| entry.stamp);
        let stamp = next_stamp(deadline_millis(call.until), last);
        let opened = unix_millis(SystemTime::now());
        let expires = call.until + TOMBSTONE;
        let record = Record::ringing(call.devices, stamp);
        let owner = call.account;
        for (index, push) in push_keys.iter().enumerate() {
            let pointer = Stored::Pointer {
                call: key.to_owned(),
                device: index,
            };
            let entry = Entry {
                stored: pointer,
                owner,
                stamp,
                opened,
            };
            self.keys.set(push, entry, expires);
        }
        let entry = Entry {
            stored: Stored::Call(record),
            owner,
            stamp,
            opened,
        };
        self.keys.set(key, entry, expires);
        Some(stamp)
    }

    /// The calls that `key` names for a cancel: the call under it (or,
    /// `by` a `unique_key`, whose device key it is), and the legs opened
    /// for it as a Call-ID; only `account`'s when given.
    fn named_by(&self, key: &str, account: Option<i64>, by: Named) -> Vec<String> {
        let mut calls = Vec::new();
        match self.keys.get(key).map(|e| &e.stored) {
            Some(Stored::Pointer { call, .. }) if by == Named::UniqueKey => {
                calls.push(call.clone());
            }
            Some(Stored::Pointer { .. }) => {}
            Some(Stored::Call(_)) => calls.push(key.to_owned()),
            None => {}
        }
        calls.extend(self.legs.get(key).into_iter().flatten().cloned());
        calls.retain(|call| {
            account.is_none_or(|account| self.keys.get(call).is_some_and(|e| e.owner == account))
        });
        calls
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
    async fn open(&self, call: Opening<'_>) -> Result<Wait, BrokerError> {
        for (n, key) in candidates(call.key, call.account).enumerate() {
            let key = &key;
            let leg_of = (n > 0).then_some(call.key);
            let Joined::Waiting {
                news,
                generation,
                joined,
                ringer,
                ..
            } = self.shared.waiters.join_opened(key, &call, leg_of).await
            else {
                continue;
            };
            let shared = self.shared.clone();
            let release_key = key.clone();
            let release = Release::new(move || {
                if let Left::Last {
                    cancel: true,
                    stamp,
                    ..
                } = shared.waiters.leave(&release_key, generation)
                {
                    // Nobody ended it: the PBX hung up.
                    shared.records.lock().expect("records lock poisoned").end(
                        &release_key,
                        EndReason::Cancelled,
                        stamp,
                    );
                }
            });
            if let Some(stamp) = joined {
                // A retry of a call this process rings: nothing to store.
                let held = Held {
                    generation,
                    stamp,
                    joined: true,
                    opened: None,
                };
                return Ok(Wait::held(key, news, held, ringer, release));
            }
            let mut records = self.records();
            let existing = records.keys.get(key).map(|e| (&e.stored, Some(e.owner)));
            let replacing = existing.is_some();
            // A call the PBX's cancel ended: the cancel found it, so its
            // mark is not for the call that follows it under the key.
            let after_cancel = matches!(
                existing,
                Some((Stored::Call(record), _)) if record.phase == Phase::Ended(EndReason::Cancelled)
            );
            let existing_stamp = records.keys.get(key).map(|e| e.stamp);
            let claimed = claim(existing, call.account);
            let joined = claimed == Claim::Join;
            let stamp = match claimed {
                Claim::Join => existing_stamp,
                Claim::New => {
                    let stored = records.store(key, &call);
                    if stored.is_none() && replacing {
                        // A device key of the new call is another call's:
                        // the key's old tombstone goes with the attempt, as
                        // the Redis broker's undo takes it.
                        records.keys.map.remove(key.as_str());
                    }
                    stored
                }
                Claim::Taken => None,
            };
            let Some(stamp) = stamp else {
                // Not ours: leaving must not end another account's call.
                self.shared.waiters.claim_end(key, Some(generation));
                drop(records);
                drop(release);
                continue;
            };
            let stamp = Some(stamp);
            self.shared.waiters.confirm(key, generation, stamp);
            self.shared.waiters.opened(key, generation);
            // One clock: nothing to say of the opening.
            let held = Held {
                generation,
                stamp,
                joined,
                opened: None,
            };
            let wait = Wait::held(key, news, held, ringer, release);
            // Where a cancel crossed this call's request, ended as it opens:
            // unless the call under the key before ended by a cancel, which
            // found it (a call posted again after its cancel is a new call,
            // and rings), or this request joins the ringing call (which the
            // cancel would have found).
            let marked = !joined && !after_cancel;
            let crossed = match leg_of {
                Some(call_id) => {
                    let mut legs = records.legs.get(call_id).cloned().unwrap_or_default();
                    if !legs.contains(key) {
                        legs.push(key.clone());
                    }
                    records.legs.set(call_id, legs, call.until + TOMBSTONE);
                    marked.then(|| records.cancels.get(call_id)).flatten()
                }
                None if marked => records.cancels.get(key),
                None => None,
            };
            let marks = crossed.map(Vec::as_slice).unwrap_or_default();
            if cancelled_by(marks, call.account) && records.cancel(key) {
                drop(records);
                let ended = Message::Ended(EndReason::Cancelled);
                self.shared.waiters.tell(key, stamp, ended);
            }
            return Ok(wait);
        }
        Err(BrokerError::Unavailable(
            "no free key for the call".to_owned(),
        ))
    }

    async fn answer(
        &self,
        key: &str,
        available: bool,
        pushed: Pushed,
    ) -> Result<Verdict, BrokerError> {
        let (call, stamp, index, verdict) = {
            let mut records = self.records();
            let Some((call, index)) = records.call_of(key) else {
                return Ok(Verdict::Unknown);
            };
            let opened = records.keys.get(&call).map_or(0, |entry| entry.opened);
            let Some((record, stamp)) = records.record_mut(&call) else {
                return Ok(Verdict::Unknown);
            };
            let deadline = match record.phase {
                Phase::Ringing { until } | Phase::Won { until } => until,
                Phase::Ended(_) => i64::MAX,
            };
            let stale = pushed == Pushed::Stale || pushed_before(pushed, deadline, opened);
            let before = record.clone();
            let now = unix_millis(SystemTime::now());
            let counted = record.take(index, available, now, stale);
            (call, stamp, index, before.verdict(index, counted))
        };
        if let Verdict::Taken { .. } = verdict {
            let answer = Answer {
                available,
                received_at: Some(SystemTime::now()),
            };
            let message = Message::Answer { index, answer };
            self.shared.waiters.tell(&call, Some(stamp), message);
        }
        Ok(verdict)
    }

    async fn end(&self, wait: &Wait, reason: EndReason) -> Result<Option<Record>, BrokerError> {
        if !self
            .shared
            .waiters
            .claim_end_as(wait.key(), wait.generation(), wait.stopped_last())
        {
            return Ok(None);
        }
        Ok(self.records().end(wait.key(), reason, wait.stamp()))
    }

    async fn cancel(
        &self,
        key: &str,
        account: Option<i64>,
        by: Named,
    ) -> Result<bool, BrokerError> {
        let cancelled: Vec<(String, Stamp)> = {
            let mut records = self.records();
            let mut marks = records.cancels.get(key).cloned().unwrap_or_default();
            let mark = cancel_mark(account);
            if !marks.contains(&mark) {
                marks.push(mark);
            }
            records
                .cancels
                .set(key, marks, Instant::now() + CANCEL_REACH);
            let calls = records.named_by(key, account, by);
            calls
                .into_iter()
                .filter_map(|call| {
                    let stamp = records.keys.get(&call)?.stamp;
                    records.cancel(&call).then_some((call, stamp))
                })
                .collect()
        };
        for (call, stamp) in &cancelled {
            let ended = Message::Ended(EndReason::Cancelled);
            self.shared.waiters.tell(call, Some(*stamp), ended);
        }
        Ok(!cancelled.is_empty())
    }

    async fn read(&self, key: &str) -> Result<Option<(Stored, Option<i64>)>, BrokerError> {
        Ok(self.records().keys.get(key).map(|entry| {
            let owner = matches!(entry.stored, Stored::Call(_)).then_some(entry.owner);
            (entry.stored.clone(), owner)
        }))
    }

    async fn alias(&self, alias: &str, key: &str, until: Instant) -> Result<(), BrokerError> {
        self.records()
            .aliases
            .set(alias, key.to_owned(), until + TOMBSTONE);
        Ok(())
    }

    async fn resolve(&self, alias: &str) -> Result<Option<String>, BrokerError> {
        Ok(self.records().aliases.get(alias).cloned())
    }

    async fn claim(&self, claim: &PhoneClaim<'_>) -> Result<Option<FirstClaim>, BrokerError> {
        let told = &mut self.records().told;
        let key = format!("{} {} {}", claim.call, claim.stamp, claim.what);
        if let Some(first) = told.get(&key) {
            return Ok(Some(first.clone()));
        }
        let first = FirstClaim {
            at: claim.at,
            push_key: claim.push_key.to_owned(),
        };
        told.set(&key, first, Instant::now() + claim.kept);
        Ok(None)
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    fn wakes_in_place(&self) -> bool {
        true
    }

    fn shared(&self) -> bool {
        false
    }

    fn waiting(&self) -> usize {
        self.shared.waiters.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Platform;

    /// Issue #23: a tombstone ends on time however quiet the server: no
    /// other call needs to open for it to go.
    #[tokio::test(start_paused = true)]
    async fn a_tombstone_ends_on_time_on_a_quiet_server() {
        let broker = MemoryBroker::new();
        let devices = [Platform::Android];
        let wait = broker
            .open(Opening {
                key: "k",
                account: 42,
                devices: &devices,
                until: Instant::now() + std::time::Duration::from_secs(4),
            })
            .await
            .expect("opened");
        assert!(broker
            .end(&wait, EndReason::TimedOut)
            .await
            .expect("ended")
            .is_some());
        drop(wait);
        tokio::time::advance(TOMBSTONE - std::time::Duration::from_secs(1)).await;
        assert_eq!(
            broker
                .answer("k", true, Pushed::Unsaid)
                .await
                .expect("answered"),
            Verdict::Gone(EndReason::TimedOut),
            "410 while the tombstone lives"
        );
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        assert_eq!(
            broker
                .answer("k", true, Pushed::Unsaid)
                .await
                .expect("answered"),
            Verdict::Unknown,
            "404 once it is past"
        );
        assert_eq!(broker.read("k").await.expect("read"), None);
    }
}

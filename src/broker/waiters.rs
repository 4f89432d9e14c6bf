//! This process's waits, by call key: the same shape as mini-redis's pub/sub
//! map. Several requests may wait on one key (a PBX retrying a call it
//! parked, with the same `call_id` and account); all get the news. Both
//! brokers keep their waits here; only what reaches them differs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;

use super::{push_key, Answer, News, Opening};
use crate::lifecycle::{Phase, Record};
use crate::store::{EndReason, Platform};

#[derive(Default)]
pub(crate) struct Waiters {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    slots: HashMap<Arc<str>, Slot>,
    /// The push keys of calls waited on here with several devices: their
    /// call and device, so an answer reaching this process needs no lookup.
    devices: HashMap<Arc<str>, (Arc<str>, usize)>,
    /// The generation the next slot gets: a wait leaves only its own slot,
    /// never a newer call's under the same key.
    generations: u64,
}

struct Slot {
    news: watch::Sender<News>,
    waiters: usize,
    generation: u64,
    /// The account whose call this is: another account's request never
    /// joins it.
    account: i64,
    /// The devices as the first waiter gave them, and until when the key is
    /// waited on (the latest waiter's deadline): what a broker needs to
    /// store the call's record again (see [`Waiters::pending`]).
    devices: Vec<Platform>,
    until: Instant,
    /// The Call-ID the call was opened for, when its key is a leg's own.
    leg_of: Option<String>,
    /// Its devices' aliases and the push key each rings under.
    aliases: Vec<(String, String)>,
    /// Whether a waiter ended the call itself (else leaving cancels it).
    ended: bool,
    /// Whether the broker has opened the call in its store: until then its
    /// keys are not missing but not yet written, and a call whose open then
    /// fails must leave none behind (see [`Waiters::pending`]).
    opened: bool,
}

/// What joining a key found.
pub(crate) enum Joined {
    /// Another account's call is waited on here under the key.
    Taken,
    /// Waiting on the key: its news, whether this is the first wait here
    /// (the process must subscribe), and the wait's generation (for
    /// [`Waiters::leave`]).
    Waiting {
        news: watch::Receiver<News>,
        first: bool,
        generation: u64,
    },
}

/// What leaving a key means for the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Left {
    /// Others still wait on the key here (or a newer call holds it).
    Others,
    /// The last waiter left: unsubscribe; `cancel` when nobody ended the
    /// call (the PBX hung up). `push_keys`: the device keys it registered.
    Last {
        cancel: bool,
        push_keys: Vec<Arc<str>>,
    },
}

/// A call waited on here, not ended: what a broker whose backing store
/// lost its keys puts back.
pub(crate) struct Pending {
    pub key: Arc<str>,
    pub account: i64,
    pub devices: Vec<Platform>,
    pub until: Instant,
    pub leg_of: Option<String>,
    pub aliases: Vec<(String, String)>,
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("waiters lock poisoned")
    }

    /// Registers one more waiter on `key` for `call`. A slot whose call has
    /// ended (its waits are finishing) gives way to the new call, so a
    /// phone is never pushed a call that is already over. Ended means told
    /// so from outside, or ended by its own last waiter ([`claim_end`]),
    /// whose wait may outlive the end by a moment (an ACK's bookkeeping):
    /// joining it would give the new call the old call's news and devices,
    /// and an answer to the old call's key would count for the new one.
    /// `leg_of`: the key asked for, when `key` is a leg's own.
    ///
    /// [`claim_end`]: Waiters::claim_end
    pub(crate) fn join(&self, key: &str, call: &Opening<'_>, leg_of: Option<&str>) -> Joined {
        let mut inner = self.lock();
        if let Some(slot) = inner.slots.get_mut(key) {
            if slot.account != call.account {
                return Joined::Taken;
            }
            if !slot.ended && slot.news.borrow().ended.is_none() {
                slot.waiters += 1;
                slot.until = slot.until.max(call.until);
                return Joined::Waiting {
                    news: slot.news.subscribe(),
                    first: false,
                    generation: slot.generation,
                };
            }
            // Ended: its remaining waits keep their own news and leave
            // nothing behind; the channel stays subscribed for the new one.
            inner.forget_devices(key);
            let generation = inner.insert(key, call, leg_of);
            let news = inner.slots[key].news.subscribe();
            return Joined::Waiting {
                news,
                first: false,
                generation,
            };
        }
        let generation = inner.insert(key, call, leg_of);
        let news = inner.slots[key].news.subscribe();
        Joined::Waiting {
            news,
            first: true,
            generation,
        }
    }

    /// Removes one waiter of generation `generation` from `key`.
    pub(crate) fn leave(&self, key: &str, generation: u64) -> Left {
        let mut inner = self.lock();
        let Some(slot) = inner.slots.get_mut(key) else {
            return Left::Others;
        };
        if slot.generation != generation {
            return Left::Others;
        }
        slot.waiters -= 1;
        if slot.waiters > 0 {
            return Left::Others;
        }
        let cancel = !slot.ended;
        let push_keys = inner.forget_devices(key);
        inner.slots.remove(key);
        Left::Last { cancel, push_keys }
    }

    /// Notes that a waiter ends the call itself, and says whether it may:
    /// only the last waiter on a key ends its call.
    pub(crate) fn claim_end(&self, key: &str) -> bool {
        let mut inner = self.lock();
        match inner.slots.get_mut(key) {
            Some(slot) if slot.waiters == 1 => {
                slot.ended = true;
                true
            }
            Some(_) => false,
            // Not waited on here (a broker's own tests): nothing to keep.
            None => true,
        }
    }

    /// Notes that the wait of generation `generation` on `key` has its
    /// call opened in the broker's store.
    pub(crate) fn opened(&self, key: &str, generation: u64) {
        if let Some(slot) = self.lock().slots.get_mut(key) {
            if slot.generation == generation {
                slot.opened = true;
            }
        }
    }

    /// Notes that the device `alias` of the call `key` rings under
    /// `push_key`, to store again with the call's record.
    pub(crate) fn note_alias(&self, key: &str, alias: &str, push_key: &str) {
        if let Some(slot) = self.lock().slots.get_mut(key) {
            slot.aliases.push((alias.to_owned(), push_key.to_owned()));
        }
    }

    /// The call and device index a push key answers for, when its call is
    /// waited on here.
    pub(crate) fn device_of(&self, push_key: &str) -> Option<(Arc<str>, usize)> {
        self.lock().device_of(push_key)
    }

    /// Whether the call `push_key` rings for is waited on here and not
    /// over: an answer to it that counts wakes a wait here.
    pub(crate) fn rings(&self, push_key: &str) -> bool {
        let inner = self.lock();
        inner
            .device_of(push_key)
            .and_then(|(key, _)| inner.slots.get(&key))
            .is_some_and(|slot| !slot.ended && slot.news.borrow().ended.is_none())
    }

    /// Hands device `index`'s answer to every waiter on `key`. A device's
    /// first answer stands; a repeat (the message after a local delivery)
    /// changes nothing.
    pub(crate) fn deliver(&self, key: &str, index: usize, answer: Answer) {
        let inner = self.lock();
        if let Some(slot) = inner.slots.get(key) {
            slot.news
                .send_if_modified(|news| match news.answers.get_mut(index) {
                    Some(seen @ None) => {
                        *seen = Some(answer);
                        true
                    }
                    _ => false,
                });
        }
    }

    /// Tells every waiter on `key` that the call was ended from outside.
    pub(crate) fn ended(&self, key: &str, reason: EndReason) {
        let inner = self.lock();
        if let Some(slot) = inner.slots.get(key) {
            slot.news.send_if_modified(|news| {
                let first = news.ended.is_none();
                news.ended.get_or_insert(reason);
                first
            });
        }
    }

    /// Hands what a stored record says to the waiters on `key` (the
    /// fallback check).
    pub(crate) fn deliver_stored(&self, key: &str, record: &Record) {
        for (index, device) in record.devices.iter().enumerate() {
            if let Some(available) = device.answer {
                let answer = Answer {
                    available,
                    received_at: None,
                };
                self.deliver(key, index, answer);
            }
        }
        if let Phase::Ended(reason) = record.phase {
            self.ended(key, reason);
        }
    }

    /// Whether anyone here still waits on `key`.
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.lock().slots.contains_key(key)
    }

    /// The keys waited on whose call may still change: what the fallback
    /// check reads.
    pub(crate) fn unsettled(&self) -> Vec<Arc<str>> {
        let inner = self.lock();
        inner
            .slots
            .iter()
            .filter(|(_, slot)| slot.news.borrow().ended.is_none())
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Every key waited on.
    pub(crate) fn keys(&self) -> Vec<Arc<str>> {
        self.lock().slots.keys().cloned().collect()
    }

    /// The calls waited on, opened and not ended: the records (with their
    /// device pointers, aliases and legs) a broker whose backing store lost
    /// them puts back. Not a call still being opened: its open writes its
    /// keys, or fails and the PBX hears NAK, and keys put back meanwhile
    /// would ring for nobody.
    pub(crate) fn pending(&self) -> Vec<Pending> {
        let inner = self.lock();
        inner
            .slots
            .iter()
            .filter(|(_, slot)| slot.opened && slot.news.borrow().ended.is_none())
            .map(|(key, slot)| Pending {
                key: key.clone(),
                account: slot.account,
                devices: slot.devices.clone(),
                until: slot.until,
                leg_of: slot.leg_of.clone(),
                aliases: slot.aliases.clone(),
            })
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().slots.len()
    }
}

impl Inner {
    /// [`Waiters::device_of`], under the lock already held.
    fn device_of(&self, push_key: &str) -> Option<(Arc<str>, usize)> {
        if let Some(found) = self.devices.get(push_key) {
            return Some(found.clone());
        }
        self.slots
            .get_key_value(push_key)
            .filter(|(_, slot)| slot.devices.len() == 1)
            .map(|(key, _)| (key.clone(), 0))
    }

    /// A new slot for `call` under `key`, with one waiter; its generation.
    fn insert(&mut self, key: &str, call: &Opening<'_>, leg_of: Option<&str>) -> u64 {
        self.generations += 1;
        let generation = self.generations;
        let key: Arc<str> = Arc::from(key);
        let count = call.devices.len();
        if count > 1 {
            for index in 0..count {
                let push = Arc::from(push_key(&key, index, count));
                self.devices.insert(push, (key.clone(), index));
            }
        }
        let (news, _) = watch::channel(News {
            answers: vec![None; count],
            ended: None,
        });
        self.slots.insert(
            key,
            Slot {
                news,
                waiters: 1,
                generation,
                account: call.account,
                devices: call.devices.to_vec(),
                until: call.until,
                leg_of: leg_of.map(str::to_owned),
                aliases: Vec::new(),
                opened: false,
                ended: false,
            },
        );
        generation
    }

    /// Drops the device keys of the call waited on under `key`.
    fn forget_devices(&mut self, key: &str) -> Vec<Arc<str>> {
        let Some(count) = self.slots.get(key).map(|slot| slot.devices.len()) else {
            return Vec::new();
        };
        let mut push_keys = Vec::new();
        if count > 1 {
            for index in 0..count {
                if let Some((push, _)) = self
                    .devices
                    .remove_entry(push_key(key, index, count).as_str())
                {
                    push_keys.push(push);
                }
            }
        }
        push_keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opening(account: i64, devices: &[Platform]) -> Opening<'_> {
        Opening {
            key: "k",
            account,
            devices,
            until: Instant::now(),
        }
    }

    fn waiting(joined: Joined) -> (watch::Receiver<News>, bool, u64) {
        match joined {
            Joined::Waiting {
                news,
                first,
                generation,
            } => (news, first, generation),
            Joined::Taken => panic!("taken"),
        }
    }

    #[tokio::test]
    async fn only_an_opened_call_not_ended_is_pending() {
        let waiters = Waiters::default();
        let devices = [Platform::Android];
        let (_news, _, generation) = waiting(waiters.join("k", &opening(42, &devices), None));
        waiters.note_alias("k", "5 tok", "k");
        assert!(
            waiters.pending().is_empty(),
            "a call still being opened has no keys to put back"
        );
        waiters.opened("k", generation + 1);
        assert!(waiters.pending().is_empty(), "another generation's open");
        waiters.opened("k", generation);
        let pending = waiters.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(&*pending[0].key, "k");
        assert_eq!(pending[0].account, 42);
        assert_eq!(pending[0].aliases, [("5 tok".to_owned(), "k".to_owned())]);
        waiters.ended("k", EndReason::TimedOut);
        assert!(waiters.pending().is_empty(), "an ended call is not pending");
    }

    #[tokio::test]
    async fn every_waiter_on_a_key_gets_each_devices_first_answer() {
        let waiters = Waiters::default();
        let devices = [Platform::Android, Platform::Apns];
        let (mut a, first_a, gen) = waiting(waiters.join("k", &opening(42, &devices), None));
        let (mut b, first_b, _) = waiting(waiters.join("k", &opening(42, &devices), None));
        assert!(first_a && !first_b);
        assert!(matches!(
            waiters.join("k", &opening(43, &devices), None),
            Joined::Taken
        ));
        assert_eq!(waiters.device_of("k.2"), Some((Arc::from("k"), 1)));
        assert_eq!(
            waiters.device_of("k"),
            None,
            "a fork's call key is no push key"
        );
        let no = Answer {
            available: false,
            received_at: None,
        };
        let yes = Answer {
            available: true,
            received_at: None,
        };
        waiters.deliver("k", 1, no);
        waiters.deliver("k", 1, yes);
        for news in [&mut a, &mut b] {
            let seen = news
                .wait_for(|n| n.answers[1].is_some())
                .await
                .unwrap()
                .clone();
            assert_eq!(seen.answers, vec![None, Some(no)]);
        }
        assert_eq!(waiters.leave("k", gen), Left::Others);
        assert!(waiters.claim_end("k"));
        assert_eq!(
            waiters.leave("k", gen),
            Left::Last {
                cancel: false,
                push_keys: vec![Arc::from("k.1"), Arc::from("k.2")]
            }
        );
        assert_eq!((waiters.len(), waiters.device_of("k.1")), (0, None));
    }

    /// The property test's find (tests/lifecycle_model.rs): a one-device
    /// call its waiter ended, then a new call under the same key with two
    /// devices while the old wait still lived. The new call joined the old
    /// slot, so the bare key still named device 0, and on Redis an answer
    /// to the old call's key counted for the new call.
    #[test]
    fn a_call_its_own_waiter_ended_gives_way_to_a_new_one() {
        let waiters = Waiters::default();
        let (_, _, old) = waiting(waiters.join("k", &opening(42, &[Platform::Android]), None));
        assert_eq!(waiters.device_of("k"), Some((Arc::from("k"), 0)));
        assert!(waiters.rings("k"));
        assert!(waiters.claim_end("k"));
        assert!(!waiters.rings("k"), "ended by its waiter, still held");
        let old_answer = Answer {
            available: true,
            received_at: None,
        };
        waiters.deliver("k", 0, old_answer);
        let two = [Platform::Android, Platform::Apns];
        let (news, first, new) = waiting(waiters.join("k", &opening(42, &two), None));
        assert!(!first, "still subscribed");
        assert_ne!(new, old, "a slot of its own");
        assert_eq!(
            news.borrow().answers,
            vec![None, None],
            "the old call's answer reached the new call"
        );
        assert_eq!(waiters.device_of("k"), None, "the old call's key");
        assert_eq!(waiters.device_of("k.2"), Some((Arc::from("k"), 1)));
        assert!(waiters.rings("k.2") && !waiters.rings("k") && !waiters.rings("k.3"));
        assert_eq!(waiters.leave("k", old), Left::Others);
        assert_eq!(waiters.device_of("k.1"), Some((Arc::from("k"), 0)));
        assert!(matches!(
            waiters.leave("k", new),
            Left::Last { cancel: true, .. }
        ));
    }

    #[test]
    fn an_ended_call_gives_way_to_a_new_one_whose_waits_it_never_touches() {
        let waiters = Waiters::default();
        let devices = [Platform::Android];
        let (_, _, old) = waiting(waiters.join("k", &opening(42, &devices), None));
        waiters.ended("k", EndReason::Cancelled);
        let (news, first, new) = waiting(waiters.join("k", &opening(42, &devices), None));
        assert!(!first, "still subscribed");
        assert_eq!(news.borrow().ended, None, "the new call rings");
        assert_eq!(waiters.leave("k", old), Left::Others);
        assert!(waiters.contains("k"));
        assert!(matches!(
            waiters.leave("k", new),
            Left::Last { cancel: true, .. }
        ));
    }
}

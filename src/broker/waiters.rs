//! This process's waits, by call key: the same shape as mini-redis's pub/sub
//! map. Several requests may wait on one key (a PBX retrying a call it
//! parked, with the same `call_id` and account); all get the news. Both
//! brokers keep their waits here; only what reaches them differs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;

use super::{push_key, Answer, News, Opening, Ringer, Ringers, Stamp};
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
    /// The requests that ring the call, for their waits.
    ringers: Ringers,
    generation: u64,
    /// The stored call's [`Stamp`], once `confirmed` by the store (the
    /// call's own, or the one of the call it joined; `None` when the store
    /// did not say, and then any news are the slot's). News stamped for
    /// another call never reach the slot: they are an earlier call's under
    /// the same key.
    stamp: Option<Stamp>,
    confirmed: bool,
    /// The hold ids under which the store may count requests of this
    /// process among the call's holders: one per request here that ran
    /// the store's open (the first, and a PBX retry that came before the
    /// first was stored), noted before it ran. A hang-up takes them all
    /// back (see the Redis broker's `holders_key`).
    holds: Vec<Arc<str>>,
    /// Stamped news that came before the stamp was confirmed: handed over
    /// if the stamp turns out to be theirs.
    early: Vec<(Stamp, Message)>,
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

/// What reaches the waits on a key: a device's answer, or the call's end
/// from outside.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Message {
    /// Device `index` answered.
    Answer { index: usize, answer: Answer },
    /// The call was ended from outside.
    Ended(EndReason),
}

/// The most news a slot keeps before its stamp is confirmed: one per
/// device and an end, and then some.
const EARLY_MAX: usize = 16;

/// How long an open waits before it looks again at a key another
/// account's call is being opened under ([`Waiters::join_opened`]).
const OPENING_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// What joining a key found.
pub(crate) enum Joined {
    /// Another account's call is waited on here under the key.
    Taken,
    /// Another account's call is being opened here under the key: its
    /// open says whether the key is that call's (see
    /// [`Waiters::join_opened`]).
    Opening,
    /// Waiting on the key: its news, whether this is the first wait here
    /// (the process must subscribe), the wait's generation (for
    /// [`Waiters::leave`]), and whether it joined a call this process has
    /// opened already (a PBX retry), with that call's stamp: nothing more
    /// to store.
    Waiting {
        news: watch::Receiver<News>,
        first: bool,
        generation: u64,
        joined: Option<Option<Stamp>>,
        ringer: Ringer,
    },
}

/// What leaving a key means for the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Left {
    /// Others still wait on the key here (or a newer call holds it).
    Others,
    /// The last waiter left: unsubscribe; `cancel` when nobody ended the
    /// call (the PBX hung up), the call `stamp`, and this process's
    /// `holds` on it (see [`Waiters::hold`]). `push_keys`: the device
    /// keys it registered.
    Last {
        cancel: bool,
        stamp: Option<Stamp>,
        holds: Holds,
        push_keys: Vec<Arc<str>>,
    },
}

/// What a hang-up takes back of a call: this process's hold ids on it
/// (see [`Waiters::hold`]), and the account whose call it is, so that a
/// key another account's call holds by then is left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holds {
    pub account: i64,
    pub ids: Vec<Arc<str>>,
}

/// A call waited on here, not ended: what a broker whose backing store
/// lost its keys puts back.
pub(crate) struct Pending {
    pub key: Arc<str>,
    pub stamp: Option<Stamp>,
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

    /// Registers one more waiter on `key` for `call`. Only a call that
    /// still rings is joined (a PBX retry); a slot whose call is over gives
    /// way to the new call, so a phone is never pushed a call that is
    /// already over. Over means won (a device took it: its PBX hears, or
    /// has heard, ACK), declined by every device (NAK), told so from
    /// outside, or ended by its own last
    /// waiter ([`claim_end`]), whose wait may outlive the end by a moment
    /// (an ACK's bookkeeping): joining it would give the new call the old
    /// call's outcome, news and devices, and an answer to the old call's
    /// key would count for the new one. `leg_of`: the key asked for, when
    /// `key` is a leg's own.
    ///
    /// [`claim_end`]: Waiters::claim_end
    pub(crate) fn join(&self, key: &str, call: &Opening<'_>, leg_of: Option<&str>) -> Joined {
        let mut inner = self.lock();
        if let Some(slot) = inner.slots.get_mut(key) {
            if slot.account != call.account {
                return if slot.opened {
                    Joined::Taken
                } else {
                    Joined::Opening
                };
            }
            if !slot.over() {
                slot.waiters += 1;
                slot.until = slot.until.max(call.until);
                return Joined::Waiting {
                    news: slot.news.subscribe(),
                    first: false,
                    generation: slot.generation,
                    joined: slot.opened.then_some(slot.stamp),
                    ringer: slot.ringers.join(),
                };
            }
            // Over: its remaining waits keep their own news and leave
            // nothing behind; the channel stays subscribed for the new one.
            inner.forget_devices(key);
            return inner.insert(key, call, leg_of, false);
        }
        inner.insert(key, call, leg_of, true)
    }

    /// [`Waiters::join`], once no other account's call is being opened
    /// under `key` here. Such an open may find the key another's (the
    /// Call-ID's own call, of the account that posted it first) and let
    /// it go: this call, of that account, then takes the key it asked
    /// for, not a leg's, which a cancel by the Call-ID may have marked.
    /// The wait is one open's (a store round trip).
    pub(crate) async fn join_opened(
        &self,
        key: &str,
        call: &Opening<'_>,
        leg_of: Option<&str>,
    ) -> Joined {
        loop {
            match self.join(key, call, leg_of) {
                Joined::Opening => tokio::time::sleep(OPENING_PAUSE).await,
                joined => return joined,
            }
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
        let (cancel, stamp, holds) = (!slot.ended, slot.stamp, slot.held());
        let push_keys = inner.forget_devices(key);
        inner.slots.remove(key);
        Left::Last {
            cancel,
            stamp,
            holds,
            push_keys,
        }
    }

    /// Notes that a waiter of generation `generation` (or of whatever
    /// generation waits on `key`, when `None`) ends the call itself, and
    /// says whether it may: only the last waiter on a call ends it.
    pub(crate) fn claim_end(&self, key: &str, generation: Option<u64>) -> bool {
        self.claim_end_as(key, generation, false)
    }

    /// [`Waiters::claim_end`] for a wait whose request may be the last of
    /// this process's to stop ringing the call (`last_ringer`, see
    /// [`super::Wait::stop_ringing`]): that one ends it, though a wait
    /// that stopped before it has yet to leave. Two requests that time out
    /// together (a PBX retry waits no longer than the call it joined) end
    /// it `timed_out`, not as a hang-up once both have left.
    pub(crate) fn claim_end_as(
        &self,
        key: &str,
        generation: Option<u64>,
        last_ringer: bool,
    ) -> bool {
        let mut inner = self.lock();
        match inner.slots.get_mut(key) {
            Some(slot) if generation.is_some_and(|g| g != slot.generation) => {
                // A newer call holds the key here: the old call's slot is
                // gone, and its end names its stamp, so it cannot end the
                // new call.
                true
            }
            Some(slot) if slot.waiters == 1 || last_ringer => {
                slot.ended = true;
                true
            }
            Some(_) => false,
            // Not waited on here (a broker's own tests): nothing to keep.
            None => true,
        }
    }

    /// Notes `hold`, the id under which the store is about to count a
    /// request of the wait of generation `generation` on `key` among the
    /// call's holders: noted before the store runs, so a wait dropped
    /// while it runs still takes it back.
    pub(crate) fn hold(&self, key: &str, generation: u64, hold: Arc<str>) {
        if let Some(slot) = self.lock().slots.get_mut(key) {
            if slot.generation == generation {
                slot.holds.push(hold);
            }
        }
    }

    /// This process's holds on the call that the wait of generation
    /// `generation` on `key` is on, which its hang-up takes back; none
    /// for a call whose slot is gone or newer.
    pub(crate) fn holds(&self, key: &str, generation: Option<u64>) -> Option<Holds> {
        match self.lock().slots.get(key) {
            Some(slot) if generation.is_none_or(|g| g == slot.generation) => Some(slot.held()),
            _ => None,
        }
    }

    /// Notes that the wait of generation `generation` on `key` is on the
    /// stored call `stamp` (its own, or the call it joined), and hands it
    /// the news that came early with that stamp.
    pub(crate) fn confirm(&self, key: &str, generation: u64, stamp: Option<Stamp>) {
        let mut inner = self.lock();
        let Some(slot) = inner.slots.get_mut(key) else {
            return;
        };
        if slot.generation != generation {
            return;
        }
        slot.stamp = stamp;
        slot.confirmed = true;
        for (early, message) in std::mem::take(&mut slot.early) {
            if stamp.is_none_or(|stamp| stamp == early) {
                slot.tell(message);
            }
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
            .is_some_and(|slot| !slot.over())
    }

    /// Hands `message` to every waiter on `key`, if it is their call's:
    /// `stamp` names the call it is for, `None` when the sender does not
    /// know (a release before stamps published it). Stamped news that come before the
    /// slot's stamp is confirmed wait for it ([`Waiters::confirm`]). A
    /// device's first answer stands; a repeat (the message after a local
    /// delivery) changes nothing.
    pub(crate) fn tell(&self, key: &str, stamp: Option<Stamp>, message: Message) {
        let mut inner = self.lock();
        let Some(slot) = inner.slots.get_mut(key) else {
            return;
        };
        match (stamp, slot.stamp) {
            (Some(stamp), _) if !slot.confirmed => {
                if slot.early.len() < EARLY_MAX {
                    slot.early.push((stamp, message));
                }
            }
            (Some(stamp), Some(ours)) if stamp != ours => {}
            _ => slot.tell(message),
        }
    }

    /// Hands what the stored record of the call `stamp` says to the
    /// waiters on `key` (the fallback check, with the stamp the slot had
    /// when it listed the key: a newer call's slot there since gets none
    /// of it).
    pub(crate) fn deliver_stored(&self, key: &str, stamp: Option<Stamp>, record: &Record) {
        for (index, device) in record.devices.iter().enumerate() {
            if let Some(available) = device.answer {
                let answer = Answer {
                    available,
                    received_at: None,
                };
                self.tell(key, stamp, Message::Answer { index, answer });
            }
        }
        if let Phase::Ended(reason) = record.phase {
            self.tell(key, stamp, Message::Ended(reason));
        }
    }

    /// Whether anyone here still waits on `key`.
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.lock().slots.contains_key(key)
    }

    /// The keys waited on whose call may still change, with their calls'
    /// stamps: what the fallback check reads. Not a call still being
    /// opened: until its stamp is confirmed the key may hold the call
    /// before it.
    pub(crate) fn unsettled(&self) -> Vec<(Arc<str>, Option<Stamp>)> {
        let inner = self.lock();
        inner
            .slots
            .iter()
            .filter(|(_, slot)| slot.confirmed && slot.news.borrow().ended.is_none())
            .map(|(key, slot)| (key.clone(), slot.stamp))
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
                stamp: slot.stamp,
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

impl Slot {
    /// What a hang-up of the call takes back.
    fn held(&self) -> Holds {
        Holds {
            account: self.account,
            ids: self.holds.clone(),
        }
    }

    /// Whether the call no longer rings: won, every device answered (the
    /// declines' NAK), ended from outside, or ended by its waiter: as
    /// [`crate::lifecycle::claim`] sees a stored record.
    fn over(&self) -> bool {
        let news = self.news.borrow();
        self.ended
            || news.ended.is_some()
            || news.answers.iter().all(Option::is_some)
            || news.answers.iter().flatten().any(|answer| answer.available)
    }

    /// Hands `message` to the slot's waiters.
    fn tell(&self, message: Message) {
        match message {
            Message::Answer { index, answer } => {
                self.news
                    .send_if_modified(|news| match news.answers.get_mut(index) {
                        Some(seen @ None) => {
                            *seen = Some(answer);
                            true
                        }
                        _ => false,
                    });
            }
            Message::Ended(reason) => {
                self.news.send_if_modified(|news| {
                    let first = news.ended.is_none();
                    news.ended.get_or_insert(reason);
                    first
                });
            }
        }
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

    /// A new slot for `call` under `key`, with one waiter; `first`: no
    /// slot was there (the process must subscribe).
    fn insert(
        &mut self,
        key: &str,
        call: &Opening<'_>,
        leg_of: Option<&str>,
        first: bool,
    ) -> Joined {
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
        let joined = news.subscribe();
        let ringers = Ringers::default();
        let ringer = ringers.join();
        self.slots.insert(
            key,
            Slot {
                news,
                waiters: 1,
                ringers,
                generation,
                stamp: None,
                confirmed: false,
                holds: Vec::new(),
                early: Vec::new(),
                account: call.account,
                devices: call.devices.to_vec(),
                until: call.until,
                leg_of: leg_of.map(str::to_owned),
                aliases: Vec::new(),
                opened: false,
                ended: false,
            },
        );
        Joined::Waiting {
            news: joined,
            first,
            generation,
            joined: None,
            ringer,
        }
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
                ..
            } => (news, first, generation),
            Joined::Taken | Joined::Opening => panic!("taken"),
        }
    }

    fn answer(index: usize, available: bool) -> Message {
        let answer = Answer {
            available,
            received_at: None,
        };
        Message::Answer { index, answer }
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
        waiters.tell("k", None, Message::Ended(EndReason::TimedOut));
        assert!(waiters.pending().is_empty(), "an ended call is not pending");
    }

    #[tokio::test]
    async fn every_waiter_on_a_key_gets_each_devices_first_answer() {
        let waiters = Waiters::default();
        let devices = [Platform::Android, Platform::Apns];
        let (mut a, first_a, gen) = waiting(waiters.join("k", &opening(42, &devices), None));
        let (mut b, first_b, _) = waiting(waiters.join("k", &opening(42, &devices), None));
        assert!(first_a && !first_b);
        assert!(
            matches!(
                waiters.join("k", &opening(43, &devices), None),
                Joined::Opening
            ),
            "another account waits for the open, which may give the key up"
        );
        waiters.opened("k", gen);
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
        waiters.tell(
            "k",
            None,
            Message::Answer {
                index: 1,
                answer: no,
            },
        );
        waiters.tell(
            "k",
            None,
            Message::Answer {
                index: 1,
                answer: yes,
            },
        );
        for news in [&mut a, &mut b] {
            let seen = news
                .wait_for(|n| n.answers[1].is_some())
                .await
                .unwrap()
                .clone();
            assert_eq!(seen.answers, vec![None, Some(no)]);
        }
        assert_eq!(waiters.leave("k", gen), Left::Others);
        assert!(waiters.claim_end("k", Some(gen)));
        assert!(matches!(
            waiters.leave("k", gen),
            Left::Last { cancel: false, push_keys, .. }
                if push_keys == vec![Arc::<str>::from("k.1"), Arc::from("k.2")]
        ));
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
        assert!(waiters.claim_end("k", Some(old)));
        assert!(!waiters.rings("k"), "ended by its waiter, still held");
        waiters.tell("k", None, answer(0, true));
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
        waiters.tell("k", None, Message::Ended(EndReason::Cancelled));
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

    /// A won call is over: the same account's next request under its key
    /// is a new call (a slot of its own), and news stamped for the won
    /// call never reach it, however late they come.
    #[test]
    fn a_won_call_gives_way_and_its_news_never_reach_the_next_call() {
        let waiters = Waiters::default();
        let devices = [Platform::Android];
        let (_, _, old) = waiting(waiters.join("k", &opening(42, &devices), None));
        let won = Some(5);
        waiters.confirm("k", old, won);
        waiters.opened("k", old);
        let retry = waiters.join("k", &opening(42, &devices), None);
        assert!(
            matches!(retry, Joined::Waiting { joined: Some(stamp), generation, .. } if generation == old && stamp == won),
            "a retry while it rings joins the opened call"
        );
        waiters.tell("k", won, answer(0, true));
        assert!(!waiters.rings("k"), "won");
        let Joined::Waiting {
            news,
            generation: new,
            joined,
            ..
        } = waiters.join("k", &opening(42, &devices), None)
        else {
            panic!("taken");
        };
        assert!(joined.is_none() && new != old, "a call of its own");
        // Before its stamp is confirmed, the won call's news wait aside;
        // the store then names the new call, and they are dropped.
        waiters.tell("k", won, answer(0, true));
        waiters.tell("k", won, Message::Ended(EndReason::Cancelled));
        waiters.confirm("k", new, Some(6));
        waiters.tell("k", won, answer(0, false));
        waiters.deliver_stored("k", won, &Record::ringing(&devices, 0));
        let silent = News {
            answers: vec![None],
            ended: None,
        };
        assert_eq!(*news.borrow(), silent);
        assert!(waiters.rings("k"));
        // The old call's end no longer touches the key's slot.
        assert!(waiters.claim_end("k", Some(old)));
        assert!(waiters.rings("k"), "the new call still rings");
        waiters.tell("k", Some(6), answer(0, true));
        assert_eq!(news.borrow().answers[0].map(|a| a.available), Some(true));
    }

    /// A wait that joins another instance's call learns its stamp from the
    /// store: news with that stamp that came first are handed over then;
    /// a call whose stamp the store did not say takes any.
    #[test]
    fn news_that_come_before_the_stamp_is_known_are_kept_for_it() {
        let waiters = Waiters::default();
        let devices = [Platform::Android, Platform::Android];
        let (news, _, generation) = waiting(waiters.join("k", &opening(42, &devices), None));
        waiters.tell("k", Some(77), answer(0, false));
        waiters.tell("k", Some(78), answer(1, false));
        assert_eq!(news.borrow().answers, vec![None, None]);
        waiters.confirm("k", generation, Some(77));
        let answered: Vec<_> = news.borrow().answers.iter().map(Option::is_some).collect();
        assert_eq!(answered, [true, false], "only the joined call's news");

        let (news, _, generation) = waiting(waiters.join("j", &opening(42, &devices), None));
        waiters.confirm("j", generation, None);
        waiters.tell("j", Some(78), answer(1, false));
        assert!(
            news.borrow().answers[1].is_some(),
            "a call of unknown stamp takes any"
        );
    }

    /// A call every device declined is over as well: its NAK is on its way.
    #[test]
    fn a_call_every_device_declined_gives_way() {
        let waiters = Waiters::default();
        let devices = [Platform::Android, Platform::Apns];
        let (_, _, old) = waiting(waiters.join("k", &opening(42, &devices), None));
        waiters.confirm("k", old, Some(1));
        waiters.opened("k", old);
        waiters.tell("k", None, answer(0, false));
        assert!(waiters.rings("k.2"), "one device still rings");
        waiters.tell("k", None, answer(1, false));
        assert!(!waiters.rings("k.2"));
        let (_, _, new) = waiting(waiters.join("k", &opening(42, &devices), None));
        assert_ne!(new, old);
    }
}

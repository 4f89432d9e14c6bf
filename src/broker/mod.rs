//! The [`CallBroker`] boundary: carries an app's answer from the request that
//! receives it (`/api/call-response/`) to the request that waits for it
//! (`/api/incoming-call/`), which may live in another instance, and decides,
//! atomically wherever the answers arrive, which answer counts.
//!
//! A call rings every device of its account. The broker stores one record
//! per call under the call's key (see [`CallState`]): every device's
//! platform and answer, and the call's phase (ringing, won by a device,
//! ended with a reason). The first `available=true` answer wins the call;
//! a decline takes only its device out. When the call ends its record
//! stays a while as a tombstone, so a late answer learns why (410 Gone)
//! rather than a bare 404. A device's push carries the call's key when the
//! account has one device, else its own key, `<call key>.<n>`, which the
//! broker stores as a pointer to the call.
//!
//! Two implementations: [`memory::MemoryBroker`] (one process, zero set-up)
//! and [`redis::RedisBroker`] (many instances behind a load balancer). Both
//! deliver an answer to the waiting request the moment it is stored; neither
//! polls per call. This module must not know about pushes or HTTP.

pub mod memory;
pub mod redis;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::{EndReason, Platform};

/// How long an ended call's record stays, so an answer that comes late is
/// told why (410 Gone) rather than 404. The contract says at least 60 s.
pub const TOMBSTONE: Duration = Duration::from_secs(70);

/// What went wrong in the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker's backing service cannot be reached now.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// A device's answer as it reaches a waiting call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer {
    pub available: bool,
    /// When the answer reached a call-notifier instance, for the wake-up
    /// latency metric; `None` when the fallback check found it.
    pub received_at: Option<SystemTime>,
}

/// What a wait has learned so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct News {
    /// Each device's answer, by its index in the call, once it has one.
    pub answers: Vec<Option<Answer>>,
    /// The call was ended from outside (the cancel endpoint, on any instance).
    pub ended: Option<EndReason>,
}

/// The push key of device `index` (from 0) of a call rung on `devices`
/// devices: the call's key itself for a lone device, so an account with one
/// device sees exactly the key it always saw.
pub fn push_key(call: &str, index: usize, devices: usize) -> String {
    if devices == 1 {
        call.to_owned()
    } else {
        format!("{call}.{}", index + 1)
    }
}

/// The alias of an account's device, by its push token: what a SIP proxy's
/// REGISTER names (RFC 8599 `pn-prid`), where the app's answer names a
/// push key.
pub fn device_alias(sip_user_id: i64, token: &str) -> String {
    format!("{sip_user_id} {token}")
}

/// Unix milliseconds, the clock of the stored deadlines.
fn unix_millis(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The wall-clock time of a monotonic instant, in Unix milliseconds.
pub(crate) fn deadline_millis(until: Instant) -> i64 {
    let now = Instant::now();
    let at = if until >= now {
        SystemTime::now() + (until - now)
    } else {
        SystemTime::now() - (now - until)
    };
    unix_millis(at)
}

/// Where a call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for an answer until the Unix millisecond `until`.
    Ringing { until: i64 },
    /// A device answered `available=true`; the holder is ending the call.
    Won { until: i64 },
    /// Over, for this reason (as a late answer from a device that did not
    /// answer hears it).
    Ended(EndReason),
}

/// One device of a call, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceState {
    pub platform: Platform,
    /// Its answer, once it gave one.
    pub answer: Option<bool>,
}

/// A call's stored record.
///
/// Stored as text, one word each, so a Lua script reads it with a pattern
/// and a fallback check reads many with one `MGET`: the phase (`ring`,
/// `won`, `ended`), the deadline in Unix ms (or the end reason), then each
/// device's platform with `+` once it answered available and `-` once it
/// declined: `ring 1733250000000 android apns+`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallState {
    pub phase: Phase,
    pub devices: Vec<DeviceState>,
}

/// What a broker key holds: a call's record, or a pointer from a device's
/// push key to its call (`to <n> <call key>`, `n` from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Call(CallState),
    Pointer { call: String, device: usize },
}

impl Stored {
    pub fn decode(text: &str) -> Option<Stored> {
        if let Some(rest) = text.strip_prefix("to ") {
            let (n, call) = rest.split_once(' ')?;
            let n: usize = n.parse().ok()?;
            return (n >= 1).then(|| Stored::Pointer {
                call: call.to_owned(),
                device: n - 1,
            });
        }
        CallState::decode(text).map(Stored::Call)
    }

    pub(crate) fn pointer(call: &str, device: usize) -> String {
        format!("to {} {call}", device + 1)
    }
}

impl CallState {
    /// A call that starts ringing `devices` until `until` (Unix ms).
    pub fn ringing(devices: &[Platform], until: i64) -> CallState {
        CallState {
            phase: Phase::Ringing { until },
            devices: devices
                .iter()
                .map(|&platform| DeviceState {
                    platform,
                    answer: None,
                })
                .collect(),
        }
    }

    /// The text stored, see [`CallState`].
    pub fn encode(&self) -> String {
        let mut text = match self.phase {
            Phase::Ringing { until } => format!("ring {until}"),
            Phase::Won { until } => format!("won {until}"),
            Phase::Ended(reason) => format!("ended {reason}"),
        };
        for device in &self.devices {
            text.push(' ');
            text.push_str(device.platform.as_str());
            match device.answer {
                Some(true) => text.push('+'),
                Some(false) => text.push('-'),
                None => {}
            }
        }
        text
    }

    /// The record stored as `text`; `None` for text no broker writes.
    pub fn decode(text: &str) -> Option<CallState> {
        let mut words = text.split(' ');
        let phase = words.next()?;
        let second = words.next()?;
        let phase = match phase {
            "ring" => Phase::Ringing {
                until: second.parse().ok()?,
            },
            "won" => Phase::Won {
                until: second.parse().ok()?,
            },
            "ended" => Phase::Ended(EndReason::parse(second)?),
            _ => return None,
        };
        let devices = words
            .map(|word| {
                let (name, answer) = match word.as_bytes().last() {
                    Some(b'+') => (&word[..word.len() - 1], Some(true)),
                    Some(b'-') => (&word[..word.len() - 1], Some(false)),
                    _ => (word, None),
                };
                Some(DeviceState {
                    platform: Platform::parse(name)?,
                    answer,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        (!devices.is_empty()).then_some(CallState { phase, devices })
    }

    /// Takes device `index`'s answer if it counts: the call still rings
    /// (before `now`, Unix ms, reaches its deadline) and the device has not
    /// answered. An available answer wins the call. Says whether it counted.
    /// The Redis broker's answer script does exactly this in Lua
    /// ([`redis`]'s `ANSWER_SCRIPT`).
    pub fn take_answer(&mut self, index: usize, available: bool, now: i64) -> bool {
        let Phase::Ringing { until } = self.phase else {
            return false;
        };
        match self.devices.get_mut(index) {
            Some(device) if device.answer.is_none() && now < until => {
                device.answer = Some(available);
                if available {
                    self.phase = Phase::Won { until };
                }
                true
            }
            _ => false,
        }
    }

    /// Ends the call for `reason` unless it has ended already; a call a
    /// device won ends `answered_elsewhere` whatever the reason given. The
    /// Redis broker's end script does exactly this in Lua.
    pub fn end(&mut self, reason: EndReason) {
        self.phase = match self.phase {
            Phase::Ended(_) => return,
            Phase::Won { .. } => Phase::Ended(EndReason::AnsweredElsewhere),
            Phase::Ringing { .. } => Phase::Ended(reason),
        };
    }

    /// What an answer of device `index` became, given the record before it
    /// and whether it counted.
    pub fn verdict(&self, index: usize, counted: bool) -> Verdict {
        let Some(device) = self.devices.get(index) else {
            return Verdict::Unknown;
        };
        if counted {
            return Verdict::Taken {
                platform: device.platform,
            };
        }
        if device.answer.is_some() {
            return Verdict::Repeat;
        }
        Verdict::Gone(match self.phase {
            Phase::Ended(reason) => reason,
            Phase::Won { .. } => EndReason::AnsweredElsewhere,
            // Still ringing, yet not counted: it came after the deadline.
            Phase::Ringing { .. } => EndReason::TimedOut,
        })
    }

    /// The answers it holds, as a wait's news.
    fn news(&self) -> News {
        News {
            answers: self
                .devices
                .iter()
                .map(|d| {
                    d.answer.map(|available| Answer {
                        available,
                        received_at: None,
                    })
                })
                .collect(),
            ended: match self.phase {
                Phase::Ended(reason) => Some(reason),
                _ => None,
            },
        }
    }
}

/// What became of an app's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The key was never issued, or its call's record is gone.
    Unknown,
    /// The first answer of its device, taken: `platform` is the device's.
    Taken { platform: Platform },
    /// The device had answered already; its first answer stands.
    Repeat,
    /// The call is over for this device (late, answered elsewhere, ended).
    Gone(EndReason),
}

/// The broker boundary. Implementations are cheap to share (`Arc<dyn CallBroker>`).
#[async_trait]
pub trait CallBroker: Send + Sync + 'static {
    /// Opens a wait for the call `key`, ringing `devices`, until `until` (the
    /// call's deadline): subscribes to the call's news and then stores its
    /// record (and a pointer per device key when there are several), in
    /// that order, so no answer can slip between. A record still ringing
    /// under the key (a PBX forking one call to several legs with one
    /// `call_id`) is joined, not replaced; a tombstone is replaced.
    async fn open(
        &self,
        key: &str,
        devices: &[Platform],
        until: Instant,
    ) -> Result<Wait, BrokerError>;

    /// Takes an app's answer to the push key `key`, and wakes whoever waits
    /// on its call, here at once and elsewhere through the broker.
    async fn answer(&self, key: &str, available: bool) -> Result<Verdict, BrokerError>;

    /// Ends the call `key` for `reason` (its tombstone from now on) and
    /// returns its record before, `None` when it had none. Ends nothing
    /// while another request here still waits on the same key. A call a
    /// device won ends `answered_elsewhere`: the record before tells the
    /// holder that it was won, even when its own timer fired first.
    async fn end(&self, key: &str, reason: EndReason) -> Result<Option<CallState>, BrokerError>;

    /// Ends a ringing call as `cancelled` from any instance (`key` is its
    /// call key or a device's push key), waking its waits. Says whether it
    /// ended one: `false` when none rings under the key.
    async fn cancel(&self, key: &str) -> Result<bool, BrokerError>;

    /// Notes that the device `alias` ([`device_alias`]) rings under the push
    /// key `key` until `until` (and a tombstone's life after): how a SIP
    /// REGISTER from that device finds the call it answers.
    async fn alias(&self, alias: &str, key: &str, until: Instant) -> Result<(), BrokerError>;

    /// The push key the device `alias` last rang under, while it lives.
    async fn resolve(&self, alias: &str) -> Result<Option<String>, BrokerError>;

    /// Answers when the broker's backing service does.
    async fn ping(&self) -> Result<(), BrokerError>;

    /// How many keys this process waits on: the parked calls.
    fn waiting(&self) -> usize;
}

/// One open wait. Dropping it, on any path (answer, timeout, the PBX hanging
/// up and hyper dropping the handler's future, an error), removes this
/// process's bookkeeping and the subscription; a call nobody ended (the
/// PBX hung up) is ended `cancelled` in the background.
pub struct Wait {
    news: watch::Receiver<News>,
    _release: Release,
}

impl Wait {
    /// A wait that learns from `news` and runs `release` when dropped: what
    /// a broker outside this crate (the benchmarks' polling one) builds its
    /// waits from.
    pub fn new(
        news: watch::Receiver<News>,
        release: impl FnOnce() + Send + Sync + 'static,
    ) -> Wait {
        Wait {
            news,
            _release: Release::new(release),
        }
    }

    /// What the wait knows now.
    pub fn news(&self) -> News {
        self.news.borrow().clone()
    }

    /// Resolves with the news once they change. Never resolves when none
    /// come: race it against the deadline.
    pub async fn changed(&mut self) -> News {
        if self.news.changed().await.is_err() {
            // The broker went away; only the deadline can end the wait now.
            std::future::pending::<()>().await;
        }
        self.news.borrow_and_update().clone()
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

/// This process's waits, by call key: the same shape as mini-redis's pub/sub
/// map. Several requests may wait on one key (a PBX forking one call to
/// several legs with the same `call_id`); all get the news.
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
}

struct Slot {
    news: watch::Sender<News>,
    waiters: usize,
    /// The devices as the first waiter gave them, and until when the key is
    /// waited on (the latest waiter's deadline): what a broker needs to
    /// store the call's record again (see [`Waiters::pending`]).
    devices: Vec<Platform>,
    until: Instant,
    /// Whether a waiter ended the call itself (else leaving cancels it).
    ended: bool,
}

/// What leaving a key means for the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Left {
    /// Others still wait on the key here.
    Others,
    /// The last waiter left: unsubscribe; `cancel` when nobody ended the
    /// call (the PBX hung up). `push_keys`: the device keys it registered.
    Last {
        cancel: bool,
        push_keys: Vec<Arc<str>>,
    },
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("waiters lock poisoned")
    }

    /// Registers one more waiter on `key`. Says whether it is the first, i.e.
    /// whether the process must subscribe.
    pub(crate) fn join(
        &self,
        key: &str,
        devices: &[Platform],
        until: Instant,
    ) -> (watch::Receiver<News>, bool) {
        let mut inner = self.lock();
        if let Some(slot) = inner.slots.get_mut(key) {
            slot.waiters += 1;
            slot.until = slot.until.max(until);
            return (slot.news.subscribe(), false);
        }
        let key: Arc<str> = Arc::from(key);
        if devices.len() > 1 {
            for index in 0..devices.len() {
                let push = Arc::from(push_key(&key, index, devices.len()));
                inner.devices.insert(push, (key.clone(), index));
            }
        }
        let (news, receiver) = watch::channel(News {
            answers: vec![None; devices.len()],
            ended: None,
        });
        inner.slots.insert(
            key,
            Slot {
                news,
                waiters: 1,
                devices: devices.to_vec(),
                until,
                ended: false,
            },
        );
        (receiver, true)
    }

    /// Removes one waiter from `key`.
    pub(crate) fn leave(&self, key: &str) -> Left {
        let mut inner = self.lock();
        let Some(slot) = inner.slots.get_mut(key) else {
            return Left::Others;
        };
        slot.waiters -= 1;
        if slot.waiters > 0 {
            return Left::Others;
        }
        let cancel = !slot.ended;
        let count = slot.devices.len();
        inner.slots.remove(key);
        let mut push_keys = Vec::new();
        if count > 1 {
            for index in 0..count {
                if let Some((push, _)) = inner
                    .devices
                    .remove_entry(push_key(key, index, count).as_str())
                {
                    push_keys.push(push);
                }
            }
        }
        Left::Last { cancel, push_keys }
    }

    /// Notes that a waiter ends the call itself. Says whether it may: only
    /// the last waiter on a key ends its call.
    pub(crate) fn ending(&self, key: &str) -> bool {
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

    /// The call and device index a push key answers for, when its call is
    /// waited on here.
    pub(crate) fn device_of(&self, push_key: &str) -> Option<(Arc<str>, usize)> {
        let inner = self.lock();
        if let Some(found) = inner.devices.get(push_key) {
            return Some(found.clone());
        }
        inner
            .slots
            .get_key_value(push_key)
            .filter(|(_, slot)| slot.devices.len() == 1)
            .map(|(key, _)| (key.clone(), 0))
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
    pub(crate) fn deliver_stored(&self, key: &str, state: &CallState) {
        let news = state.news();
        for (index, answer) in news.answers.into_iter().enumerate() {
            if let Some(answer) = answer {
                self.deliver(key, index, answer);
            }
        }
        if let Some(reason) = news.ended {
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

    /// The calls waited on, not ended, with their devices and deadlines:
    /// the records a broker whose backing store lost them puts back.
    pub(crate) fn pending(&self) -> Vec<(Arc<str>, Vec<Platform>, Instant)> {
        let inner = self.lock();
        inner
            .slots
            .iter()
            .filter(|(_, slot)| slot.news.borrow().ended.is_none())
            .map(|(key, slot)| (key.clone(), slot.devices.clone(), slot.until))
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_as_text() {
        let mut state = CallState::ringing(&[Platform::Android, Platform::Apns], 1_733_250_000_000);
        assert_eq!(state.encode(), "ring 1733250000000 android apns");
        assert!(state.take_answer(1, false, 0));
        assert!(state.take_answer(0, true, 0));
        assert_eq!(state.encode(), "won 1733250000000 android+ apns-");
        state.end(EndReason::TimedOut);
        assert_eq!(state.encode(), "ended answered_elsewhere android+ apns-");
        for text in [
            "ring 1 gcm",
            "won 5 android+ apns",
            "ended cancelled apns- android",
        ] {
            assert_eq!(
                CallState::decode(text).map(|s| s.encode()).as_deref(),
                Some(text)
            );
        }
        for bad in [
            "",
            "ring",
            "ring 1",
            "ring x gcm",
            "ended late gcm",
            "ring 1 windows",
        ] {
            assert_eq!(CallState::decode(bad), None, "{bad}");
        }
        assert_eq!(
            Stored::decode("to 2 a key.with spaces"),
            Some(Stored::Pointer {
                call: "a key.with spaces".into(),
                device: 1
            })
        );
        assert_eq!(Stored::decode("to 0 k"), None);
    }

    #[test]
    fn the_first_available_answer_wins_and_late_ones_are_told_why() {
        let mut state = CallState::ringing(&[Platform::Android; 3], 100);
        let before = state.clone();
        assert!(state.take_answer(0, false, 10));
        assert_eq!(
            before.verdict(0, true),
            Verdict::Taken {
                platform: Platform::Android
            }
        );
        let before = state.clone();
        assert!(
            !state.take_answer(0, true, 10),
            "a device's first answer stands"
        );
        assert_eq!(before.verdict(0, false), Verdict::Repeat);
        assert!(state.take_answer(1, true, 10));
        let before = state.clone();
        assert!(!state.take_answer(2, true, 10));
        assert_eq!(
            before.verdict(2, false),
            Verdict::Gone(EndReason::AnsweredElsewhere)
        );
        assert_eq!(before.verdict(3, false), Verdict::Unknown);
        let mut late = CallState::ringing(&[Platform::Gcm], 100);
        assert!(!late.take_answer(0, true, 100));
        assert_eq!(late.verdict(0, false), Verdict::Gone(EndReason::TimedOut));
        late.end(EndReason::Cancelled);
        late.end(EndReason::TimedOut);
        assert_eq!(late.verdict(0, false), Verdict::Gone(EndReason::Cancelled));
    }

    #[tokio::test]
    async fn every_waiter_on_a_key_gets_each_devices_first_answer() {
        let waiters = Waiters::default();
        let until = Instant::now();
        let devices = [Platform::Android, Platform::Apns];
        let (mut a, first_a) = waiters.join("k", &devices, until);
        let (mut b, first_b) = waiters.join("k", &devices, until);
        assert!(first_a && !first_b);
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
        assert_eq!(waiters.leave("k"), Left::Others);
        assert!(waiters.ending("k"));
        assert_eq!(
            waiters.leave("k"),
            Left::Last {
                cancel: false,
                push_keys: vec![Arc::from("k.1"), Arc::from("k.2")]
            }
        );
        assert_eq!((waiters.len(), waiters.device_of("k.1")), (0, None));
    }
}

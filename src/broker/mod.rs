//! The [`CallBroker`] boundary: carries an app's answer from the request that
//! receives it (`/api/call-response/`) to the request that waits for it
//! (`/api/incoming-call/`), which may live in another instance, and decides,
//! atomically wherever the answers arrive, which answer counts.
//!
//! A call rings every device of its account. The broker stores one record
//! per call under the call's key (a [`Record`]: every device's platform and
//! answer, and the call's phase), with the account that owns the key beside
//! it. The record's transitions are [`crate::lifecycle`]'s: this module
//! stores them and carries their news, and decides nothing of its own. A
//! device's push carries the call's key when the account has one device,
//! else its own key, `<call key>.<n>`, which the broker stores as a pointer
//! to the call. When the call ends its record stays a while as a tombstone,
//! so a late answer learns why (410 Gone) rather than a bare 404.
//!
//! The call's key is the PBX's `call_id` when the key is free for the
//! account (see [`crate::lifecycle::claim`]); a ring group's other legs,
//! which share the Call-ID, get [`leg_key`]s of their own, listed under
//! the Call-ID so a cancel by it finds them all.
//!
//! A key holds one call after another: a PBX may post the same account and
//! `call_id` again the moment it hears the last call's outcome, while that
//! call's holder is still storing its end and its news are still on their
//! way. Each call under a key is told apart by its [`Stamp`], the deadline
//! its record is stored with, kept rising under the key: its end names it,
//! and so does every piece of its news, so the old call's end, hang-up,
//! answer and cancel never reach the new one.
//!
//! Two implementations: [`memory::MemoryBroker`] (one process, zero set-up)
//! and [`redis::RedisBroker`] (many instances behind a load balancer). Both
//! deliver an answer to the waiting request the moment it is stored; neither
//! polls per call. This module must not know about pushes or HTTP.

pub mod memory;
pub mod redis;
mod waiters;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

pub use crate::lifecycle::{Phase, Record, Stored, Verdict};
use crate::store::{EndReason, Platform};
pub(crate) use waiters::{Holds, Joined, Left, Message, Pending, Waiters};

/// How long an ended call's record stays, so an answer that comes late is
/// told why (410 Gone) rather than 404. The contract says at least 60 s.
pub const TOMBSTONE: Duration = Duration::from_secs(70);

/// The longest push key: a `call_id` (255), a leg's `~<account>` (20) and
/// a device's `.<n>`.
pub const PUSH_KEY_MAX: usize = 300;

/// Which call under a key (see the module's doc): the deadline its record
/// is stored with, in Unix ms, kept rising under the key ([`next_stamp`]),
/// so no two calls under one key share it. Named by the call's end and
/// carried by its news. A record holds its deadline anyway (a release
/// before stamps wrote it too), so the answer script, between the app's
/// answer and the PBX's ACK, reads the stamp for nothing.
pub type Stamp = i64;

/// The stamp of a call with the deadline `deadline` (Unix ms) under a key
/// whose last call was stamped `last`: its deadline, or one ms past the
/// last call's when that is not earlier (two calls opened within the same
/// millisecond, or a shorter wait).
pub(crate) fn next_stamp(deadline: i64, last: Option<Stamp>) -> Stamp {
    last.map_or(deadline, |last| deadline.max(last.saturating_add(1)))
}

/// What an app's answer says of the push it answers: its
/// `message_start_time`, which every call push carries and the app echoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Older than the wait: the answer never counts.
    Stale,
    /// Sent at `at`, Unix ms; `wait`: the answering instance's wait, ms.
    /// The answer counts only for a call begun by then ([`pushed_before`]):
    /// one to a push of the call before it under the same key (a PBX that
    /// posts a `call_id` again) is that call's, never this one's.
    At { at: i64, wait: i64 },
    /// Not said: a REGISTER's answer names no push.
    Unsaid,
}

/// How much earlier than its call's beginning an answer's push may say it
/// was sent and still count for that call. The call's request sets the
/// push's `message_start_time` after it opened the call, on the same
/// clock, and the app echoes it unchanged (README, API), so an answer to
/// it never says earlier; the margin is the millisecond the time is read
/// in, and its floating point. The call before under the same key ended
/// before this one began, a PBX round trip at least.
pub const ECHO_MARGIN_MS: i64 = 1;

/// Whether an answer that says its push was sent `pushed` answers a call
/// begun before the call whose record has the deadline `deadline` and was
/// opened at `opened` (Unix ms): sent before the call was opened, and
/// before its deadline less the wait (the request's arrival, on the
/// opening instance, for instances that share one wait). The Redis answer
/// script reads the opening time (a key of its own) only where the
/// deadline says the answer may be earlier: never, for an answer to a
/// push of the call.
pub(crate) fn pushed_before(pushed: Pushed, deadline: i64, opened: i64) -> bool {
    match pushed {
        Pushed::At { at, wait } => {
            let at = at.saturating_add(ECHO_MARGIN_MS);
            at.saturating_add(wait) < deadline && at < opened
        }
        Pushed::Stale | Pushed::Unsaid => false,
    }
}

/// What a PBX's cancel names a call by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Named {
    /// The `call_id` it posted the call with: the call under that key, and
    /// every leg opened for it. Never a call whose device key reads the
    /// same (`<call_id>.1`): that one has another Call-ID. (A leg's key,
    /// `<call_id>~<account>`, posted as a Call-ID of its own, is still
    /// read as that leg's: nothing stored tells the two apart.)
    CallId,
    /// A `unique_key` of a push: the call's own, or a device's.
    UniqueKey,
}

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

/// The call a wait opens: the key asked for (the PBX's `call_id`, or a
/// random one), the account, its devices, and the call's deadline.
#[derive(Debug, Clone, Copy)]
pub struct Opening<'a> {
    pub key: &'a str,
    pub account: i64,
    pub devices: &'a [Platform],
    pub until: Instant,
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

/// The key of `account`'s leg of the call `call_id` when another account's
/// call holds the `call_id` itself (a ring group): the same for every
/// request of that account, so a PBX retry finds its leg.
pub fn leg_key(call_id: &str, account: i64) -> String {
    format!("{call_id}~{account}")
}

/// How long a cancel by `call_id` reaches the legs opened after it: a leg
/// whose request crossed the cancel (sent before it, opened a millisecond
/// after its read of the legs) ends `cancelled` at once, where it would
/// otherwise ring to its wait. 32 s is SIP's INVITE transaction timeout
/// (64·T1, RFC 3261 Timer B): no fork of a cancelled INVITE starts later.
/// The call under the `call_id` itself is held to it too (its request
/// crossed the cancel, which found nothing to end). Neither is where its
/// key held a call that a cancel ended: a PBX may post the same `call_id`
/// again, to every account of a ring group, for a new call after the one
/// it cancelled, whose tombstones the keys then hold. A request that joins
/// a ringing call (a PBX retry) is not held to it either: the cancel found
/// that call.
pub const CANCEL_REACH: Duration = Duration::from_secs(32);

/// What a cancel by `call_id` leaves under it, for [`CANCEL_REACH`]: the
/// account it was limited to, or `*` for every account.
pub fn cancel_mark(account: Option<i64>) -> String {
    account.map_or_else(|| "*".to_owned(), |account| account.to_string())
}

/// Whether the cancels' `marks` left under a `call_id` reach `account`'s
/// leg of it.
pub fn cancelled_by<S: AsRef<str>>(marks: &[S], account: i64) -> bool {
    let account = account.to_string();
    marks
        .iter()
        .any(|mark| mark.as_ref() == "*" || mark.as_ref() == account)
}

/// The keys a call asking for `key` tries, in order: the key itself, its
/// account's [`leg_key`], and a random key, which no other call holds.
/// Each made only when the one before it was taken: nearly every call
/// takes the first.
fn candidates(key: &str, account: i64) -> impl Iterator<Item = String> + '_ {
    (0..3).map(move |n| match n {
        0 => key.to_owned(),
        1 => leg_key(key, account),
        _ => random_key(),
    })
}

/// A fresh key: 128 bits from the OS generator, as 32 hex characters.
/// call-response is unauthenticated, so the key is the only secret.
pub fn random_key() -> String {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The alias of an account's device, by its push token: what a SIP proxy's
/// REGISTER names (RFC 8599 `pn-prid`), where the app's answer names a
/// push key.
pub fn device_alias(sip_user_id: i64, token: &str) -> String {
    format!("{sip_user_id} {token}")
}

/// Unix milliseconds, the clock of the stored deadlines.
pub(crate) fn unix_millis(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Unix microseconds, the clock of the notice claims: a push accepted a
/// fraction of a millisecond before a claim is told apart from one
/// accepted after it.
pub(crate) fn unix_micros(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// A claim, made now, of something a phone is sent once in the call under
/// `call` stamped `stamp`, however many of the call's requests ring it (a
/// PBX retry joins the call, here or on another instance), by a request
/// that pushes it under `push_key` ([`CallBroker::claim`]): `what` names
/// it, the phone's push token for its `call_ended` notice
/// ([`PhoneClaim::notice`]), `<token> <attempt>` for a numbered call push
/// ([`PhoneClaim::push`]). A token holds no whitespace.
#[derive(Debug, Clone)]
pub struct PhoneClaim<'a> {
    pub call: &'a str,
    pub stamp: Stamp,
    pub what: std::borrow::Cow<'a, str>,
    pub push_key: &'a str,
    /// When it is made, in Unix µs ([`unix_micros`]).
    pub at: i64,
    /// How long it is kept: until the call's tombstone would be gone
    /// however late the call ended (its deadline, which is its stamp, plus
    /// [`TOMBSTONE`]), so a request that learns of the end late (at its
    /// own deadline, its message lost) still finds it.
    pub kept: Duration,
}

impl<'a> PhoneClaim<'a> {
    /// The claim of the `call_ended` notice to the phone whose push token
    /// is `token`; `None` once the call's tombstone would be gone: there is
    /// nothing left to claim.
    pub fn notice(
        call: &'a str,
        stamp: Stamp,
        token: &'a str,
        push_key: &'a str,
    ) -> Option<PhoneClaim<'a>> {
        Self::new(call, stamp, token.into(), push_key)
    }

    /// The claim of call push number `attempt` to the phone whose push
    /// token is `token`, as [`PhoneClaim::notice`].
    pub fn push(
        call: &'a str,
        stamp: Stamp,
        token: &str,
        attempt: u32,
        push_key: &'a str,
    ) -> Option<PhoneClaim<'a>> {
        Self::new(call, stamp, format!("{token} {attempt}").into(), push_key)
    }

    fn new(
        call: &'a str,
        stamp: Stamp,
        what: std::borrow::Cow<'a, str>,
        push_key: &'a str,
    ) -> Option<PhoneClaim<'a>> {
        let now = SystemTime::now();
        let tombstone = i64::try_from(TOMBSTONE.as_millis()).unwrap_or(i64::MAX);
        let kept = stamp
            .saturating_add(tombstone)
            .saturating_sub(unix_millis(now));
        let kept = u64::try_from(kept).ok()?;
        let at = unix_micros(now);
        (kept > 0).then(|| PhoneClaim {
            call,
            stamp,
            what,
            push_key,
            at,
            kept: Duration::from_millis(kept),
        })
    }
}

/// The first claim of a phone's notice in a call, as a later claim finds
/// it: when it was made (Unix µs) and the push key its request rang the
/// phone under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstClaim {
    pub at: i64,
    pub push_key: String,
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

/// What [`CallBroker::hang_up`] resolves to: whether the call is over.
pub type HangUp =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, BrokerError>> + Send>>;

/// The broker boundary. Implementations are cheap to share (`Arc<dyn CallBroker>`).
#[async_trait]
pub trait CallBroker: Send + Sync + 'static {
    /// Opens a wait for a call: subscribes to the call's news and then
    /// stores its record (and a pointer per device key when there are
    /// several), in that order, so no answer can slip between. Under the
    /// key asked for, or the first of its [`candidates`] that the account
    /// may claim ([`crate::lifecycle::claim`]): this account's call still
    /// ringing there is joined (a PBX retry), another account's is never
    /// touched. [`Wait::key`] says which key it got. A leg that a cancel's
    /// [`cancel_mark`] reaches opens ended `cancelled`: its news say so.
    async fn open(&self, call: Opening<'_>) -> Result<Wait, BrokerError>;

    /// Takes an app's answer to the push key `key` ([`Record::take`]; a
    /// stale answer, or one to a push sent before the call opened, never
    /// counts: see [`Pushed`]), and wakes whoever waits on its call, here
    /// at once and elsewhere through the broker.
    async fn answer(
        &self,
        key: &str,
        available: bool,
        pushed: Pushed,
    ) -> Result<Verdict, BrokerError>;

    /// Ends the call `wait` waits on, for `reason` (its tombstone from now
    /// on), and returns its record before, `None` when it had none. Ends
    /// nothing while another request here still waits on the same call,
    /// nor once the key holds a newer call (another [`Stamp`]). A call a
    /// device won ends `answered_elsewhere`: the record before tells the
    /// holder that it was won, even when its own timer fired first.
    async fn end(&self, wait: &Wait, reason: EndReason) -> Result<Option<Record>, BrokerError>;

    /// The PBX hung up on `wait`'s request, the last of this process's to
    /// ring the call ([`Wait::stop_ringing`]), while the call rang: ends
    /// the call `cancelled`, unless a PBX retry parked on another instance
    /// still rings it. Resolves to whether the call is over, and so whether
    /// its phones are to be told. Called where the request's future is
    /// dropped, so it takes its part of the wait at once and returns a
    /// future of its own: the wait's release that follows ends nothing
    /// again. By default, the call is over, and the release ends it.
    fn hang_up(&self, _wait: &Wait) -> HangUp {
        Box::pin(std::future::ready(Ok(true)))
    }

    /// Ends as `cancelled`, from any instance, every ringing call that
    /// `key` names: the call under the key (or, `by` a `unique_key`, whose
    /// device key it is), and every leg opened for it as a `call_id`
    /// ([`leg_key`]); only `account`'s when given. Wakes their waits. Says
    /// whether it ended any. Leaves its [`cancel_mark`] under the
    /// `call_id`, in one step with its read of the legs, so a leg opened
    /// after that read ends `cancelled` as it opens.
    async fn cancel(&self, key: &str, account: Option<i64>, by: Named)
        -> Result<bool, BrokerError>;

    /// Makes `claim`: `None` when it is the first of its kind for its
    /// phone in its call, else that first one. A call that PBX retries
    /// joined is rung by several requests, here and on other instances,
    /// each ringing the same phones (under keys of its own device list)
    /// and each learning of the call's end: the first to claim a call
    /// push sends it, the first to claim a phone's notice tells it, the
    /// others need not (see `calls::schedule`). By default every claim is
    /// the first.
    async fn claim(&self, _claim: &PhoneClaim<'_>) -> Result<Option<FirstClaim>, BrokerError> {
        Ok(None)
    }

    /// What the key holds, and the account that owns it (`None` for a
    /// pointer, or a record stored without one): a key's state, read
    /// without changing it.
    async fn read(&self, key: &str) -> Result<Option<(Stored, Option<i64>)>, BrokerError>;

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

    /// Whether other instances share this broker's calls (Redis): an
    /// answer that reaches one of them reaches a call parked here. A
    /// draining server whose calls no other instance shares (in process)
    /// takes their answers itself until they are done
    /// ([`crate::http::serve`]).
    fn shared(&self) -> bool {
        true
    }

    /// Whether [`CallBroker::answer`] has already woken the call's wait
    /// when the call is held here (in process), rather than through a
    /// message that another task reads (Redis's publish, which comes in
    /// with the script's reply). See [`crate::calls::answer`].
    fn wakes_in_place(&self) -> bool {
        false
    }

    /// Whether the call `push_key` rings for is waited on in this process,
    /// so that an answer to it that counts wakes its wait from inside
    /// [`CallBroker::answer`], on the answering task's worker. A guess
    /// taken before the answer: the call may end meanwhile. See
    /// [`crate::calls::answer`].
    fn holds(&self, _push_key: &str) -> bool {
        self.wakes_in_place()
    }
}

/// One open wait. Dropping it, on any path (answer, timeout, the PBX hanging
/// up and hyper dropping the handler's future, an error), removes this
/// process's bookkeeping and the subscription; a call nobody ended (the
/// PBX hung up) is ended `cancelled` in the background.
pub struct Wait {
    key: Arc<str>,
    news: watch::Receiver<News>,
    /// Which wait of this process and which call under the key, for a
    /// wait this crate's brokers opened.
    held: Option<Held>,
    /// Its place among this process's requests that ring the call, until
    /// it stops ringing (see [`Wait::stop_ringing`]).
    ringer: Ringer,
    /// Whether this request was the last of them to stop.
    last_ringer: bool,
    _release: Release,
}

/// How many of this process's requests ring one call: the first, and each
/// PBX retry that joined it. Kept by the call's slot in the waiters; a
/// request that stops ringing (its PBX hung up, its wait ran out) while
/// another still rings leaves the phones to that one.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ringers(Arc<AtomicUsize>);

impl Ringers {
    /// One more request rings the call: its place among the ringers.
    pub(crate) fn join(&self) -> Ringer {
        self.0.fetch_add(1, Ordering::AcqRel);
        Ringer(Some(self.0.clone()))
    }
}

/// One request's place among its call's [`Ringers`], given up once: by
/// [`Wait::stop_ringing`], or when dropped (a wait whose open failed, or
/// that never rang).
#[derive(Debug)]
pub(crate) struct Ringer(Option<Arc<AtomicUsize>>);

impl Ringer {
    /// Gives the place up, the first time: whether it was the last.
    fn leave(&mut self) -> Option<bool> {
        self.0
            .take()
            .map(|ringing| ringing.fetch_sub(1, Ordering::AcqRel) == 1)
    }
}

impl Drop for Ringer {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A wait's place in this process's [`Waiters`] (its slot's generation)
/// and its call's [`Stamp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    pub generation: u64,
    /// `None` when the store did not say (see [`Waiters::confirm`]).
    pub stamp: Option<Stamp>,
    /// Whether the wait joined a call another request rang first (see
    /// [`Wait::joined`]).
    pub joined: bool,
    /// When the call opened (Unix ms), where another instance opened it
    /// and said (see [`Wait::opened`]).
    pub opened: Option<i64>,
}

impl Wait {
    /// A wait on the call `key` that learns from `news` and runs `release`
    /// when dropped: what a broker outside this crate (the benchmarks'
    /// polling one) builds its waits from.
    pub fn new(
        key: &str,
        news: watch::Receiver<News>,
        release: impl FnOnce() + Send + Sync + 'static,
    ) -> Wait {
        Wait {
            key: Arc::from(key),
            news,
            held: None,
            ringer: Ringer(None),
            last_ringer: true,
            _release: Release::new(release),
        }
    }

    /// A wait of this crate's brokers: on the call `held` names, where it
    /// has `ringer`'s place among the requests that ring it.
    pub(crate) fn held(
        key: &str,
        news: watch::Receiver<News>,
        held: Held,
        ringer: Ringer,
        release: Release,
    ) -> Wait {
        Wait {
            key: Arc::from(key),
            news,
            held: Some(held),
            ringer,
            last_ringer: true,
            _release: release,
        }
    }

    /// Notes that this wait's request stops ringing its call while the
    /// call may ring on (its PBX hung up, or its wait ran out), and says
    /// whether it was the last of this process's requests on the call to
    /// stop: only that one tells the phones the call is over, for a PBX
    /// retry that joined the call still rings them. Asked again, it
    /// answers the same; a wait dropped without asking stops then.
    pub fn stop_ringing(&mut self) -> bool {
        if let Some(last) = self.ringer.leave() {
            self.last_ringer = last;
        }
        self.last_ringer
    }

    /// Whether this wait's request has stopped ringing, the last of this
    /// process's requests on the call to do so.
    pub(crate) fn stopped_last(&self) -> bool {
        self.ringer.0.is_none() && self.last_ringer
    }

    /// Whether this wait joined a call that another request, here or on
    /// another instance, opened and rings (a PBX retry): that request
    /// pushed the phones already, and pushes them on while it waits.
    pub fn joined(&self) -> bool {
        self.held.is_some_and(|held| held.joined)
    }

    /// When the call opened (Unix ms) on another instance's clock, for a
    /// PBX retry that joined it there: the retry's pushes say they were
    /// sent no earlier, so an instance whose clock runs behind the
    /// opener's never has its phones' answers taken for the call before's
    /// ([`pushed_before`]).
    pub fn opened(&self) -> Option<i64> {
        self.held.and_then(|held| held.opened)
    }

    /// The call's [`Stamp`], for a wait this crate's brokers opened.
    pub fn stamp(&self) -> Option<Stamp> {
        self.held.and_then(|held| held.stamp)
    }

    /// When the call stops taking answers, for a wait this crate's brokers
    /// opened: its stamp, which is its record's deadline. A PBX retry that
    /// joined the call waits no longer than that.
    pub fn call_deadline(&self) -> Option<Instant> {
        let stamp = self.stamp()?;
        let (now, now_millis) = (Instant::now(), unix_millis(SystemTime::now()));
        let ahead = Duration::from_millis(stamp.saturating_sub(now_millis).unsigned_abs());
        Some(if stamp >= now_millis {
            now + ahead
        } else {
            now.checked_sub(ahead).unwrap_or(now)
        })
    }

    /// The generation of its slot in this process's waiters, for a wait
    /// this crate's brokers opened.
    pub(crate) fn generation(&self) -> Option<u64> {
        self.held.map(|held| held.generation)
    }

    /// The call's key: the one asked for, or the leg's own.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Another receiver of the wait's news, to read them where the wait
    /// is not at hand.
    pub fn subscribe(&self) -> watch::Receiver<News> {
        self.news.clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Of this process's requests on one call (the first and its PBX
    /// retries), only the last to stop ringing it is told it was the last,
    /// whether the others stopped by asking, by their wait being dropped,
    /// or by never getting a wait (an open that failed); asking again
    /// answers the same.
    #[test]
    fn only_the_last_request_to_stop_ringing_a_call_is_told_so() {
        let (_, news) = watch::channel(News::default());
        let held = Held {
            generation: 1,
            stamp: None,
            joined: false,
            opened: None,
        };
        let wait =
            |ringer: Ringer| Wait::held("k", news.clone(), held, ringer, Release::new(|| {}));
        let ringers = Ringers::default();
        let mut a = wait(ringers.join());
        let mut b = wait(ringers.join());
        let dropped = wait(ringers.join());
        let failed_open = ringers.join();
        drop(dropped);
        drop(failed_open);
        assert!(!a.stopped_last());
        assert!(!a.stop_ringing());
        assert!(!a.stop_ringing(), "asked again");
        assert!(!a.stopped_last());
        assert!(b.stop_ringing());
        assert!(b.stop_ringing(), "asked again");
        assert!(b.stopped_last());
        // A wait outside this crate's brokers rings alone.
        let mut alone = Wait::new("k", news.clone(), || {});
        assert!(alone.stop_ringing());
    }

    /// Two calls under one key never share a stamp, whatever their
    /// deadlines: opened in the same millisecond, or the later one with a
    /// shorter wait.
    #[test]
    fn a_keys_stamps_only_rise() {
        assert_eq!(next_stamp(1_000, None), 1_000);
        assert_eq!(next_stamp(1_000, Some(999)), 1_000);
        assert_eq!(next_stamp(1_000, Some(1_000)), 1_001);
        assert_eq!(next_stamp(1_000, Some(1_500)), 1_501);
        assert_eq!(next_stamp(1_000, Some(Stamp::MAX)), Stamp::MAX);
    }
}

//! The life of a call, as one state machine: every state a call and each of
//! its devices can be in, every event that moves them, and what each move
//! makes happen. Pure: no I/O, no clock, no locks; the rest of the crate
//! runs it.
//!
//! Two views of one call, each a pure transition function:
//!
//! - [`Record`], what every instance shares: the call's [`Phase`] (ringing
//!   until a deadline, won by a device, ended with a reason), each device's
//!   answer, and the account that owns the call's key. Its events are the
//!   ones any instance may cause: open or join ([`claim`]), an answer or a
//!   decline ([`Record::take`]), the end ([`Record::end`]) and the PBX's
//!   cancel ([`Record::cancel`]). The in-process broker runs these on its
//!   map; the Redis broker's scripts do the same in Lua, and the property
//!   test `tests/lifecycle_model.rs` holds the two to each other step by
//!   step.
//! - [`Call`], what the instance that parked the call (its holder) knows
//!   beside: which devices' tokens died, and which phones were told that
//!   the call is over. Its events ([`Event`]) are what reaches the holder:
//!   an answer, a dead token, the cancel, the wait running out, shutdown,
//!   the PBX hanging up; each returns its [`Effect`]s: wake the PBX with
//!   ACK or NAK, stop a device's resends, tell a device that the call is
//!   over and why. `calls::ring` applies them.
//!
//! The rules, in one place:
//!
//! - The first `available=true` answer wins the call, a device's whose
//!   token died after its push reached the phone too; a decline takes only
//!   its device out, at once (no further call push, no notice), and when
//!   every device is out the call ends NAK, once the broker has ended it
//!   ([`Effect::Confirm`]): a take counted there meanwhile wins it.
//! - A device's first answer stands. A repeat is accepted while the call
//!   rings; once it is over, only the winner's repeat is, and every other
//!   device hears the call's reason (410).
//! - An answer that comes after the deadline, whose push is older than
//!   the wait (stale), or whose push was sent before the call opened (the
//!   call before's under the same key: `broker::Pushed`), is refused with
//!   `timed_out` and changes nothing.
//! - A cancel, a hang-up, a timeout or a shutdown tells exactly the phones
//!   still ringing: not answered either way, token not dead (and pushed:
//!   the device's schedule, which owns its pushes, checks that last).
//!   Once, however many requests ring the call: each request's [`Call`]
//!   steps the end it learns of, and the device's schedule claims the
//!   phone's notice in the broker before it leaves
//!   (`broker::CallBroker::claim`), so a PBX retry that joined the
//!   call, here or on another instance, does not tell the phone again,
//!   unless its own call push came back at or after the first claim (the
//!   phone must hear last that the call is over) or rang the phone under
//!   another push key.
//! - A key belongs to one account: a request of another account never
//!   joins it, even once it has ended ([`claim`]).
//! - A hang-up lets go of the call for its request alone: the call ends,
//!   and its phones are told, only when no other request rings it, on
//!   this instance or another (a PBX retry that joined it rings on). The
//!   brokers count the requests (`broker::Ringers` in a process, the
//!   record's holders in Redis); [`Call`] steps the hang-up, and its
//!   holder holds the notices back until the broker says the call is over.
//! - The same account's request joins the call under the key only while it
//!   rings (a PBX retry). Once a device has won it, every device has
//!   declined it, or it has ended, the
//!   request is a new call under the same key (a PBX may post the Call-ID
//!   again the moment it hears the outcome); the brokers tell the two calls
//!   apart by their stamps ([`crate::broker::Stamp`]), so nothing of the
//!   old call reaches the new one.

use std::fmt;

use crate::store::{EndReason, Platform};

/// How a call ended, as the PBX hears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The app is awake and registered: route the call.
    Ack,
    /// Do not route the call to the app.
    Nak(NakReason),
}

/// Why a call was answered NAK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NakReason {
    /// No device is registered for the SIP account.
    NoDevice,
    /// Every device declined (busy), or died with at least one declining.
    NotAvailable,
    /// The PBX cancelled the call (the cancel endpoint, on any instance).
    Cancelled,
    /// The push service declared every device's token dead.
    TokenDead,
    /// Nobody answered within the wait.
    Timeout,
    /// Too many calls are parked already (`--max-pending-calls`).
    Overloaded,
    /// The store or the broker could not be reached.
    Unavailable,
    /// The server was shutting down: out of time to wait, or (in process,
    /// where no other instance could take it) draining when the call came.
    Shutdown,
}

impl NakReason {
    pub fn as_str(self) -> &'static str {
        match self {
            NakReason::NoDevice => "no_device",
            NakReason::NotAvailable => "not_available",
            NakReason::Cancelled => "cancelled",
            NakReason::TokenDead => "token_dead",
            NakReason::Timeout => "timeout",
            NakReason::Overloaded => "overloaded",
            NakReason::Unavailable => "unavailable",
            NakReason::Shutdown => "shutdown",
        }
    }
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Nak(reason) => reason.as_str(),
        }
    }

    /// The reason stored in the call's tombstone: what a late answer
    /// hears, and what a device still ringing is told.
    pub fn end_reason(self) -> EndReason {
        match self {
            Outcome::Ack => EndReason::AnsweredElsewhere,
            Outcome::Nak(NakReason::NotAvailable) => EndReason::NotAvailable,
            Outcome::Nak(NakReason::Timeout) => EndReason::TimedOut,
            Outcome::Nak(NakReason::Cancelled) => EndReason::Cancelled,
            Outcome::Nak(_) => EndReason::Failed,
        }
    }
}

// ---------------------------------------------------------------------------
// The record every instance shares.
// ---------------------------------------------------------------------------

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
pub struct Device {
    pub platform: Platform,
    /// Its answer, once it gave one: `true` took the call, `false` declined.
    pub answer: Option<bool>,
}

/// A call's stored record.
///
/// Stored as text, one word each, so a Lua script reads it with a pattern
/// and a fallback check reads many with one `MGET`: the phase (`ring`,
/// `won`, `ended`), the deadline in Unix ms (or the end reason), then each
/// device's platform with `+` once it answered available and `-` once it
/// declined: `ring 1733250000000 android apns+`. The account that owns the
/// key is stored beside it (see [`claim`]), so a record written by a release
/// that did not know accounts reads the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub phase: Phase,
    pub devices: Vec<Device>,
}

/// What a broker key holds: a call's record, or a pointer from a device's
/// push key to its call (`to <n> <call key>`, `n` from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Call(Record),
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
        Record::decode(text).map(Stored::Call)
    }

    pub fn encode(&self) -> String {
        match self {
            Stored::Call(record) => record.encode(),
            Stored::Pointer { call, device } => Stored::pointer(call, *device),
        }
    }

    pub fn pointer(call: &str, device: usize) -> String {
        format!("to {} {call}", device + 1)
    }
}

/// What opening a call under a key finds there ([`claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nothing, or this account's call that is over (won, every device
    /// answered, or ended): store a new ringing record.
    New,
    /// This account's call still rings under the key: a PBX retry. Wait on
    /// it.
    Join,
    /// Another account's call (live or ended), or another call's device
    /// pointer: the key is not this call's to use; try the next one.
    Taken,
}

/// Whether `account` may open a call under a key that holds `existing`
/// (with its owner, `None` for a record written before accounts were
/// stored: taken as the same account, as that release did). Every push
/// key that rings names one account's call: a tombstone is kept from
/// another account too, so a late answer to the old call never lands in
/// the new one.
pub fn claim(existing: Option<(&Stored, Option<i64>)>, account: i64) -> Claim {
    match existing {
        None => Claim::New,
        Some((Stored::Pointer { .. }, _)) => Claim::Taken,
        Some((Stored::Call(_), Some(owner))) if owner != account => Claim::Taken,
        Some((Stored::Call(record), _)) => match record.phase {
            // Every device declined: its PBX hears (or has heard) NAK.
            Phase::Ringing { .. } if record.devices.iter().all(|d| d.answer.is_some()) => {
                Claim::New
            }
            Phase::Ringing { .. } => Claim::Join,
            // Won: its PBX hears (or has heard) ACK; the request is the
            // next call under the key, not a retry.
            Phase::Won { .. } | Phase::Ended(_) => Claim::New,
        },
    }
}

/// What became of an app's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The key was never issued, or its call's record is gone.
    Unknown,
    /// The first answer of its device, taken: `platform` is the device's.
    Taken { platform: Platform },
    /// The device had answered already and its answer stands: the call
    /// still rings, or this device won it.
    Repeat,
    /// The call is over for this device (late, stale, answered elsewhere,
    /// ended), for this reason.
    Gone(EndReason),
}

impl Record {
    /// A call that starts ringing `devices` until `until` (Unix ms).
    pub fn ringing(devices: &[Platform], until: i64) -> Record {
        Record {
            phase: Phase::Ringing { until },
            devices: devices
                .iter()
                .map(|&platform| Device {
                    platform,
                    answer: None,
                })
                .collect(),
        }
    }

    /// The text stored, see [`Record`].
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
    pub fn decode(text: &str) -> Option<Record> {
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
                Some(Device {
                    platform: Platform::parse(name)?,
                    answer,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        (!devices.is_empty()).then_some(Record { phase, devices })
    }

    /// Takes device `index`'s answer if it counts: the call still rings
    /// (before `now`, Unix ms, reaches its deadline), the device has not
    /// answered, and the answer is not `stale` (its push older than the
    /// wait). An available answer wins the call. Says whether it counted.
    /// The Redis broker's answer script does exactly this in Lua.
    pub fn take(&mut self, index: usize, available: bool, now: i64, stale: bool) -> bool {
        let Phase::Ringing { until } = self.phase else {
            return false;
        };
        match self.devices.get_mut(index) {
            Some(device) if device.answer.is_none() && now < until && !stale => {
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

    /// The PBX's cancel: ends the call `cancelled` only while it rings.
    /// Says whether it did.
    pub fn cancel(&mut self) -> bool {
        if !matches!(self.phase, Phase::Ringing { .. }) {
            return false;
        }
        self.end(EndReason::Cancelled);
        true
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
        match (device.answer, self.phase) {
            // The winner's own repeat, however late.
            (Some(true), _) => Verdict::Repeat,
            // A repeat while the call rings changes nothing.
            (Some(false), Phase::Ringing { .. }) => Verdict::Repeat,
            (_, Phase::Ended(reason)) => Verdict::Gone(reason),
            (_, Phase::Won { .. }) => Verdict::Gone(EndReason::AnsweredElsewhere),
            // Still ringing, yet not counted: after the deadline, or stale.
            (None, Phase::Ringing { .. }) => Verdict::Gone(EndReason::TimedOut),
        }
    }
}

// ---------------------------------------------------------------------------
// The call as its holder sees it.
// ---------------------------------------------------------------------------

/// A device of a call, as the instance that parked the call sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Being pushed (or about to be): no answer yet, token alive.
    Ringing,
    /// It declined: no further call push, no notice.
    Declined,
    /// It took the call.
    Won,
    /// The push service declared its token dead: nothing more goes to it.
    Dead,
    /// The call ended while it rang; it is told why.
    Told(EndReason),
}

/// What a device's push schedule does next: what [`Effect`]s come to, for
/// one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Course {
    /// Go on ringing (resend on schedule).
    Ring,
    /// Stop ringing, quietly: it answered, or its token died.
    Stop,
    /// Stop ringing and tell the phone the call is over, for this reason,
    /// if it was pushed.
    Tell(EndReason),
}

/// What reaches the holder of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Device `device`'s first answer counted (here or on any instance).
    Answer { device: usize, available: bool },
    /// The push service declared device `device`'s token dead.
    Dead { device: usize },
    /// The PBX cancelled the call (the cancel endpoint, any instance).
    Cancel,
    /// The wait ran out.
    Timeout,
    /// The server is out of time to drain.
    Shutdown,
    /// The PBX closed its request: nobody to answer.
    HangUp,
    /// The broker has ended the call that every device left (see
    /// [`Effect::Confirm`]), with no take the holder had not seen.
    Confirmed,
}

/// What a transition makes happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Answer the PBX's parked request.
    Wake(Outcome),
    /// Device `n` follows this course from now on.
    Steer(usize, Course),
    /// Every device is out (declined, or its token died): end the call in
    /// the broker for this reason, whose record has the last word, then
    /// step its answers and [`Event::Confirmed`]. A device whose token
    /// the push service declared dead after its push reached the phone may
    /// have taken the call there meanwhile: the broker does not know of
    /// dead tokens, so it counted the take and told the app 202.
    Confirm(NakReason),
}

/// A call as its holder sees it: each device's [`Fate`], and how the call
/// ended once it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    fates: Vec<Fate>,
    /// How the call ended; `Some` once over. A hang-up ends it with no
    /// outcome: nobody is left to hear one.
    over: Option<Option<Outcome>>,
}

impl Call {
    /// A call ringing `devices` devices.
    pub fn ringing(devices: usize) -> Call {
        Call {
            fates: vec![Fate::Ringing; devices],
            over: None,
        }
    }

    pub fn fates(&self) -> &[Fate] {
        &self.fates
    }

    /// How the call ended: `None` while it rings, `Some(None)` when its PBX
    /// hung up.
    pub fn over(&self) -> Option<Option<Outcome>> {
        self.over
    }

    /// The device that took the call.
    pub fn winner(&self) -> Option<usize> {
        self.fates.iter().position(|f| *f == Fate::Won)
    }

    /// Moves the call by `event`; returns what must happen. Once the call
    /// is over nothing moves it again.
    pub fn step(&mut self, event: Event) -> Vec<Effect> {
        if self.over.is_some() {
            return Vec::new();
        }
        match event {
            Event::Answer { device, available } => {
                // A device whose token died after its push reached the
                // phone still takes the call: the broker counted the take.
                let Some(fate @ (Fate::Ringing | Fate::Dead)) = self.fates.get_mut(device) else {
                    return Vec::new();
                };
                if *fate == Fate::Dead && !available {
                    return Vec::new();
                }
                if available {
                    *fate = Fate::Won;
                    let mut effects = vec![Effect::Steer(device, Course::Stop)];
                    effects.extend(self.finish(Some(Outcome::Ack)));
                    return effects;
                }
                *fate = Fate::Declined;
                let mut effects = vec![Effect::Steer(device, Course::Stop)];
                effects.extend(self.settle());
                effects
            }
            Event::Dead { device } => {
                let Some(fate @ Fate::Ringing) = self.fates.get_mut(device) else {
                    return Vec::new();
                };
                *fate = Fate::Dead;
                let mut effects = vec![Effect::Steer(device, Course::Stop)];
                effects.extend(self.settle());
                effects
            }
            Event::Cancel => self.finish(Some(Outcome::Nak(NakReason::Cancelled))),
            Event::Timeout => self.finish(Some(Outcome::Nak(NakReason::Timeout))),
            Event::Shutdown => self.finish(Some(Outcome::Nak(NakReason::Shutdown))),
            Event::HangUp => self.finish(None),
            Event::Confirmed => match self.out() {
                Some(reason) => self.finish(Some(Outcome::Nak(reason))),
                None => Vec::new(),
            },
        }
    }

    /// Once no device rings any more, asks for the call's end in the
    /// broker ([`Effect::Confirm`]) before it ends NAK.
    fn settle(&mut self) -> Vec<Effect> {
        self.out().map(Effect::Confirm).into_iter().collect()
    }

    /// Why the call ends NAK when no device rings any more: `not_available`
    /// when one declined, `token_dead` when every token died; `None` while
    /// one rings.
    fn out(&self) -> Option<NakReason> {
        if self.fates.contains(&Fate::Ringing) {
            return None;
        }
        Some(if self.fates.contains(&Fate::Declined) {
            NakReason::NotAvailable
        } else {
            NakReason::TokenDead
        })
    }

    /// Ends the call: wakes the PBX (unless it hung up) and tells every
    /// device still ringing why.
    fn finish(&mut self, outcome: Option<Outcome>) -> Vec<Effect> {
        self.over = Some(outcome);
        let reason = outcome.map_or(EndReason::Cancelled, Outcome::end_reason);
        let mut effects: Vec<Effect> = outcome.map(Effect::Wake).into_iter().collect();
        for (device, fate) in self.fates.iter_mut().enumerate() {
            if *fate == Fate::Ringing {
                *fate = Fate::Told(reason);
                effects.push(Effect::Steer(device, Course::Tell(reason)));
            }
        }
        effects
    }
}

impl fmt::Display for Fate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fate::Ringing => f.write_str("ringing"),
            Fate::Declined => f.write_str("declined"),
            Fate::Won => f.write_str("won"),
            Fate::Dead => f.write_str("dead"),
            Fate::Told(reason) => write!(f, "told {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANDROID: Platform = Platform::Android;

    #[test]
    fn records_round_trip_as_text() {
        let mut record = Record::ringing(&[Platform::Android, Platform::Apns], 1_733_250_000_000);
        assert_eq!(record.encode(), "ring 1733250000000 android apns");
        assert!(record.take(1, false, 0, false));
        assert!(record.take(0, true, 0, false));
        assert_eq!(record.encode(), "won 1733250000000 android+ apns-");
        record.end(EndReason::TimedOut);
        assert_eq!(record.encode(), "ended answered_elsewhere android+ apns-");
        for text in [
            "ring 1 gcm",
            "won 5 android+ apns",
            "ended cancelled apns- android",
        ] {
            assert_eq!(
                Record::decode(text).map(|s| s.encode()).as_deref(),
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
            assert_eq!(Record::decode(bad), None, "{bad}");
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
        let mut record = Record::ringing(&[ANDROID; 3], 100);
        let before = record.clone();
        assert!(record.take(0, false, 10, false));
        assert_eq!(
            before.verdict(0, true),
            Verdict::Taken { platform: ANDROID }
        );
        let before = record.clone();
        assert!(
            !record.take(0, true, 10, false),
            "a device's first answer stands"
        );
        assert_eq!(before.verdict(0, false), Verdict::Repeat);
        assert!(record.take(1, true, 10, false));
        let before = record.clone();
        assert!(!record.take(2, true, 10, false));
        assert_eq!(
            before.verdict(2, false),
            Verdict::Gone(EndReason::AnsweredElsewhere)
        );
        assert_eq!(
            before.verdict(0, false),
            Verdict::Gone(EndReason::AnsweredElsewhere),
            "a decline's repeat once the call is won"
        );
        assert_eq!(before.verdict(1, false), Verdict::Repeat, "the winner's");
        assert_eq!(before.verdict(3, false), Verdict::Unknown);
        let mut late = Record::ringing(&[Platform::Gcm], 100);
        assert!(!late.take(0, true, 100, false));
        assert_eq!(late.verdict(0, false), Verdict::Gone(EndReason::TimedOut));
        assert!(late.cancel());
        assert!(!late.cancel(), "only a ringing call is cancelled");
        late.end(EndReason::TimedOut);
        assert_eq!(late.verdict(0, false), Verdict::Gone(EndReason::Cancelled));
    }

    #[test]
    fn a_stale_answer_changes_nothing_and_hears_timed_out() {
        let mut record = Record::ringing(&[ANDROID; 2], 100);
        let before = record.clone();
        assert!(!record.take(0, true, 10, true));
        assert_eq!(record, before);
        assert_eq!(record.verdict(0, false), Verdict::Gone(EndReason::TimedOut));
        assert!(record.take(0, true, 10, false), "a timely one still wins");
    }

    #[test]
    fn a_decliner_hears_the_calls_reason_once_it_is_over_and_the_winner_stays_accepted() {
        let mut record = Record::ringing(&[ANDROID; 2], 100);
        assert!(record.take(0, false, 10, false));
        assert!(record.take(1, false, 10, false));
        record.end(EndReason::NotAvailable);
        assert_eq!(
            record.verdict(0, false),
            Verdict::Gone(EndReason::NotAvailable)
        );
        let mut won = Record::ringing(&[ANDROID], 100);
        assert!(won.take(0, true, 10, false));
        won.end(EndReason::AnsweredElsewhere);
        assert_eq!(won.verdict(0, false), Verdict::Repeat);
    }

    #[test]
    fn a_key_belongs_to_one_account() {
        let ringing = Stored::Call(Record::ringing(&[ANDROID], 100));
        let mut ended = Record::ringing(&[ANDROID], 100);
        ended.end(EndReason::TimedOut);
        let ended = Stored::Call(ended);
        let pointer = Stored::Pointer {
            call: "k".into(),
            device: 0,
        };
        assert_eq!(claim(None, 42), Claim::New);
        assert_eq!(claim(Some((&ringing, Some(42))), 42), Claim::Join);
        assert_eq!(claim(Some((&ringing, None)), 42), Claim::Join);
        assert_eq!(claim(Some((&ringing, Some(43))), 42), Claim::Taken);
        assert_eq!(claim(Some((&ended, Some(42))), 42), Claim::New);
        assert_eq!(claim(Some((&ended, Some(43))), 42), Claim::Taken);
        assert_eq!(claim(Some((&pointer, Some(42))), 42), Claim::Taken);
    }

    /// A call a device has won, or every device declined, is over for the
    /// PBX: the same account's request under its key is the next call,
    /// never a retry that would hear the old call's outcome.
    #[test]
    fn only_a_ringing_call_is_joined() {
        let mut won = Record::ringing(&[ANDROID], 100);
        assert!(won.take(0, true, 50, false));
        let won = Stored::Call(won);
        assert_eq!(claim(Some((&won, Some(42))), 42), Claim::New);
        assert_eq!(claim(Some((&won, None)), 42), Claim::New);
        assert_eq!(claim(Some((&won, Some(43))), 42), Claim::Taken);
        let mut declined = Record::ringing(&[ANDROID, ANDROID], 100);
        assert!(declined.take(0, false, 50, false));
        let one_out = Stored::Call(declined.clone());
        assert_eq!(claim(Some((&one_out, Some(42))), 42), Claim::Join);
        assert!(declined.take(1, false, 50, false));
        let all_out = Stored::Call(declined);
        assert_eq!(claim(Some((&all_out, Some(42))), 42), Claim::New);
    }

    fn steer(effects: &[Effect]) -> Vec<(usize, Course)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Steer(n, course) => Some((*n, *course)),
                Effect::Wake(_) | Effect::Confirm(_) => None,
            })
            .collect()
    }

    fn woke(effects: &[Effect]) -> Option<Outcome> {
        effects.iter().find_map(|e| match e {
            Effect::Wake(outcome) => Some(*outcome),
            Effect::Steer(..) | Effect::Confirm(_) => None,
        })
    }

    #[test]
    fn a_decline_stops_only_its_device_and_a_hang_up_tells_only_those_still_ringing() {
        let mut call = Call::ringing(3);
        let effects = call.step(Event::Answer {
            device: 0,
            available: false,
        });
        assert_eq!(effects, vec![Effect::Steer(0, Course::Stop)]);
        let effects = call.step(Event::Dead { device: 2 });
        assert_eq!(effects, vec![Effect::Steer(2, Course::Stop)]);
        let effects = call.step(Event::HangUp);
        assert_eq!(woke(&effects), None, "nobody to wake");
        assert_eq!(
            steer(&effects),
            vec![(1, Course::Tell(EndReason::Cancelled))]
        );
        assert_eq!(call.over(), Some(None));
        assert!(
            call.step(Event::Timeout).is_empty(),
            "over is over: nothing moves it again"
        );
    }

    #[test]
    fn the_first_available_answer_wakes_the_pbx_and_tells_the_rest() {
        let mut call = Call::ringing(3);
        call.step(Event::Answer {
            device: 2,
            available: false,
        });
        let effects = call.step(Event::Answer {
            device: 1,
            available: true,
        });
        assert_eq!(woke(&effects), Some(Outcome::Ack));
        assert_eq!(
            steer(&effects),
            vec![
                (1, Course::Stop),
                (0, Course::Tell(EndReason::AnsweredElsewhere))
            ]
        );
        assert_eq!(call.winner(), Some(1));
        assert_eq!(
            call.fates(),
            [
                Fate::Told(EndReason::AnsweredElsewhere),
                Fate::Won,
                Fate::Declined
            ]
        );
    }

    #[test]
    fn a_call_with_no_device_left_ends_nak_once_the_broker_confirms() {
        let mut call = Call::ringing(2);
        call.step(Event::Dead { device: 0 });
        let effects = call.step(Event::Answer {
            device: 1,
            available: false,
        });
        assert_eq!(
            effects,
            vec![
                Effect::Steer(1, Course::Stop),
                Effect::Confirm(NakReason::NotAvailable)
            ],
            "the broker first"
        );
        assert_eq!(call.over(), None);
        let effects = call.step(Event::Confirmed);
        assert_eq!(woke(&effects), Some(Outcome::Nak(NakReason::NotAvailable)));
        let mut dead = Call::ringing(1);
        let effects = dead.step(Event::Dead { device: 0 });
        assert_eq!(
            effects,
            vec![
                Effect::Steer(0, Course::Stop),
                Effect::Confirm(NakReason::TokenDead)
            ]
        );
        let effects = dead.step(Event::Confirmed);
        assert_eq!(woke(&effects), Some(Outcome::Nak(NakReason::TokenDead)));
        assert!(steer(&effects).is_empty(), "nobody to tell");
    }

    /// The broker knows nothing of dead tokens: a phone whose token died
    /// after its push reached it may still take the call there, and its
    /// app hears 202. The holder follows the broker, before and after the
    /// other devices are out.
    #[test]
    fn a_device_whose_token_died_still_takes_the_call_it_was_pushed() {
        let mut call = Call::ringing(2);
        call.step(Event::Dead { device: 0 });
        let effects = call.step(Event::Answer {
            device: 0,
            available: true,
        });
        assert_eq!(woke(&effects), Some(Outcome::Ack));
        assert_eq!(
            steer(&effects),
            vec![
                (0, Course::Stop),
                (1, Course::Tell(EndReason::AnsweredElsewhere))
            ]
        );
        assert_eq!(call.winner(), Some(0));

        // Its take reaches the holder after the last decline made it ask
        // the broker, with the broker's record.
        let mut call = Call::ringing(2);
        call.step(Event::Dead { device: 0 });
        call.step(Event::Answer {
            device: 1,
            available: false,
        });
        let effects = call.step(Event::Answer {
            device: 0,
            available: true,
        });
        assert_eq!(woke(&effects), Some(Outcome::Ack));
        assert!(call.step(Event::Confirmed).is_empty(), "over is over");
        assert_eq!(call.winner(), Some(0));
        assert_eq!(
            call.fates()[1],
            Fate::Declined,
            "the decliner is told nothing"
        );

        let mut call = Call::ringing(2);
        call.step(Event::Dead { device: 0 });
        assert!(
            call.step(Event::Answer {
                device: 0,
                available: false,
            })
            .is_empty(),
            "a dead device's decline changes nothing"
        );
        assert_eq!(call.fates(), [Fate::Dead, Fate::Ringing]);
    }

    #[test]
    fn every_way_out_tells_the_ringing_phones_its_reason() {
        for (event, outcome, reason) in [
            (
                Event::Cancel,
                Outcome::Nak(NakReason::Cancelled),
                EndReason::Cancelled,
            ),
            (
                Event::Timeout,
                Outcome::Nak(NakReason::Timeout),
                EndReason::TimedOut,
            ),
            (
                Event::Shutdown,
                Outcome::Nak(NakReason::Shutdown),
                EndReason::Failed,
            ),
        ] {
            let mut call = Call::ringing(2);
            call.step(Event::Answer {
                device: 1,
                available: false,
            });
            let effects = call.step(event);
            assert_eq!(woke(&effects), Some(outcome), "{event:?}");
            assert_eq!(steer(&effects), vec![(0, Course::Tell(reason))]);
        }
    }
}

//! The life of an incoming call: find the account's devices, open the wait,
//! push and resend to every device beside it, end with an [`Outcome`] the
//! moment there is one, and tell every phone still ringing why the call is
//! over ([`ring`]); the app's answer ([`answer`]); the PBX's cancel
//! ([`cancel`]); the count of parked calls ([`parking`]).
//!
//! Owns the resend schedule and the retry of refused pushes, because only the
//! call knows its deadline. Must not know about HTTP: the PBX endpoint turns
//! an [`Outcome`] into `status=ACK` / `status=NAK`.

mod answer;
mod history;
pub mod parking;
mod schedule;

pub use answer::{answer, cancel, registered, Answered, AppAnswer};
pub use parking::Parking;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};

use crate::broker::{device_alias, push_key, Answer, BrokerError, News};
use history::HistoryRow;

use crate::logs::{short_token, Escaped};
use crate::push::{Payload, PushTarget};
use crate::shutdown::{phase_reached, Phase};
use crate::state::AppState;
use crate::store::{now_millis, EndReason, Platform};

/// An incoming call as the PBX described it, already validated.
#[derive(Debug, Clone)]
pub struct IncomingCall {
    pub sip_user_id: i64,
    pub phonenumber: String,
    pub caller_id: String,
    /// The PBX's id for the call; becomes the `unique_key` when given.
    pub call_id: Option<String>,
}

/// How a call ended.
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
    /// The server was shutting down and out of time to wait.
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
}

/// A fresh `unique_key`: 128 bits from the OS generator, as 32 hex characters.
/// call-response is unauthenticated, so the key is the only secret.
pub fn random_key() -> String {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Now as Unix seconds, the unit of `message_start_time`.
pub fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One call's log line and metrics, written once on every way out, the PBX
/// hanging up (this dropped mid-wait) included; and its part of the call's
/// history row.
struct CallRecord {
    state: Arc<AppState>,
    sip_user_id: i64,
    started: Instant,
    unique_key: Option<String>,
    platforms: Vec<Platform>,
    /// Pushes accepted so far per device, reported by the push schedules.
    attempts: Vec<watch::Receiver<u32>>,
    /// `None` until the call ends; still `None` on drop: the PBX hung up.
    outcome: Option<Outcome>,
    /// The index of the device that took the call, and its wake-up in ms as
    /// the call saw it (see [`crate::store::CallHistoryEntry::roundtrip_ms`]).
    answered_by: Option<(usize, Option<i64>)>,
    /// The call's history row (`None`: not kept), which each device's
    /// schedule completes.
    history: Option<Arc<HistoryRow>>,
}

impl CallRecord {
    /// Notes the device whose answer took the call, and the roundtrip its
    /// app reported (none for an answer learnt from the stored record).
    fn answered(&mut self, news: &News, message_start_time: f64) {
        self.answered_by = answered_by(news).map(|(index, answer)| {
            let roundtrip = answer
                .received_at
                .map(|at| roundtrip_ms(message_start_time, at));
            (index, roundtrip)
        });
    }

    fn end(&mut self, outcome: Outcome) -> Outcome {
        self.outcome = Some(outcome);
        outcome
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let outcome = self.outcome.map_or("hung_up", Outcome::as_str);
        self.state.metrics.call(outcome);
        let platforms: Vec<&str> = self.platforms.iter().map(|p| p.as_str()).collect();
        let attempts: Vec<u32> = self.attempts.iter().map(|a| *a.borrow()).collect();
        let waited_ms = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        tracing::info!(
            unique_key = %Escaped(self.unique_key.as_deref().unwrap_or("")),
            sip_user_id = self.sip_user_id,
            platform = platforms.join(","),
            attempts = attempts.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
            waited_ms,
            outcome,
            "call ended"
        );
        // The devices' part comes from their schedules; the row is queued
        // when the last of them is done.
        if let Some(history) = self.history.take() {
            history.fill(|row| {
                row.unique_key = self.unique_key.take().unwrap_or_default();
                row.outcome = outcome.to_owned();
                row.waited_ms = waited_ms;
                row.answered_by = self
                    .answered_by
                    .and_then(|(index, _)| i32::try_from(index).ok());
                row.roundtrip_ms = self.answered_by.and_then(|(_, roundtrip)| roundtrip);
            });
        }
    }
}

/// From a push's `message_start_time` (Unix seconds) to its answer reaching
/// an instance, in ms: both wall clock, so 0 when another instance's clock
/// runs behind ours.
fn roundtrip_ms(message_start_time: f64, received_at: SystemTime) -> i64 {
    let received = received_at
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    ((received - message_start_time) * 1000.0).round().max(0.0) as i64
}

/// Rings every device of `call.sip_user_id` and waits for the first of
/// their apps to take the call.
///
/// Dropping this future (the PBX hung up) is a clean exit: the wait's guard
/// ends the call `cancelled` and drops the subscription, and each device's
/// schedule, told nothing, sends its `cancelled` notice.
pub async fn ring(state: &Arc<AppState>, call: IncomingCall) -> Outcome {
    let mut record = CallRecord {
        state: state.clone(),
        sip_user_id: call.sip_user_id,
        started: Instant::now(),
        unique_key: None,
        platforms: Vec::new(),
        attempts: Vec::new(),
        outcome: None,
        answered_by: None,
        history: HistoryRow::start(
            &state.call_history,
            state.config.call_history_days > 0,
            now_millis(),
            call.sip_user_id,
        ),
    };
    let Some(_parked) = state.parking.try_park(state.config.max_pending_calls) else {
        tracing::warn!(
            max = state.config.max_pending_calls,
            "too many parked calls; answering NAK"
        );
        return record.end(Outcome::Nak(NakReason::Overloaded));
    };
    // Nothing waits past the wait (see `within`); a database or Redis that
    // refuses fails at once.
    let deadline = tokio::time::Instant::from_std(record.started) + state.config.wait();
    let looked_up = state.store.devices(call.sip_user_id);
    let devices = match within(state, &call, deadline, "store", "device lookup", looked_up).await {
        Ok(devices) if devices.is_empty() => return record.end(Outcome::Nak(NakReason::NoDevice)),
        Ok(devices) => devices,
        Err(outcome) => return record.end(outcome),
    };
    record.platforms = devices.iter().map(|d| d.registration.platform).collect();
    if let Some(history) = &record.history {
        history.devices(
            devices
                .iter()
                .map(|d| (d.registration.platform, short_token(&d.registration.token))),
        );
    }
    let unique_key = call.call_id.clone().unwrap_or_else(random_key);
    record.unique_key = Some(unique_key.clone());
    // The wait is open (subscribed, record stored) before any push: a call
    // that cannot be answered is never rung.
    let opened = state.broker.open(&unique_key, &record.platforms, deadline);
    let mut wait = match within(state, &call, deadline, "broker", "opening the wait", opened).await
    {
        Ok(wait) => wait,
        Err(outcome) => return record.end(outcome),
    };
    // A device its SIP proxy registered answers with its next REGISTER:
    // noted before its push leaves, so that REGISTER finds the call.
    let aliases = devices
        .iter()
        .enumerate()
        .filter(|(_, d)| d.registration.expires_at.is_some())
        .map(|(index, d)| {
            let alias = device_alias(d.registration.sip_user_id, &d.registration.token);
            let key = push_key(&unique_key, index, devices.len());
            async move { state.broker.alias(&alias, &key, deadline).await }
        });
    for noted in futures_util::future::join_all(aliases).await {
        if let Err(e) = noted {
            // Its app's call-response still answers.
            state.metrics.error("broker");
            tracing::warn!(error = %e, "cannot note a proxy-registered device for its REGISTER");
        }
    }
    let caller = if call.caller_id.trim().is_empty() {
        call.phonenumber.clone()
    } else {
        call.caller_id.clone()
    };
    let count = devices.len();
    let message_start_time = unix_seconds();
    let (dead_token, mut died) = mpsc::unbounded_channel();
    let mut endings = Vec::with_capacity(count);
    for (index, device) in devices.into_iter().enumerate() {
        let (attempts, attempts_seen) = watch::channel(0u32);
        record.attempts.push(attempts_seen);
        let (tell, ending) = oneshot::channel();
        endings.push(tell);
        let payload = Payload::Call {
            unique_key: push_key(&unique_key, index, count),
            phonenumber: call.phonenumber.clone(),
            caller_id: call.caller_id.clone(),
            response_api: state.response_api.clone(),
            message_start_time,
            attempt: 1,
        };
        let report = schedule::Report {
            index,
            dead_token: dead_token.clone(),
            attempts,
            verdict: None,
            history: record.history.clone(),
        };
        tokio::spawn(schedule::ring_device(
            state.clone(),
            PushTarget::from(device.registration),
            payload,
            report,
            ending,
            caller.clone(),
        ));
    }

    let mut phase = state.phase.subscribe();
    let mut dead = vec![false; count];
    let mut news = wait.news();
    let mut outcome = loop {
        if let Some(outcome) = settled(&news, &dead) {
            break outcome;
        }
        tokio::select! {
            changed = wait.changed() => news = changed,
            Some(index) = died.recv() => if let Some(d) = dead.get_mut(index) { *d = true },
            _ = tokio::time::sleep_until(deadline) => break Outcome::Nak(NakReason::Timeout),
            _ = phase_reached(&mut phase, |p| *p == Phase::Aborting) => break Outcome::Nak(NakReason::Shutdown),
        }
    };
    // From the answer that settled the call (the winner, or the last
    // decline) reaching us to the PBX waking.
    let settling = match outcome {
        Outcome::Ack => winner(&news).and_then(|a| a.received_at),
        Outcome::Nak(NakReason::NotAvailable) => news
            .answers
            .iter()
            .flatten()
            .filter_map(|a| a.received_at)
            .max(),
        Outcome::Nak(_) => None,
    };
    if let Some(latency) = settling.and_then(|at| at.elapsed().ok()) {
        state.metrics.wakeup_latency.observe(latency.as_secs_f64());
    }
    let reason = end_reason(outcome);
    if outcome == Outcome::Ack {
        record.answered(&news, message_start_time);
        record.end(Outcome::Ack);
        // The PBX hears ACK first: the other phones' notices, the log line,
        // the tombstone and the wait's release follow in a task of their
        // own, which this worker runs once this task has written the ACK.
        let state = state.clone();
        tokio::spawn(async move {
            tell_the_rest(endings, &news, &dead, reason);
            drop(record);
            // Ended before the wait is released, or the release would end
            // it again, as a hang-up.
            if let Err(e) = state.broker.end(&unique_key, reason).await {
                state.metrics.error("broker");
                tracing::warn!(error = %e, "cannot store the end of an answered call; its record expires by itself");
            }
            drop(wait);
        });
        return Outcome::Ack;
    }
    // The broker has the last word: an answer may have won the call just
    // as its timer fired, and the app that gave it was told so.
    let ended = tokio::time::timeout(LAST_WORD, state.broker.end(&unique_key, reason));
    match ended.await.unwrap_or_else(|_| {
        Err(BrokerError::Unavailable(format!(
            "no answer within {LAST_WORD:?}"
        )))
    }) {
        Ok(Some(before)) => {
            for (index, device) in before.devices.iter().enumerate() {
                if let (Some(answer), Some(seen @ None)) =
                    (device.answer, news.answers.get_mut(index))
                {
                    *seen = Some(Answer {
                        available: answer,
                        received_at: None,
                    });
                }
            }
            if before.devices.iter().any(|d| d.answer == Some(true)) {
                outcome = Outcome::Ack;
                record.answered(&news, message_start_time);
            }
        }
        Ok(None) => {}
        Err(e) => {
            state.metrics.error("broker");
            tracing::warn!(error = %e, "cannot store the end of a call; its record expires by itself");
        }
    }
    tell_the_rest(endings, &news, &dead, end_reason(outcome));
    record.end(outcome)
}

/// Tells every device still ringing why the call is over: all but those
/// that answered (either way) or whose token died.
fn tell_the_rest(
    endings: Vec<oneshot::Sender<Option<EndReason>>>,
    news: &News,
    dead: &[bool],
    notice: EndReason,
) {
    for (index, tell) in endings.into_iter().enumerate() {
        let answered = news.answers.get(index).is_some_and(Option::is_some);
        let quiet = answered || dead.get(index).copied().unwrap_or(false);
        let _ = tell.send((!quiet).then_some(notice));
    }
}

/// How long a call that is over waits for the broker's last word (whether
/// an answer won it as its timer fired) before it answers NAK anyway: a
/// Redis that hangs must not hold the PBX past its wait by more than this.
const LAST_WORD: std::time::Duration = std::time::Duration::from_millis(250);

/// How the call ended, once the news settles it: the first available
/// answer wins; cancelled from outside; or every device out (declined or
/// its token dead).
fn settled(news: &News, dead: &[bool]) -> Option<Outcome> {
    if winner(news).is_some() {
        return Some(Outcome::Ack);
    }
    if news.ended.is_some() {
        return Some(Outcome::Nak(NakReason::Cancelled));
    }
    let mut declined = false;
    for (answer, dead) in news.answers.iter().zip(dead) {
        match (answer, dead) {
            (Some(_), _) => declined = true,
            (None, true) => {}
            (None, false) => return None,
        }
    }
    Some(Outcome::Nak(if declined {
        NakReason::NotAvailable
    } else {
        NakReason::TokenDead
    }))
}

/// The answer that took the call, if any.
fn winner(news: &News) -> Option<&Answer> {
    answered_by(news).map(|(_, answer)| answer)
}

/// The index of the device whose answer took the call, and that answer.
fn answered_by(news: &News) -> Option<(usize, &Answer)> {
    news.answers
        .iter()
        .enumerate()
        .find_map(|(index, answer)| Some((index, answer.as_ref().filter(|a| a.available)?)))
}

/// The reason a device that did not answer is told, and a late answer hears.
fn end_reason(outcome: Outcome) -> EndReason {
    match outcome {
        Outcome::Ack => EndReason::AnsweredElsewhere,
        Outcome::Nak(NakReason::NotAvailable) => EndReason::NotAvailable,
        Outcome::Nak(NakReason::Timeout) => EndReason::TimedOut,
        Outcome::Nak(NakReason::Cancelled) => EndReason::Cancelled,
        Outcome::Nak(_) => EndReason::Failed,
    }
}

/// Runs one step of a call's set-up (`what`, on `component`) within the
/// call's wait. A step that fails, or takes the whole wait, is an error of
/// its component, and the call ends NAK `unavailable`: a database or Redis
/// that hangs (answers nothing, rather than refusing) keeps no PBX longer
/// than its wait.
async fn within<T, E: std::fmt::Display>(
    state: &AppState,
    call: &IncomingCall,
    deadline: tokio::time::Instant,
    component: &'static str,
    what: &'static str,
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Outcome> {
    let error = match tokio::time::timeout_at(deadline, step).await {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "took the whole wait".to_owned(),
    };
    state.metrics.error(component);
    tracing::error!(sip_user_id = call.sip_user_id, %error, "{what} failed; answering NAK");
    Err(Outcome::Nak(NakReason::Unavailable))
}

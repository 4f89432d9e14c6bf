//! The life of an incoming call: find the device, open the wait, push and
//! resend beside it, and end with an [`Outcome`] the moment there is one
//! ([`ring`]); the app's answer ([`answer`]); the count of parked calls
//! ([`parking`]).
//!
//! Owns the resend schedule and the retry of refused pushes, because only the
//! call knows its deadline. Must not know about HTTP: the PBX endpoint turns
//! an [`Outcome`] into `status=ACK` / `status=NAK`.

mod answer;
pub mod parking;
mod schedule;

pub use answer::{answer, Answered, AppAnswer};
pub use parking::Parking;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};

use crate::logs::Escaped;
use crate::push::{Payload, PushTarget};
use crate::shutdown::{phase_reached, Phase};
use crate::state::AppState;
use crate::store::Platform;

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
    /// The app answered that it is not available (busy, declined).
    NotAvailable,
    /// The push service declared the device's token dead.
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

/// Aborts a spawned task when dropped: the pushes of a call stop the moment
/// its wait ends, whichever way it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
/// hanging up (this dropped mid-wait) included.
struct CallRecord<'a> {
    state: &'a AppState,
    sip_user_id: i64,
    started: Instant,
    unique_key: Option<String>,
    platform: Option<Platform>,
    /// Pushes accepted so far, reported by the push schedule.
    attempts: Option<watch::Receiver<u32>>,
    /// `None` until the call ends; still `None` on drop: the PBX hung up.
    outcome: Option<Outcome>,
}

impl CallRecord<'_> {
    fn end(&mut self, outcome: Outcome) -> Outcome {
        self.outcome = Some(outcome);
        outcome
    }
}

impl Drop for CallRecord<'_> {
    fn drop(&mut self) {
        let outcome = self.outcome.map_or("hung_up", Outcome::as_str);
        self.state.metrics.call(outcome);
        tracing::info!(
            unique_key = %Escaped(self.unique_key.as_deref().unwrap_or("")),
            sip_user_id = self.sip_user_id,
            platform = self.platform.map_or("", Platform::as_str),
            attempts = self.attempts.as_ref().map_or(0, |a| *a.borrow()),
            waited_ms = self.started.elapsed().as_millis() as u64,
            outcome,
            "call ended"
        );
    }
}

/// Rings the device of `call.sip_user_id` and waits for its app.
///
/// Dropping this future (the PBX hung up) is a clean exit: the wait's guard
/// removes the subscription and the state, and the pushes are aborted.
pub async fn ring(state: &Arc<AppState>, call: IncomingCall) -> Outcome {
    let mut record = CallRecord {
        state,
        sip_user_id: call.sip_user_id,
        started: Instant::now(),
        unique_key: None,
        platform: None,
        attempts: None,
        outcome: None,
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
    let looked_up = state.store.device(call.sip_user_id);
    let device = match within(state, &call, deadline, "store", "device lookup", looked_up).await {
        Ok(Some(device)) => device.registration,
        Ok(None) => return record.end(Outcome::Nak(NakReason::NoDevice)),
        Err(outcome) => return record.end(outcome),
    };
    record.platform = Some(device.platform);
    let unique_key = call.call_id.clone().unwrap_or_else(random_key);
    record.unique_key = Some(unique_key.clone());
    // The wait is open (subscribed, pending state stored) before any push:
    // a call that cannot be answered is never rung.
    let opened = state.broker.open(&unique_key, device.platform, deadline);
    let mut wait = match within(state, &call, deadline, "broker", "opening the wait", opened).await
    {
        Ok(wait) => wait,
        Err(outcome) => return record.end(outcome),
    };
    let target = PushTarget::from(device);
    let payload = Payload::Call {
        unique_key: unique_key.clone(),
        phonenumber: call.phonenumber,
        caller_id: call.caller_id,
        response_api: state.response_api.clone(),
        message_start_time: unix_seconds(),
        attempt: 1,
    };
    let (dead_token, token_died) = oneshot::channel();
    let (attempts, attempts_seen) = watch::channel(0u32);
    record.attempts = Some(attempts_seen);
    let _pushes = AbortOnDrop(tokio::spawn(schedule::push_until_answered(
        state.clone(),
        target,
        payload,
        schedule::Report {
            dead_token,
            attempts,
        },
    )));

    let mut phase = state.phase.subscribe();
    let outcome = tokio::select! {
        answer = wait.answered() => {
            if let Some(latency) = answer.received_at.and_then(|at| at.elapsed().ok()) {
                state.metrics.wakeup_latency.observe(latency.as_secs_f64());
            }
            if answer.available { Outcome::Ack } else { Outcome::Nak(NakReason::NotAvailable) }
        }
        Ok(()) = token_died => Outcome::Nak(NakReason::TokenDead),
        _ = tokio::time::sleep_until(deadline) => Outcome::Nak(NakReason::Timeout),
        _ = phase_reached(&mut phase, |p| *p == Phase::Aborting) => Outcome::Nak(NakReason::Shutdown),
    };
    record.end(outcome)
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

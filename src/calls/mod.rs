//! The wait of one incoming call: find the device, open the wait, push and
//! resend beside it, and end with an [`Outcome`] the moment there is one.
//!
//! Owns the resend schedule and the retry of refused pushes, because only the
//! call knows its deadline. Must not know about HTTP: the PBX endpoint turns
//! an [`Outcome`] into `status=ACK` / `status=NAK`.

mod schedule;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use crate::broker::Wait;
use crate::config::BrokerMode;
use crate::push::{Payload, PushTarget};
use crate::server::AppState;

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

/// The count of parked calls, bounded by `--max-pending-calls`.
#[derive(Debug, Default)]
pub struct Parking {
    parked: AtomicUsize,
}

/// One parked call's place; gives it back on drop.
pub struct Parked<'a>(&'a Parking);

impl Parking {
    /// Takes a place, unless `max` are taken.
    pub fn try_park(&self, max: usize) -> Option<Parked<'_>> {
        self.parked
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Parked(self))
    }

    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Acquire)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Ordering::AcqRel);
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

/// Rings the device of `call.sip_user_id` and waits for its app.
///
/// Dropping this future (the PBX hung up) is a clean exit: the wait's guard
/// removes the subscription and the state, and the pushes are aborted.
pub async fn ring(state: &Arc<AppState>, call: IncomingCall) -> Outcome {
    let started = Instant::now();
    let Some(_parked) = state.parking.try_park(state.config.max_pending_calls) else {
        tracing::warn!(
            sip_user_id = call.sip_user_id,
            max = state.config.max_pending_calls,
            "too many parked calls; answering NAK"
        );
        return Outcome::Nak(NakReason::Overloaded);
    };
    let device = match state.store.device(call.sip_user_id).await {
        Ok(Some(device)) => device,
        Ok(None) => {
            tracing::info!(
                sip_user_id = call.sip_user_id,
                outcome = "no_device",
                "call ended"
            );
            return Outcome::Nak(NakReason::NoDevice);
        }
        Err(e) => {
            tracing::error!(sip_user_id = call.sip_user_id, error = %e, "device lookup failed; answering NAK");
            return Outcome::Nak(NakReason::Unavailable);
        }
    };
    let unique_key = call.call_id.clone().unwrap_or_else(random_key);
    let mut wait = match state.broker.open(&unique_key, device.platform).await {
        Ok(wait) => wait,
        Err(e) => {
            tracing::error!(sip_user_id = call.sip_user_id, %unique_key, error = %e, "cannot open the wait; answering NAK");
            return Outcome::Nak(NakReason::Unavailable);
        }
    };
    let deadline = tokio::time::Instant::from_std(started) + state.config.wait();
    let target = PushTarget {
        platform: device.platform,
        token: device.token,
        app_id: device.app_id,
        sandbox: device.sandbox,
        sip_user_id: device.sip_user_id,
    };
    let payload = Payload::Call {
        unique_key: unique_key.clone(),
        phonenumber: call.phonenumber,
        caller_id: call.caller_id,
        response_api: state.response_api.clone(),
        message_start_time: unix_seconds(),
        attempt: 1,
    };
    let (dead_token, token_died) = oneshot::channel();
    let (attempts_tx, attempts) = tokio::sync::watch::channel(0u32);
    let _pushes = AbortOnDrop(tokio::spawn(schedule::push_until_answered(
        state.clone(),
        target,
        payload,
        schedule::Report {
            dead_token,
            attempts: attempts_tx,
        },
    )));

    let outcome = tokio::select! {
        available = answered(state, &unique_key, &mut wait) => {
            if available { Outcome::Ack } else { Outcome::Nak(NakReason::NotAvailable) }
        }
        Ok(()) = token_died => Outcome::Nak(NakReason::TokenDead),
        _ = tokio::time::sleep_until(deadline) => Outcome::Nak(NakReason::Timeout),
    };
    tracing::info!(
        %unique_key,
        sip_user_id = call.sip_user_id,
        platform = %device.platform,
        attempts = *attempts.borrow(),
        waited_ms = started.elapsed().as_millis() as u64,
        outcome = outcome.as_str(),
        "call ended"
    );
    outcome
}

/// Resolves with the app's answer: pushed to us in the `pubsub` broker mode,
/// read every poll interval in the `poll` mode kept for comparison.
async fn answered(state: &AppState, key: &str, wait: &mut Wait) -> bool {
    match state.config.broker_mode {
        BrokerMode::Pubsub => wait.answered().await,
        BrokerMode::Poll => {
            let mut tick = tokio::time::interval(state.config.poll_interval());
            loop {
                tick.tick().await;
                if let Ok(Some(answer)) = state
                    .broker
                    .state(key)
                    .await
                    .map(|s| s.and_then(|s| s.answer()))
                {
                    return answer;
                }
            }
        }
    }
}

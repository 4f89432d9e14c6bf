//! The life of an incoming call as this process carries it out: find the
//! account's devices, open the wait, push and resend to every device beside
//! it, end with an [`Outcome`] the moment there is one, and tell every phone
//! still ringing why the call is over ([`ring`]); the app's answer
//! ([`answer`]); a REGISTER answering ([`registered`]); the PBX's cancel
//! ([`cancel`]); the count of parked calls ([`parking`]).
//!
//! What happens when is decided by the call's state machine
//! ([`crate::lifecycle`]); this module runs it: it owns the pushes, their
//! resend schedule and the retry of refused ones, because only the call
//! knows its deadline. Must not know about HTTP: the PBX endpoint turns an
//! [`Outcome`] into `status=ACK` / `status=NAK`.

mod answer;
mod handoff;
mod history;
mod log;
pub mod parking;
mod ring;
mod schedule;

pub use answer::{answer, cancel, registered, CallResponse};
pub use handoff::Handoffs;
pub use parking::Parking;
pub use ring::ring;

pub use crate::broker::random_key;
pub use crate::lifecycle::{NakReason, Outcome, Verdict};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::broker::BrokerError;

/// How long a call that is over waits for the broker's last word (whether
/// an answer won it as its timer fired) before it answers NAK anyway: a
/// Redis that hangs must not hold the PBX past its wait by more than this.
/// A phone's `call_ended` notice waits for its claim no longer either.
pub const LAST_WORD: Duration = Duration::from_millis(250);

/// The broker's `step`, within [`LAST_WORD`]: one that hangs fails.
async fn by_last_word<T>(
    step: impl std::future::Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    tokio::time::timeout(LAST_WORD, step)
        .await
        .unwrap_or_else(|_| {
            Err(BrokerError::Unavailable(format!(
                "no answer within {LAST_WORD:?}"
            )))
        })
}

/// An incoming call as the PBX described it, already validated.
#[derive(Debug, Clone)]
pub struct IncomingCall {
    pub sip_user_id: i64,
    pub phonenumber: String,
    pub caller_id: String,
    /// The PBX's id for the call; becomes the `unique_key` when given (and
    /// free for the account: see [`crate::lifecycle::claim`]), and travels
    /// verbatim in every call push as `call_id`.
    pub call_id: Option<String>,
}

/// Now as Unix seconds, the unit of `message_start_time`.
pub fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

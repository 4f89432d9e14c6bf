//! The app's answer to a call push (`/api/call-response/`): too late or
//! unknown, or handed to the broker, which wakes the waiting PBX request
//! wherever it is parked.

use crate::broker::BrokerError;
use crate::state::AppState;
use crate::store::{now_millis, ResponseLogEntry};

/// What the app says.
#[derive(Debug, Clone, PartialEq)]
pub struct AppAnswer {
    /// The key its push carried.
    pub unique_key: String,
    /// Its push's `message_start_time`, echoed back: Unix seconds.
    pub message_start_time: f64,
    /// Whether it takes the call.
    pub available: bool,
}

/// What became of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// Delivered to the call's wait (or a repeat of an answer it already has).
    Accepted,
    /// No call waits for this key (never issued, or its wait ended), or the
    /// answer came later than the wait: the PBX has moved on either way.
    Unknown,
}

/// Hands the app's answer to the call's wait. The first answer to a key
/// counts for the metrics and the response log; a repeat is accepted
/// without either.
pub async fn answer(state: &AppState, answer: AppAnswer) -> Result<Answered, BrokerError> {
    let roundtrip = super::unix_seconds() - answer.message_start_time;
    if roundtrip > state.config.wait().as_secs_f64() {
        return Ok(Answered::Unknown);
    }
    let Some(before) = state
        .broker
        .answer(&answer.unique_key, answer.available)
        .await?
    else {
        return Ok(Answered::Unknown);
    };
    if before.answer().is_none() {
        let roundtrip = roundtrip.max(0.0);
        state.metrics.wakeup_roundtrip(before.platform(), roundtrip);
        // Queued: the log row must not delay the answer the PBX waits for.
        state.response_log.record(ResponseLogEntry {
            platform: before.platform(),
            roundtrip,
            available: answer.available,
            created_at: now_millis(),
        });
    }
    Ok(Answered::Accepted)
}

//! The app's answer to a call push (`/api/call-response/`), handed to the
//! broker, which decides whether it counts and wakes the waiting PBX
//! request wherever it is parked; and the PBX's cancel of a call.

use crate::broker::{device_alias, BrokerError, Verdict};
use crate::state::AppState;
use crate::store::{now_millis, EndReason, ResponseLogEntry};

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
    /// Delivered to the call's wait (or a repeat of this device's answer).
    Accepted,
    /// The call is over for this device, for this reason: the app stops
    /// ringing.
    Gone(EndReason),
    /// No call was ever rung under this key, or it ended long ago.
    Unknown,
}

/// Hands the app's answer to the call's wait. A device's first answer
/// counts for the metrics and the response log; a repeat is accepted
/// without either.
pub async fn answer(state: &AppState, answer: AppAnswer) -> Result<Answered, BrokerError> {
    let verdict = state
        .broker
        .answer(&answer.unique_key, answer.available)
        .await?;
    let_the_call_go_first(&verdict).await;
    Ok(match verdict {
        Verdict::Unknown => Answered::Unknown,
        Verdict::Gone(reason) => Answered::Gone(reason),
        Verdict::Repeat => Answered::Accepted,
        Verdict::Taken { platform } => {
            // As the app reports it; a forged start time moves no metric
            // past the wait.
            let roundtrip = (super::unix_seconds() - answer.message_start_time)
                .clamp(0.0, state.config.wait().as_secs_f64());
            state.metrics.wakeup_roundtrip(platform, roundtrip);
            // Queued: the log row must not delay the answer the PBX waits for.
            state.response_log.record(ResponseLogEntry {
                platform,
                roundtrip,
                available: answer.available,
                created_at: now_millis(),
            });
            Answered::Accepted
        }
    })
}

/// A device a SIP proxy registered REGISTERed again (`/api/sip-registration/`):
/// awake and reachable. If a call rings for it, that is its answer, exactly
/// as an `available=true` call-response would be (first answer wins); a
/// call-response from the device that follows is a repeat. No roundtrip is
/// reported (the REGISTER carries no `message_start_time`), so the metric
/// and the response log are left to app answers. `None` when no call rings
/// for the device.
pub async fn registered(
    state: &AppState,
    sip_user_id: i64,
    token: &str,
) -> Result<Option<Answered>, BrokerError> {
    let alias = device_alias(sip_user_id, token);
    let Some(key) = state.broker.resolve(&alias).await? else {
        return Ok(None);
    };
    let verdict = state.broker.answer(&key, true).await?;
    let_the_call_go_first(&verdict).await;
    Ok(Some(match verdict {
        Verdict::Unknown => return Ok(None),
        Verdict::Gone(reason) => Answered::Gone(reason),
        Verdict::Repeat | Verdict::Taken { .. } => Answered::Accepted,
    }))
}

/// When this answer counted for a call held by this process, the broker has
/// just woken the call's wait, which is queued behind this task on this
/// worker. Yielding lets it write the PBX's `status=ACK` (or go on waiting,
/// for a decline) now; the answer's own bookkeeping (metrics, the response
/// log row, whose writer would otherwise run first) and the app's 202
/// follow. The caller hears nothing until the ACK; the app only learns its
/// answer was taken.
async fn let_the_call_go_first(verdict: &Verdict) {
    if matches!(verdict, Verdict::Taken { .. }) {
        tokio::task::yield_now().await;
    }
}

/// Ends a ringing call as `cancelled`, wherever it is parked (`key`: the
/// PBX's `call_id`, or a `unique_key`). Says whether one was.
pub async fn cancel(state: &AppState, key: &str) -> Result<bool, BrokerError> {
    state.broker.cancel(key).await
}

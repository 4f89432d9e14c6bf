//! The app's answer to a call push (`/api/call-response/`), handed to the
//! broker, which decides whether it counts and wakes the waiting PBX
//! request wherever it is parked; a REGISTER that answers; and the PBX's
//! cancel of a call.

use crate::broker::{device_alias, BrokerError, Named, Pushed};
use crate::lifecycle::Verdict;
use crate::state::AppState;
use crate::store::{now_millis, ResponseLogEntry};

/// What the app posts to `/api/call-response/`.
#[derive(Debug, Clone, PartialEq)]
pub struct CallResponse {
    /// The key its push carried.
    pub unique_key: String,
    /// Its push's `message_start_time`, echoed back: Unix seconds.
    pub message_start_time: f64,
    /// Whether it takes the call.
    pub available: bool,
}

/// Hands the app's answer to the call's wait. An answer to a push older
/// than the wait is stale: it never counts, and hears `timed_out` while the
/// call rings on for its other phones and newer pushes; so does one to a
/// push sent before the call opened, the call before it under the same
/// key's ([`Pushed::At`], [`crate::broker::pushed_before`]). A device's first
/// answer counts for the metrics and the response log; a repeat is
/// accepted without either.
///
/// The call's `status=ACK` comes before the app's 202 and the bookkeeping;
/// see [`let_the_call_go_first`].
pub async fn answer(state: &AppState, response: CallResponse) -> Result<Verdict, BrokerError> {
    let roundtrip = super::unix_seconds() - response.message_start_time;
    let stale = roundtrip > state.config.wait().as_secs_f64();
    let pushed = if stale {
        Pushed::Stale
    } else {
        // Validated as a time (`http::calls`): the cast cannot wrap.
        Pushed::At {
            at: (response.message_start_time * 1000.0).floor() as i64,
            wait: i64::try_from(state.config.wait().as_millis()).unwrap_or(i64::MAX),
        }
    };
    // In place before the answer can wake the call: the call's task may run
    // on the other worker at once.
    let handoff = (response.available && !stale && state.broker.holds(&response.unique_key))
        .then(|| state.handoffs.expect(&response.unique_key));
    let verdict = state
        .broker
        .answer(&response.unique_key, response.available, pushed)
        .await?;
    let_the_call_go_first(state, &verdict, handoff).await;
    if let Verdict::Taken { platform } = verdict {
        // As the app reports it; a forged start time moves no metric past
        // the wait.
        let roundtrip = roundtrip.clamp(0.0, state.config.wait().as_secs_f64());
        state.metrics.wakeup_roundtrip(platform, roundtrip);
        // Queued: the log row must not delay the answer the PBX waits for.
        state.response_log.record(ResponseLogEntry {
            platform,
            roundtrip,
            available: response.available,
            created_at: now_millis(),
        });
    }
    Ok(verdict)
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
) -> Result<Option<Verdict>, BrokerError> {
    let alias = device_alias(sip_user_id, token);
    let Some(key) = state.broker.resolve(&alias).await? else {
        return Ok(None);
    };
    let verdict = state.broker.answer(&key, true, Pushed::Unsaid).await?;
    let_the_call_go_first(state, &verdict, None).await;
    Ok((verdict != Verdict::Unknown).then_some(verdict))
}

/// Once an answer counted, the call's wait must write the PBX's
/// `status=ACK` before anything else here runs.
///
/// - When the call is held in this process (always, with the in-process
///   broker), the broker has just put the call's task on this worker's
///   next slot. An answer that takes the call (`handoff`) waits for it to
///   write the ACK and hand over its follow-up ([`super::handoff`]): the
///   one task it wakes is this one, so no thread is woken, and the app's
///   202 goes out after the ACK. Nothing else here may wake another task
///   before that (the response log's row is queued without waking its
///   writer).
/// - A REGISTER's answer waits for nothing in process: its 202 goes first.
/// - On Redis, for a call held by another instance (or a REGISTER's
///   answer), the call is woken by the script's publish: yielding lets the
///   subscriber read it first.
///
/// Measured in `docs/performance.md`, "Wake-ups nothing needs" and "The
/// ACK before the 202".
async fn let_the_call_go_first(
    state: &AppState,
    verdict: &Verdict,
    handoff: Option<super::handoff::Expecting<'_>>,
) {
    if !matches!(verdict, Verdict::Taken { .. }) {
        return;
    }
    if let Some(handoff) = handoff {
        handoff.follow().await;
    } else if !state.broker.wakes_in_place() {
        tokio::task::yield_now().await;
    }
}

/// Ends as `cancelled` every ringing call that `key` names, wherever it is
/// parked (`key`: the PBX's `call_id`, every leg of it; or a
/// `unique_key`), only `account`'s when given. Says whether one was.
/// Each leg ends on its own shard, all of them tried: an error for one
/// leaves the others cancelled, and the PBX hears 503, so a repeat (which
/// finds the ended legs ended) is what finishes the job.
pub async fn cancel(
    state: &AppState,
    key: &str,
    account: Option<i64>,
    by: Named,
) -> Result<bool, BrokerError> {
    state.broker.cancel(key, account, by).await
}

//! The pushes of one call: the first at once, a resend every resend interval
//! while nobody answers, and a retry of every push the service refused.
//!
//! `attempt` counts pushes the phone could have received: a retry of a
//! refused send keeps its number and comes sooner than the next resend.
//! iOS is the exception to resending: iOS makes the app report every VoIP
//! push to CallKit and stops waking apps that fail to, so an APNs push that
//! was accepted is never resent.
//!
//! This runs in its own task beside the wait, which aborts it the moment the
//! call ends: it never delays an answer.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::logs::{redact, Escaped};
use crate::push::{Payload, PushOutcome, PushTarget};
use crate::state::AppState;

/// What the schedule tells the waiting call.
pub(super) struct Report {
    /// Fired when the push service declared the token dead: end with NAK now.
    pub dead_token: oneshot::Sender<()>,
    /// The number of pushes accepted so far, for the call's log line.
    pub attempts: watch::Sender<u32>,
}

/// Backoff for a refused push: what the service asked for, else 100 ms
/// doubling up to 1 s.
fn retry_delay(retries: u32, asked: Option<Duration>) -> Duration {
    asked.unwrap_or_else(|| {
        (Duration::from_millis(100) * 2u32.pow(retries.min(4))).min(Duration::from_secs(1))
    })
}

pub(super) async fn push_until_answered(
    state: Arc<AppState>,
    target: PushTarget,
    mut payload: Payload,
    report: Report,
) {
    let interval = state.config.resend_interval();
    let max_attempts = state.config.max_attempts();
    let mut attempt = 1;
    let mut retries = 0;
    loop {
        if let Payload::Call {
            attempt: number, ..
        } = &mut payload
        {
            *number = attempt;
        }
        let sent_at = Instant::now();
        let outcome = state.pusher.send(&target, &payload).await;
        state.metrics.push(
            target.platform,
            payload.kind(),
            &outcome,
            sent_at.elapsed().as_secs_f64(),
        );
        match outcome {
            PushOutcome::Delivered => {
                report.attempts.send_replace(attempt);
                if target.platform.is_apns() || attempt >= max_attempts {
                    return;
                }
                retries = 0;
                attempt += 1;
                tokio::time::sleep_until(sent_at + interval).await;
            }
            PushOutcome::Retry { after, refusal } => {
                let delay = retry_delay(retries, after);
                tracing::warn!(
                    platform = %target.platform,
                    app = %Escaped(&target.app_id),
                    sip_user_id = target.sip_user_id,
                    attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    reason = %refusal,
                    "push refused for now; retrying"
                );
                retries += 1;
                tokio::time::sleep(delay).await;
            }
            PushOutcome::TokenDead(refusal) => {
                tracing::info!(
                    platform = %target.platform,
                    app = %Escaped(&target.app_id),
                    sip_user_id = target.sip_user_id,
                    token = %redact(&target.token),
                    reason = %refusal,
                    "push token is dead; forgetting the device"
                );
                // Its own task: this one is aborted as soon as the call ends,
                // which the report below makes happen at once.
                let store = state.store.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.forget_token(target.sip_user_id, &target.token).await {
                        tracing::error!(sip_user_id = target.sip_user_id, error = %e, "cannot forget a dead token");
                    }
                });
                let _ = report.dead_token.send(());
                return;
            }
            PushOutcome::Failed(refusal) => {
                tracing::error!(
                    platform = %target.platform,
                    app = %Escaped(&target.app_id),
                    sip_user_id = target.sip_user_id,
                    attempt,
                    reason = %refusal,
                    "push failed; the call will time out"
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_to_a_second_unless_asked() {
        let delays: Vec<u128> = (0..6).map(|n| retry_delay(n, None).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(
            retry_delay(0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
    }
}

//! The pushes of one device for one call: the first at once, a resend every
//! resend interval while nobody answers, a retry of every push the service
//! refused, and, once the call is over, the `call_ended` notice.
//!
//! `attempt` counts pushes the phone could have received: a retry of a
//! refused send keeps its number and comes sooner than the next resend.
//! iOS is the exception to resending: iOS makes the app report every VoIP
//! push to CallKit and stops waking apps that fail to, so an APNs push that
//! was accepted is never resent.
//!
//! Each device's schedule runs in a task of its own beside the wait, so it
//! never delays an answer, and outlives the PBX's request: a call whose PBX
//! hung up (its handler dropped) still tells its phones. It follows the
//! [`Course`] the call's state machine steers it on
//! ([`crate::lifecycle::Call`]): a decline, a win or the call's end stops it
//! between pushes, never in the middle of one, so a phone is never told the
//! call is over before its call push has left; and only a course of
//! [`Course::Tell`] sends the notice, to a phone that was pushed, once
//! however many of the call's requests ring it (a PBX retry joins the
//! call, here or on another instance, and rings the same phones).
//!
//! A phone gets each numbered call push once, however many requests ring
//! it: a PBX retry that joined the call sends no first push (the request
//! that opened the call sent it), and each later push goes from the first
//! request to claim it in the broker ([`ours`]). So an iPhone rung by a
//! retry gets no second VoIP push, and when the first request's PBX hangs
//! up, the retry's pushes go on from the next number.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::by_last_word;
use super::history::HistoryRow;
use super::parking::Scheduled;
use crate::broker::{unix_micros, FirstClaim, PhoneClaim, Stamp};
use crate::lifecycle::Course;
use crate::logs::{redact, Escaped};
use crate::push::{Payload, PushOutcome, PushTarget, Reason, NOTICE_TTL};
use crate::state::AppState;
use crate::store::EndReason;

/// What the schedule tells the waiting call. Dropped when the device's call
/// pushes are over, which the call's history waits for.
pub(super) struct Report {
    /// This device's index in the call.
    pub index: usize,
    /// Where to say that the push service declared the token dead.
    pub dead_token: mpsc::UnboundedSender<usize>,
    /// The number of pushes accepted so far, for the call's log line.
    pub attempts: watch::Sender<u32>,
    /// What the push service said to the last call push.
    pub last_push: Option<LastPush>,
    /// The call's history row, told both when the report is dropped.
    pub history: Option<Arc<HistoryRow>>,
}

impl Drop for Report {
    fn drop(&mut self) {
        if let Some(history) = self.history.take() {
            let last_push = self.last_push.map(|v| v.to_string());
            history.pushed(self.index, *self.attempts.borrow(), last_push);
        }
    }
}

/// What the push service said to a call push: its outcome and reason, as
/// the `pushes` metric labels them. Copied, not formatted, on the push
/// path; shown as `delivered`, or e.g. `token_dead UNREGISTERED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LastPush {
    outcome: &'static str,
    reason: Reason,
}

impl From<&PushOutcome> for LastPush {
    fn from(outcome: &PushOutcome) -> Self {
        LastPush {
            outcome: outcome.as_str(),
            reason: outcome.reason(),
        }
    }
}

impl std::fmt::Display for LastPush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.outcome)?;
        if self.reason != Reason::NONE {
            write!(f, " {}", self.reason.as_str())?;
        }
        Ok(())
    }
}

/// How often a `call_ended` notice the service refused for now is tried.
const NOTICE_TRIES: u32 = 3;

/// Backoff for a refused push: what the service asked for, else 100 ms
/// doubling up to 1 s.
fn retry_delay(retries: u32, asked: Option<Duration>) -> Duration {
    asked.unwrap_or_else(|| {
        (Duration::from_millis(100) * 2u32.pow(retries.min(4))).min(Duration::from_secs(1))
    })
}

/// How a device's call pushes came to an end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pushes {
    /// Nothing more to push (iOS accepted, the last attempt left, a push
    /// failed for good), or the call's course changed: its course decides.
    Over,
    /// The push service declared the token dead: nothing more goes to it.
    TokenDead,
}

/// What a device's schedule has in common with the other requests that
/// ring its call: a PBX retry joins the call, here or on another
/// instance, and rings the same phones.
pub(super) struct Joint {
    /// The call's key and stamp, under which its pushes after the first
    /// and its notice are claimed ([`crate::broker::CallBroker::claim`]),
    /// so the phone gets each once. No stamp where the broker gave none
    /// (one outside this crate, or a store that did not say): then nothing
    /// is claimed, and everything is sent.
    pub call: Arc<str>,
    pub stamp: Option<Stamp>,
    /// Whether this request joined the call another request opened
    /// ([`crate::broker::Wait::joined`]): that one sent the first push.
    pub joined: bool,
    /// What the iOS notice names.
    pub caller: String,
}

/// Rings one device until its course leaves [`Course::Ring`], then tells
/// it why the call is over, if the course says so, it was pushed, and
/// another request of the call has not claimed its notice first (see
/// [`to_tell`]). `_scheduled` counts the schedule until it returns, so a
/// draining server waits for its notice.
pub(super) async fn ring_device(
    state: Arc<AppState>,
    target: PushTarget,
    payload: Payload,
    mut report: Report,
    mut course: watch::Receiver<Course>,
    joint: Joint,
    _scheduled: Scheduled,
) {
    let mut sent = Sent::default();
    let pushes = push_until_done(
        &state,
        &target,
        payload.clone(),
        &joint,
        &mut report,
        &mut course,
        &mut sent,
    )
    .await;
    let pushed = sent.reached || sent.elsewhere;
    // The call pushes are over: what they came to is final, and dropping the
    // report says so to the call's history.
    drop(report);
    if pushes == Pushes::TokenDead {
        return;
    }
    let Course::Tell(reason) = settled(&mut course).await else {
        return;
    };
    if !pushed {
        // Never rung: nothing to take back.
        return;
    }
    if !target.can_be_told() {
        // An iOS device without an alert token: a VoIP push must ring, so
        // its app learns from its call-response (410).
        return;
    }
    let Payload::Call { unique_key, .. } = payload else {
        return;
    };
    if !to_tell(&state, &joint, &target.token, &unique_key, sent.last).await {
        return;
    }
    // Rung only by another request, whose key the phone knows its call by.
    let unique_key = match sent.last {
        None => sent.key_elsewhere.unwrap_or(unique_key),
        Some(_) => unique_key,
    };
    let notice = Payload::CallEnded {
        unique_key,
        reason,
        caller: joint.caller,
    };
    tell(&state, &target, &notice).await;
}

/// Whether this schedule tells its phone (push token `token`, rung under
/// `push_key`) that the call is over, its last own call push sent at
/// `last_sent` (`None`: it sent none, another request rang the phone).
/// Every request of the call that rang the phone learns of the end; the
/// first to claim the notice in the broker tells it, and another tells it
/// too when its own call push left at or after that claim (the phone may
/// have had that push after the first notice, and what it hears last from
/// us must be that the call is over), or when it rang the phone under
/// another push key (the account's devices changed between the requests:
/// the first notice names a key the app may not know this push by). A
/// broker that cannot say within [`super::LAST_WORD`] is taken for yes: a
/// phone told twice is better than one never told.
async fn to_tell(
    state: &AppState,
    joint: &Joint,
    token: &str,
    push_key: &str,
    last_sent: Option<SystemTime>,
) -> bool {
    let claim = joint
        .stamp
        .and_then(|stamp| PhoneClaim::notice(&joint.call, stamp, token, push_key));
    match claimed(state, claim, "call_ended notice").await {
        Claimed::First => true,
        Claimed::Before(first) => tells(&first, push_key, last_sent),
    }
}

/// What claiming something of a phone's found ([`claimed`]).
enum Claimed {
    /// This claim is the first, there is nothing to claim (no stamp), or
    /// the broker could not say within [`super::LAST_WORD`].
    First,
    /// Another request's claim came first.
    Before(FirstClaim),
}

/// Makes `claim` (of a `what`); a broker that fails or hangs counts as a
/// first claim: the phone gets the thing twice rather than never.
async fn claimed(state: &AppState, claim: Option<PhoneClaim<'_>>, what: &str) -> Claimed {
    let Some(claim) = claim else {
        return Claimed::First;
    };
    match by_last_word(state.broker.claim(&claim)).await {
        Ok(None) => Claimed::First,
        Ok(Some(first)) => Claimed::Before(first),
        Err(e) => {
            state.metrics.error("broker");
            tracing::warn!(error = %e, "cannot claim a {what}; sending it anyway");
            Claimed::First
        }
    }
}

/// Whether a phone rung under `push_key` is told that the call is over
/// though another request claimed its notice `first`, this schedule's last
/// own call push to it sent at `last_sent` (see [`to_tell`]). One that
/// sent none tells nothing more: the phone heard the end from the request
/// that rang it.
fn tells(first: &FirstClaim, push_key: &str, last_sent: Option<SystemTime>) -> bool {
    last_sent.is_some_and(|sent| first.push_key != push_key || unix_micros(sent) >= first.at)
}

/// Whether this request sends call push number `attempt` to the phone
/// (push token `token`, rung under `push_key`): the first push is the
/// opening request's, sent at once, never claimed (nothing more on the
/// call's set-up); every later one goes from the first of the call's
/// requests to claim it, so a phone rung by a PBX retry too gets each
/// number once, and the retry's pushes go on from the next number when
/// the first request stops. A broker that cannot say within
/// [`super::LAST_WORD`] is taken for yes: a push sent twice is better than
/// one never sent.
async fn ours(
    state: &AppState,
    joint: &Joint,
    token: &str,
    push_key: &str,
    attempt: u32,
) -> Claimed {
    if attempt == 1 {
        return if joint.joined {
            // Sent by the request that opened the call, when it opened it.
            Claimed::Before(FirstClaim {
                at: unix_micros(SystemTime::now()),
                push_key: String::new(),
            })
        } else {
            Claimed::First
        };
    }
    let claim = joint
        .stamp
        .and_then(|stamp| PhoneClaim::push(&joint.call, stamp, token, attempt, push_key));
    claimed(state, claim, "call push").await
}

/// Whether `target` is still a device of its account: one deleted while
/// its call rings (its app logged out), replaced (another phone took a
/// one-device account over, and this one was just told so) or lapsed (its
/// SIP registration) gets no further call push for it. A store that cannot
/// say within [`super::LAST_WORD`] is taken for yes: a resend too many is
/// better than a phone that stops ringing.
async fn still_registered(state: &AppState, target: &PushTarget) -> bool {
    match tokio::time::timeout(super::LAST_WORD, state.store.devices(target.sip_user_id)).await {
        Ok(Ok(devices)) => devices.iter().any(|device| {
            let device = &device.registration;
            device
                .platform
                .same_phone(&device.token, target.platform, &target.token)
        }),
        Ok(Err(e)) => {
            tracing::warn!(sip_user_id = target.sip_user_id, error = %e, "cannot read the account's devices before a resend; resending");
            true
        }
        Err(_) => true,
    }
}

/// The call pushes a schedule knows of.
#[derive(Debug, Default)]
struct Sent {
    /// When the last of its own came back, whatever the push service said
    /// (one that timed out may have reached the phone all the same).
    last: Option<SystemTime>,
    /// Whether one of its own may have reached the phone
    /// ([`PushOutcome::may_have_reached`]): taken by the push service, or
    /// sent with no answer back.
    reached: bool,
    /// Whether another request of the call sent one of them (see [`ours`]).
    elsewhere: bool,
    /// The push key it sent the last of those under, where its claim said.
    key_elsewhere: Option<String>,
}

/// The course once it is no longer [`Course::Ring`]. A course nobody steers
/// any more (the call went away without a word) ends `cancelled`.
async fn settled(course: &mut watch::Receiver<Course>) -> Course {
    match course.wait_for(|c| *c != Course::Ring).await {
        Ok(settled) => *settled,
        Err(_) => Course::Tell(EndReason::Cancelled),
    }
}

/// Resolves once the course leaves [`Course::Ring`]: the call steered this
/// device out (a decline, a win, the call's end).
async fn steered_out(course: &mut watch::Receiver<Course>) {
    let _ = course.wait_for(|c| *c != Course::Ring).await;
}

/// Sends a `call_ended` notice, retrying a refusal a few times, never past
/// the notice's life at the push service.
async fn tell(state: &AppState, target: &PushTarget, notice: &Payload) {
    let expires = Instant::now() + NOTICE_TTL;
    for tries in 0..NOTICE_TRIES {
        let sent_at = Instant::now();
        let outcome = state.pusher.send(target, notice).await;
        state.metrics.push(
            target.platform,
            notice.kind(),
            &outcome,
            sent_at.elapsed().as_secs_f64(),
        );
        match outcome {
            PushOutcome::Retry { after, .. }
                if tries + 1 < NOTICE_TRIES
                    && Instant::now() + retry_delay(tries, after) < expires =>
            {
                tokio::time::sleep(retry_delay(tries, after)).await;
            }
            outcome => {
                tracing::debug!(
                    platform = %target.platform,
                    sip_user_id = target.sip_user_id,
                    outcome = outcome.as_str(),
                    "call_ended notice sent"
                );
                return;
            }
        }
    }
}

/// The call pushes, until the schedule is done or the course leaves
/// [`Course::Ring`] between two pushes; `sent`: what became of them.
async fn push_until_done(
    state: &AppState,
    target: &PushTarget,
    mut payload: Payload,
    joint: &Joint,
    report: &mut Report,
    course: &mut watch::Receiver<Course>,
    sent: &mut Sent,
) -> Pushes {
    let interval = state.config.resend_interval();
    let max_attempts = state.config.max_attempts();
    let mut attempt = 1;
    let mut retries = 0;
    loop {
        if *course.borrow() != Course::Ring {
            return Pushes::Over;
        }
        let Payload::Call {
            attempt: number,
            unique_key,
            ..
        } = &mut payload
        else {
            unreachable!("a schedule rings with a call push");
        };
        *number = attempt;
        // Every push but the first (a resend, or a refused push tried
        // again) goes only to a device still its account's.
        if (attempt > 1 || retries > 0) && !still_registered(state, target).await {
            return Pushes::Over;
        }
        let tick = Instant::now();
        // A retry of a refused push keeps the number it claimed.
        if retries == 0 {
            if let Claimed::Before(first) =
                ours(state, joint, &target.token, unique_key, attempt).await
            {
                // Another request of the call sent this one: the next is
                // due an interval after it.
                sent.elsewhere = true;
                if !first.push_key.is_empty() {
                    sent.key_elsewhere = Some(first.push_key);
                }
                if target.platform.is_apns() || attempt >= max_attempts {
                    return Pushes::Over;
                }
                attempt += 1;
                let ago = unix_micros(SystemTime::now()).saturating_sub(first.at);
                let ago = Duration::from_micros(u64::try_from(ago).unwrap_or(0));
                tokio::select! {
                    _ = tokio::time::sleep(interval.saturating_sub(ago)) => {}
                    _ = steered_out(course) => return Pushes::Over,
                }
                continue;
            }
            // The claim took a broker's round trip: the call may have
            // ended meanwhile.
            if *course.borrow() != Course::Ring {
                return Pushes::Over;
            }
        }
        let sent_at = Instant::now();
        let outcome = state.pusher.send(target, &payload).await;
        sent.last = Some(SystemTime::now());
        sent.reached |= outcome.may_have_reached();
        state.metrics.push(
            target.platform,
            payload.kind(),
            &outcome,
            sent_at.elapsed().as_secs_f64(),
        );
        report.last_push = Some(LastPush::from(&outcome));
        match outcome {
            PushOutcome::Delivered => {
                report.attempts.send_replace(attempt);
                if target.platform.is_apns() || attempt >= max_attempts {
                    return Pushes::Over;
                }
                retries = 0;
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep_until(tick + interval) => {}
                    _ = steered_out(course) => return Pushes::Over,
                }
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
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = steered_out(course) => return Pushes::Over,
                }
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
                let store = state.store.clone();
                let (sip_user_id, token) = (target.sip_user_id, target.token.clone());
                tokio::spawn(async move {
                    if let Err(e) = store.forget_token(sip_user_id, &token).await {
                        tracing::error!(sip_user_id, error = %e, "cannot forget a dead token");
                    }
                });
                let _ = report.dead_token.send(report.index);
                return Pushes::TokenDead;
            }
            PushOutcome::Failed(refusal) => {
                tracing::error!(
                    platform = %target.platform,
                    app = %Escaped(&target.app_id),
                    sip_user_id = target.sip_user_id,
                    attempt,
                    reason = %refusal,
                    "push failed; this device will not ring"
                );
                return Pushes::Over;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first claim of a phone's notice tells it; a later one only
    /// when its own call push left at or after the first claim, so the
    /// phone hears last that the call is over, or when it rang the phone
    /// under another push key than the first claimant's.
    #[test]
    fn a_phone_is_told_by_the_first_claim_and_after_a_later_push() {
        let at = |us: u64| std::time::UNIX_EPOCH + Duration::from_micros(us);
        let first = FirstClaim {
            at: 2_000,
            push_key: "k.1".to_owned(),
        };
        let at = |us: u64| Some(at(us));
        assert!(
            !tells(&first, "k.1", at(1_999)),
            "pushed before the first claim"
        );
        assert!(tells(&first, "k.1", at(2_000)), "pushed as it was claimed");
        assert!(
            tells(&first, "k.1", at(2_300)),
            "pushed after the first notice"
        );
        assert!(tells(&first, "k.2", at(1_000)), "rung under another key");
        assert!(
            !tells(&first, "k.2", None),
            "rung only by the first claimant, under its key"
        );
    }

    #[test]
    fn retry_delay_doubles_to_a_second_unless_asked() {
        let delays: Vec<u128> = (0..6).map(|n| retry_delay(n, None).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(
            retry_delay(0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn a_verdict_is_the_outcome_and_the_services_reason() {
        use crate::push::Refusal;
        assert_eq!(
            LastPush::from(&PushOutcome::Delivered).to_string(),
            "delivered"
        );
        let refusal = Refusal::new(Reason::OTHER, "FCM 500");
        assert_eq!(
            LastPush::from(&PushOutcome::Failed(refusal)).to_string(),
            "failed other"
        );
        let retry = PushOutcome::Retry {
            after: None,
            refusal: Refusal::unanswered("timed out"),
        };
        assert_eq!(LastPush::from(&retry).to_string(), "retry");
    }
}

//! Ringing one call, in four steps a reader can follow:
//!
//! 1. **open**: find the account's devices and open the wait in the broker
//!    (subscribed and stored before any push), noting proxy-registered
//!    devices for their REGISTER;
//! 2. **ring**: start a push schedule per device, each steered by a
//!    [`Course`];
//! 3. **settle**: feed everything that reaches the call (answers, dead
//!    tokens, the cancel, the deadline, shutdown) to its state machine
//!    ([`crate::lifecycle::Call`]) and steer the devices as it says, until
//!    it wakes the PBX; a NAK ends the call in the broker first, whose
//!    record has the last word (the deadline's, the shutdown's, and when
//!    every device is out);
//! 4. **finish**: store the call's end (an ACK's, a cancel's), and tell the
//!    phones still ringing.
//!
//! The state machine decides; this file only carries its events in and its
//! effects out.

use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::log::CallLog;
use super::{by_last_word, schedule, unix_seconds, IncomingCall};
use crate::broker::{device_alias, push_key, BrokerError, News, Opening, Wait};
use crate::lifecycle::{Call, Course, Effect, Event, NakReason, Outcome};
use crate::push::{Payload, PushTarget};
use crate::shutdown::{phase_reached, Phase};
use crate::state::AppState;
use crate::store::{now_millis, Device, EndReason};

/// Rings every device of `call.sip_user_id` and waits for the first of
/// their apps to take the call.
///
/// Dropping this future (the PBX hung up) is a clean exit: the broker ends
/// the call, the call's [`Steering`] tells the phones still ringing
/// `cancelled`, and the wait's guard drops the subscription; unless a PBX
/// retry of the call still waits, here or on another instance, which then
/// rings on.
///
/// A retry joins the call, and waits no longer than it: its wait ends at
/// the call's deadline, past which no answer counts.
pub async fn ring(state: &Arc<AppState>, call: IncomingCall) -> Outcome {
    let mut log = CallLog::start(state, call.sip_user_id);
    let Some(_parked) = state.parking.try_park(state.config.max_pending_calls) else {
        tracing::warn!(
            max = state.config.max_pending_calls,
            "too many parked calls; answering NAK"
        );
        return log.end(Outcome::Nak(NakReason::Overloaded));
    };
    // A draining server whose calls no other instance shares (in process)
    // still takes answers for its parked calls (`http::serve`), and no new
    // call: the drain would last as long as calls kept coming. Parked
    // first, so a drain that counts no parked call has seen this one's
    // answer here.
    if !state.broker.shared() && *state.phase.borrow() != Phase::Serving {
        return log.end(Outcome::Nak(NakReason::Shutdown));
    }
    // Nothing waits past the wait (see `within`); a database or Redis that
    // refuses fails at once.
    let deadline = Instant::from_std(log.started) + state.config.wait();
    let (devices, wait) = match open(state, &call, &mut log, deadline).await {
        Ok(opened) => opened,
        Err(outcome) => return log.end(outcome),
    };
    let deadline = wait
        .call_deadline()
        .map_or(deadline, |call| call.min(deadline));
    let mut ringing = ring_devices(state, &call, devices, wait, &mut log);
    match ringing.settle(state, deadline).await {
        Outcome::Ack => ringing.finish_answered(state, log),
        outcome => ringing.finish_unanswered(state, log, outcome).await,
    }
}

/// Step 1: the account's devices, and the wait opened for them. The wait
/// is open (subscribed, record stored) before any push: a call that cannot
/// be answered is never rung.
async fn open(
    state: &Arc<AppState>,
    call: &IncomingCall,
    log: &mut CallLog,
    deadline: Instant,
) -> Result<(Vec<Device>, Wait), Outcome> {
    let looked_up = state.store.devices(call.sip_user_id);
    let devices = within(state, call, deadline, "store", "device lookup", looked_up).await?;
    if devices.is_empty() {
        return Err(Outcome::Nak(NakReason::NoDevice));
    }
    log.devices(&devices);
    let key = call.call_id.clone().unwrap_or_else(super::random_key);
    let opening = Opening {
        key: &key,
        account: call.sip_user_id,
        devices: log.platforms(),
        until: deadline,
    };
    let opened = state.broker.open(opening);
    let wait = within(state, call, deadline, "broker", "opening the wait", opened).await?;
    log.unique_key = Some(wait.key().to_owned());
    // A ring-group leg whose request crossed the PBX's cancel by its
    // Call-ID: over before it rang, so no phone hears of it.
    if wait.news().ended == Some(EndReason::Cancelled) {
        return Err(Outcome::Nak(NakReason::Cancelled));
    }
    note_aliases(state, &devices, wait.key(), deadline).await;
    Ok((devices, wait))
}

/// Notes each device its SIP proxy registered under its push key, before
/// its push leaves, so its next REGISTER finds the call; within the call's
/// wait. A device not noted still answers through its app.
///
/// A note the broker refused (Redis failing over, a connection cut) is
/// tried again off the call's path ([`note_again`]): a phone with no app
/// to call back (a SIP client woken by RFC 8599 push) answers only by its
/// REGISTER, which comes a phone's wake-up after the push, time enough for
/// a Redis blip to pass.
async fn note_aliases(state: &Arc<AppState>, devices: &[Device], key: &str, deadline: Instant) {
    let now = now_millis();
    let count = devices.len();
    let aliases: Vec<(String, String)> = devices
        .iter()
        .enumerate()
        .filter(|(_, d)| d.registration.proxy_bound(now))
        .map(|(index, d)| {
            let alias = device_alias(d.registration.sip_user_id, &d.registration.token);
            (alias, push_key(key, index, count))
        })
        .collect();
    if aliases.is_empty() {
        return;
    }
    let Ok(refused) = tokio::time::timeout_at(deadline, note(state, aliases, deadline)).await
    else {
        state.metrics.error("broker");
        tracing::warn!("noting proxy-registered devices took the whole wait");
        return;
    };
    let failed: Vec<(String, String)> = refused
        .into_iter()
        .map(|(alias, e)| {
            state.metrics.error("broker");
            tracing::warn!(error = %e, "cannot note a proxy-registered device for its REGISTER; trying again");
            alias
        })
        .collect();
    if !failed.is_empty() {
        tokio::spawn(note_again(state.clone(), failed, deadline));
    }
}

/// Notes each (alias, push key) of `aliases` at once; returns those the
/// broker refused, with why.
async fn note(
    state: &AppState,
    aliases: Vec<(String, String)>,
    deadline: Instant,
) -> Vec<((String, String), BrokerError)> {
    let notes = aliases
        .iter()
        .map(|(alias, push)| state.broker.alias(alias, push, deadline));
    let noted = futures_util::future::join_all(notes).await;
    aliases
        .into_iter()
        .zip(noted)
        .filter_map(|(alias, noted)| Some((alias, noted.err()?)))
        .collect()
}

/// The first pause before a refused note is tried again; it doubles each
/// time, up to [`NOTE_AGAIN_MAX`].
const NOTE_AGAIN_FIRST: std::time::Duration = std::time::Duration::from_millis(50);
const NOTE_AGAIN_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Tries the notes in `failed` (alias, push key) again until each is
/// stored or the call's wait is over; a note stored after its call ended
/// only makes a late REGISTER hear that the call is over.
async fn note_again(state: Arc<AppState>, mut failed: Vec<(String, String)>, deadline: Instant) {
    let mut pause = NOTE_AGAIN_FIRST;
    while !failed.is_empty() {
        let at = Instant::now() + pause;
        if at >= deadline {
            tracing::warn!(
                devices = failed.len(),
                "a proxy-registered device could not be noted within its call's wait; its REGISTER will not answer the call"
            );
            return;
        }
        tokio::time::sleep_until(at).await;
        failed = note(&state, failed, deadline)
            .await
            .into_iter()
            .map(|(alias, _)| alias)
            .collect();
        pause = (pause * 2).min(NOTE_AGAIN_MAX);
    }
    tracing::info!("proxy-registered devices noted for their REGISTER on a later try");
}

/// Step 2: a push schedule per device, each on the course the call steers
/// it; and the call's state machine, which steers them.
fn ring_devices(
    state: &Arc<AppState>,
    call: &IncomingCall,
    devices: Vec<Device>,
    wait: Wait,
    log: &mut CallLog,
) -> Ringing {
    let caller = if call.caller_id.trim().is_empty() {
        call.phonenumber.clone()
    } else {
        call.caller_id.clone()
    };
    let count = devices.len();
    // Never before the call opened, on whichever instance's clock opened
    // it: an answer to a push sent earlier is the call before's.
    let message_start_time = wait.opened().map_or(unix_seconds(), |opened| {
        unix_seconds().max(opened as f64 / 1000.0)
    });
    let (dead_token, died) = mpsc::unbounded_channel();
    let call_key: Arc<str> = Arc::from(wait.key());
    let mut courses = Vec::with_capacity(count);
    for (index, device) in devices.into_iter().enumerate() {
        let (attempts, attempts_seen) = watch::channel(0u32);
        log.attempts(attempts_seen);
        let (course, steered) = watch::channel(Course::Ring);
        courses.push(course);
        let payload = Payload::Call {
            unique_key: push_key(wait.key(), index, count),
            phonenumber: call.phonenumber.clone(),
            caller_id: call.caller_id.clone(),
            response_api: state.response_api.clone(),
            message_start_time,
            attempt: 1,
            call_id: call.call_id.clone(),
        };
        let report = schedule::Report {
            index,
            dead_token: dead_token.clone(),
            attempts,
            last_push: None,
            history: log.history.clone(),
        };
        tokio::spawn(schedule::ring_device(
            state.clone(),
            PushTarget::from(device.registration),
            payload,
            report,
            steered,
            schedule::Joint {
                call: call_key.clone(),
                stamp: wait.stamp(),
                joined: wait.joined(),
                caller: caller.clone(),
            },
            state.parking.schedule(),
        ));
    }
    Ringing {
        state: state.clone(),
        steering: Steering {
            call: Call::ringing(count),
            courses,
            news: wait.subscribe(),
            seen: News::default(),
            died,
            deferred: Vec::new(),
        },
        wait,
        message_start_time,
    }
}

/// A call being rung: its wait in the broker and its steering. Dropped
/// while the call still rings, it steers the hang-up
/// ([`Steering::hang_up`]) and hands it to the broker
/// ([`crate::broker::CallBroker::hang_up`]), which says whether the call
/// is over or a PBX retry parked elsewhere rings on.
struct Ringing {
    state: Arc<AppState>,
    steering: Steering,
    wait: Wait,
    message_start_time: f64,
}

impl Ringing {
    /// Step 3: feeds the call's state machine until it wakes the PBX.
    async fn settle(&mut self, state: &AppState, deadline: Instant) -> Outcome {
        let mut phase = state.phase.subscribe();
        let mut effects = self.steering.absorb(&self.wait.news());
        loop {
            match self.steering.apply(effects) {
                Some(Effect::Wake(outcome)) => return outcome,
                Some(Effect::Confirm(reason)) => {
                    effects = self.confirm(state, reason).await;
                    continue;
                }
                _ => {}
            }
            effects = tokio::select! {
                news = self.wait.changed() => self.steering.absorb(&news),
                Some(device) = self.steering.died.recv() => self.steering.call.step(Event::Dead { device }),
                _ = tokio::time::sleep_until(deadline) => self.last_word(state, Event::Timeout).await,
                _ = phase_reached(&mut phase, |p| *p == Phase::Aborting) => self.last_word(state, Event::Shutdown).await,
            };
        }
    }

    /// The wait ran out, or the server must stop: ends the call in the
    /// broker first, for an answer may have won it just as the timer fired
    /// (and the app that gave it was told so); then the event.
    async fn last_word(&mut self, state: &AppState, event: Event) -> Vec<Effect> {
        let reason = match event {
            Event::Timeout => EndReason::TimedOut,
            _ => EndReason::Failed,
        };
        // Whether a PBX retry of the call still rings it here: then this
        // request neither ends the call nor tells the phones.
        let last = self.wait.stop_ringing();
        let mut effects = self.stored_end(state, reason).await;
        effects.extend(self.steering.leave(event, last));
        effects
    }

    /// Every device is out (declined, or its token died): ends the call in
    /// the broker first, for a device whose token died after its push
    /// reached the phone may have taken it there meanwhile (and its app
    /// was told 202); then NAK, for `reason` (see [`Effect::Confirm`]).
    async fn confirm(&mut self, state: &AppState, reason: NakReason) -> Vec<Effect> {
        let ended = Outcome::Nak(reason).end_reason();
        let mut effects = self.stored_end(state, ended).await;
        // What reached the wait meanwhile, which the end's record does not
        // show where the broker did not end the call (a PBX retry rings it
        // here too) or did not answer in time.
        effects.extend(self.steering.absorb(&self.wait.news()));
        effects.extend(self.steering.call.step(Event::Confirmed));
        effects
    }

    /// Ends the call in the broker for `reason`; steps what its record
    /// held that had not reached the call yet: the answers, and a cancel.
    /// The end confirms a NAK those answers leave ([`Effect::Confirm`]).
    async fn stored_end(&mut self, state: &AppState, reason: EndReason) -> Vec<Effect> {
        let Some(before) = end_in_broker(state, &self.wait, reason).await else {
            return Vec::new();
        };
        let call = &mut self.steering.call;
        let stored = before.devices.iter().map(|device| device.answer);
        // Cancelled elsewhere, and the message lost (a cut connection):
        // the phones hear `cancelled`, as they would have.
        let cancelled = before.phase == crate::lifecycle::Phase::Ended(EndReason::Cancelled);
        let mut effects = step_answers(call, stored, cancelled);
        if effects.iter().any(|e| matches!(e, Effect::Confirm(_))) {
            effects.extend(call.step(Event::Confirmed));
        }
        effects
    }

    /// Step 4 for an answered call: the PBX hears ACK first; the other
    /// phones' notices, the log line, the tombstone and the wait's release
    /// follow in a task of their own, which this worker runs once this
    /// task has written the ACK: handed to the winning answer when it
    /// waits for it here (see [`super::handoff`]), else spawned.
    fn finish_answered(mut self, state: &Arc<AppState>, mut log: CallLog) -> Outcome {
        self.observe_wakeup(state, &mut log, Outcome::Ack);
        log.end(Outcome::Ack);
        let winner = self
            .steering
            .call
            .winner()
            .map(|device| push_key(self.wait.key(), device, self.steering.courses.len()));
        let handoffs = &state.handoffs;
        let state = state.clone();
        let follow_up = Box::pin(async move {
            self.steering.steer_deferred();
            drop(log);
            // Ended before the wait is released, or the release would end
            // it again, as a hang-up.
            if let Err(e) = state
                .broker
                .end(&self.wait, EndReason::AnsweredElsewhere)
                .await
            {
                state.metrics.error("broker");
                tracing::warn!(error = %e, "cannot store the end of an answered call; its record expires by itself");
            }
            drop(self);
        });
        match winner {
            Some(push_key) => handoffs.hand_over(&push_key, follow_up),
            None => drop(tokio::spawn(follow_up)),
        }
        Outcome::Ack
    }

    /// Step 4 for a call that ended NAK: its tombstone (stored already
    /// when the wait ran out or every device was out; stored again for a
    /// cancel), and the log line.
    async fn finish_unanswered(
        self,
        state: &AppState,
        mut log: CallLog,
        outcome: Outcome,
    ) -> Outcome {
        self.observe_wakeup(state, &mut log, outcome);
        if outcome == Outcome::Nak(NakReason::Cancelled) {
            end_in_broker(state, &self.wait, outcome.end_reason()).await;
        }
        log.end(outcome)
    }

    /// The wake-up latency (from the answer that settled the call reaching
    /// us to the PBX waking) and, for an ACK, the device that took it.
    fn observe_wakeup(&self, state: &AppState, log: &mut CallLog, outcome: Outcome) {
        let answers = &self.steering.seen.answers;
        let settling = match outcome {
            Outcome::Ack => {
                let winner = self.steering.call.winner();
                let received_at = winner
                    .and_then(|w| answers.get(w).copied().flatten())
                    .and_then(|a| a.received_at);
                if let Some(winner) = winner {
                    log.answered(winner, received_at, self.message_start_time);
                }
                received_at
            }
            Outcome::Nak(NakReason::NotAvailable) => {
                answers.iter().flatten().filter_map(|a| a.received_at).max()
            }
            Outcome::Nak(_) => None,
        };
        if let Some(latency) = settling.and_then(|at| at.elapsed().ok()) {
            state.metrics.wakeup_latency.observe(latency.as_secs_f64());
        }
    }
}

/// Ends the call `wait` waits on in the broker for `reason`, within
/// [`super::LAST_WORD`]; its record before, when the broker had one and answered
/// in time.
async fn end_in_broker(
    state: &AppState,
    wait: &Wait,
    reason: EndReason,
) -> Option<crate::lifecycle::Record> {
    match by_last_word(state.broker.end(wait, reason)).await {
        Ok(before) => before,
        Err(e) => {
            state.metrics.error("broker");
            tracing::warn!(error = %e, "cannot store the end of a call; its record expires by itself");
            None
        }
    }
}

/// Steps each device's answer (`Some(available)`) in `answers`, by device
/// index, into `call`: its declines first, then its take. The broker takes
/// no answer once a phone has won the call, so a decline it holds beside
/// the win came first; stepped after the win, the declining phone would
/// be told `answered_elsewhere`, as if it were still ringing. Two answers
/// reach a call at once when the subscriber reads both messages in one go,
/// or the fallback check or the record reads them together.
fn answers_in_order(
    call: &mut Call,
    answers: impl Iterator<Item = Option<bool>> + Clone,
) -> Vec<Effect> {
    let mut effects = Vec::new();
    for take in [false, true] {
        for (device, answer) in answers.clone().enumerate() {
            if answer == Some(take) {
                effects.extend(call.step(Event::Answer {
                    device,
                    available: take,
                }));
            }
        }
    }
    effects
}

/// Steps the devices' answers ([`answers_in_order`]), then the call's
/// cancel if `cancelled`: what news, or a stored record, brings a call.
fn step_answers(
    call: &mut Call,
    answers: impl Iterator<Item = Option<bool>> + Clone,
    cancelled: bool,
) -> Vec<Effect> {
    let mut effects = answers_in_order(call, answers);
    if cancelled {
        effects.extend(call.step(Event::Cancel));
    }
    effects
}

/// The call's state machine and the devices it steers.
struct Steering {
    call: Call,
    courses: Vec<watch::Sender<Course>>,
    /// The wait's news, read once more on a hang-up.
    news: watch::Receiver<News>,
    /// The news fed to the state machine so far.
    seen: News,
    /// Device indexes whose token the push service declared dead.
    died: mpsc::UnboundedReceiver<usize>,
    /// Steering held back until the PBX has heard its ACK.
    deferred: Vec<(usize, Course)>,
}

impl Steering {
    /// Feeds the wait's news to the state machine: the devices' answers
    /// ([`answers_in_order`]), then the cancel. A device's answer steps the
    /// machine once; a repeat moves nothing.
    fn absorb(&mut self, news: &News) -> Vec<Effect> {
        let answers = news.answers.iter().map(|a| a.map(|a| a.available));
        let effects = step_answers(&mut self.call, answers, news.ended.is_some());
        self.seen = news.clone();
        effects
    }

    /// Steers the devices; returns what is left for the call's holder to
    /// do, if the effects say so: the PBX to wake ([`Effect::Wake`]), else
    /// the end to confirm ([`Effect::Confirm`]). After an ACK the steering
    /// waits ([`Steering::steer_deferred`]): nothing comes before the
    /// PBX's ACK.
    fn apply(&mut self, effects: Vec<Effect>) -> Option<Effect> {
        let outcome = effects.iter().find_map(|effect| match effect {
            Effect::Wake(outcome) => Some(*outcome),
            _ => None,
        });
        let next = outcome.map(Effect::Wake).or_else(|| {
            effects
                .iter()
                .find(|effect| matches!(effect, Effect::Confirm(_)))
                .copied()
        });
        for effect in effects {
            if let Effect::Steer(device, course) = effect {
                if outcome == Some(Outcome::Ack) {
                    self.deferred.push((device, course));
                } else {
                    self.steer(device, course);
                }
            }
        }
        next
    }

    fn steer(&self, device: usize, course: Course) {
        if let Some(sender) = self.courses.get(device) {
            sender.send_replace(course);
        }
    }

    fn steer_deferred(&mut self) {
        for (device, course) in std::mem::take(&mut self.deferred) {
            self.steer(device, course);
        }
    }
}

impl Steering {
    /// Steps `event`, by which this request lets go of the call (a
    /// hang-up, its wait running out, the shutdown). `last`: whether it
    /// was the last of this process's requests ringing the call; if not, a
    /// PBX retry rings on, the call is not over, and no phone is told it
    /// is: this request's pushes just stop.
    fn leave(&mut self, event: Event, last: bool) -> Vec<Effect> {
        let mut effects = self.call.step(event);
        if !last {
            for effect in &mut effects {
                if let Effect::Steer(_, course @ Course::Tell(_)) = effect {
                    *course = Course::Stop;
                }
            }
        }
        effects
    }

    /// The request is gone (the PBX hung up, and hyper dropped the call's
    /// future mid-wait) while the call rang: steers whatever news had
    /// reached the wait, then the hang-up; `last` as for
    /// [`Steering::leave`]. Returns the hang-up's notices, held back: the
    /// phones are told only once the broker says that the call is over.
    fn hang_up(&mut self, last: bool) -> Vec<(usize, Course)> {
        let mut notices = Vec::new();
        if self.call.over().is_none() {
            let news = self.news.borrow().clone();
            let mut effects = self.absorb(&news);
            while let Ok(device) = self.died.try_recv() {
                effects.extend(self.call.step(Event::Dead { device }));
            }
            for effect in effects {
                if let Effect::Steer(device, course) = effect {
                    self.steer(device, course);
                }
            }
            for effect in self.leave(Event::HangUp, last) {
                match effect {
                    Effect::Steer(device, course @ Course::Tell(_)) => {
                        notices.push((device, course));
                    }
                    Effect::Steer(device, course) => self.steer(device, course),
                    Effect::Wake(_) | Effect::Confirm(_) => {}
                }
            }
        }
        self.steer_deferred();
        notices
    }
}

impl Drop for Ringing {
    fn drop(&mut self) {
        let last = self.wait.stop_ringing();
        let notices = self.steering.hang_up(last);
        if notices.is_empty() {
            return;
        }
        // Over unless a PBX retry parked on another instance still rings
        // the call; then that request's phones are not told it is.
        let mut over = self.state.broker.hang_up(&self.wait);
        let courses = std::mem::take(&mut self.steering.courses);
        let state = self.state.clone();
        let tell = move |over: Result<bool, BrokerError>| {
            let over = over.unwrap_or_else(|e| {
                state.metrics.error("broker");
                tracing::warn!(error = %e, "cannot store the end of a call whose PBX hung up; its record expires by itself");
                true
            });
            for (device, course) in notices {
                if let Some(sender) = courses.get(device) {
                    sender.send_replace(if over { course } else { Course::Stop });
                }
            }
        };
        match (&mut over).now_or_never() {
            Some(over) => tell(over),
            None => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    // The broker's part runs to its end; the phones wait
                    // for it no longer than a last word (their pushes go on
                    // meanwhile).
                    let over = runtime.spawn(over);
                    drop(runtime.spawn(async move {
                        let over = over.map(|ran| {
                            ran.unwrap_or_else(|e| Err(BrokerError::Unavailable(e.to_string())))
                        });
                        tell(by_last_word(over).await);
                    }));
                }
                Err(_) => tell(Ok(true)),
            },
        }
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
    deadline: Instant,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Course;

    /// Phone 2's decline and phone 1's take reach the call together (one
    /// read of the subscriber, the fallback check, the record): phone 2 is
    /// out, not told that phone 1 took the call, whatever their order by
    /// index.
    #[test]
    fn a_decline_that_reaches_the_call_with_the_take_is_stepped_first() {
        for answers in [[Some(true), Some(false)], [Some(false), Some(true)]] {
            let mut call = Call::ringing(2);
            let effects = answers_in_order(&mut call, answers.into_iter());
            assert!(
                effects.contains(&Effect::Wake(Outcome::Ack)),
                "{answers:?}: {effects:?}"
            );
            let decliner = answers.iter().position(|a| *a == Some(false)).unwrap();
            let told = effects
                .iter()
                .any(|e| matches!(e, Effect::Steer(d, Course::Tell(_)) if *d == decliner));
            assert!(
                !told,
                "{answers:?}: the decliner is told nothing: {effects:?}"
            );
            assert_eq!(call.winner(), answers.iter().position(|a| *a == Some(true)));
        }
    }
}

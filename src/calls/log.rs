//! One call's log line, its metrics and its history row: written once on
//! every way out of the call, the PBX hanging up (the call's future dropped
//! mid-wait) included.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::history::HistoryRow;
use crate::lifecycle::Outcome;
use crate::logs::{short_token, Escaped};
use crate::state::AppState;
use crate::store::{now_millis, Device, Platform};

/// What one call leaves behind once it ends; written on drop.
pub(super) struct CallLog {
    state: Arc<AppState>,
    sip_user_id: i64,
    pub started: Instant,
    pub unique_key: Option<String>,
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
    pub history: Option<Arc<HistoryRow>>,
}

impl CallLog {
    pub fn start(state: &Arc<AppState>, sip_user_id: i64) -> CallLog {
        CallLog {
            state: state.clone(),
            sip_user_id,
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
                sip_user_id,
            ),
        }
    }

    /// Notes the devices the call rings.
    pub fn devices(&mut self, devices: &[Device]) {
        self.platforms = devices.iter().map(|d| d.registration.platform).collect();
        if let Some(history) = &self.history {
            history.devices(
                devices
                    .iter()
                    .map(|d| (d.registration.platform, short_token(&d.registration.token))),
            );
        }
    }

    pub fn platforms(&self) -> &[Platform] {
        &self.platforms
    }

    /// Notes a device's count of accepted pushes, as its schedule reports it.
    pub fn attempts(&mut self, attempts: watch::Receiver<u32>) {
        self.attempts.push(attempts);
    }

    /// Notes the device whose answer took the call, and the roundtrip its
    /// app reported (none for an answer learnt from the stored record).
    pub fn answered(&mut self, device: usize, received_at: Option<SystemTime>, started: f64) {
        let roundtrip = received_at.map(|at| roundtrip_ms(started, at));
        self.answered_by = Some((device, roundtrip));
    }

    pub fn end(&mut self, outcome: Outcome) -> Outcome {
        self.outcome = Some(outcome);
        outcome
    }
}

impl Drop for CallLog {
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

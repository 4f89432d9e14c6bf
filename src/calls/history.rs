//! A call's row in the call history, filled in by everyone who knows a part
//! of it: the call (its outcome, its wait, who answered) and each device's
//! push schedule (how many pushes it sent, what the service said to the
//! last). The app may answer before the push service has replied to the
//! push that woke it, so the call cannot write the row alone when it ends:
//! the row is queued when the last of them lets go of it, with no task or
//! timer of its own, and the history's shutdown waits for it ([`Promise`]).

use std::sync::{Arc, Mutex};

use crate::store::{CallHistoryEntry, CalledDevice, Platform, Promise};

/// The row being filled in; shared as `Arc<HistoryRow>` by the call and
/// its devices' schedules.
pub(super) struct HistoryRow {
    row: Mutex<CallHistoryEntry>,
    promise: Option<Promise<CallHistoryEntry>>,
}

impl HistoryRow {
    /// A row for the call that started at `created_at` (Unix ms) on
    /// `sip_user_id`, or `None` when the history keeps nothing or has
    /// written its last row (shutting down).
    pub fn start(
        history: &crate::store::CallHistory,
        keep: bool,
        created_at: i64,
        sip_user_id: i64,
    ) -> Option<Arc<HistoryRow>> {
        if !keep {
            return None;
        }
        let promise = history.promise()?;
        Some(Arc::new(HistoryRow {
            row: Mutex::new(CallHistoryEntry {
                created_at,
                sip_user_id,
                ..CallHistoryEntry::default()
            }),
            promise: Some(promise),
        }))
    }

    /// Changes the row (the call's part of it).
    pub fn fill(&self, fill: impl FnOnce(&mut CallHistoryEntry)) {
        fill(&mut self.row.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The devices looked up, before any is pushed: a shortened token each.
    pub fn devices(&self, devices: impl Iterator<Item = (Platform, String)>) {
        self.fill(|row| {
            row.devices = devices
                .map(|(platform, token)| CalledDevice {
                    platform,
                    token,
                    attempts: 0,
                    verdict: None,
                })
                .collect();
        });
    }

    /// What device `index`'s schedule came to, once its call pushes are over.
    pub fn pushed(&self, index: usize, attempts: u32, verdict: Option<String>) {
        self.fill(|row| {
            if let Some(device) = row.devices.get_mut(index) {
                device.attempts = attempts;
                device.verdict = verdict;
            }
        });
    }
}

impl Drop for HistoryRow {
    /// The last holder let go: the row is complete.
    fn drop(&mut self) {
        if let Some(promise) = self.promise.take() {
            let row = self.row.get_mut().unwrap_or_else(|p| p.into_inner());
            promise.record(std::mem::take(row));
        }
    }
}

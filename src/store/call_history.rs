//! The call history: a row per incoming call, written off the call path and
//! in batches ([`BatchWriter`]), so ringing a phone never waits on it; and
//! the periodic purge that keeps it, and what the apps reported about the
//! calls (the response log, hangup reasons), to `--call-history-days`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::batch::BatchWriter;
use super::{now_millis, CallHistoryEntry, Store};
use crate::shutdown::{phase_reached, Phase};

/// The call history's writer.
pub type CallHistory = BatchWriter<CallHistoryEntry>;

impl CallHistory {
    /// Starts the writer task.
    pub fn start(store: Arc<dyn Store>) -> Self {
        BatchWriter::new("call history", store, |store, rows| store.log_calls(rows))
    }
}

/// How often the purge runs (and once at start-up): rows live at most this
/// much longer than the retention, and each run deletes an hour's calls.
pub const PURGE_EVERY: Duration = Duration::from_secs(3600);

const DAY_MS: i64 = 86_400_000;

/// The oldest `created_at` kept at `now` (Unix ms) when calls are kept
/// `days` days: rows started before it go. With 0 days nothing is kept:
/// the cutoff is `now` itself.
pub fn history_cutoff(now: i64, days: u32) -> i64 {
    now.saturating_sub(i64::from(days).saturating_mul(DAY_MS))
}

/// Deletes the calls, and the apps' reports, older than `days` days at
/// start-up and every [`PURGE_EVERY`] after, until the server stops
/// serving. Without it the reports' tables grew for as long as the
/// database lived, one row or two per call. A failed run is logged; the
/// next one catches up.
pub async fn purge_periodically(
    store: Arc<dyn Store>,
    days: u32,
    mut phase: watch::Receiver<Phase>,
) {
    loop {
        let cutoff = history_cutoff(now_millis(), days);
        match store.purge_calls(cutoff).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, days, "old call history deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot delete old call history"),
        }
        match store.purge_reports(cutoff).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, days, "old app reports deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot delete old app reports"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PURGE_EVERY) => {}
            _ = phase_reached(&mut phase, |p| *p != Phase::Serving) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cutoff_is_the_retention_before_now() {
        let now = 1_700_000_000_000;
        assert_eq!(history_cutoff(now, 14), now - 14 * DAY_MS);
        assert_eq!(history_cutoff(now, 0), now, "0 days keeps nothing");
        assert_eq!(history_cutoff(i64::MIN + 1, u32::MAX), i64::MIN);
    }
}

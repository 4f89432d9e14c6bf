//! The fallback check: one `MGET` for every unsettled call waited on here
//! (one per slot on a cluster), every poll interval, but only while the subscription is not known good
//! (down, for [`UNSURE_WINDOW`] after a reconnect, or for
//! [`CLUSTER_SETTLING`] after a cluster node's connection dropped or a
//! cluster command failed). A healthy subscription loses no message (Redis
//! delivers pub/sub over one TCP connection, in order), so parked calls then
//! cost Redis no command at all, however many they are.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::watch;

use super::keys::{meta_key, stamp_of, state_key};
use super::{direct::slot, Shared, BATCH};
use crate::broker::{BrokerError, Record, Stamp};
use crate::logs::Escaped;

/// How long after a reconnect or a dropped node connection the fallback
/// check keeps running: covers answers published into the gap.
const UNSURE_WINDOW: Duration = Duration::from_secs(5);

/// How many slots' `MGET`s one fallback check on a cluster has in flight.
const SLOTS_AT_ONCE: usize = 32;

/// How long after a cluster node's connection dropped the fallback check
/// keeps running. A failover takes the cluster's node timeout plus an
/// election (15-20 s with Redis's default `cluster-node-timeout`), and the
/// redis crate resubscribes on the promoted replica only once it has
/// refreshed its slot map: an answer published on the new master before
/// that reaches nobody, and only the stored state tells. 5 s was too short
/// even for a 1.5 s node timeout (a failover test lost such an answer in 1
/// of 30 runs).
pub(super) const CLUSTER_SETTLING: Duration = Duration::from_secs(30);

/// Runs the fallback check every poll interval while it is needed.
pub(super) async fn fallback_check(shared: Weak<Shared>, mut stop: watch::Receiver<()>) {
    let Some(interval) = shared.upgrade().map(|s| s.options.poll_interval) else {
        return;
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if !shared.needs_fallback() {
            continue;
        }
        if let Err(e) = shared.check_stored().await {
            tracing::debug!(error = %e, "fallback check failed");
        }
    }
}

impl Shared {
    /// Messages may have been lost just now (a reconnect): run the fallback
    /// check for a while.
    pub(super) fn mark_unsure(&self) {
        self.mark_unsure_for(UNSURE_WINDOW);
    }

    /// Runs the fallback check for at least `window` from now.
    pub(super) fn mark_unsure_for(&self, window: Duration) {
        let until = Instant::now() + window;
        let mut unsure = self.unsure_until.lock().expect("unsure lock poisoned");
        *unsure = Some(unsure.map_or(until, |current| current.max(until)));
    }

    /// Whether the fallback check must run: only while the subscription is
    /// not known good.
    fn needs_fallback(&self) -> bool {
        if !self.subscriptions.up() {
            return true;
        }
        let mut unsure = self.unsure_until.lock().expect("unsure lock poisoned");
        match *unsure {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                *unsure = None;
                false
            }
            None => false,
        }
    }

    /// The fallback check: the record of every call waited on here that
    /// may still change, in one `MGET` on one server. On a cluster one
    /// `MGET` per slot, each on its own: a multi-slot `MGET` fails as a
    /// whole while any shard is down, and a shard failing over is exactly
    /// when the other shards' lost messages must still be found.
    pub(super) async fn check_stored(&self) -> Result<(), BrokerError> {
        let mut keys = self.waiters.unsettled();
        let groups: Vec<&[(Arc<str>, Option<Stamp>)]> = if self.is_cluster() {
            keys.sort_by_cached_key(|(k, _)| slot(state_key(k).as_bytes()));
            keys.chunk_by(|(a, _), (b, _)| {
                slot(state_key(a).as_bytes()) == slot(state_key(b).as_bytes())
            })
            .flat_map(|same_slot| same_slot.chunks(BATCH))
            .collect()
        } else {
            keys.chunks(BATCH).collect()
        };
        let reads: Vec<_> = groups.into_iter().map(|g| self.read_stored(g)).collect();
        let read: Vec<Result<(), BrokerError>> = futures_util::stream::iter(reads)
            .buffer_unordered(SLOTS_AT_ONCE)
            .collect()
            .await;
        read.into_iter().find(Result::is_err).unwrap_or(Ok(()))
    }

    /// Reads the records of `keys` (one slot's on a cluster), with their
    /// metas, and hands each to its waiters if it is the call they wait
    /// on: a newer call under a reused key is not (its stamp differs), nor
    /// is anything to a slot opened under the key since it was listed.
    pub(super) async fn read_stored(
        &self,
        keys: &[(Arc<str>, Option<Stamp>)],
    ) -> Result<(), BrokerError> {
        let names: Vec<String> = keys
            .iter()
            .flat_map(|(k, _)| [state_key(k), meta_key(k)])
            .collect();
        let values: Vec<Option<String>> = self.query(redis::cmd("MGET").arg(&names)).await?;
        for ((key, listed), stored) in keys.iter().zip(values.chunks(2)) {
            let [record, meta] = stored else {
                continue;
            };
            let Some(state) = record.as_deref().and_then(Record::decode) else {
                continue;
            };
            let stamp = stamp_of(&state, meta.as_deref());
            if listed.is_some() && stamp.is_some() && stamp != *listed {
                continue;
            }
            tracing::trace!(unique_key = %Escaped(key), "fallback check read a record");
            self.waiters.deliver_stored(key, *listed, &state);
        }
        Ok(())
    }
}

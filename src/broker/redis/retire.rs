//! The retirer: for finished waits, ends the calls nobody ended (the PBX
//! hung up: `cancelled`) and unsubscribes their channels, batching whatever
//! piled up meanwhile, off the call path. Records are not deleted: each
//! stays as a tombstone until its TTL, so a late answer learns why.

use std::sync::{Arc, Weak};

use tokio::sync::mpsc;

use super::keys::channel;
use super::{Shared, BATCH};
use crate::broker::{Holds, Stamp};
use crate::logs::Escaped;

/// A key whose last local waiter left; when its call is to be ended
/// `cancelled` (the PBX hung up), this process's holds on it to take back
/// (see [`super::keys::holders_key`]: a PBX retry held elsewhere rings
/// on); and the call's stamp.
pub(super) type Retired = (Arc<str>, Option<Holds>, Option<Stamp>);

pub(super) async fn retirer(shared: Weak<Shared>, mut retired: mpsc::UnboundedReceiver<Retired>) {
    while let Some(first) = retired.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match retired.try_recv() {
                Ok(key) => batch.push(key),
                Err(_) => break,
            }
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // A hang-up's holds are its own, even on a key that a new request
        // here waits on again.
        let hung_up = batch.iter().filter_map(|(key, holds, stamp)| {
            let (shared, holds) = (&shared, holds.as_ref()?);
            Some(async move {
                if let Err(e) = shared.leave(key, holds, *stamp).await {
                    tracing::warn!(unique_key = %Escaped(key), error = %e, "cannot end a call whose PBX hung up; its record expires by itself");
                }
            })
        });
        futures_util::future::join_all(hung_up).await;
        // A key somebody here started waiting on again is not ours to drop.
        batch.retain(|(key, _, _)| !shared.waiters.contains(key));
        if batch.is_empty() {
            continue;
        }
        let channels = batch.iter().map(|(k, _, _)| channel(k)).collect();
        shared
            .subscriptions
            .unsubscribe(channels, shared.options.acquire_timeout)
            .await;
        // A new wait on one of these keys may have subscribed while the
        // round trips above were under way, and the unsubscribe just took
        // its subscription away: subscribe it again, and let the fallback
        // check cover what was published in between.
        let back: Vec<&Arc<str>> = batch
            .iter()
            .map(|(key, _, _)| key)
            .filter(|key| shared.waiters.contains(key))
            .collect();
        if !back.is_empty() {
            shared.mark_unsure();
            for key in back {
                if let Err(e) = shared
                    .subscriptions
                    .subscribe(channel(key), shared.options.acquire_timeout)
                    .await
                {
                    tracing::warn!(unique_key = %Escaped(key), error = %e, "cannot subscribe again a call's channel; the fallback check covers it");
                }
            }
        }
    }
}

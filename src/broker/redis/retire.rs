//! The retirer: deletes the state keys of finished waits and unsubscribes
//! their channels, batching whatever piled up meanwhile into one command of
//! each, off the call path.

use std::sync::{Arc, Weak};

use tokio::sync::mpsc;

use super::keys::{channel, state_key};
use super::{Shared, BATCH};

pub(super) async fn retirer(shared: Weak<Shared>, mut retired: mpsc::UnboundedReceiver<Arc<str>>) {
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
        // A key somebody here started waiting on again is not ours to drop.
        batch.retain(|key| !shared.waiters.contains(key));
        if batch.is_empty() {
            continue;
        }
        let names: Vec<String> = batch.iter().map(|k| state_key(k)).collect();
        if let Err(e) = shared.query::<()>(redis::cmd("DEL").arg(&names)).await {
            tracing::warn!(error = %e, keys = names.len(), "cannot delete finished calls; their TTL will expire them");
        }
        let channels = batch.iter().map(|k| channel(k)).collect();
        shared
            .subscriptions
            .unsubscribe(channels, shared.options.acquire_timeout)
            .await;
    }
}

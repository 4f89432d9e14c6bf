//! Putting back what Redis lost of the calls parked here.
//!
//! A call parked here has keys in Redis that the rest of the system needs
//! while its PBX request waits: its ringing record and meta (the app's
//! answer, through any instance), its device pointers (an answer to one
//! device's push key), its devices' aliases (the REGISTER of a device its
//! proxy reports) and its leg under the Call-ID (a cancel by Call-ID). Redis
//! can lose them while the call still rings, and then the answer gets 404,
//! the REGISTER finds no call, and the call ends NAK at its wait although
//! the phone answered in time:
//!
//! - **one server restarted without persistence**: the subscriber connection
//!   drops with it; when it connects again it stores the keys again
//!   ([`restore_pending`]) before the broker says it is ready;
//! - **a cluster master failed over**: Redis replicates asynchronously, so
//!   the writes of a master's last moments, acknowledged to this process,
//!   may never reach the replica that takes its slots. Nothing says which
//!   writes were lost, so after any sign of a failover (a node connection
//!   dropped, a command failed, the cluster connection replaced) the
//!   [`restorer`] stores every parked call's keys again, one pipeline per
//!   slot, and tries again the slots whose shard was not back yet (after 1
//!   s, the waits doubling up to 8 s), until each took them or
//!   [`CLUSTER_SETTLING`] has passed.
//!
//! This process knows every call it waits on and has opened
//! ([`crate::broker::Waiters::pending`]); putting its keys back costs one
//! `SET NX` a key (a `SADD` for a leg). `NX` keeps what Redis still has (the
//! connection dropped but Redis did not), so an answered or ended call never
//! rings again. Each key expires with its wait, as when it was first stored.
//! An answer that was lost with the keys stays lost: the call rings on until
//! the phone answers again or its wait ends.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::direct::slot;
use super::fallback::CLUSTER_SETTLING;
use super::keys::{self, meta_key, state_key};
use super::subscriber::sleep_or_stop;
use super::{push_key, Shared, Stored, BATCH};
use crate::broker::{deadline_millis, BrokerError, Pending, Record};
use crate::logs::Escaped;

/// How long after a sign of a failover the restorer first stores the keys,
/// and then first tries again the slots it could not reach: a failover
/// takes the cluster's node timeout and an election, seconds.
const RESTORE_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two tries, the waits doubling from
/// [`RESTORE_FIRST`]: a shard down for long, or commands timing out under
/// load (also a sign), must not have every parked call's keys written every
/// second.
const RESTORE_MAX: Duration = Duration::from_secs(8);

/// How many slots' pipelines one pass has in flight.
const SLOTS_AT_ONCE: usize = 32;

/// One key a parked call needs, and the command that stores it again where
/// Redis has none.
struct Restore {
    name: String,
    command: redis::Cmd,
    /// Whether its reply tells that it stored something (`SET NX`), rather
    /// than being ignored (a leg's `SADD` and `PEXPIRE`).
    counted: bool,
}

/// Every key the calls `calls` need, each with its command.
fn restores(calls: &[Pending]) -> Vec<Restore> {
    let mut all = Vec::new();
    for call in calls {
        let set = |name: String, value: String| Restore {
            command: keys::set_missing(name.clone(), value, call.until),
            name,
            counted: true,
        };
        // The record as it was stored: its deadline is the call's stamp,
        // which the call's news carry and its end names.
        let stamp = call.stamp.unwrap_or_else(|| deadline_millis(call.until));
        let record = Record::ringing(&call.devices, stamp).encode();
        all.push(set(state_key(&call.key), record));
        all.push(set(meta_key(&call.key), keys::meta(call.account, stamp)));
        let count = call.devices.len();
        for index in (0..count).filter(|_| count > 1) {
            let push = push_key(&call.key, index, count);
            all.push(set(state_key(&push), Stored::pointer(&call.key, index)));
        }
        for (alias, push) in &call.aliases {
            all.push(set(keys::alias_key(alias), push.clone()));
        }
        if let Some(call_id) = &call.leg_of {
            for command in keys::note_leg(call_id, &call.key, call.until).cmd_iter() {
                all.push(Restore {
                    name: keys::legs_key(call_id),
                    command: command.clone(),
                    counted: false,
                });
            }
        }
    }
    all
}

/// The commands of `restores` in one pipeline, the uncounted replies
/// ignored, and the names of the keys whose replies are kept, in order.
fn pipeline(restores: Vec<Restore>) -> (redis::Pipeline, Vec<String>) {
    let mut pipe = redis::pipe();
    let mut counted = Vec::new();
    for restore in restores {
        pipe.add_command(restore.command);
        if restore.counted {
            counted.push(restore.name);
        } else {
            pipe.ignore();
        }
    }
    (pipe, counted)
}

/// How many keys of `names` the `SET NX` replies say were stored, each
/// logged (at debug) for whoever must tell which calls a failure touched.
fn stored(names: &[String], replies: &[Option<String>]) -> usize {
    let mut stored = 0;
    for (name, _) in names.iter().zip(replies).filter(|(_, r)| r.is_some()) {
        tracing::debug!(key = %Escaped(name), "stored again a key Redis had lost");
        stored += 1;
    }
    stored
}

/// One server: stores again every key of the calls parked here that Redis
/// has not got, and says how many it stored. Called each time the
/// subscriber connection connects again, before the broker says it is
/// ready.
pub(super) async fn restore_pending(shared: &Shared) -> Result<usize, BrokerError> {
    let mut restored = 0;
    for chunk in shared.waiters.pending().chunks(BATCH) {
        let (pipe, names) = pipeline(restores(chunk));
        let replies: Vec<Option<String>> = shared.pipeline(&pipe).await?;
        restored += stored(&names, &replies);
    }
    if restored > 0 {
        tracing::warn!(
            restored,
            "Redis had lost keys of calls parked here; stored them again"
        );
    }
    Ok(restored)
}

/// A cluster: stores again every key of the calls parked here that the
/// cluster has not got, one pipeline per slot (a cluster pipeline stays in
/// one slot), of every slot or of `only`'s. Returns how many keys it stored
/// and the slots it could not reach.
async fn restore_slots(shared: &Shared, only: Option<&HashSet<u16>>) -> (usize, HashSet<u16>) {
    let mut by_slot: HashMap<u16, Vec<Restore>> = HashMap::new();
    for restore in restores(&shared.waiters.pending()) {
        let at = slot(restore.name.as_bytes());
        if only.is_none_or(|only| only.contains(&at)) {
            by_slot.entry(at).or_default().push(restore);
        }
    }
    let bound = shared.options.acquire_timeout * 2;
    let passes = by_slot.into_iter().map(|(at, restores)| async move {
        let (pipe, names) = pipeline(restores);
        let mut conn = shared.link.conn();
        // Not through `Shared::pipeline`: a failure here is expected while
        // the shard fails over, and must not call for another pass.
        let replies =
            tokio::time::timeout(bound, pipe.query_async::<Vec<Option<String>>>(&mut conn));
        let replies = replies.await.ok().and_then(Result::ok);
        (at, replies.map(|replies| stored(&names, &replies)))
    });
    let mut passes = futures_util::stream::iter(passes).buffer_unordered(SLOTS_AT_ONCE);
    let (mut restored, mut missed) = (0, HashSet::new());
    while let Some((at, replies)) = passes.next().await {
        match replies {
            Some(stored) => restored += stored,
            None => {
                missed.insert(at);
            }
        }
    }
    (restored, missed)
}

/// A cluster's restorer: woken by `due` at any sign of a failover
/// ([`Shared::failover_suspected`]), it stores every parked call's keys
/// again ([`restore_slots`]), then the slots it could not reach, until every
/// slot took them or [`CLUSTER_SETTLING`] has passed. A sign that comes
/// meanwhile makes one more pass afterwards.
pub(super) async fn restorer(
    shared: Weak<Shared>,
    due: Arc<Notify>,
    mut stop: watch::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = due.notified() => {}
            _ = stop.changed() => return,
        }
        let give_up = Instant::now() + CLUSTER_SETTLING;
        let (mut only, mut pause) = (None, RESTORE_FIRST);
        loop {
            if !sleep_or_stop(pause, &mut stop).await {
                return;
            }
            pause = (pause * 2).min(RESTORE_MAX);
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let (restored, missed) = restore_slots(&shared, only.as_ref()).await;
            if restored > 0 {
                tracing::warn!(
                    restored,
                    "the Redis Cluster had lost keys of calls parked here; stored them again"
                );
            }
            if missed.is_empty() {
                break;
            }
            if Instant::now() >= give_up {
                tracing::warn!(
                    slots = missed.len(),
                    "cannot check the keys of calls parked here on every slot: their shards still do not answer"
                );
                break;
            }
            only = Some(missed);
        }
    }
}

impl Shared {
    /// Something a failover does just happened (a node connection dropped,
    /// a cluster command failed, the cluster connection was replaced): the
    /// promoted replica may lack the last writes of calls parked here. Wakes
    /// the [`restorer`], which only a cluster runs (one server's reconnect
    /// restores).
    pub(super) fn failover_suspected(&self) {
        self.restore_due.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Platform;

    fn call(devices: usize, aliases: &[(&str, &str)], leg_of: Option<&str>) -> Pending {
        Pending {
            key: Arc::from("k1"),
            stamp: Some(9),
            account: 7,
            devices: vec![Platform::Android; devices],
            until: Instant::now() + Duration::from_secs(30),
            leg_of: leg_of.map(str::to_owned),
            aliases: aliases
                .iter()
                .map(|(a, p)| (a.to_string(), p.to_string()))
                .collect(),
        }
    }

    fn names(restores: &[Restore]) -> Vec<(&str, bool)> {
        restores
            .iter()
            .map(|r| (r.name.as_str(), r.counted))
            .collect()
    }

    #[test]
    fn a_lone_device_call_restores_its_record_and_meta_only() {
        let all = restores(&[call(1, &[], None)]);
        assert_eq!(
            names(&all),
            [
                (state_key("k1").as_str(), true),
                (meta_key("k1").as_str(), true)
            ]
        );
    }

    #[test]
    fn every_key_a_ringing_call_needs_is_restored_and_only_set_nx_is_counted() {
        let all = restores(&[call(2, &[("5 tok", "k1:1")], Some("cid@pbx"))]);
        let (first, second) = (push_key("k1", 0, 2), push_key("k1", 1, 2));
        let (first, second) = (state_key(&first), state_key(&second));
        let alias = keys::alias_key("5 tok");
        let legs = keys::legs_key("cid@pbx");
        let expected = vec![
            (state_key("k1"), true),
            (meta_key("k1"), true),
            (first, true),
            (second, true),
            (alias, true),
            (legs.clone(), false),
            (legs, false),
        ];
        let got: Vec<(String, bool)> = names(&all)
            .into_iter()
            .map(|(n, c)| (n.to_owned(), c))
            .collect();
        assert_eq!(got, expected);
        // Every counted command is a `SET ... NX`: what Redis still has stays.
        for restore in all.iter().filter(|r| r.counted) {
            let packed =
                String::from_utf8_lossy(&restore.command.get_packed_command()).into_owned();
            assert!(packed.contains("\r\nSET\r\n"), "{packed}");
            assert!(packed.ends_with("\r\nNX\r\n"), "{packed}");
        }
    }
}

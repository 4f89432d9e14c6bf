//! Subscribing: the channels this process waits on, and the task that reads
//! their answers and hands them to the waiters.
//!
//! One server: one subscriber connection carries every channel; when it
//! drops, the task reconnects with backoff, resubscribes every channel
//! waited on, stores again the pending state of every unanswered wait
//! ([`restore::restore_pending`]) and runs the fallback check once, before
//! the broker says it is ready. A cluster: sharded subscriptions ride the cluster
//! connection, which resubscribes by itself after a failover; the task reads
//! the messages it pushes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::{FromRedisValue, PushInfo, PushKind};
use tokio::sync::{mpsc, watch};

use super::cluster::Cluster;
use super::keys::{self, channel, key_of_channel};
use super::{restore, unavailable, Shared, BATCH};
use crate::broker::BrokerError;
use crate::logs::Escaped;

/// How often an idle subscriber connection is pinged, to notice a dead peer.
const PING_EVERY: Duration = Duration::from_secs(5);
/// How often, and how far apart, a sharded unsubscribe is tried while its
/// shard fails over (a failover takes a few seconds).
const UNSUBSCRIBE_TRIES: u32 = 10;
const UNSUBSCRIBE_RETRY: Duration = Duration::from_secs(1);
/// Backoff between reconnect attempts of the subscriber connection.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Where subscriptions are made.
pub(super) enum Subscriptions {
    /// One server: the subscriber connection's command half, while it is
    /// up, and whether it is up and subscribed.
    Single {
        sink: Mutex<Option<PubSubSink>>,
        up: AtomicBool,
    },
    /// A cluster: sharded subscriptions on the cluster connection.
    Cluster(Arc<Cluster>),
}

impl Subscriptions {
    pub(super) fn single() -> Subscriptions {
        Subscriptions::Single {
            sink: Mutex::new(None),
            up: AtomicBool::new(false),
        }
    }

    /// Whether answers can reach this process now. The cluster connection
    /// resubscribes by itself; the fallback check covers its gaps.
    pub(super) fn up(&self) -> bool {
        match self {
            Subscriptions::Single { up, .. } => up.load(Ordering::Acquire),
            Subscriptions::Cluster(_) => true,
        }
    }

    /// The one-server sink and the up flag: where the subscriber task
    /// keeps its connection's state.
    fn set_single(&self, sink: Option<PubSubSink>) {
        if let Subscriptions::Single { sink: current, up } = self {
            if sink.is_none() {
                up.store(false, Ordering::Release);
            }
            *current.lock().expect("sink lock poisoned") = sink;
        }
    }

    fn mark_up(&self) {
        if let Subscriptions::Single { up, .. } = self {
            up.store(true, Ordering::Release);
        }
    }

    /// Subscribes to one key's channel, confirmed by Redis before it returns.
    pub(super) async fn subscribe(
        &self,
        channel: String,
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        let subscribed = match self {
            Subscriptions::Single { sink, .. } => {
                let mut sink = sink
                    .lock()
                    .expect("sink lock poisoned")
                    .clone()
                    .ok_or_else(|| unavailable("Redis subscriber connection is down"))?;
                tokio::time::timeout(timeout, async move { sink.subscribe(channel).await }).await
            }
            Subscriptions::Cluster(cluster) => {
                let mut conn = cluster.conn();
                let subscribed =
                    tokio::time::timeout(timeout, async move { conn.ssubscribe(channel).await })
                        .await;
                if !matches!(subscribed, Ok(Ok(()))) {
                    cluster.suspect();
                }
                subscribed
            }
        };
        subscribed
            .map_err(|_| unavailable("Redis SUBSCRIBE timed out"))?
            .map_err(unavailable)
    }

    /// Unsubscribes from channels nobody here waits on any more.
    pub(super) async fn unsubscribe(&self, channels: Vec<String>, timeout: Duration) {
        match self {
            Subscriptions::Single { sink, .. } => {
                let sink = sink.lock().expect("sink lock poisoned").clone();
                // A lost subscriber connection took its subscriptions with it.
                if let Some(mut sink) = sink {
                    let _ = tokio::time::timeout(timeout, sink.unsubscribe(&channels)).await;
                }
            }
            Subscriptions::Cluster(cluster) => {
                // Sharded channels of different slots cannot share one
                // command. One whose shard is failing over is retried a
                // while: the redis crate would otherwise resubscribe it on
                // the promoted replica, to nobody's use.
                let unsubscribed = channels.into_iter().map(|channel| {
                    let cluster = cluster.clone();
                    async move {
                        for attempt in 0..UNSUBSCRIBE_TRIES {
                            if attempt > 0 {
                                tokio::time::sleep(UNSUBSCRIBE_RETRY).await;
                            }
                            // The current connection each time: a replaced
                            // one took its subscriptions with it.
                            let mut conn = cluster.conn();
                            let done =
                                tokio::time::timeout(timeout, conn.sunsubscribe(&channel)).await;
                            if matches!(done, Ok(Ok(()))) {
                                return;
                            }
                            cluster.suspect();
                        }
                        tracing::warn!(channel = %Escaped(&channel), "cannot unsubscribe a finished call's channel");
                    }
                });
                // Off the retirer's path: a failover must not hold up the
                // clean-up of other calls.
                tokio::spawn(futures_util::future::join_all(unsubscribed));
            }
        }
    }
}

/// What the subscriber task reads from.
pub(super) enum Subscriber {
    /// Connects (and reconnects) its own pub/sub connection.
    Single(redis::Client),
    /// Receives the cluster connection's RESP3 pushes.
    Cluster(mpsc::UnboundedReceiver<PushInfo>),
}

impl Subscriber {
    pub(super) fn spawn(self, shared: Weak<Shared>, stop: watch::Receiver<()>) {
        match self {
            Subscriber::Single(client) => tokio::spawn(single(shared, client, stop)),
            Subscriber::Cluster(pushed) => tokio::spawn(cluster(shared, pushed, stop)),
        };
    }
}

/// Sleeps `duration`, or returns `false` when the broker stops first.
pub(super) async fn sleep_or_stop(duration: Duration, stop: &mut watch::Receiver<()>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(duration) => true,
        _ = stop.changed() => false,
    }
}

/// Hands a published message to the waiters on its call.
fn deliver(shared: &Shared, channel_name: &str, payload: &[u8]) {
    let (Some(key), Some((message, stamp))) =
        (key_of_channel(channel_name), keys::decode_message(payload))
    else {
        return;
    };
    shared.waiters.tell(key, stamp, message);
}

/// One server: owns the subscriber connection: connect, resubscribe, read, repeat.
async fn single(shared: Weak<Shared>, client: redis::Client, mut stop: watch::Receiver<()>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let connected = tokio::select! {
            connected = connect(&shared, &client) => connected,
            _ = stop.changed() => return,
        };
        let (sink, messages) = match connected {
            Ok(Some(connected)) => connected,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Redis subscriber cannot connect");
                if !sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        if !read(&shared, sink, messages, &mut stop).await {
            return;
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.subscriptions.set_single(None);
        tracing::warn!("Redis subscriber connection lost; reconnecting");
    }
}

/// Connects the subscriber connection and makes it whole: every channel
/// waited on subscribed, every pending state stored, answers given
/// meanwhile found. `None` when the broker is gone.
async fn connect(
    shared: &Weak<Shared>,
    client: &redis::Client,
) -> Result<Option<(PubSubSink, PubSubStream)>, BrokerError> {
    let pubsub = client.get_async_pubsub().await.map_err(unavailable)?;
    let (sink, messages) = pubsub.split();
    let Some(shared) = shared.upgrade() else {
        return Ok(None);
    };
    // New waits subscribe through the new sink from now on; the ones
    // already open are resubscribed here.
    shared.subscriptions.set_single(Some(sink.clone()));
    let made_whole = async {
        resubscribe(&shared, sink.clone()).await?;
        let restored = restore::restore_pending(&shared).await?;
        // Whatever was answered while we were away was published to nobody.
        if let Err(e) = shared.check_stored().await {
            tracing::warn!(error = %e, "fallback check after resubscribe failed");
        }
        Ok::<_, BrokerError>(restored)
    };
    match made_whole.await {
        Ok(restored) => {
            shared.subscriptions.mark_up();
            shared.mark_unsure();
            tracing::info!(
                channels = shared.waiters.len(),
                restored,
                "Redis subscriber connected"
            );
            Ok(Some((sink, messages)))
        }
        Err(e) => {
            shared.subscriptions.set_single(None);
            Err(e)
        }
    }
}

/// Reads answers until the connection drops (`true`) or the broker stops
/// (`false`), pinging it while idle to notice a dead peer.
async fn read(
    shared: &Weak<Shared>,
    sink: PubSubSink,
    mut messages: PubSubStream,
    stop: &mut watch::Receiver<()>,
) -> bool {
    // How long a ping may take before the connection counts as down:
    // `--redis-timeout-ms`, like every other command.
    let Some(timeout) = shared.upgrade().map(|s| s.options.acquire_timeout) else {
        return false;
    };
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { return true };
                let Some(shared) = shared.upgrade() else { return false };
                deliver(&shared, message.get_channel_name(), message.get_payload_bytes());
            }
            _ = ping.tick() => {
                let mut sink = sink.clone();
                // Any answer will do: a subscribed connection answers
                // PING with `["pong", ""]`, not `PONG`.
                match tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "Redis subscriber ping failed");
                        return true;
                    }
                    Err(_) => {
                        tracing::warn!(timeout_ms = timeout.as_millis() as u64, "Redis subscriber ping timed out");
                        return true;
                    }
                }
            }
            _ = stop.changed() => return false,
        }
    }
}

/// A cluster: reads the sharded messages the cluster connection pushes.
async fn cluster(
    shared: Weak<Shared>,
    mut pushed: mpsc::UnboundedReceiver<PushInfo>,
    mut stop: watch::Receiver<()>,
) {
    loop {
        let push = tokio::select! {
            push = pushed.recv() => push,
            _ = stop.changed() => return,
        };
        let Some(push) = push else { return };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match (push.kind, push.data.as_slice()) {
            (PushKind::SMessage | PushKind::Message, [channel, payload]) => {
                if let (Ok(channel), Ok(payload)) = (
                    String::from_redis_value_ref(channel),
                    Vec::<u8>::from_redis_value_ref(payload),
                ) {
                    deliver(&shared, &channel, &payload);
                }
            }
            (PushKind::SSubscribe, [channel, ..]) => {
                // After a failover the redis crate resubscribes, on the
                // promoted replica, the channels it tracked when it refreshed
                // its slot map, and sends them through its own queue. A wait
                // that ended in between has already had its `SUNSUBSCRIBE`
                // confirmed (by the new master, which had nothing to drop),
                // so the late `SSUBSCRIBE` would strand its channel there for
                // good. Every confirmation is seen here: one for a channel
                // nobody here waits on is undone at once.
                if let Ok(channel) = String::from_redis_value_ref(channel) {
                    let Some(key) = key_of_channel(&channel) else {
                        continue;
                    };
                    if !shared.waiters.contains(key) {
                        tracing::debug!(channel = %Escaped(&channel), "undoing the resubscription of a finished call's channel");
                        let key = key.to_owned();
                        shared
                            .subscriptions
                            .unsubscribe(vec![channel.clone()], shared.options.acquire_timeout)
                            .await;
                        // A new wait on the key that subscribed meanwhile
                        // lost its subscription to the undo: give it back.
                        if shared.waiters.contains(&key) {
                            shared.mark_unsure();
                            let _ = shared
                                .subscriptions
                                .subscribe(channel, shared.options.acquire_timeout)
                                .await;
                        }
                    }
                }
            }
            (PushKind::SUnsubscribe, [channel, ..]) => {
                // Redis drops a node's sharded subscriptions of the slots it
                // gives up (a master paused through its failover wakes as a
                // replica) and says so with `sunsubscribe`. A call still
                // waited on here then hears no message: the fallback check
                // reads its stored state instead. Not subscribed again: the
                // cluster connection's slot map may still name the woken
                // node, and a replica accepts `SSUBSCRIBE` for its master's
                // slots, where no `SUNSUBSCRIBE` routed by slot would find it
                // again (the chaos run's stranded channels).
                let Ok(channel) = String::from_redis_value_ref(channel) else {
                    continue;
                };
                if key_of_channel(&channel).is_some_and(|key| shared.waiters.contains(key)) {
                    shared.mark_unsure_for(super::fallback::CLUSTER_SETTLING);
                    tracing::debug!(channel = %Escaped(&channel), "Redis dropped the subscription of a call waited on; the fallback check covers it");
                }
            }
            (PushKind::Disconnection, _) => {
                shared.mark_unsure_for(super::fallback::CLUSTER_SETTLING);
                shared.failover_suspected();
                tracing::warn!(
                    "a Redis Cluster node connection dropped; the fallback check covers the gap"
                );
            }
            _ => {}
        }
    }
}

async fn resubscribe(shared: &Shared, mut sink: PubSubSink) -> Result<(), BrokerError> {
    let channels: Vec<String> = shared.waiters.keys().iter().map(|k| channel(k)).collect();
    for chunk in channels.chunks(BATCH) {
        tokio::time::timeout(shared.options.acquire_timeout * 5, sink.subscribe(chunk))
            .await
            .map_err(|_| unavailable("Redis SUBSCRIBE timed out"))?
            .map_err(unavailable)?;
    }
    Ok(())
}

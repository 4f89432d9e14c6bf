//! The Redis broker: state in keys, answers over pub/sub, so the PBX's request
//! and the app's answer may reach different instances.
//!
//! Per process there is one pool of command connections (bb8-redis) and one
//! subscriber connection that carries every channel the process waits on;
//! never a connection per call. Three background tasks serve all waits:
//!
//! - the subscriber reads answers and hands them to the waiters; when its
//!   connection drops it reconnects with backoff and resubscribes;
//! - the fallback check reads, in one `MGET` per poll interval, the stored
//!   state of every unanswered key this process waits on, so an answer whose
//!   message was lost (published while the subscriber was reconnecting) still
//!   ends its wait;
//! - the retirer deletes the keys of finished waits and unsubscribes their
//!   channels, in batches, off the call path.
//!
//! Keys: `cn:{<unique_key>}` holds the state (`pending:<platform>`,
//! `available:<platform>`, `unavailable:<platform>`), `cn:{<unique_key>}:answer`
//! is the channel. The braces are a Redis Cluster hash tag: key and channel
//! always share a slot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bb8_redis::RedisConnectionManager;
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::{mpsc, watch};

use super::{BrokerError, CallBroker, CallState, Release, Wait, Waiters};
use crate::store::Platform;

/// Stores an answer only over a pending state, then publishes it: one round
/// trip, atomic, and the first answer stands. Returns the state before.
const ANSWER_SCRIPT: &str = r#"
local before = redis.call('GET', KEYS[1])
if not before then return false end
if string.sub(before, 1, 8) == 'pending:' then
  redis.call('SET', KEYS[1], ARGV[1] .. string.sub(before, 8), 'KEEPTTL')
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return before
"#;

/// How long one subscribe or one ping of the subscriber may take before the
/// connection counts as down.
const SUBSCRIBER_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an idle subscriber connection is pinged, to notice a dead peer.
const SUBSCRIBER_PING_EVERY: Duration = Duration::from_secs(5);
/// Keys per `MGET`, `DEL` or `UNSUBSCRIBE`, so no single command grows without bound.
const BATCH: usize = 5000;

fn state_key(key: &str) -> String {
    format!("cn:{{{key}}}")
}

fn channel(key: &str) -> String {
    format!("cn:{{{key}}}:answer")
}

fn key_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("cn:{")?.strip_suffix("}:answer")
}

/// Settings of the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    pub pool_size: u32,
    /// How long a command waits for a pooled connection.
    pub acquire_timeout: Duration,
    /// Interval of the fallback check.
    pub poll_interval: Duration,
    /// Lifetime of a state key: longer than any wait, so a crashed process
    /// leaves nothing behind for long.
    pub state_ttl: Duration,
    /// `false` in the `poll` broker mode: no subscriber, no fallback check;
    /// each wait reads its own state.
    pub subscribe: bool,
}

/// The Redis [`CallBroker`]. Dropping it stops its background tasks.
pub struct RedisBroker {
    shared: Arc<Shared>,
    /// Dropped with the broker: the background tasks watch it to stop.
    _stop: watch::Sender<()>,
}

struct Shared {
    pool: bb8::Pool<RedisConnectionManager>,
    waiters: Waiters,
    /// The subscriber connection's command half, while it is up.
    sink: Mutex<Option<PubSubSink>>,
    /// Whether the subscriber connection is up and subscribed.
    subscribed: AtomicBool,
    /// Keys whose last local waiter left, for the retirer.
    retire: mpsc::UnboundedSender<Arc<str>>,
    options: RedisOptions,
    answer: redis::Script,
}

impl RedisBroker {
    /// Builds the broker and starts its tasks. Fails only on a malformed URL:
    /// a Redis that is down now makes the broker unready, not the process dead.
    pub async fn connect(options: RedisOptions) -> Result<RedisBroker, BrokerError> {
        let client = redis::Client::open(options.url.as_str())
            .map_err(|e| BrokerError::Unavailable(format!("bad Redis URL: {e}")))?;
        let manager = RedisConnectionManager::new(options.url.as_str())
            .map_err(|e| BrokerError::Unavailable(format!("bad Redis URL: {e}")))?;
        let pool = bb8::Pool::builder()
            .max_size(options.pool_size.max(1))
            .connection_timeout(options.acquire_timeout)
            .test_on_check_out(false)
            .build_unchecked(manager);
        let (retire, retired) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(());
        let shared = Arc::new(Shared {
            pool,
            waiters: Waiters::default(),
            sink: Mutex::new(None),
            subscribed: AtomicBool::new(false),
            retire,
            answer: redis::Script::new(ANSWER_SCRIPT),
            options,
        });
        tokio::spawn(retirer(Arc::downgrade(&shared), retired));
        if shared.options.subscribe {
            tokio::spawn(subscriber(Arc::downgrade(&shared), client, stopped.clone()));
            tokio::spawn(fallback_check(Arc::downgrade(&shared), stopped));
        }
        Ok(RedisBroker {
            shared,
            _stop: stop,
        })
    }
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl Shared {
    async fn conn(&self) -> Result<bb8::PooledConnection<'_, RedisConnectionManager>, BrokerError> {
        self.pool.get().await.map_err(unavailable)
    }

    fn sink(&self) -> Option<PubSubSink> {
        self.sink.lock().expect("sink lock poisoned").clone()
    }

    /// The fallback check: one `MGET` for every unanswered key waited on here.
    async fn check_stored(&self) -> Result<(), BrokerError> {
        let keys = self.waiters.unanswered();
        if keys.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        for chunk in keys.chunks(BATCH) {
            let names: Vec<String> = chunk.iter().map(|k| state_key(k)).collect();
            let values: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&names)
                .query_async(&mut *conn)
                .await
                .map_err(unavailable)?;
            for (key, value) in chunk.iter().zip(values) {
                if let Some(available) = value
                    .as_deref()
                    .and_then(CallState::decode)
                    .and_then(CallState::answer)
                {
                    tracing::debug!(unique_key = %key, "answer found by the fallback check");
                    self.waiters.deliver(key, available);
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl CallBroker for RedisBroker {
    async fn open(&self, key: &str, platform: Platform) -> Result<Wait, BrokerError> {
        let shared = &self.shared;
        let (answers, first) = shared.waiters.join(key);
        let release = {
            let shared = shared.clone();
            let key: Arc<str> = Arc::from(key);
            Release::new(move || {
                if shared.waiters.leave(&key) {
                    // The retirer only stops when the broker is gone, and
                    // then there is nothing left to clean.
                    let _ = shared.retire.send(key);
                }
            })
        };
        if shared.options.subscribe && first {
            let mut sink = shared
                .sink()
                .ok_or_else(|| unavailable("Redis subscriber connection is down"))?;
            tokio::time::timeout(SUBSCRIBER_TIMEOUT, sink.subscribe(channel(key)))
                .await
                .map_err(|_| unavailable("Redis SUBSCRIBE timed out"))?
                .map_err(unavailable)?;
        }
        let mut conn = shared.conn().await?;
        let ttl = u64::try_from(shared.options.state_ttl.as_millis()).unwrap_or(u64::MAX);
        redis::cmd("SET")
            .arg(state_key(key))
            .arg(CallState::Pending { platform }.encode())
            .arg("PX")
            .arg(ttl)
            .arg("NX")
            .query_async::<()>(&mut *conn)
            .await
            .map_err(unavailable)?;
        Ok(Wait {
            answers,
            _release: release,
        })
    }

    async fn answer(&self, key: &str, available: bool) -> Result<Option<CallState>, BrokerError> {
        let mut conn = self.shared.conn().await?;
        let before: Option<String> = self
            .shared
            .answer
            .key(state_key(key))
            .arg(if available {
                "available"
            } else {
                "unavailable"
            })
            .arg(channel(key))
            .arg(if available { "1" } else { "0" })
            .invoke_async(&mut *conn)
            .await
            .map_err(unavailable)?;
        Ok(before.as_deref().and_then(CallState::decode))
    }

    async fn state(&self, key: &str) -> Result<Option<CallState>, BrokerError> {
        let mut conn = self.shared.conn().await?;
        let value: Option<String> = redis::cmd("GET")
            .arg(state_key(key))
            .query_async(&mut *conn)
            .await
            .map_err(unavailable)?;
        Ok(value.as_deref().and_then(CallState::decode))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let mut conn = self.shared.conn().await?;
        redis::cmd("PING")
            .query_async::<()>(&mut *conn)
            .await
            .map_err(unavailable)?;
        if self.shared.options.subscribe && !self.shared.subscribed.load(Ordering::Acquire) {
            return Err(unavailable("Redis subscriber connection is down"));
        }
        Ok(())
    }

    fn waiting(&self) -> usize {
        self.shared.waiters.len()
    }
}

/// Sleeps `duration`, or returns `false` when the broker stops first.
async fn sleep_or_stop(duration: Duration, stop: &mut watch::Receiver<()>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(duration) => true,
        _ = stop.changed() => false,
    }
}

/// Owns the subscriber connection: connect, resubscribe, read, repeat.
async fn subscriber(shared: Weak<Shared>, client: redis::Client, mut stop: watch::Receiver<()>) {
    const MIN_BACKOFF: Duration = Duration::from_millis(50);
    const MAX_BACKOFF: Duration = Duration::from_secs(2);
    let mut backoff = MIN_BACKOFF;
    loop {
        let connected = tokio::select! {
            connected = client.get_async_pubsub() => connected,
            _ = stop.changed() => return,
        };
        let pubsub = match connected {
            Ok(pubsub) => pubsub,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Redis subscriber cannot connect");
                if !sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let (sink, mut messages) = pubsub.split();
        {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            // New waits subscribe through the new sink from now on; the ones
            // already open are resubscribed here.
            *shared.sink.lock().expect("sink lock poisoned") = Some(sink.clone());
            if let Err(e) = resubscribe(&shared, sink.clone()).await {
                tracing::warn!(error = %e, "Redis resubscribe failed");
                *shared.sink.lock().expect("sink lock poisoned") = None;
                drop(shared);
                if !sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                continue;
            }
            shared.subscribed.store(true, Ordering::Release);
            // Whatever was answered while we were away was published to nobody.
            if let Err(e) = shared.check_stored().await {
                tracing::warn!(error = %e, "fallback check after resubscribe failed");
            }
            tracing::info!(
                channels = shared.waiters.len(),
                "Redis subscriber connected"
            );
        }
        backoff = MIN_BACKOFF;
        let mut ping = tokio::time::interval(SUBSCRIBER_PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else { break };
                    let Some(shared) = shared.upgrade() else { return };
                    if let Some(key) = key_of_channel(message.get_channel_name()) {
                        shared.waiters.deliver(key, message.get_payload_bytes() == b"1");
                    }
                }
                _ = ping.tick() => {
                    let mut sink = sink.clone();
                    let alive = tokio::time::timeout(SUBSCRIBER_TIMEOUT, sink.ping::<String>()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break;
                    }
                }
                _ = stop.changed() => return,
            }
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.subscribed.store(false, Ordering::Release);
        *shared.sink.lock().expect("sink lock poisoned") = None;
        tracing::warn!("Redis subscriber connection lost; reconnecting");
    }
}

async fn resubscribe(shared: &Shared, mut sink: PubSubSink) -> Result<(), BrokerError> {
    let channels: Vec<String> = shared.waiters.keys().iter().map(|k| channel(k)).collect();
    for chunk in channels.chunks(BATCH) {
        tokio::time::timeout(SUBSCRIBER_TIMEOUT * 5, sink.subscribe(chunk))
            .await
            .map_err(|_| unavailable("Redis SUBSCRIBE timed out"))?
            .map_err(unavailable)?;
    }
    Ok(())
}

/// Runs the fallback check every poll interval.
async fn fallback_check(shared: Weak<Shared>, mut stop: watch::Receiver<()>) {
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
        if let Err(e) = shared.check_stored().await {
            tracing::debug!(error = %e, "fallback check failed");
        }
    }
}

/// Deletes the state keys of finished waits and unsubscribes their channels,
/// batching whatever piled up meanwhile into one command of each.
async fn retirer(shared: Weak<Shared>, mut retired: mpsc::UnboundedReceiver<Arc<str>>) {
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
        match shared.conn().await {
            Ok(mut conn) => {
                if let Err(e) = redis::cmd("DEL")
                    .arg(&names)
                    .query_async::<()>(&mut *conn)
                    .await
                {
                    tracing::warn!(error = %e, keys = names.len(), "Redis DEL of finished calls failed; their TTL will expire them");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Redis unavailable to delete finished calls; their TTL will expire them")
            }
        }
        if let Some(mut sink) = shared.options.subscribe.then(|| shared.sink()).flatten() {
            let channels: Vec<String> = batch.iter().map(|k| channel(k)).collect();
            // A lost subscriber connection took its subscriptions with it.
            let _ = tokio::time::timeout(SUBSCRIBER_TIMEOUT, sink.unsubscribe(&channels)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_give_back_their_key() {
        for key in ["abc", "with:colon", "{braced}", ""] {
            assert_eq!(key_of_channel(&channel(key)), Some(key));
        }
        assert_eq!(key_of_channel("other"), None);
    }
}

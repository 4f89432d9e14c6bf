//! The design call-notifier replaced, rebuilt here only to be measured
//! against: every parked call reads its own state every poll interval, as
//! the Django service did from a thread per call.
//!
//! [`PollingBroker`] wraps the server's real broker and keeps its answer
//! path (`/api/call-response/` stores the answer exactly as in production),
//! but a wait learns of the answer only at its next poll:
//!
//! - On Redis, as the old service did: `open` stores the pending state with
//!   the product's own `SET … PX … NX`, without subscribing; each wait then
//!   sends one `GET` per interval, and its end deletes the key.
//! - In process: the wait is the in-process broker's, and each poll looks
//!   at whether its answer has arrived (the cost of a map lookup, which is
//!   what polling costs without a network).
//!
//! The server role builds it when [`POLL_VAR`] is set (see
//! `server_role.rs`), so the product carries no polling mode of its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use call_notifier::broker::redis::{set_pending, state_key};
use call_notifier::broker::{Answer, BrokerError, CallBroker, CallState, Wait};
use call_notifier::store::Platform;
use futures_util::FutureExt;
use redis::aio::MultiplexedConnection;
use tokio::sync::watch;
use tokio::time::Instant;

/// The environment variable that makes the server role poll, every that
/// many milliseconds.
pub const POLL_VAR: &str = "CALL_NOTIFIER_BENCH_POLL_MS";

/// A broker whose waits poll; see the module's documentation.
pub struct PollingBroker {
    inner: Arc<dyn CallBroker>,
    /// Set on Redis: the waits read the stored state themselves.
    redis: Option<MultiplexedConnection>,
    interval: Duration,
    waiting: Arc<AtomicUsize>,
}

impl PollingBroker {
    /// Wraps `inner`; with `redis_url` (a single Redis, as the old service
    /// used), each wait reads its state from there.
    pub async fn new(
        inner: Arc<dyn CallBroker>,
        redis_url: Option<&str>,
        interval: Duration,
    ) -> anyhow::Result<PollingBroker> {
        let redis = match redis_url {
            None => None,
            Some(url) if url.starts_with("redis+cluster://") => {
                anyhow::bail!("the polling comparison runs on a single Redis, not a cluster")
            }
            Some(url) => Some(
                redis::Client::open(url)?
                    .get_multiplexed_async_connection()
                    .await?,
            ),
        };
        Ok(PollingBroker {
            inner,
            redis,
            interval,
            waiting: Arc::default(),
        })
    }
}

fn unavailable(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

#[async_trait]
impl CallBroker for PollingBroker {
    async fn open(
        &self,
        key: &str,
        platform: Platform,
        until: Instant,
    ) -> Result<Wait, BrokerError> {
        let (found, answers) = watch::channel(None);
        let (poller, redis) = match &self.redis {
            Some(conn) => {
                let mut conn = conn.clone();
                set_pending(key, platform, until)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(unavailable)?;
                let poller = tokio::spawn(poll_redis(
                    conn.clone(),
                    state_key(key),
                    self.interval,
                    found,
                ));
                (poller, Some(conn))
            }
            None => {
                let wait = self.inner.open(key, platform, until).await?;
                (
                    tokio::spawn(poll_in_process(wait, self.interval, found)),
                    None,
                )
            }
        };
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let waiting = self.waiting.clone();
        let key = state_key(key);
        Ok(Wait::new(answers, move || {
            // Aborting drops the in-process wait, which cleans up after it.
            poller.abort();
            waiting.fetch_sub(1, Ordering::Relaxed);
            if let Some(mut conn) = redis {
                tokio::spawn(async move {
                    let _ = redis::cmd("DEL")
                        .arg(key)
                        .query_async::<()>(&mut conn)
                        .await;
                });
            }
        }))
    }

    async fn answer(&self, key: &str, available: bool) -> Result<Option<CallState>, BrokerError> {
        self.inner.answer(key, available).await
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.inner.ping().await
    }

    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// One `GET` per interval until the state holds an answer.
async fn poll_redis(
    mut conn: MultiplexedConnection,
    key: String,
    interval: Duration,
    found: watch::Sender<Option<Answer>>,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let state: Option<String> = match redis::cmd("GET").arg(&key).query_async(&mut conn).await {
            Ok(state) => state,
            Err(_) => continue,
        };
        if let Some(available) = state
            .as_deref()
            .and_then(CallState::decode)
            .and_then(CallState::answer)
        {
            found.send_replace(Some(Answer {
                available,
                received_at: None,
            }));
            return;
        }
    }
}

/// Looks once per interval at whether the in-process wait has its answer.
async fn poll_in_process(mut wait: Wait, interval: Duration, found: watch::Sender<Option<Answer>>) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        if let Some(answer) = wait.answered().now_or_never() {
            found.send_replace(Some(Answer {
                received_at: None,
                ..answer
            }));
            // Keep the wait (and its bookkeeping) until the call drops ours.
            std::future::pending::<()>().await;
        }
    }
}

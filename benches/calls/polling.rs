//! The design call-notifier replaced, rebuilt here only to be measured
//! against: every parked call reads its own state every poll interval, as
//! the Django service did from a thread per call.
//!
//! [`PollingBroker`] wraps the server's real broker and keeps its answer
//! path (`/api/call-response/` stores the answer exactly as in production),
//! but a wait learns of the answer only at its next poll:
//!
//! - On Redis, as the old service did: `open` stores the call's record with
//!   the product's own `SET … PX … NX`, without subscribing; each wait then
//!   sends one `GET` per interval, and its end is the product's.
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
use call_notifier::broker::{
    Answer, BrokerError, CallBroker, Named, News, Opening, Pushed, Record, Stored, Verdict, Wait,
};
use call_notifier::store::EndReason;
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
    async fn open(&self, call: Opening<'_>) -> Result<Wait, BrokerError> {
        let (found, news) = watch::channel(News {
            answers: vec![None; call.devices.len()],
            ended: None,
        });
        let key = call.key;
        let poller = match &self.redis {
            Some(conn) => {
                let mut conn = conn.clone();
                set_pending(key, call.devices, call.until)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(unavailable)?;
                tokio::spawn(poll_redis(conn, state_key(key), self.interval, found))
            }
            None => {
                let wait = self.inner.open(call).await?;
                tokio::spawn(poll_in_process(wait, self.interval, found))
            }
        };
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let waiting = self.waiting.clone();
        Ok(Wait::new(key, news, move || {
            // Aborting drops the in-process wait, which cleans up after it.
            poller.abort();
            waiting.fetch_sub(1, Ordering::Relaxed);
        }))
    }

    async fn answer(
        &self,
        key: &str,
        available: bool,
        pushed: Pushed,
    ) -> Result<Verdict, BrokerError> {
        self.inner.answer(key, available, pushed).await
    }

    async fn end(&self, wait: &Wait, reason: EndReason) -> Result<Option<Record>, BrokerError> {
        self.inner.end(wait, reason).await
    }

    async fn cancel(
        &self,
        key: &str,
        account: Option<i64>,
        by: Named,
    ) -> Result<bool, BrokerError> {
        self.inner.cancel(key, account, by).await
    }

    async fn read(&self, key: &str) -> Result<Option<(Stored, Option<i64>)>, BrokerError> {
        self.inner.read(key).await
    }

    async fn alias(&self, alias: &str, key: &str, until: Instant) -> Result<(), BrokerError> {
        self.inner.alias(alias, key, until).await
    }

    async fn resolve(&self, alias: &str) -> Result<Option<String>, BrokerError> {
        self.inner.resolve(alias).await
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.inner.ping().await
    }

    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// One `GET` per interval until the record holds an answer.
async fn poll_redis(
    mut conn: MultiplexedConnection,
    key: String,
    interval: Duration,
    found: watch::Sender<News>,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let stored: Option<String> = match redis::cmd("GET").arg(&key).query_async(&mut conn).await
        {
            Ok(stored) => stored,
            Err(_) => continue,
        };
        let Some(state) = stored.as_deref().and_then(Record::decode) else {
            continue;
        };
        let answers = state
            .devices
            .iter()
            .map(|d| {
                d.answer.map(|available| Answer {
                    available,
                    received_at: None,
                })
            })
            .collect::<Vec<_>>();
        if answers.iter().any(Option::is_some) {
            found.send_replace(News {
                answers,
                ended: None,
            });
        }
    }
}

/// Looks once per interval at what the in-process wait has learned.
async fn poll_in_process(wait: Wait, interval: Duration, found: watch::Sender<News>) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let news = wait.news();
        if news != *found.borrow() {
            found.send_replace(news);
        }
    }
}

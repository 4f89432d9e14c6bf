//! The Redis broker: state in keys, answers over pub/sub, so the PBX's request
//! and the app's answer may reach different instances.
//!
//! Two links to Redis, one behaviour:
//!
//! - one server (`redis://`): a pool of command connections (bb8 over
//!   multiplexed connections, see [`CommandConnections`]) and one subscriber
//!   connection that carries every channel the process waits on, never a
//!   connection per call;
//! - a Redis Cluster (`redis+cluster://host:port,host:port`): one cluster
//!   connection (a multiplexed connection per node, RESP3) carries commands
//!   and sharded subscriptions (`SSUBSCRIBE`/`SPUBLISH`), so an answer travels
//!   only to the shard that owns its key; the redis crate follows slot moves
//!   and failovers and resubscribes.
//!
//! Three background tasks serve all waits:
//!
//! - the subscriber reads answers and hands them to the waiters; on one
//!   server, when its connection drops, it reconnects with backoff and
//!   resubscribes;
//! - the fallback check reads, in one `MGET` per poll interval (split per
//!   slot on a cluster), the stored state of every unanswered key this
//!   process waits on, so an answer whose message was lost (published while
//!   the subscriber was reconnecting) still ends its wait. It runs only
//!   while the subscription is not known good: while it is down, and for a
//!   few seconds after a reconnect or a cluster node's connection dropping.
//!   A healthy subscription loses nothing, so parked calls then cost Redis
//!   no command at all, however many they are;
//! - the retirer deletes the keys of finished waits and unsubscribes their
//!   channels, in batches, off the call path.
//!
//! Outages. A Redis that cannot be reached makes the broker unready and
//! every new wait fail at once (the call is answered NAK before any push):
//! the subscriber connection is known down, and the command pool fails fast
//! ([`Reachability`]) instead of waiting out `--redis-timeout-ms`. A command
//! connection found dropped is replaced and the command sent once more, so a
//! Redis that restarted costs no request an error. When the subscriber
//! connects again it resubscribes every channel waited on, stores the
//! pending state of every unanswered wait again (see
//! [`restore_pending`]), and runs the fallback check once, before the broker
//! says it is ready. A cluster connection follows failovers by itself (the
//! redis crate refreshes its slot map on a failed or `MOVED` command and
//! resubscribes sharded channels); the fallback check covers answers
//! published meanwhile.
//!
//! Keys: `cn:{<unique_key>}` holds the state (`pending:<platform>`,
//! `available:<platform>`, `unavailable:<platform>`), `cn:{<unique_key>}:answer`
//! is the channel. The braces are a Redis Cluster hash tag: key and channel
//! always share a slot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionLike, MultiplexedConnection, PubSubSink};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, PushInfo, PushKind, RedisFuture, ScriptInvocation, Value};
use tokio::sync::{mpsc, watch};

use super::{Answer, BrokerError, CallBroker, CallState, Release, Wait, Waiters};
use crate::pool::Reachability;
use crate::store::Platform;

/// Stores an answer only over a pending state, then publishes it (`PUBLISH`,
/// or `SPUBLISH` on a cluster: ARGV[4]): one round trip, atomic, and the
/// first answer stands. Returns the state before.
const ANSWER_SCRIPT: &str = r#"
local before = redis.call('GET', KEYS[1])
if not before then return false end
if string.sub(before, 1, 8) == 'pending:' then
  redis.call('SET', KEYS[1], ARGV[1] .. string.sub(before, 8), 'KEEPTTL')
  redis.call(ARGV[4], ARGV[2], ARGV[3])
end
return before
"#;

/// How often an idle subscriber connection is pinged, to notice a dead peer.
const SUBSCRIBER_PING_EVERY: Duration = Duration::from_secs(5);
/// How often, and how far apart, a sharded unsubscribe is tried while its
/// shard fails over (a failover takes a few seconds).
const UNSUBSCRIBE_TRIES: u32 = 10;
const UNSUBSCRIBE_RETRY: Duration = Duration::from_secs(1);
/// How long after a reconnect or a dropped node connection the fallback
/// check keeps running: covers answers published into the gap.
const UNSURE_WINDOW: Duration = Duration::from_secs(5);
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

/// The published message: `1` or `0` for available, a space, and when the
/// answer reached us in Unix microseconds (for the wake-up latency metric).
fn encode_message(available: bool, at: SystemTime) -> String {
    let micros = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("{} {micros}", u8::from(available))
}

fn decode_message(payload: &[u8]) -> Option<Answer> {
    let text = std::str::from_utf8(payload).ok()?;
    let (flag, micros) = text.split_once(' ').unwrap_or((text, ""));
    let available = match flag {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    let received_at = micros
        .parse::<u64>()
        .ok()
        .map(|m| UNIX_EPOCH + Duration::from_micros(m));
    Some(Answer {
        available,
        received_at,
    })
}

/// Settings of the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port/db`, or `redis+cluster://host:port,host:port` for a
    /// Redis Cluster (any reachable nodes; the rest are discovered).
    pub url: String,
    pub pool_size: u32,
    /// How long a command waits for a pooled connection, a connection
    /// attempt may take, and Redis may take to answer one command.
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
    link: Link,
    waiters: Waiters,
    /// Keys whose last local waiter left, for the retirer.
    retire: mpsc::UnboundedSender<Arc<str>>,
    options: RedisOptions,
    answer: redis::Script,
    /// Until when messages may have been lost: the fallback check runs
    /// while this lies ahead (or while the subscription is down).
    unsure_until: Mutex<Option<Instant>>,
}

/// How this process reaches Redis.
enum Link {
    /// One Redis server.
    Single {
        /// Command connections.
        pool: bb8::Pool<CommandConnections>,
        /// Whether Redis answers connection attempts: the pool fails fast
        /// while it does not.
        reach: Reachability,
        /// The database the URL names, for [`ConnectionLike::get_db`].
        db: i64,
        /// The subscriber connection's command half, while it is up.
        sink: Mutex<Option<PubSubSink>>,
        /// Whether the subscriber connection is up and subscribed.
        subscribed: AtomicBool,
    },
    /// A Redis Cluster: one connection per node, commands and sharded
    /// subscriptions alike; cheap to clone.
    Cluster { conn: ClusterConnection },
}

/// The nodes of a `redis+cluster://a:1,b:2/...` URL, as RESP3 node URLs.
fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let rest = url.strip_prefix("redis+cluster://")?;
    let (hosts, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let nodes: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|host| format!("redis://{host}/{tail}"))
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

impl RedisBroker {
    /// Builds the broker and starts its tasks. On one server it fails only on
    /// a malformed URL: a Redis that is down now makes the broker unready, not
    /// the process dead. A cluster must answer at start-up, to learn its slots.
    pub async fn connect(options: RedisOptions) -> Result<RedisBroker, BrokerError> {
        let bad_url =
            |e: redis::RedisError| BrokerError::Unavailable(format!("bad Redis URL: {e}"));
        let (stop, stopped) = watch::channel(());
        let (retire, retired) = mpsc::unbounded_channel();
        let (link, subscriber) = match cluster_nodes(&options.url) {
            Some(nodes) => {
                let (pushes, pushed) = mpsc::unbounded_channel();
                let client = ClusterClientBuilder::new(nodes)
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(pushes)
                    .connection_timeout(options.acquire_timeout)
                    .response_timeout(options.acquire_timeout)
                    .build()
                    .map_err(bad_url)?;
                let conn = client.get_async_connection().await.map_err(|e| {
                    BrokerError::Unavailable(format!("cannot reach the Redis Cluster: {e}"))
                })?;
                (Link::Cluster { conn }, Subscriber::Cluster(pushed))
            }
            None => {
                let client = redis::Client::open(options.url.as_str()).map_err(bad_url)?;
                let db = client.get_connection_info().redis_settings().db();
                let reach = Reachability::new("Redis");
                let manager = CommandConnections {
                    client: client.clone(),
                    config: redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(options.acquire_timeout))
                        .set_response_timeout(Some(options.acquire_timeout)),
                    generation: Arc::new(AtomicU64::new(0)),
                };
                let pool = bb8::Pool::builder()
                    .max_size(options.pool_size.max(1))
                    .connection_timeout(options.acquire_timeout)
                    // Only the generation is checked: no round trip.
                    .test_on_check_out(true)
                    .error_sink(reach.error_sink(|e: &CommandPoolError| {
                        matches!(e, CommandPoolError::Connect(_))
                    }))
                    .connection_customizer(Box::new(reach.clone()))
                    .build_unchecked(manager);
                let link = Link::Single {
                    pool,
                    reach,
                    db,
                    sink: Mutex::new(None),
                    subscribed: AtomicBool::new(false),
                };
                (link, Subscriber::Single(client))
            }
        };
        let shared = Arc::new(Shared {
            link,
            waiters: Waiters::default(),
            retire,
            unsure_until: Mutex::new(None),
            answer: redis::Script::new(ANSWER_SCRIPT),
            options,
        });
        tokio::spawn(retirer(Arc::downgrade(&shared), retired));
        if shared.options.subscribe {
            let weak = Arc::downgrade(&shared);
            match subscriber {
                Subscriber::Single(client) => {
                    tokio::spawn(subscriber_single(weak, client, stopped.clone()))
                }
                Subscriber::Cluster(pushed) => {
                    tokio::spawn(subscriber_cluster(weak, pushed, stopped.clone()))
                }
            };
            tokio::spawn(fallback_check(Arc::downgrade(&shared), stopped));
        }
        Ok(RedisBroker {
            shared,
            _stop: stop,
        })
    }
}

/// The command connections of one Redis server, for bb8.
///
/// A multiplexed connection cannot say whether it is still alive short of a
/// round trip (bb8-redis's `has_broken` always says no), so after Redis
/// restarted every pooled connection would fail every command for good.
/// Instead every connection carries the pool's generation from when it was
/// made; the first command that finds its connection dropped moves the
/// generation on ([`CommandConnection::retire_siblings`]), and bb8 then drops
/// every connection of an older generation at checkout or when it comes
/// back, with no round trip.
struct CommandConnections {
    client: redis::Client,
    config: redis::AsyncConnectionConfig,
    generation: Arc<AtomicU64>,
}

struct CommandConnection {
    conn: MultiplexedConnection,
    /// The pool's generation when this connection was made.
    generation: u64,
    current: Arc<AtomicU64>,
}

impl CommandConnection {
    fn stale(&self) -> bool {
        self.generation != self.current.load(Ordering::Acquire)
    }

    /// This connection was found dropped, and so, most likely, were the
    /// others made before it (Redis restarted, or the network broke).
    fn retire_siblings(&self) {
        let _ = self.current.compare_exchange(
            self.generation,
            self.generation + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

/// Why the command pool has no connection to give.
#[derive(Debug, thiserror::Error)]
enum CommandPoolError {
    /// Connecting to Redis failed: it is down or unreachable.
    #[error(transparent)]
    Connect(redis::RedisError),
    /// A pooled connection from before a drop was discarded.
    #[error("connection made before Redis was lost")]
    Stale,
}

impl bb8::ManageConnection for CommandConnections {
    type Connection = CommandConnection;
    type Error = CommandPoolError;

    async fn connect(&self) -> Result<CommandConnection, CommandPoolError> {
        let generation = self.generation.load(Ordering::Acquire);
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
            .map_err(CommandPoolError::Connect)?;
        Ok(CommandConnection {
            conn,
            generation,
            current: self.generation.clone(),
        })
    }

    async fn is_valid(&self, conn: &mut CommandConnection) -> Result<(), CommandPoolError> {
        if conn.stale() {
            Err(CommandPoolError::Stale)
        } else {
            Ok(())
        }
    }

    fn has_broken(&self, conn: &mut CommandConnection) -> bool {
        conn.stale()
    }
}

/// The one-server command link as the redis crate's commands, pipelines and
/// scripts see it: every command takes a pooled connection (failing at once
/// while Redis is known unreachable), and is sent once more, on a fresh
/// connection, when the one it had turned out to be dropped before the
/// command could be sent or answered.
///
/// Sending twice is safe for every command here: `SET NX`, `GET`, `MGET`,
/// `DEL`, `PING`, and the answer script, whose first answer stands (a second
/// run returns the answered state, so the caller only skips the response
/// log for it).
struct Commands<'a> {
    pool: &'a bb8::Pool<CommandConnections>,
    reach: &'a Reachability,
    db: i64,
}

impl Commands<'_> {
    async fn checkout(&self) -> redis::RedisResult<bb8::PooledConnection<'_, CommandConnections>> {
        self.reach
            .get(self.pool)
            .await
            .map_err(|e| redis::RedisError::from((redis::ErrorKind::Io, "Redis unavailable", e)))
    }
}

impl ConnectionLike for Commands<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut conn = self.checkout().await?;
            match conn.conn.req_packed_command(cmd).await {
                Err(e) if e.is_connection_dropped() => {
                    conn.retire_siblings();
                    drop(conn);
                    self.checkout().await?.conn.req_packed_command(cmd).await
                }
                result => result,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut conn = self.checkout().await?;
            match conn.conn.req_packed_commands(pipeline, offset, count).await {
                Err(e) if e.is_connection_dropped() => {
                    conn.retire_siblings();
                    drop(conn);
                    self.checkout()
                        .await?
                        .conn
                        .req_packed_commands(pipeline, offset, count)
                        .await
                }
                result => result,
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}

/// Either link, for one command.
enum Conn<'a> {
    Single(Commands<'a>),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// What the subscriber task reads from.
enum Subscriber {
    /// Connects (and reconnects) its own pub/sub connection.
    Single(redis::Client),
    /// Receives the cluster connection's RESP3 pushes.
    Cluster(mpsc::UnboundedReceiver<PushInfo>),
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl Shared {
    /// Whichever link this is, as the redis crate's commands see it.
    fn conn(&self) -> Conn<'_> {
        match &self.link {
            Link::Single {
                pool, reach, db, ..
            } => Conn::Single(Commands {
                pool,
                reach,
                db: *db,
            }),
            Link::Cluster { conn } => Conn::Cluster(conn.clone()),
        }
    }

    /// Runs one command.
    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BrokerError> {
        cmd.query_async(&mut self.conn()).await.map_err(unavailable)
    }

    /// Runs a pipeline (on a cluster, all of it must be in one slot).
    async fn pipeline<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, BrokerError> {
        pipe.query_async(&mut self.conn())
            .await
            .map_err(unavailable)
    }

    /// Runs the answer script.
    async fn invoke<T: FromRedisValue>(
        &self,
        script: &ScriptInvocation<'_>,
    ) -> Result<T, BrokerError> {
        script
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)
    }

    /// The command that publishes an answer to its channel.
    fn publish_command(&self) -> &'static str {
        match self.link {
            Link::Single { .. } => "PUBLISH",
            Link::Cluster { .. } => "SPUBLISH",
        }
    }

    /// Subscribes to one key's channel, confirmed by Redis before it returns.
    async fn subscribe(&self, channel: String) -> Result<(), BrokerError> {
        let subscribed = match &self.link {
            Link::Single { sink, .. } => {
                let mut sink = sink
                    .lock()
                    .expect("sink lock poisoned")
                    .clone()
                    .ok_or_else(|| unavailable("Redis subscriber connection is down"))?;
                tokio::time::timeout(self.options.acquire_timeout, async move {
                    sink.subscribe(channel).await
                })
                .await
            }
            Link::Cluster { conn } => {
                let mut conn = conn.clone();
                tokio::time::timeout(self.options.acquire_timeout, async move {
                    conn.ssubscribe(channel).await
                })
                .await
            }
        };
        subscribed
            .map_err(|_| unavailable("Redis SUBSCRIBE timed out"))?
            .map_err(unavailable)
    }

    /// Unsubscribes from channels nobody here waits on any more.
    async fn unsubscribe(&self, channels: Vec<String>) {
        match &self.link {
            Link::Single { sink, .. } => {
                let sink = sink.lock().expect("sink lock poisoned").clone();
                // A lost subscriber connection took its subscriptions with it.
                if let Some(mut sink) = sink {
                    let _ = tokio::time::timeout(
                        self.options.acquire_timeout,
                        sink.unsubscribe(&channels),
                    )
                    .await;
                }
            }
            Link::Cluster { conn } => {
                // Sharded channels of different slots cannot share one
                // command. One whose shard is failing over is retried a
                // while: the redis crate would otherwise resubscribe it on
                // the promoted replica, to nobody's use.
                let timeout = self.options.acquire_timeout;
                let unsubscribed = channels.into_iter().map(|channel| {
                    let mut conn = conn.clone();
                    async move {
                        for attempt in 0..UNSUBSCRIBE_TRIES {
                            if attempt > 0 {
                                tokio::time::sleep(UNSUBSCRIBE_RETRY).await;
                            }
                            let done =
                                tokio::time::timeout(timeout, conn.sunsubscribe(&channel)).await;
                            if matches!(done, Ok(Ok(()))) {
                                return;
                            }
                        }
                        tracing::warn!(%channel, "cannot unsubscribe a finished call's channel");
                    }
                });
                // Off the retirer's path: a failover must not hold up the
                // clean-up of other calls.
                tokio::spawn(futures_util::future::join_all(unsubscribed));
            }
        }
    }

    /// Whether answers can reach this process now.
    fn subscribed(&self) -> bool {
        match &self.link {
            Link::Single { subscribed, .. } => subscribed.load(Ordering::Acquire),
            // The cluster connection resubscribes by itself; the fallback
            // check covers its gaps (see `mark_unsure`).
            Link::Cluster { .. } => true,
        }
    }

    /// Messages may have been lost just now (a reconnect, a cluster node's
    /// connection dropping): run the fallback check for a while.
    fn mark_unsure(&self) {
        *self.unsure_until.lock().expect("unsure lock poisoned") =
            Some(Instant::now() + UNSURE_WINDOW);
    }

    /// Whether the fallback check must run: only while the subscription is
    /// not known good. A healthy subscription loses no message (Redis
    /// delivers pub/sub over one TCP connection, in order), so parked calls
    /// cost Redis nothing while they wait, however many there are.
    fn needs_fallback(&self) -> bool {
        if !self.subscribed() {
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

    /// The fallback check: one `MGET` for every unanswered key waited on here.
    async fn check_stored(&self) -> Result<(), BrokerError> {
        let keys = self.waiters.unanswered();
        for chunk in keys.chunks(BATCH) {
            let names: Vec<String> = chunk.iter().map(|k| state_key(k)).collect();
            let values: Vec<Option<String>> = self.query(redis::cmd("MGET").arg(&names)).await?;
            for (key, value) in chunk.iter().zip(values) {
                if let Some(available) = value
                    .as_deref()
                    .and_then(CallState::decode)
                    .and_then(CallState::answer)
                {
                    tracing::debug!(unique_key = %key, "answer found by the fallback check");
                    self.waiters.deliver(
                        key,
                        Answer {
                            available,
                            received_at: None,
                        },
                    );
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
        let (answers, first) = shared.waiters.join(key, platform);
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
            shared.subscribe(channel(key)).await?;
        }
        let ttl = u64::try_from(shared.options.state_ttl.as_millis()).unwrap_or(u64::MAX);
        let pending = CallState::Pending { platform }.encode();
        shared
            .query::<()>(
                redis::cmd("SET")
                    .arg(state_key(key))
                    .arg(pending)
                    .arg("PX")
                    .arg(ttl)
                    .arg("NX"),
            )
            .await?;
        Ok(Wait {
            answers,
            _release: release,
        })
    }

    async fn answer(&self, key: &str, available: bool) -> Result<Option<CallState>, BrokerError> {
        let mut script = self.shared.answer.prepare_invoke();
        script
            .key(state_key(key))
            .arg(if available {
                "available"
            } else {
                "unavailable"
            })
            .arg(channel(key))
            .arg(encode_message(available, SystemTime::now()))
            .arg(self.shared.publish_command());
        let before: Option<String> = self.shared.invoke(&script).await?;
        Ok(before.as_deref().and_then(CallState::decode))
    }

    async fn state(&self, key: &str) -> Result<Option<CallState>, BrokerError> {
        let value: Option<String> = self
            .shared
            .query(redis::cmd("GET").arg(state_key(key)))
            .await?;
        Ok(value.as_deref().and_then(CallState::decode))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.shared.query::<()>(&redis::cmd("PING")).await?;
        if self.shared.options.subscribe && !self.shared.subscribed() {
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

/// Hands a published message to the waiters on its key.
fn deliver_message(shared: &Shared, channel_name: &str, payload: &[u8]) {
    if let (Some(key), Some(answer)) = (key_of_channel(channel_name), decode_message(payload)) {
        shared.waiters.deliver(key, answer);
    }
}

/// One server: owns the subscriber connection: connect, resubscribe, read, repeat.
async fn subscriber_single(
    shared: Weak<Shared>,
    client: redis::Client,
    mut stop: watch::Receiver<()>,
) {
    // How long a ping of the subscriber connection may take before it
    // counts as down: `--redis-timeout-ms`, like every other command.
    let Some(timeout) = shared.upgrade().map(|s| s.options.acquire_timeout) else {
        return;
    };
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
            let Link::Single {
                sink: current,
                subscribed,
                ..
            } = &shared.link
            else {
                return;
            };
            // New waits subscribe through the new sink from now on; the ones
            // already open are resubscribed here.
            *current.lock().expect("sink lock poisoned") = Some(sink.clone());
            if let Err(e) = resubscribe(&shared, sink.clone()).await {
                tracing::warn!(error = %e, "Redis resubscribe failed");
                *current.lock().expect("sink lock poisoned") = None;
                drop(shared);
                if !sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            let restored = match restore_pending(&shared).await {
                Ok(restored) => restored,
                Err(e) => {
                    tracing::warn!(error = %e, "storing the pending calls again failed");
                    *current.lock().expect("sink lock poisoned") = None;
                    drop(shared);
                    if !sleep_or_stop(backoff, &mut stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            // Whatever was answered while we were away was published to nobody.
            if let Err(e) = shared.check_stored().await {
                tracing::warn!(error = %e, "fallback check after resubscribe failed");
            }
            subscribed.store(true, Ordering::Release);
            shared.mark_unsure();
            tracing::info!(
                channels = shared.waiters.len(),
                restored,
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
                    deliver_message(&shared, message.get_channel_name(), message.get_payload_bytes());
                }
                _ = ping.tick() => {
                    let mut sink = sink.clone();
                    // Any answer will do: a subscribed connection answers
                    // PING with `["pong", ""]`, not `PONG`.
                    match tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "Redis subscriber ping failed");
                            break;
                        }
                        Err(_) => {
                            tracing::warn!(timeout_ms = timeout.as_millis() as u64, "Redis subscriber ping timed out");
                            break;
                        }
                    }
                }
                _ = stop.changed() => return,
            }
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Link::Single {
            sink, subscribed, ..
        } = &shared.link
        {
            subscribed.store(false, Ordering::Release);
            *sink.lock().expect("sink lock poisoned") = None;
        }
        tracing::warn!("Redis subscriber connection lost; reconnecting");
    }
}

/// A cluster: reads the sharded messages the cluster connection pushes.
async fn subscriber_cluster(
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
                    deliver_message(&shared, &channel, &payload);
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
                    if key_of_channel(&channel).is_some_and(|key| !shared.waiters.contains(key)) {
                        tracing::debug!(%channel, "undoing the resubscription of a finished call's channel");
                        shared.unsubscribe(vec![channel]).await;
                    }
                }
            }
            (PushKind::Disconnection, _) => {
                shared.mark_unsure();
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

/// Stores again, where Redis has none, the pending state of every wait of
/// this process still unanswered; says how many it stored. Called each time
/// the subscriber connects again, before the broker says it is ready.
///
/// Why: a Redis that restarted without persistence has lost the pending
/// states of the calls parked here while their PBX requests still wait.
/// Without them the app's answer gets 404 and the call ends NAK at its wait,
/// although the app answered in time. This process knows every key it waits
/// on and its platform ([`Waiters::pending`]), so putting them back costs one
/// pipelined `SET NX` per parked call, once per reconnect. `NX` keeps what
/// Redis still has (the subscriber connection dropped but Redis did not), so
/// an answered key never turns pending again. The TTL starts afresh; the
/// retirer still deletes the key the moment its wait ends.
///
/// An answer that reached Redis before it went down is lost with it: that
/// call ends NAK at its wait unless the app answers again. A cluster is left
/// to its replicas, which hold the states (all but the writes of the last
/// moments before a failover).
async fn restore_pending(shared: &Shared) -> Result<usize, BrokerError> {
    let ttl = u64::try_from(shared.options.state_ttl.as_millis()).unwrap_or(u64::MAX);
    let mut restored = 0;
    for chunk in shared.waiters.pending().chunks(BATCH) {
        let mut pipe = redis::pipe();
        for (key, platform) in chunk {
            pipe.cmd("SET")
                .arg(state_key(key))
                .arg(
                    CallState::Pending {
                        platform: *platform,
                    }
                    .encode(),
                )
                .arg("PX")
                .arg(ttl)
                .arg("NX");
        }
        let stored: Vec<Option<String>> = shared.pipeline(&pipe).await?;
        restored += stored.iter().filter(|s| s.is_some()).count();
    }
    if restored > 0 {
        tracing::warn!(
            restored,
            "Redis had lost the pending state of calls parked here; stored it again"
        );
    }
    Ok(restored)
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
        if !shared.needs_fallback() {
            continue;
        }
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
        if let Err(e) = shared.query::<()>(redis::cmd("DEL").arg(&names)).await {
            tracing::warn!(error = %e, keys = names.len(), "cannot delete finished calls; their TTL will expire them");
        }
        if shared.options.subscribe {
            shared
                .unsubscribe(batch.iter().map(|k| channel(k)).collect())
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_the_answer_and_when_it_came() {
        let at = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let answer = decode_message(encode_message(true, at).as_bytes()).unwrap();
        assert_eq!(
            answer,
            Answer {
                available: true,
                received_at: Some(at)
            }
        );
        assert!(!decode_message(b"0").unwrap().available);
        assert_eq!(decode_message(b"maybe"), None);
    }

    #[test]
    fn cluster_urls_name_their_nodes() {
        assert_eq!(
            cluster_nodes("redis+cluster://a:1,b:2/?protocol=resp3"),
            Some(vec![
                "redis://a:1/?protocol=resp3".to_owned(),
                "redis://b:2/?protocol=resp3".to_owned()
            ])
        );
        assert_eq!(
            cluster_nodes("redis+cluster://a:1"),
            Some(vec!["redis://a:1/".to_owned()])
        );
        assert_eq!(cluster_nodes("redis://a:1"), None);
        assert_eq!(cluster_nodes("redis+cluster://"), None);
    }

    #[test]
    fn channel_names_give_back_their_key() {
        for key in ["abc", "with:colon", "{braced}", ""] {
            assert_eq!(key_of_channel(&channel(key)), Some(key));
        }
        assert_eq!(key_of_channel("other"), None);
    }
}

//! The Redis broker: state in keys, answers over pub/sub, so the PBX's request
//! and the app's answer may reach different instances.
//!
//! Two links to Redis, one behaviour:
//!
//! - one server (`redis://`): one multiplexed command connection (see
//!   [`connections`] for why the redis crate's `ConnectionManager`) and one
//!   subscriber connection that carries every channel the process waits on,
//!   never a connection per call;
//! - a Redis Cluster (`redis+cluster://host:port,host:port`): one cluster
//!   connection (a multiplexed connection per node, RESP3) carries commands
//!   and sharded subscriptions (`SSUBSCRIBE`/`SPUBLISH`), so an answer travels
//!   only to the shard that owns its key; the redis crate follows slot moves
//!   and failovers and resubscribes, and a watchdog replaces the connection
//!   when the crate gets stuck on one shard.
//!
//! The jobs, a file each:
//!
//! - [`keys`]: key and channel names, the state's text, the message;
//! - [`connections`]: command connections;
//! - [`cluster`]: the cluster connection, and the watchdog that replaces
//!   it when one shard stops answering it while it answers everyone else;
//! - [`direct`]: the answer script's short way, on a connection the
//!   answering task drives itself, with the usual way as its fallback;
//! - [`subscriber`]: subscribing, and the task that reads answers and hands
//!   them to the waiters (on one server it reconnects with backoff,
//!   resubscribes and stores the pending states again);
//! - [`fallback`]: the fallback check, which reads, in one `MGET` per poll
//!   interval (split per slot on a cluster), the stored state of every
//!   unanswered key waited on here, while the subscription is not known
//!   good, so an answer whose message was lost still ends its wait;
//! - [`restore`]: puts back the keys of the calls parked here that Redis
//!   lost (a restart without persistence, a cluster failover);
//! - [`retire`]: deletes the keys of finished waits and unsubscribes their
//!   channels, in batches, off the call path.
//!
//! Outages. A Redis that cannot be reached makes the broker unready and
//! every new wait fail at once (the call is answered NAK before any push):
//! the subscriber connection is known down, and a command connection that
//! cannot reconnect fails its commands at once. A cluster connection follows
//! failovers by itself; the fallback check covers answers published
//! meanwhile.

mod cluster;
mod connections;
mod direct;
mod fallback;
mod keys;
mod restore;
mod retire;
mod subscriber;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::cluster::ClusterClientBuilder;
use redis::{FromRedisValue, ScriptInvocation};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::{
    candidates, push_key, unix_millis, Answer, BrokerError, CallBroker, FirstClaim, HangUp, Held,
    Holds, Joined, Left, Message, Named, Opening, Phase, PhoneClaim, Pushed, Record, Release,
    Stamp, Stored, Verdict, Wait, Waiters, ECHO_MARGIN_MS,
};
use crate::store::EndReason;
use cluster::Cluster;
use connections::{Link, ServerConnection};
use direct::{Direct, Sent};
pub use keys::{channel, holders_key, meta_key, set_pending, state_key, told_key, FORMAT};
use subscriber::{Subscriber, Subscriptions};

/// Keys per `MGET`, `DEL` or `UNSUBSCRIBE`, so no single command grows without bound.
const BATCH: usize = 5000;

/// Settings of the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port/db`, or `redis+cluster://host:port,host:port` for a
    /// Redis Cluster (any reachable nodes; the rest are discovered).
    pub url: String,
    /// How long a connection attempt may take, and Redis may take to
    /// answer one command.
    pub acquire_timeout: Duration,
    /// Interval of the fallback check.
    pub poll_interval: Duration,
}

/// The Redis [`CallBroker`]. Dropping it stops its background tasks.
pub struct RedisBroker {
    shared: Arc<Shared>,
    /// Dropped with the broker: the background tasks watch it to stop.
    _stop: watch::Sender<()>,
}

/// What the broker and its tasks share.
struct Shared {
    link: Link,
    subscriptions: Subscriptions,
    waiters: Waiters,
    /// Keys whose last local waiter left, for the retirer: whether their
    /// call is to be ended `cancelled` (nobody ended it), and its stamp.
    retire: mpsc::UnboundedSender<retire::Retired>,
    options: RedisOptions,
    open: redis::Script,
    answer: Lua,
    end: Lua,
    leg: Lua,
    cancel: Lua,
    told: Lua,
    /// The answer script's short way.
    direct: Direct,
    /// Until when messages may have been lost: the fallback check runs
    /// while this lies ahead (or while the subscription is down).
    unsure_until: Mutex<Option<std::time::Instant>>,
    /// Wakes the [`restore::restorer`] (a cluster's) after a sign of a
    /// failover.
    restore_due: Arc<Notify>,
    /// This process's ids for holds ([`keys::holders_key`]) and notice
    /// claims ([`keys::TOLD_SCRIPT`]): a random prefix and a count, so no
    /// two of any instance share one.
    ids: (String, AtomicU64),
}

/// A Lua script and its text: sent by hash (`EVALSHA`), and whole
/// (`EVAL`) where the short way finds a server that has not got it.
struct Lua {
    script: redis::Script,
    code: &'static str,
}

impl Lua {
    fn new(code: &'static str) -> Lua {
        Lua {
            script: redis::Script::new(code),
            code,
        }
    }
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

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
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
        let nodes = cluster_nodes(&options.url);
        let direct = Direct::new(
            nodes.as_ref().map_or(&options.url, |nodes| &nodes[0]),
            nodes.is_some(),
            options.acquire_timeout,
        );
        let (link, subscriptions, subscriber) = match nodes {
            Some(nodes) => {
                let (pushes, pushed) = mpsc::unbounded_channel();
                let client = ClusterClientBuilder::new(nodes.clone())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(pushes)
                    .connection_timeout(options.acquire_timeout)
                    .response_timeout(options.acquire_timeout)
                    .build()
                    .map_err(bad_url)?;
                let cluster = Cluster::connect(client, &nodes).await.map_err(|e| {
                    BrokerError::Unavailable(format!("cannot reach the Redis Cluster: {e}"))
                })?;
                let cluster = Arc::new(cluster);
                (
                    Link::Cluster(cluster.clone()),
                    Subscriptions::Cluster(cluster),
                    Subscriber::Cluster(pushed),
                )
            }
            None => {
                let client = redis::Client::open(options.url.as_str()).map_err(bad_url)?;
                let server =
                    ServerConnection::new(&client, options.acquire_timeout).map_err(bad_url)?;
                (
                    Link::Single(server),
                    Subscriptions::single(),
                    Subscriber::Single(client),
                )
            }
        };
        let shared = Arc::new(Shared {
            link,
            subscriptions,
            waiters: Waiters::default(),
            retire,
            unsure_until: Mutex::new(None),
            restore_due: Arc::new(Notify::new()),
            ids: (crate::calls::random_key(), AtomicU64::new(0)),
            open: redis::Script::new(keys::OPEN_SCRIPT),
            answer: Lua::new(keys::ANSWER_SCRIPT),
            end: Lua::new(keys::END_SCRIPT),
            leg: Lua::new(keys::LEG_SCRIPT),
            cancel: Lua::new(keys::CANCEL_SCRIPT),
            told: Lua::new(keys::TOLD_SCRIPT),
            direct,
            options,
        });
        if shared.direct.is_cluster() {
            tokio::spawn(read_slot_maps(Arc::downgrade(&shared), stopped.clone()));
        }
        if shared.is_cluster() {
            tokio::spawn(cluster::watchdog(Arc::downgrade(&shared), stopped.clone()));
            let due = shared.restore_due.clone();
            tokio::spawn(restore::restorer(
                Arc::downgrade(&shared),
                due,
                stopped.clone(),
            ));
        }
        tokio::spawn(retire::retirer(Arc::downgrade(&shared), retired));
        subscriber.spawn(Arc::downgrade(&shared), stopped.clone());
        tokio::spawn(fallback::fallback_check(Arc::downgrade(&shared), stopped));
        Ok(RedisBroker {
            shared,
            _stop: stop,
        })
    }
}

impl Shared {
    fn is_cluster(&self) -> bool {
        self.cluster().is_some()
    }

    /// The cluster connection, on a cluster.
    fn cluster(&self) -> Option<&Arc<Cluster>> {
        match &self.link {
            Link::Cluster(cluster) => Some(cluster),
            Link::Single(_) => None,
        }
    }

    /// A command failed. On a cluster that is often the only sign of a
    /// failing node: a paused master answers nothing and drops no
    /// connection, so no `Disconnection` push comes, yet a failover may
    /// give its slots to a replica where this process's sharded
    /// subscriptions are not. The fallback check then runs for
    /// [`fallback::CLUSTER_SETTLING`], so an answer published meanwhile is
    /// still read.
    ///
    /// It also wakes the cluster watchdog ([`cluster`]), which tells a
    /// failing shard from a wedged connection, and the restorer
    /// ([`restore`]), which puts back what a failover lost.
    fn failed(&self, e: impl std::fmt::Display) -> BrokerError {
        if let Some(cluster) = self.cluster() {
            self.mark_unsure_for(fallback::CLUSTER_SETTLING);
            cluster.suspect();
            self.failover_suspected();
        }
        unavailable(e)
    }

    /// Runs one command.
    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BrokerError> {
        cmd.query_async(&mut self.link.conn())
            .await
            .map_err(|e| self.failed(e))
    }

    /// Runs a pipeline (on a cluster, all of it must be in one slot).
    async fn pipeline<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, BrokerError> {
        pipe.query_async(&mut self.link.conn())
            .await
            .map_err(|e| self.failed(e))
    }

    /// Runs a script.
    async fn invoke<T: FromRedisValue>(
        &self,
        script: &ScriptInvocation<'_>,
    ) -> Result<T, BrokerError> {
        script
            .invoke_async(&mut self.link.conn())
            .await
            .map_err(|e| self.failed(e))
    }

    /// Runs `lua` on `keys` (all in one slot)
    /// with `args`: the short way when `short` and it can ([`direct`]),
    /// else the usual way. Two scripts go the short way: the answer script,
    /// the one command between the app's answer and the PBX's ACK, and a
    /// call's last word (its end at the deadline), which must get through
    /// while the cluster connection is stuck. The other ends go the usual
    /// way: pipelined with every other command of the process, they cost
    /// less CPU than a plain connection's round trip each at a few thousand
    /// set-ups a second.
    async fn script<T: FromRedisValue>(
        &self,
        lua: &Lua,
        keys: &[String],
        args: &[String],
        short: bool,
    ) -> Result<T, BrokerError> {
        if let Some(first) = keys.first().filter(|_| short) {
            let eval = |command: &str, body: &str| {
                let mut eval = redis::cmd(command);
                eval.arg(body).arg(keys.len()).arg(keys).arg(args);
                eval
            };
            let mut sent = self
                .direct
                .send(first, &eval("EVALSHA", lua.script.get_hash()))
                .await;
            if matches!(sent, Sent::NoScript) {
                sent = self.direct.send(first, &eval("EVAL", lua.code)).await;
            }
            match sent {
                Sent::Reply(value) => {
                    return FromRedisValue::from_redis_value(value).map_err(unavailable)
                }
                Sent::TimedOut => return Err(self.failed("Redis did not answer a script in time")),
                Sent::Detour | Sent::NoScript => {}
            }
        }
        let mut invocation = lua.script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        self.invoke(&invocation).await
    }

    /// The command that publishes an answer to its channel.
    fn publish_command(&self) -> &'static str {
        if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }
}

#[async_trait]
impl CallBroker for RedisBroker {
    async fn open(&self, call: Opening<'_>) -> Result<Wait, BrokerError> {
        let shared = &self.shared;
        for (n, key) in candidates(call.key, call.account).enumerate() {
            let key = &key;
            let leg_of = (n > 0).then_some(call.key);
            let Joined::Waiting {
                news,
                first,
                generation,
                joined,
                ringer,
            } = shared.waiters.join_opened(key, &call, leg_of).await
            else {
                continue;
            };
            let release = {
                let shared = shared.clone();
                let key: Arc<str> = Arc::from(key.as_str());
                Release::new(move || {
                    if let Left::Last {
                        cancel,
                        stamp,
                        holds,
                        ..
                    } = shared.waiters.leave(&key, generation)
                    {
                        // The retirer only stops when the broker is gone, and
                        // then there is nothing left to clean.
                        let _ = shared.retire.send((key, cancel.then_some(holds), stamp));
                    }
                })
            };
            if let Some(stamp) = joined {
                // A retry of a call this process rings: stored already.
                // Opened by this process: one clock.
                let held = Held {
                    generation,
                    stamp,
                    joined: true,
                    opened: None,
                };
                return Ok(Wait::held(key, news, held, ringer, release));
            }
            if first {
                let subscribed = shared
                    .subscriptions
                    .subscribe(channel(key), shared.options.acquire_timeout)
                    .await;
                if let Err(e) = subscribed {
                    // Nothing stored: leaving must not end the call that
                    // holds the key.
                    shared.waiters.claim_end(key, Some(generation));
                    return Err(e);
                }
            }
            let hold = shared.next_id();
            shared.waiters.hold(key, generation, hold.clone());
            // An error, or this future dropped, from here on: the script
            // may have stored the call or joined it, and leaving takes the
            // hold back (ending the call only if nobody else holds it).
            let (stamp, joined, crossed, opened) =
                match shared.claim(key, &call, &hold, n == 0).await? {
                    Claimed::Ours { stamp, crossed } => (stamp, false, crossed, None),
                    Claimed::Joined { stamp, opened } => (stamp, true, Crossed::Anew, opened),
                    // Not ours (or not stored): leaving must not end the call
                    // that holds the key.
                    Claimed::Taken => {
                        shared.waiters.claim_end(key, Some(generation));
                        continue;
                    }
                };
            shared.waiters.confirm(key, generation, stamp);
            if joined {
                // What reached the call before this process subscribed (a
                // phone's decline, above all) is only in its record.
                if let Err(e) = shared
                    .read_stored(&[(Arc::from(key.as_str()), stamp)])
                    .await
                {
                    tracing::warn!(unique_key = %crate::logs::Escaped(key), error = %e, "cannot read the answers of the call a PBX retry joined; its declines reach this retry only by a later answer or its end");
                }
            }
            let crossed = match leg_of {
                Some(call_id) => {
                    let (leg_keys, args) = keys::add_leg(call_id, key, call.account, call.until);
                    let marked = shared
                        .script::<bool>(&shared.leg, &leg_keys, &args, false)
                        .await?;
                    // A cancel would have found a call the key held.
                    marked && crossed != Crossed::Anew
                }
                None => crossed == Crossed::Yes,
            };
            if crossed {
                // A cancel read the key (or the Call-ID's legs) before this
                // call was there: it ends itself, as the cancel would have.
                shared
                    .end(
                        key,
                        EndReason::Cancelled,
                        Ending::Cancel(Some(call.account)),
                        stamp,
                    )
                    .await?;
                let ended = Message::Ended(EndReason::Cancelled);
                shared.waiters.tell(key, stamp, ended);
            }
            shared.waiters.opened(key, generation);
            let held = Held {
                generation,
                stamp,
                joined,
                opened,
            };
            return Ok(Wait::held(key, news, held, ringer, release));
        }
        Err(unavailable("no free key for the call"))
    }

    async fn answer(
        &self,
        key: &str,
        available: bool,
        pushed: Pushed,
    ) -> Result<Verdict, BrokerError> {
        let shared = &self.shared;
        // A call held here names its device at once; any other key is
        // tried as a lone device's call, then through its pointer.
        let (mut call, mut index, mut as_given) = match shared.waiters.device_of(key) {
            Some((call, index)) => (call.to_string(), index, false),
            None => (key.to_owned(), 0, true),
        };
        let received_at = SystemTime::now();
        let (counted, before) = loop {
            let args = [
                (index + 1).to_string(),
                (if available { "+" } else { "-" }).to_owned(),
                channel(&call),
                keys::encode_answer(index, available, received_at),
                shared.publish_command().to_owned(),
                (if as_given { "1" } else { "0" }).to_owned(),
                (if pushed == Pushed::Stale { "1" } else { "0" }).to_owned(),
                unix_millis(received_at).to_string(),
            ];
            let args = match pushed {
                Pushed::At { at, wait } => {
                    let at = at.saturating_add(ECHO_MARGIN_MS);
                    let mut with = args.to_vec();
                    with.extend([at.to_string(), at.saturating_add(wait).to_string()]);
                    with
                }
                Pushed::Stale | Pushed::Unsaid => args.to_vec(),
            };
            let keys = [state_key(&call), meta_key(&call)];
            let reply: Option<String> = shared.script(&shared.answer, &keys, &args, true).await?;
            let Some((counted, before)) = reply.as_deref().and_then(keys::split_answer) else {
                return Ok(Verdict::Unknown);
            };
            match Stored::decode(before) {
                Some(Stored::Pointer {
                    call: pointed,
                    device,
                }) if as_given => {
                    (call, index, as_given) = (pointed, device, false);
                }
                Some(Stored::Call(record)) => break (counted, record),
                _ => return Ok(Verdict::Unknown),
            }
        };
        let verdict = before.verdict(index, counted);
        if let (true, Phase::Ringing { until: stamp }) = (counted, before.phase) {
            // The call held here wakes from this reply; the message that
            // follows through pub/sub then changes nothing.
            let answer = Answer {
                available,
                received_at: Some(received_at),
            };
            let message = Message::Answer { index, answer };
            shared.waiters.tell(&call, Some(stamp), message);
        }
        Ok(verdict)
    }

    async fn end(&self, wait: &Wait, reason: EndReason) -> Result<Option<Record>, BrokerError> {
        if !self
            .shared
            .waiters
            .claim_end_as(wait.key(), wait.generation(), wait.stopped_last())
        {
            return Ok(None);
        }
        self.shared
            .end(wait.key(), reason, Ending::End, wait.stamp())
            .await
    }

    fn hang_up(&self, wait: &Wait) -> HangUp {
        let shared = &self.shared;
        let Some(holds) = shared.waiters.holds(wait.key(), wait.generation()) else {
            // A newer call holds the key here: this one is over.
            return Box::pin(std::future::ready(Ok(true)));
        };
        if !shared
            .waiters
            .claim_end_as(wait.key(), wait.generation(), wait.stopped_last())
        {
            // Another request here rings the call on.
            return Box::pin(std::future::ready(Ok(false)));
        }
        let (shared, key, stamp) = (shared.clone(), wait.key().to_owned(), wait.stamp());
        Box::pin(async move { shared.leave(&key, &holds, stamp).await })
    }

    async fn cancel(
        &self,
        key: &str,
        account: Option<i64>,
        by: Named,
    ) -> Result<bool, BrokerError> {
        let shared = &self.shared;
        let named = async {
            if by == Named::CallId {
                return Ok(key.to_owned());
            }
            if let Some((call, _)) = shared.waiters.device_of(key) {
                return Ok(call.to_string());
            }
            let stored: Option<String> =
                shared.query(redis::cmd("GET").arg(state_key(key))).await?;
            Ok(match stored.as_deref().and_then(Stored::decode) {
                Some(Stored::Pointer { call, .. }) => call,
                _ => key.to_owned(),
            })
        };
        let (cancel_keys, args) = keys::cancel(key, account);
        let legs = shared.script::<Vec<String>>(&shared.cancel, &cancel_keys, &args, false);
        let (named, legs) = tokio::join!(named, legs);
        let mut calls = vec![named?];
        calls.extend(legs?);
        let ended = calls.iter().map(|call| async move {
            let before = shared
                .end(call, EndReason::Cancelled, Ending::Cancel(account), None)
                .await?;
            let stamp = match before.map(|b| b.phase) {
                Some(Phase::Ringing { until }) => Some(until),
                _ => None,
            };
            if stamp.is_some() {
                let ended = Message::Ended(EndReason::Cancelled);
                shared.waiters.tell(call, stamp, ended);
            }
            Ok::<_, BrokerError>(stamp.is_some())
        });
        let mut any = false;
        for cancelled in futures_util::future::join_all(ended).await {
            any |= cancelled?;
        }
        Ok(any)
    }

    async fn read(&self, key: &str) -> Result<Option<(Stored, Option<i64>)>, BrokerError> {
        let (stored, meta): (Option<String>, Option<String>) = self
            .shared
            .query(redis::cmd("MGET").arg(state_key(key)).arg(meta_key(key)))
            .await?;
        Ok(stored.as_deref().and_then(Stored::decode).map(|stored| {
            let owner = meta
                .as_deref()
                .and_then(keys::owner_of)
                .filter(|_| matches!(stored, Stored::Call(_)));
            (stored, owner)
        }))
    }

    async fn alias(&self, alias: &str, key: &str, until: Instant) -> Result<(), BrokerError> {
        self.shared
            .query::<()>(&keys::set_alias(alias, key, until))
            .await?;
        // Stored again with the call if Redis loses it.
        if let Some((call, _)) = self.shared.waiters.device_of(key) {
            self.shared.waiters.note_alias(&call, alias, key);
        }
        Ok(())
    }

    async fn resolve(&self, alias: &str) -> Result<Option<String>, BrokerError> {
        self.shared
            .query(redis::cmd("GET").arg(keys::alias_key(alias)))
            .await
    }

    async fn claim(&self, claim: &PhoneClaim<'_>) -> Result<Option<FirstClaim>, BrokerError> {
        let shared = &self.shared;
        let keys = [keys::told_key(claim.call, claim.stamp)];
        let args = [
            claim.what.to_string(),
            format!("{} {} {}", claim.at, shared.next_id(), claim.push_key),
            claim.kept.as_millis().to_string(),
        ];
        let first: Option<String> = shared.script(&shared.told, &keys, &args, false).await?;
        // An unreadable first claim is no claim.
        Ok(first.and_then(|first| {
            let mut words = first.splitn(3, ' ');
            let at = words.next()?.parse().ok()?;
            let push_key = words.nth(1)?.to_owned();
            Some(FirstClaim { at, push_key })
        }))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.shared.query::<()>(&redis::cmd("PING")).await?;
        if !self.shared.subscriptions.up() {
            return Err(unavailable("Redis subscriber connection is down"));
        }
        Ok(())
    }

    fn holds(&self, push_key: &str) -> bool {
        self.shared.waiters.rings(push_key)
    }

    fn waiting(&self) -> usize {
        self.shared.waiters.len()
    }
}

/// Whether a call stored under its key crossed a PBX cancel
/// ([`keys::OPEN_SCRIPT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crossed {
    /// A cancel marked the key before the call was there: the call's
    /// request crossed it.
    Yes,
    /// No cancel marked the key, or it is a leg's (checked apart).
    No,
    /// The key held a call a cancel ended, or this request joins the
    /// ringing call: the cancel found that call, and no mark reaches this
    /// one, a leg's neither.
    Anew,
}

/// What [`Shared::claim`] found.
enum Claimed {
    /// The key holds this call under this stamp (`None`: unreadable, a
    /// reply the open script never gives; the wait then takes any news on
    /// the key, as before stamps).
    Ours {
        stamp: Option<Stamp>,
        crossed: Crossed,
    },
    /// The key holds the ringing call this one joined (a PBX retry), under
    /// this stamp, opened then (Unix ms, where its meta says).
    Joined {
        stamp: Option<Stamp>,
        opened: Option<i64>,
    },
    /// Another call's record or pointer holds the key.
    Taken,
}

/// Reads the Cluster's slot map for the answer script's short way each
/// time it asks ([`Direct`]): at the first answer, and after a redirection
/// or a master it could not reach.
async fn read_slot_maps(shared: std::sync::Weak<Shared>, mut stopped: watch::Receiver<()>) {
    loop {
        let Some(wanted) = shared.upgrade() else {
            return;
        };
        tokio::select! {
            _ = wanted.direct.map_wanted.notified() => {}
            _ = stopped.changed() => return,
        }
        let slots = match wanted.cluster() {
            Some(cluster) => cluster::read_slot_map(&wanted, cluster).await,
            None => None,
        };
        wanted.direct.learn(slots.as_ref());
    }
}

impl Shared {
    /// An id (a hold's, a notice claim's) that none of any instance has
    /// had.
    fn next_id(&self) -> Arc<str> {
        let (prefix, count) = &self.ids;
        Arc::from(format!(
            "{prefix}.{}",
            count.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Stores the call's record under `key` ([`keys::OPEN_SCRIPT`]) and
    /// then, for a new call, its device pointers, each only where the key
    /// is free. Says which call the key holds for this one, by its stamp:
    /// this one, or the ringing call it joined; [`Claimed::Taken`] when
    /// another call's record or pointer stands in the way, and then what
    /// this one stored is taken back and the key is left to its owner.
    /// `asked`: the key is the one the call asked for, not a leg's.
    async fn claim(
        &self,
        key: &str,
        call: &Opening<'_>,
        hold: &str,
        asked: bool,
    ) -> Result<Claimed, BrokerError> {
        let mut open = self.open.prepare_invoke();
        open.key(state_key(key))
            .key(meta_key(key))
            .key(keys::holders_key(key))
            .key(keys::cancels_key(key));
        for arg in keys::open_args(call.account, call.devices, call.until, hold, asked) {
            open.arg(arg);
        }
        let opened: String = self.invoke(&open).await?;
        if opened == "taken" {
            return Ok(Claimed::Taken);
        }
        if let Some(joined) = opened.strip_prefix("join ") {
            // Joined as it is, pointers and all.
            let (stamp, opened) = joined.split_once(' ').unwrap_or((joined, ""));
            return Ok(Claimed::Joined {
                stamp: keys::parse_stamp(stamp),
                opened: opened.parse().ok(),
            });
        }
        let new = opened.strip_prefix("new ").unwrap_or_default();
        let (stamp, crossed) = match new.split_once(' ') {
            Some((stamp, "cancelled")) => (stamp, Crossed::Yes),
            Some((stamp, "anew")) => (stamp, Crossed::Anew),
            _ => (new, Crossed::No),
        };
        let ours = Claimed::Ours {
            stamp: keys::parse_stamp(stamp),
            crossed,
        };
        let count = call.devices.len();
        if count == 1 {
            return Ok(ours);
        }
        // Every pointer lives in its own slot: one command each, all at once.
        let pointers = (0..count).map(|index| {
            let push = push_key(key, index, count);
            let expected = Stored::pointer(key, index);
            let cmd = keys::claim_pointer(&push, key, index, call.until);
            async move {
                let held: Option<String> = self.query(&cmd).await?;
                Ok::<_, BrokerError>((push, held.is_none(), held.is_none_or(|h| h == expected)))
            }
        });
        let pointers = futures_util::future::join_all(pointers)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        if pointers.iter().all(|(_, _, ours)| *ours) {
            return Ok(ours);
        }
        let mut undo = redis::pipe();
        for (push, stored, _) in &pointers {
            if *stored {
                undo.cmd("DEL").arg(state_key(push)).ignore();
            }
        }
        if opened.starts_with("new") {
            undo.cmd("DEL").arg(state_key(key)).ignore();
            undo.cmd("DEL").arg(meta_key(key)).ignore();
            undo.cmd("DEL").arg(keys::holders_key(key)).ignore();
        }
        // Each in its own slot on a cluster: one at a time.
        for cmd in undo.cmd_iter() {
            self.query::<()>(cmd).await?;
        }
        Ok(Claimed::Taken)
    }

    /// Runs the end script on the call `key`: see [`keys::END_SCRIPT`],
    /// whose record before it returns (none for `held`). `stamp`: only
    /// that call under the key, when given.
    async fn end(
        &self,
        key: &str,
        reason: EndReason,
        ending: Ending<'_>,
        stamp: Option<Stamp>,
    ) -> Result<Option<Record>, BrokerError> {
        let before = self.end_script(key, reason, ending, stamp).await?;
        Ok(before.as_deref().and_then(Record::decode))
    }

    /// The hang-up of the last request here that rang the call `key`:
    /// takes this process's `holds` on it back, and ends it `cancelled`
    /// unless another instance still holds it ([`keys::holders_key`]).
    /// Says whether the call is over.
    async fn leave(
        &self,
        key: &str,
        holds: &Holds,
        stamp: Option<Stamp>,
    ) -> Result<bool, BrokerError> {
        let reply = self
            .end_script(key, EndReason::Cancelled, Ending::Leave(holds), stamp)
            .await?;
        Ok(reply.as_deref() != Some("held"))
    }

    async fn end_script(
        &self,
        key: &str,
        reason: EndReason,
        ending: Ending<'_>,
        stamp: Option<Stamp>,
    ) -> Result<Option<String>, BrokerError> {
        let (mode, account, holds): (_, _, &[Arc<str>]) = match ending {
            Ending::End => ("end", None, &[]),
            Ending::Leave(holds) => ("leave", Some(holds.account), &holds.ids),
            Ending::Cancel(account) => ("cancel", account, &[]),
        };
        let mut args = vec![
            reason.as_str().to_owned(),
            keys::tombstone_millis().to_string(),
            mode.to_owned(),
            channel(key),
            keys::encode_end(EndReason::Cancelled),
            self.publish_command().to_owned(),
            account.map(|a| a.to_string()).unwrap_or_default(),
            stamp.map(|stamp| stamp.to_string()).unwrap_or_default(),
        ];
        args.extend(holds.iter().map(|hold| hold.to_string()));
        self.script(
            &self.end,
            &[state_key(key), meta_key(key), keys::holders_key(key)],
            &args,
            // The last word: the deadline's end (or the shutdown's).
            matches!(ending, Ending::End)
                && matches!(reason, EndReason::TimedOut | EndReason::Failed),
        )
        .await
    }
}

/// Whose end [`keys::END_SCRIPT`] runs.
#[derive(Debug, Clone, Copy)]
enum Ending<'a> {
    /// The holder's: its wait ran out, an answer won, the shutdown.
    End,
    /// A hang-up, by a process with these holds on the call.
    Leave(&'a Holds),
    /// The PBX's cancel: only that account's call, when given.
    Cancel(Option<i64>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::News;
    use crate::store::Platform;

    /// A broker on `TEST_REDIS_URL`, its subscriber connection up.
    async fn test_broker() -> RedisBroker {
        let url = std::env::var("TEST_REDIS_URL").expect("TEST_REDIS_URL");
        let broker = RedisBroker::connect(RedisOptions {
            url: url.clone(),
            acquire_timeout: Duration::from_secs(2),
            poll_interval: Duration::from_secs(60),
        })
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
        // The subscriber connection comes up in the background.
        let up = tokio::time::timeout(Duration::from_secs(10), async {
            while broker.ping().await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        up.await.expect("the broker ready within 10 s");
        broker
    }

    /// The notice claim's script run twice with the same arguments (the
    /// client sends it again when the connection dropped before the
    /// reply) is still the first claim, or its phone would go untold;
    /// another request's claim is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_REDIS_URL: run with --include-ignored, as .ci/run does"]
    async fn a_notice_claim_sent_again_is_still_the_first() {
        let broker = test_broker().await;
        let shared = &broker.shared;
        let key = crate::broker::random_key();
        let keys = [keys::told_key(&key, 7)];
        let run = |claim: &'static str| {
            let args = ["token".to_owned(), claim.to_owned(), "60000".to_owned()];
            let keys = &keys;
            async move {
                let first: Option<String> = shared
                    .script(&shared.told, keys, &args, false)
                    .await
                    .unwrap();
                first
            }
        };
        assert_eq!(run("1000 a.1 k").await, None, "the first claim");
        assert_eq!(run("1000 a.1 k").await, None, "the first claim, sent again");
        assert_eq!(
            run("1000 b.1 k").await.as_deref(),
            Some("1000 a.1 k"),
            "another request's claim in the same microsecond"
        );
    }

    /// A request that joins a call another instance opened learns when the
    /// call opened, on that instance's clock ([`Wait::opened`]): its pushes
    /// say they were sent no earlier, so an instance whose clock runs
    /// behind never has its phones' answers taken for the call before's.
    /// One opened in this process says nothing (one clock).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_REDIS_URL: run with --include-ignored, as .ci/run does"]
    async fn a_join_on_another_instance_learns_when_the_call_opened() {
        let (here, elsewhere) = (test_broker().await, test_broker().await);
        let key = crate::broker::random_key();
        let call = || Opening {
            key: &key,
            account: 7,
            devices: &[Platform::Android],
            until: Instant::now() + Duration::from_secs(60),
        };
        let before = unix_millis(SystemTime::now());
        let first = here.open(call()).await.expect("opened");
        let after = unix_millis(SystemTime::now());
        assert_eq!((first.joined(), first.opened()), (false, None));
        let local = here.open(call()).await.expect("joined here");
        assert_eq!((local.joined(), local.opened()), (true, None));
        let retry = elsewhere.open(call()).await.expect("joined elsewhere");
        assert!(retry.joined());
        let opened = retry.opened().expect("the opening time");
        assert!(
            (before..=after).contains(&opened),
            "{before} {opened} {after}"
        );
    }

    /// A hang-up takes back its own holds on a call and no other's, and a
    /// hold taken back stays so: the scripts' edges, which the property
    /// test in tests/lifecycle_model.rs reaches seldom or never (an open
    /// whose reply was lost, one that the client ran again late, another
    /// account's request).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_REDIS_URL: run with --include-ignored, as .ci/run does"]
    async fn a_hang_up_takes_back_its_own_holds_and_no_others() {
        let broker = test_broker().await;
        let shared = &broker.shared;
        let key = crate::broker::random_key();
        let call = Opening {
            key: &key,
            account: 7,
            devices: &[Platform::Android],
            until: Instant::now() + Duration::from_secs(60),
        };
        let (key, call) = (key.as_str(), &call);
        let claim = |hold: &'static str| async move {
            match shared.claim(key, call, hold, true).await {
                Ok(
                    Claimed::Ours {
                        stamp: Some(stamp), ..
                    }
                    | Claimed::Joined {
                        stamp: Some(stamp), ..
                    },
                ) => stamp,
                Ok(Claimed::Ours { stamp: None, .. } | Claimed::Joined { stamp: None, .. }) => {
                    panic!("{hold}: no stamp")
                }
                Ok(Claimed::Taken) => panic!("{hold}: taken"),
                Err(e) => panic!("{hold}: {e}"),
            }
        };
        let holds = |account: i64, ids: &[&str]| Holds {
            account,
            ids: ids.iter().map(|id| Arc::from(*id)).collect(),
        };
        let phase = || async {
            match broker.read(key).await {
                Ok(Some((Stored::Call(record), _))) => record.phase,
                other => panic!("{other:?}"),
            }
        };
        let stamp = claim("a").await;
        assert_eq!(claim("b").await, stamp, "the retry joined");

        // An open that failed (no stamp) and held nothing ends nothing.
        let left = shared.leave(key, &holds(7, &["lost"]), None).await;
        assert!(!left.expect("the end script"), "held by a and b");
        // Another account's request never touches the call.
        let left = shared.leave(key, &holds(8, &["a", "b"]), Some(stamp)).await;
        left.expect("the end script");
        assert!(matches!(phase().await, Phase::Ringing { .. }));
        // The retry hangs up; its open, run again late, holds no more.
        let left = shared.leave(key, &holds(7, &["b"]), Some(stamp)).await;
        assert!(!left.expect("the end script"), "held by a");
        assert_eq!(claim("b").await, stamp);
        // The last hold taken back ends the call.
        let left = shared.leave(key, &holds(7, &["a"]), Some(stamp)).await;
        assert!(left.expect("the end script"), "over");
        assert_eq!(phase().await, Phase::Ended(EndReason::Cancelled));

        // A call whose holds Redis lost (a failover): an open that failed
        // there ends nothing, its holder's hang-up (its stamp) ends it.
        let key = crate::broker::random_key();
        let call = Opening { key: &key, ..*call };
        let stamp = match shared.claim(&key, &call, "c", true).await {
            Ok(Claimed::Ours {
                stamp: Some(stamp), ..
            }) => stamp,
            _ => panic!("c: not opened"),
        };
        let lost: i64 = shared
            .query(redis::cmd("DEL").arg(keys::holders_key(&key)))
            .await
            .expect("DEL");
        assert_eq!(lost, 1);
        let left = shared.leave(&key, &holds(7, &["lost"]), None).await;
        assert!(!left.expect("the end script"), "not the failed open's");
        let left = shared.leave(&key, &holds(7, &["c"]), Some(stamp)).await;
        assert!(left.expect("the end script"), "over");
    }

    /// The fallback check reads what a key holds now, which may be a newer
    /// call under the key (the wait's own call over, its `call_id` posted
    /// again, its news lost with the subscription): it hands a wait only
    /// its own call's record, told by the stamp (a live record's deadline,
    /// a tombstone's meta).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_REDIS_URL: run with --include-ignored, as .ci/run does"]
    async fn the_fallback_check_hands_a_wait_only_its_own_calls_record() {
        let broker = test_broker().await;
        let key = crate::broker::random_key();
        let wait = broker
            .open(Opening {
                key: &key,
                account: 7,
                devices: &[Platform::Android],
                until: Instant::now() + Duration::from_secs(60),
            })
            .await
            .expect("a wait opens");
        let own = wait.stamp().expect("a stamp");
        let (shared, key) = (&broker.shared, key.as_str());
        let store = |record: String, stamp: Stamp| async move {
            let mut pipe = redis::pipe();
            pipe.cmd("SET").arg(state_key(key)).arg(record).ignore();
            pipe.cmd("SET")
                .arg(meta_key(key))
                .arg(keys::meta(7, stamp))
                .ignore();
            shared.pipeline::<()>(&pipe).await.expect("stored");
            shared.check_stored().await.expect("checked");
        };
        let newer = own + 5;
        store(format!("won {newer} android+"), newer).await;
        store("ended cancelled android+".to_owned(), newer).await;
        assert_eq!(
            wait.news(),
            News {
                answers: vec![None],
                ended: None
            },
            "a newer call's"
        );
        store(format!("won {own} android+"), own).await;
        assert_eq!(
            wait.news().answers[0].map(|a| a.available),
            Some(true),
            "its own"
        );
        store("ended answered_elsewhere android+".to_owned(), own).await;
        assert_eq!(
            wait.news().ended,
            Some(EndReason::AnsweredElsewhere),
            "its own"
        );
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
}

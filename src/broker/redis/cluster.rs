//! The Redis Cluster connection ([`Cluster`]), and the watchdog that
//! replaces it when one shard stops answering it while answering everyone
//! else.
//!
//! Why a watchdog. The chaos run (`docs/chaos.md`) found instances on which,
//! after a master slept through its own failover, every command the redis
//! crate's cluster connection sent to that shard's new master timed out,
//! for the rest of the run (minutes), while the master answered other
//! clients and an instance started meanwhile served the shard at once. The
//! crate retries a timed-out command on the same node connection and only
//! reconnects a node for a dropped connection, so nothing inside it ends
//! such a state, whatever wedged the node connection. A new cluster
//! connection is clean: that is what the watchdog makes.
//!
//! How it tells a wedged connection from a failing shard. Any failed
//! cluster command wakes it (a healthy cluster costs it nothing). It then
//! reads the slot map straight from a node, over the short way's plain
//! connections ([`super::direct`]), not over the cluster connection; and for
//! each master it sends `PING` the short way and `ECHO <nonce>` through the
//! cluster connection, routed to one of the master's slots. A master that
//! answers nobody is down or failing over: the cluster connection is not
//! to blame, nothing is replaced. A master that answers the short way but
//! not through the cluster connection (no reply in time, or another
//! command's reply), [`STRIKES`] probes in a row [`PROBE_EVERY`] apart,
//! means the cluster connection is wedged, or still routes the shard to a
//! master that was replaced and sleeps: either way a new one is made (the
//! same client, so the same push channel for the subscriber task), every
//! channel waited on here is subscribed on it, and the fallback check runs
//! for [`CLUSTER_SETTLING`] to cover messages published during the switch.
//! The old connection closes when its last command in flight ends, and its
//! subscriptions with it. Probing stops once every master answers through
//! the cluster connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{IntoConnectionInfo, RedisResult, Value};
use tokio::sync::{watch, Notify};

use super::direct::{Sent, SlotMap};
use super::fallback::CLUSTER_SETTLING;
use super::keys::channel;
use super::subscriber::sleep_or_stop;
use super::Shared;
use crate::logs::Escaped;

/// How far apart the probes of a suspected cluster connection are.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Probes in a row that must find one master answering the short way but
/// not through the cluster connection before it is replaced: not one, for
/// the connection may be following a failover at that very moment; not
/// many, for every call on that shard fails meanwhile (a replacement costs
/// a connection per node and a `SSUBSCRIBE` per call ringing here).
const STRIKES: u32 = 2;
/// Channels subscribed at once on a new cluster connection.
const RESUBSCRIBING: usize = 32;

/// The cluster connection of this process, replaceable.
pub(super) struct Cluster {
    client: ClusterClient,
    current: RwLock<ClusterConnection>,
    /// The nodes the URL names, as `host:port`: where the slot map is read
    /// when no master is known.
    seeds: Vec<Arc<str>>,
    /// Woken by a failed command: the watchdog then probes.
    suspect: Notify,
    /// How many times the connection was replaced.
    replaced: AtomicU64,
}

impl Cluster {
    /// Connects to the cluster `client` names, whose nodes `seeds` lists
    /// (URLs).
    pub(super) async fn connect(client: ClusterClient, seeds: &[String]) -> RedisResult<Cluster> {
        let conn = client.get_async_connection().await?;
        let seeds = seeds
            .iter()
            .filter_map(|url| url.as_str().into_connection_info().ok())
            .filter_map(|info| match info.addr() {
                redis::ConnectionAddr::Tcp(host, port) => Some(Arc::from(format!("{host}:{port}"))),
                _ => None,
            })
            .collect();
        Ok(Cluster {
            client,
            current: RwLock::new(conn),
            seeds,
            suspect: Notify::new(),
            replaced: AtomicU64::new(0),
        })
    }

    /// A handle on the current connection, for one command.
    pub(super) fn conn(&self) -> ClusterConnection {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// A command on the cluster connection failed: have it probed.
    pub(super) fn suspect(&self) {
        self.suspect.notify_one();
    }

    /// How many times the watchdog replaced the connection.
    pub(super) fn replaced(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }
}

/// What a probe found.
#[derive(Debug, PartialEq)]
enum Health {
    /// Every master answered through the cluster connection.
    Answering,
    /// Some master answered nobody (down, failing over), or the slot map
    /// could not be read; none was found wedged.
    Failing,
    /// This master answered the short way but not through the cluster
    /// connection.
    Wedged(Arc<str>),
}

/// The watchdog task: sleeps until a cluster command fails, then probes
/// until every master answers through the cluster connection, replacing
/// the connection when one stays wedged.
pub(super) async fn watchdog(shared: Weak<Shared>, mut stop: watch::Receiver<()>) {
    loop {
        let Some(cluster) = shared.upgrade().and_then(|s| s.cluster().cloned()) else {
            return;
        };
        tokio::select! {
            _ = cluster.suspect.notified() => {}
            _ = stop.changed() => return,
        }
        let mut strikes = 0;
        loop {
            let Some(strong) = shared.upgrade() else {
                return;
            };
            match probe(&strong, &cluster).await {
                Health::Answering => break,
                Health::Failing => strikes = 0,
                Health::Wedged(master) => {
                    strikes += 1;
                    if strikes >= STRIKES {
                        replace(&strong, &cluster, &master).await;
                        strikes = 0;
                    }
                }
            }
            drop(strong);
            if !sleep_or_stop(PROBE_EVERY, &mut stop).await {
                return;
            }
        }
    }
}

/// Reads the slot map (`CLUSTER SLOTS`) straight from a node, over the
/// short way's plain connections: a master it knows, else a node the URL
/// names. The reply, when one parses as a map. Also how the short way
/// learns its map ([`super::RedisBroker::connect`]'s map reader), so that
/// neither depends on the cluster connection it is there to get around.
pub(super) async fn read_slot_map(shared: &Shared, cluster: &Cluster) -> Option<Value> {
    let known = shared.direct.masters();
    for node in known.iter().chain(&cluster.seeds) {
        if let Sent::Reply(reply) = shared
            .direct
            .send_to(node.clone(), redis::cmd("CLUSTER").arg("SLOTS"))
            .await
        {
            if SlotMap::from_reply(&reply).is_some() {
                return Some(reply);
            }
        }
    }
    None
}

/// Probes every master once: see the module's doc.
async fn probe(shared: &Shared, cluster: &Cluster) -> Health {
    let Some(map) = read_slot_map(shared, cluster)
        .await
        .as_ref()
        .and_then(SlotMap::from_reply)
    else {
        return Health::Failing;
    };
    let timeout = shared.options.acquire_timeout;
    let checks = map.masters().into_iter().map(|(master, slot)| async move {
        let direct = shared
            .direct
            .send_to(master.clone(), &redis::cmd("PING"))
            .await;
        if !matches!(direct, Sent::Reply(_)) {
            return None;
        }
        let nonce = format!("call-notifier-probe-{}", crate::broker::random_key());
        let mut echo = redis::cmd("ECHO");
        echo.arg(&nonce);
        let route = Route::new(slot, SlotAddr::Master);
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
        let mut conn = cluster.conn();
        let answered = tokio::time::timeout(timeout, conn.route_command(echo, routing)).await;
        let right = match answered {
            Ok(Ok(Value::BulkString(echoed))) => echoed == nonce.as_bytes(),
            Ok(Ok(Value::SimpleString(echoed))) => echoed == nonce,
            _ => false,
        };
        Some((master, right))
    });
    let checked = futures_util::future::join_all(checks).await;
    if let Some((master, _)) = checked.iter().flatten().find(|(_, right)| !right) {
        return Health::Wedged(master.clone());
    }
    if checked.iter().all(Option::is_some) {
        Health::Answering
    } else {
        Health::Failing
    }
}

/// Replaces the cluster connection and subscribes every channel waited on
/// here on the new one.
async fn replace(shared: &Shared, cluster: &Cluster, master: &str) {
    let timeout = shared.options.acquire_timeout;
    let fresh = match tokio::time::timeout(timeout * 4, cluster.client.get_async_connection()).await
    {
        Ok(Ok(fresh)) => fresh,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, master = %Escaped(master), "cannot replace the wedged Redis Cluster connection");
            return;
        }
        Err(_) => {
            tracing::warn!(master = %Escaped(master), "cannot replace the wedged Redis Cluster connection: timed out");
            return;
        }
    };
    *cluster
        .current
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh.clone();
    // From here on new waits subscribe on the new connection; the ones
    // already waiting (every key registered before this line) are
    // subscribed again below, and messages published before they are, the
    // fallback check reads from the stored state.
    shared.mark_unsure_for(CLUSTER_SETTLING);
    let channels: Vec<String> = shared.waiters.keys().iter().map(|k| channel(k)).collect();
    let count = channels.len();
    let failed = futures_util::stream::iter(channels)
        .map(|name| {
            let mut conn = fresh.clone();
            async move {
                matches!(
                    tokio::time::timeout(timeout, conn.ssubscribe(name)).await,
                    Ok(Ok(()))
                )
            }
        })
        .buffer_unordered(RESUBSCRIBING)
        .filter(|subscribed| std::future::ready(!subscribed))
        .count()
        .await;
    shared.mark_unsure_for(CLUSTER_SETTLING);
    shared.failover_suspected();
    cluster.replaced.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        master = %Escaped(master),
        channels = count,
        failed,
        replacements = cluster.replaced(),
        "replaced the Redis Cluster connection: the master answered directly but not through it"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::redis::{state_key, RedisBroker, RedisOptions};
    use crate::broker::{CallBroker, Opening};
    use crate::store::Platform;

    /// Awaits `future`, failing the test (naming `what`) after 60 s.
    async fn bounded<F: std::future::Future>(what: &str, future: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(60), future)
            .await
            .unwrap_or_else(|_| panic!("{what}: nothing within 60 s"))
    }

    /// A broker on the test cluster, and a call ringing on `devices` held
    /// by it.
    async fn a_call(
        devices: &[Platform],
    ) -> (RedisBroker, Arc<Cluster>, String, crate::broker::Wait) {
        let url = std::env::var("TEST_REDIS_CLUSTER_URL")
            .expect("TEST_REDIS_CLUSTER_URL (e.g. redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003)");
        let broker = RedisBroker::connect(RedisOptions {
            url: url.clone(),
            acquire_timeout: Duration::from_millis(500),
            poll_interval: Duration::from_millis(100),
        })
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
        let cluster = broker.shared.cluster().expect("a cluster").clone();
        let key = crate::broker::random_key();
        let wait = broker
            .open(Opening {
                key: &key,
                account: 1,
                devices,
                until: tokio::time::Instant::now() + Duration::from_secs(120),
            })
            .await
            .expect("a wait opens");
        (broker, cluster, key, wait)
    }

    /// Where a command for `key`'s master goes.
    fn to_master_of(key: &str) -> RoutingInfo {
        let slot = super::super::direct::slot(state_key(key).as_bytes());
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
            slot,
            SlotAddr::Master,
        )))
    }

    /// Stops the replies on the cluster connection's own connection to
    /// `key`'s master (`CLIENT REPLY OFF`, sent on it: never answered).
    async fn wedge(cluster: &Cluster, key: &str) {
        let mut off = redis::cmd("CLIENT");
        off.arg("REPLY").arg("OFF");
        let mut conn = cluster.conn();
        let sent = conn.route_command(off, to_master_of(key));
        let _ = tokio::time::timeout(Duration::from_millis(300), sent).await;
    }

    /// The chaos run's wedge, made on purpose: the redis crate's connection
    /// to one master gets no reply any more (`CLIENT REPLY OFF`, sent on
    /// that very connection) while the master answers everyone else. The
    /// crate alone stays stuck: every command to the shard times out. The
    /// watchdog must replace the connection, after which commands to the
    /// shard are answered again and the call waited on is subscribed on
    /// the new connection (the one Redis still counts once the old one has
    /// closed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_REDIS_CLUSTER_URL: run with --include-ignored, as .ci/run does"]
    async fn a_cluster_connection_one_master_stopped_answering_is_replaced() {
        let (broker, cluster, key, wait) = a_call(&[Platform::Android]).await;
        wedge(&cluster, &key).await;
        let mut echo = redis::cmd("ECHO");
        echo.arg("wedged?");
        let wedged = tokio::time::timeout(
            Duration::from_secs(2),
            cluster.conn().route_command(echo, to_master_of(&key)),
        )
        .await;
        assert!(
            !matches!(wedged, Ok(Ok(_))),
            "the connection to the master still answers: {wedged:?}"
        );
        assert_eq!(cluster.replaced(), 0);

        // A command to the shard fails, which has the watchdog probe; it
        // replaces the connection and the shard answers again.
        bounded("the shard answering again", async {
            while broker.read(&key).await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(cluster.replaced() >= 1, "answered without a new connection");
        assert!(
            broker.read(&key).await.expect("the call's state").is_some(),
            "the call's record is gone"
        );

        // The wait's channel is subscribed on the new connection: once the
        // old one has closed, Redis still counts one subscriber.
        let mut count = redis::cmd("PUBSUB");
        count.arg("SHARDNUMSUB").arg(channel(&key));
        bounded("one subscriber left on the call's channel", async {
            loop {
                let counted = cluster
                    .conn()
                    .route_command(count.clone(), to_master_of(&key))
                    .await;
                let subscribers = match counted {
                    Ok(Value::Array(pair)) => match pair.get(1) {
                        Some(Value::Int(n)) => *n,
                        _ => -1,
                    },
                    Ok(Value::Map(pairs)) => match pairs.first() {
                        Some((_, Value::Int(n))) => *n,
                        _ => -1,
                    },
                    _ => -1,
                };
                if subscribers == 1 {
                    return;
                }
                assert!(
                    subscribers != 0,
                    "the call's channel has no subscriber left"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        drop(wait);
    }

    /// Kills, on every master, the short way's connections
    /// (`call-notifier-answers`): what a restart or a cut leaves in its pool.
    async fn kill_short_way_connections(shared: &Shared) -> usize {
        let mut killed = 0;
        for master in shared.direct.masters() {
            let client = redis::Client::open(format!("redis://{master}/")).expect("a node URL");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("a connection to the master");
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut conn)
                .await
                .expect("CLIENT LIST");
            for line in list
                .lines()
                .filter(|l| l.contains("name=call-notifier-answers"))
            {
                let Some(addr) = line.split(' ').find_map(|f| f.strip_prefix("addr=")) else {
                    continue;
                };
                let _: redis::RedisResult<()> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("ADDR")
                    .arg(addr)
                    .query_async(&mut conn)
                    .await;
                killed += 1;
            }
        }
        killed
    }

    /// The last word on a call (its end script, at the deadline) gets
    /// through while the cluster connection is stuck on the call's shard
    /// and every idle connection of the short way was closed by Redis (the
    /// chaos run's cut connections): it goes the short way, on a new
    /// connection, and finds the answer that won.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs TEST_REDIS_CLUSTER_URL: run with --include-ignored, as .ci/run does"]
    async fn the_last_word_gets_through_a_stuck_cluster_connection() {
        let (broker, cluster, key, wait) = a_call(&[Platform::Android, Platform::Android]).await;
        let shared = broker.shared.clone();
        // The second device takes the call; its answer is repeated once the
        // short way knows the slot map, so its pool holds a connection.
        let device = crate::broker::push_key(&key, 1, 2);
        broker
            .answer(&device, true, crate::broker::Pushed::Unsaid)
            .await
            .expect("the answer counts");
        bounded("the short way's slot map", async {
            while shared.direct.masters().is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        broker
            .answer(&device, true, crate::broker::Pushed::Unsaid)
            .await
            .expect("the repeat");
        assert!(
            kill_short_way_connections(&shared).await > 0,
            "no idle connection to kill"
        );

        wedge(&cluster, &key).await;

        let before = tokio::time::timeout(
            Duration::from_millis(450),
            broker.end(&wait, crate::store::EndReason::TimedOut),
        )
        .await
        .expect("the end script answered before the cluster connection's timeout")
        .expect("the end script ran");
        let before = before.expect("the call's record before its end");
        assert_eq!(before.devices[1].answer, Some(true), "{before:?}");
        assert_eq!(
            cluster.replaced(),
            0,
            "the cluster connection was replaced first"
        );
    }
}

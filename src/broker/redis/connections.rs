//! How the broker reaches Redis to send commands: [`Link`].
//!
//! One server: one multiplexed connection, a redis crate
//! [`ConnectionManager`] that reconnects by itself, pipelines every command
//! of the process.
//!
//! Why the crate's manager and not a bb8 pool. A bb8 pool of multiplexed
//! connections (bb8-redis, or a manager of our own) cannot tell a dropped
//! connection short of a round trip: after a Redis restart every pooled
//! connection failed every command until we added connection generations,
//! and with Redis down every checkout waited out `--redis-timeout-ms`
//! until we added a fail-fast layer. `ConnectionManager` does both jobs:
//! a command that finds its connection dropped starts one reconnect that
//! every later command shares, and with `number_of_retries(0)` a reconnect
//! that fails fails those commands at once (the next command tries again),
//! so a Redis that is down costs a call nothing but an immediate NAK. The
//! one thing left here: a command whose connection turned out dropped is
//! sent once more, on the reconnected one, so a restarted Redis costs no
//! request an error. Every fault test in `tests/faults_*.rs` passes on it.
//!
//! A cluster: one cluster connection (a multiplexed connection per node,
//! RESP3), which follows slot moves and failovers by itself, and which a
//! watchdog replaces when one shard stops answering it ([`super::cluster`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{RedisFuture, RedisResult, Value};

use super::cluster::Cluster;

/// How this process reaches Redis for commands.
pub(super) enum Link {
    /// One Redis server.
    Single(ServerConnection),
    /// A Redis Cluster.
    Cluster(Arc<Cluster>),
}

/// The command connection of one Redis server: one multiplexed connection,
/// which pipelines every command of the process.
pub(super) struct ServerConnection {
    manager: ConnectionManager,
    /// The database the URL names, for [`ConnectionLike::get_db`].
    db: i64,
}

impl ServerConnection {
    /// A connection to `client`'s server, made lazily: a Redis that is down
    /// at start-up makes the broker unready, not the process dead.
    /// `timeout` bounds a connection attempt and each command's answer.
    pub(super) fn new(client: &redis::Client, timeout: Duration) -> RedisResult<ServerConnection> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // One attempt per reconnect: commands never wait out a backoff.
            .set_number_of_retries(0);
        Ok(ServerConnection {
            manager: ConnectionManager::new_lazy_with_config(client.clone(), config)?,
            db: client.get_connection_info().redis_settings().db(),
        })
    }
}

impl Link {
    /// A handle for one command (or pipeline, or script) on this link.
    pub(super) fn conn(&self) -> Conn {
        match self {
            Link::Single(server) => Conn::Single {
                manager: server.manager.clone(),
                db: server.db,
            },
            Link::Cluster(cluster) => Conn::Cluster(cluster.conn()),
        }
    }
}

/// One command's connection, either link, as the redis crate's commands,
/// pipelines and scripts see it.
pub(super) enum Conn {
    Single { manager: ConnectionManager, db: i64 },
    Cluster(ClusterConnection),
}

/// Sends once, and once more when the connection turned out dropped (the
/// manager has started its reconnect, which the second send awaits).
///
/// Sending twice is safe for every command the broker sends: `SET NX`,
/// `GET`, `MGET`, `DEL`, `PING`, and the answer script, whose first answer
/// stands (a second run returns the answered state, so the caller only
/// skips the response log for it).
async fn once_more<T, F, Fut>(mut send: F) -> RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = RedisResult<T>>,
{
    match send().await {
        Err(e) if e.is_connection_dropped() => send().await,
        result => result,
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single { manager, .. } => Box::pin(once_more(move || {
                let mut manager = manager.clone();
                async move { manager.req_packed_command(cmd).await }
            })),
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
            Conn::Single { manager, .. } => Box::pin(once_more(move || {
                let mut manager = manager.clone();
                async move { manager.req_packed_commands(pipeline, offset, count).await }
            })),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single { db, .. } => *db,
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

//! Scenario 5, the Redis client: the redis crate's `ConnectionManager` (one
//! multiplexed connection for the whole process, what the broker sends
//! every command but the answer script on) against a bb8-redis pool, the
//! design card's first choice, on the answer script's shape.
//!
//! - Idle round trip: one script at a time, 0 to 200 ms of idleness before
//!   each (the fork scenario's phases), on a two-worker runtime like the
//!   server's, timed from the call to the reply in the calling task.
//! - Throughput: 128 tasks sending the script back to back for 5 s.
//!
//! bb8-redis hands out the crate's `MultiplexedConnection`, so each
//! command still crosses the connection's driver task; the pool adds a
//! checkout, and by default a `PING` per checkout (`test_on_check_out`),
//! measured both ways. One server only: bb8-redis has no Cluster manager.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bb8_redis::RedisConnectionManager;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::floor::SCRIPT;
use crate::generator;
use crate::stats::Samples;

/// Idle round trips timed per client.
const IDLE_CALLS: usize = 300;
/// The fork scenario's answer phases.
const IDLE_PERIOD: Duration = Duration::from_millis(200);
const TASKS: usize = 128;
const THROUGHPUT_FOR: Duration = Duration::from_secs(5);
/// Connections in the bb8 pool.
const POOL_SIZE: u32 = 16;

#[derive(Debug, Clone, Copy)]
pub struct Size {
    pub idle_calls: usize,
    pub throughput_for: Duration,
}

impl Size {
    pub fn full() -> Size {
        Size {
            idle_calls: IDLE_CALLS,
            throughput_for: THROUGHPUT_FOR,
        }
    }

    pub fn quick() -> Size {
        Size {
            idle_calls: 20,
            throughput_for: Duration::from_millis(500),
        }
    }
}

pub struct Client {
    pub client: &'static str,
    pub idle: Samples,
    pub per_second: f64,
}

/// One way to send a command.
#[derive(Clone)]
enum Sender {
    Manager(ConnectionManager),
    Pool(bb8::Pool<RedisConnectionManager>),
}

impl Sender {
    async fn run(&self, script: &redis::Script, key: &str, n: u64) -> Result<()> {
        let mut invocation = script.key(key);
        invocation.arg(n).arg("PUBLISH");
        let _: i64 = match self {
            Sender::Manager(manager) => invocation.invoke_async(&mut manager.clone()).await?,
            Sender::Pool(pool) => {
                let mut conn = pool.get().await.context("a pooled connection")?;
                invocation.invoke_async(&mut *conn).await?
            }
        };
        Ok(())
    }
}

/// Measures each client on the Redis server at `url`.
pub async fn run(url: &str, key_prefix: &str, size: Size) -> Result<Vec<Client>> {
    let url = url.to_owned();
    let key = format!("{key_prefix}{{clients}}");
    // A runtime of its own, two workers like the server's.
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let measured = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the clients' runtime")
            .and_then(|runtime| runtime.block_on(measure_all(&url, &key, size)));
        let _ = done.send(measured);
    });
    result.await.context("the clients' thread stopped")?
}

async fn measure_all(url: &str, key: &str, size: Size) -> Result<Vec<Client>> {
    let client = redis::Client::open(url)?;
    let manager = ConnectionManager::new_with_config(
        client.clone(),
        ConnectionManagerConfig::new().set_number_of_retries(0),
    )
    .await?;
    let pool = |test_on_check_out| async move {
        let manager = RedisConnectionManager::new(url)?;
        let pool = bb8::Pool::builder()
            .max_size(POOL_SIZE)
            .test_on_check_out(test_on_check_out)
            .build(manager)
            .await?;
        Ok::<_, anyhow::Error>(pool)
    };
    let senders = [
        (
            "redis ConnectionManager (one multiplexed connection)",
            Sender::Manager(manager),
        ),
        (
            "bb8-redis pool of 16, PING on checkout (its default)",
            Sender::Pool(pool(true).await?),
        ),
        (
            "bb8-redis pool of 16, no checkout test",
            Sender::Pool(pool(false).await?),
        ),
    ];
    let script = redis::Script::new(SCRIPT);
    let mut clients = Vec::new();
    for (name, sender) in senders {
        // Warm: the script is loaded, the pool filled.
        sender.run(&script, key, 0).await?;
        let mut took = Vec::with_capacity(size.idle_calls);
        for n in 0..size.idle_calls {
            tokio::time::sleep(generator::app_delay(n, IDLE_PERIOD)).await;
            let sent = Instant::now();
            sender.run(&script, key, n as u64).await?;
            took.push(sent.elapsed());
        }
        let per_second = throughput(&sender, &script, key, size.throughput_for).await?;
        eprintln!(
            "bench: clients: {name}: idle p50 {}, {per_second:.0} scripts/s",
            crate::stats::duration(Samples::new(took.clone()).summary().p50)
        );
        clients.push(Client {
            client: name,
            idle: Samples::new(took),
            per_second,
        });
    }
    let _: () = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut client.get_multiplexed_async_connection().await?)
        .await?;
    Ok(clients)
}

async fn throughput(
    sender: &Sender,
    script: &redis::Script,
    key: &str,
    duration: Duration,
) -> Result<f64> {
    let sent = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let (sender, script, key, sent) =
            (sender.clone(), script.clone(), key.to_owned(), sent.clone());
        tasks.spawn(async move {
            while Instant::now() < until {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                sender.run(&script, &key, n).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(sent.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

//! Start-up: open the store and the broker, bind the listener, serve until
//! told to stop. `main.rs` and the tests both come through here, so the tests
//! run exactly the server the binary runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::auth::Access;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::{RedisBroker, RedisOptions};
use crate::broker::CallBroker;
use crate::calls::{Handoffs, Parking};
use crate::config::Config;
use crate::logs::Every;
use crate::metrics::Metrics;
use crate::push::notices::TakeoverNotices;
use crate::push::router::PushRouter;
use crate::push::Pusher;
use crate::shutdown::Phase;
use crate::state::AppState;
use crate::store::{self, CallHistory, ResponseLog};

/// A server to start: the configuration plus what tests may swap in.
pub struct Server {
    config: Config,
    pusher: Option<Arc<dyn Pusher>>,
    broker: Option<Arc<dyn CallBroker>>,
}

/// A started server.
pub struct Running {
    /// Where it listens (the real port when `--listen` named port 0).
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn new(config: Config) -> Self {
        Server {
            config,
            pusher: None,
            broker: None,
        }
    }

    /// Sends every push through `pusher` instead of the per-app pushers.
    pub fn with_pusher(mut self, pusher: Arc<dyn Pusher>) -> Self {
        self.pusher = Some(pusher);
        self
    }

    /// Carries answers through `broker` instead of the one `--redis-url`
    /// selects: how the benchmarks measure the polling design this service
    /// replaced, without keeping it in the product.
    pub fn with_broker(mut self, broker: Arc<dyn CallBroker>) -> Self {
        self.broker = Some(broker);
        self
    }

    /// Opens the store (running migrations) and the broker, binds the
    /// listener and starts serving in a task.
    pub async fn start(self) -> anyhow::Result<Running> {
        // Refuse an unsafe set-up before anything listens.
        let access = Access::from_config(&self.config)?;
        let listener = listen(self.config.listen)
            .with_context(|| format!("cannot listen on {}", self.config.listen))?;
        let addr = listener.local_addr()?;
        let state = build_state(self.config, addr, self.pusher, self.broker, access).await?;
        let task = tokio::spawn(crate::http::serve(listener, state.clone()));
        tracing::info!(%addr, "call-notifier listening");
        Ok(Running { addr, state, task })
    }
}

/// Beyond `--push-timeout-ms`, what the last `call_ended` notices of a
/// drain may take to be handed to the push client once their calls ended:
/// their claims in the broker (each within [`crate::calls::LAST_WORD`]),
/// and 200 ms more for the tasks to get there.
const NOTICE_MARGIN: Duration = crate::calls::LAST_WORD.saturating_add(Duration::from_millis(200));

impl Running {
    /// The base URL to reach it, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts draining: see [`Phase::Draining`].
    pub fn drain(&self) {
        self.state.phase.send_if_modified(|phase| {
            let first = *phase == Phase::Serving;
            if first {
                *phase = Phase::Draining;
            }
            first
        });
    }

    /// Answers every parked call NAK now: see [`Phase::Aborting`].
    pub fn abort(&self) {
        self.state.phase.send_replace(Phase::Aborting);
    }

    /// Drains and returns when the last connection has finished, the last
    /// `call_ended` notice has left and the response log is written.
    pub async fn stop(mut self) {
        self.drain();
        let _ = (&mut self.task).await;
        self.finish().await;
    }

    /// What follows the last connection: the `call_ended` notices of the
    /// calls that just ended (each push bounded by `--push-timeout-ms`, so
    /// the exit is held no longer than that past the last call), then what
    /// the batched writers (response log, call history) hold.
    async fn finish(&self) {
        let notices = self.state.parking.schedules_done();
        let bound = self.state.config.push_timeout() + NOTICE_MARGIN;
        if tokio::time::timeout(bound, notices).await.is_err() {
            tracing::warn!(
                schedules = self.state.parking.schedules(),
                "exiting with call_ended notices still unsent after --push-timeout-ms"
            );
        }
        self.state.response_log.flush().await;
        self.state.call_history.flush().await;
    }

    /// Serves until the first `signals` item, drains, aborts at the second
    /// (or at the shutdown timeout), and returns when everything finished.
    pub async fn run_until_signalled(
        mut self,
        mut signals: impl futures_util::Stream<Item = ()> + Unpin,
    ) {
        use futures_util::StreamExt;
        tokio::select! {
            _ = &mut self.task => {}
            _ = signals.next() => {
                tracing::info!(
                    parked_calls = self.state.parking.parked(),
                    "shutting down: draining parked calls (signal again to answer them NAK now)"
                );
                self.drain();
                tokio::select! {
                    _ = &mut self.task => {}
                    _ = signals.next() => {
                        tracing::warn!(
                            parked_calls = self.state.parking.parked(),
                            "second signal: answering parked calls NAK"
                        );
                        self.abort();
                        let _ = (&mut self.task).await;
                    }
                }
            }
        }
        self.finish().await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn build_state(
    config: Config,
    addr: SocketAddr,
    pusher: Option<Arc<dyn Pusher>>,
    broker: Option<Arc<dyn CallBroker>>,
    access: Access,
) -> anyhow::Result<Arc<AppState>> {
    let store = store::open(
        &config.database_url,
        store::PoolOptions {
            max_size: config.database_pool_size,
            acquire_timeout: Duration::from_millis(config.database_timeout_ms),
        },
    )
    .await
    .with_context(|| {
        format!(
            "cannot open the database {}",
            redact_url(&config.database_url)
        )
    })?;
    if config.broker_mode.is_some() {
        tracing::warn!("--broker-mode is deprecated and has no effect: answers always arrive by publish/subscribe");
    }
    if config.redis_pool_size.is_some() {
        tracing::warn!(
            "--redis-pool-size is deprecated and has no effect: one multiplexed connection carries every Redis command"
        );
    }
    let broker = match broker {
        Some(broker) => broker,
        None => open_broker(&config).await?,
    };
    let pusher = pusher.unwrap_or_else(|| Arc::new(PushRouter::new(store.clone(), &config)));
    let response_log = ResponseLog::start(store.clone());
    let call_history = CallHistory::start(store.clone());
    let phase = watch::channel(Phase::Serving).0;
    tokio::spawn(store::purge_periodically(
        store.clone(),
        config.call_history_days,
        phase.subscribe(),
    ));
    tokio::spawn(crate::allocator::trim_periodically(phase.subscribe()));
    Ok(Arc::new(AppState {
        response_api: config.response_api(addr),
        config,
        store,
        broker,
        pusher,
        parking: Parking::default(),
        access,
        metrics: Metrics::default(),
        phase,
        response_log,
        call_history,
        takeover_notices: TakeoverNotices::default(),
        handoffs: Handoffs::default(),
        unready_log: Every::seldom(),
    }))
}

/// The broker `config` selects: in-process without `--redis-url`, else Redis
/// or Redis Cluster.
pub async fn open_broker(config: &Config) -> anyhow::Result<Arc<dyn CallBroker>> {
    Ok(match &config.redis_url {
        None => Arc::new(MemoryBroker::new()),
        Some(url) => Arc::new(
            RedisBroker::connect(RedisOptions {
                url: url.clone(),
                acquire_timeout: config.redis_timeout(),
                poll_interval: config.poll_interval(),
            })
            .await?,
        ),
    })
}

/// How many connections may wait to be accepted. The default of 128 drops
/// SYNs when a PBX cluster opens hundreds of calls at once, and a dropped
/// SYN costs its call a one-second retransmit.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // A restarted instance may bind while the old one's sockets linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A database URL without its password, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

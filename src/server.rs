//! Start-up: open the store and the broker, bind the listener, serve until
//! told to stop. `main.rs` and the tests both come through here, so the tests
//! run exactly the server the binary runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::broker::memory::MemoryBroker;
use crate::broker::redis::{RedisBroker, RedisOptions};
use crate::broker::CallBroker;
use crate::calls::Parking;
use crate::config::{BrokerMode, Config};
use crate::push::log::LogPusher;
use crate::push::Pusher;
use crate::store::{self, Store};

/// What every handler shares: one per process, behind an `Arc`.
pub struct AppState {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub broker: Arc<dyn CallBroker>,
    pub pusher: Arc<dyn Pusher>,
    /// The `response_api` URL put into call pushes, computed once.
    pub response_api: String,
    /// The parked PBX requests, bounded by `--max-pending-calls`.
    pub parking: Parking,
}

/// A server to start: the configuration plus what tests may swap in.
pub struct Server {
    config: Config,
    pusher: Option<Arc<dyn Pusher>>,
}

/// A started server.
pub struct Running {
    /// Where it listens (the real port when `--listen` named port 0).
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn new(config: Config) -> Self {
        Server {
            config,
            pusher: None,
        }
    }

    /// Sends every push through `pusher` instead of the per-app pushers.
    pub fn with_pusher(mut self, pusher: Arc<dyn Pusher>) -> Self {
        self.pusher = Some(pusher);
        self
    }

    /// Opens the store (running migrations) and the broker, binds the
    /// listener and starts serving in a task.
    pub async fn start(self) -> anyhow::Result<Running> {
        let listener = TcpListener::bind(self.config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.config.listen))?;
        let addr = listener.local_addr()?;
        let state = build_state(self.config, addr, self.pusher).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(crate::http::serve(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        tracing::info!(%addr, "call-notifier listening");
        Ok(Running {
            addr,
            state,
            stop: Some(stop),
            task,
        })
    }
}

impl Running {
    /// The base URL to reach it, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets the open requests finish, and returns when done.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Runs until `signal` resolves, then stops as [`Running::stop`] does.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down");
        self.stop().await;
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
    let broker: Arc<dyn CallBroker> = match &config.redis_url {
        None => Arc::new(MemoryBroker::new()),
        Some(url) => Arc::new(
            RedisBroker::connect(RedisOptions {
                url: url.clone(),
                pool_size: config.redis_pool_size,
                acquire_timeout: Duration::from_secs(1),
                poll_interval: config.poll_interval(),
                state_ttl: config.wait() + Duration::from_secs(30),
                subscribe: config.broker_mode == BrokerMode::Pubsub,
            })
            .await?,
        ),
    };
    let pusher = pusher.unwrap_or_else(|| Arc::new(LogPusher));
    Ok(Arc::new(AppState {
        response_api: config.response_api(addr),
        config,
        store,
        broker,
        pusher,
        parking: Parking::default(),
    }))
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

//! Connection pools that fail fast while their service is unreachable.
//!
//! bb8 retries a failed connect until the acquire timeout runs out, and a
//! `get()` waits all that time: with the database down, every request
//! would hang for the whole `--database-timeout-ms` before it is answered
//! 503 (a call: NAK). A
//! [`Reachability`] learns from the pool's error sink that a connection
//! attempt failed, and from its connection customizer that one succeeded.
//! [`Reachability::get`] then:
//!
//! - while the service is known unreachable, hands out a connection only if
//!   one is ready this instant and fails at once otherwise; the attempt still
//!   makes bb8 start a reconnect in the background, so requests and readiness
//!   probes are what find the service again, with no task of its own;
//! - otherwise waits for a connection as bb8 does (a busy pool is not an
//!   outage), but gives up the moment a connect attempt fails.
//!
//! Used by the store's pools (PostgreSQL, SQLite); this module knows
//! nothing about either. (The Redis broker needs none of it: the redis
//! crate's `ConnectionManager` fails fast by itself, see
//! `broker::redis::connections`.)

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// Whether one pool's service answers connection attempts. Cheap to clone.
#[derive(Clone)]
pub struct Reachability(Arc<Inner>);

struct Inner {
    /// The service, for logs: `"database"`.
    service: &'static str,
    /// The last connection attempt failed, and none has succeeded since.
    down: AtomicBool,
    /// Why the last attempt failed.
    last_error: Mutex<String>,
    /// Wakes the requests waiting for a connection when an attempt fails.
    failed: Notify,
}

impl std::fmt::Debug for Reachability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reachability")
            .field("service", &self.0.service)
            .field("down", &self.is_down())
            .finish()
    }
}

impl Reachability {
    pub fn new(service: &'static str) -> Self {
        Reachability(Arc::new(Inner {
            service,
            down: AtomicBool::new(false),
            last_error: Mutex::new(String::new()),
            failed: Notify::new(),
        }))
    }

    /// Whether the service is known unreachable now.
    pub fn is_down(&self) -> bool {
        self.0.down.load(Ordering::Acquire)
    }

    /// A connection attempt failed.
    pub fn connect_failed(&self, error: &dyn Display) {
        *self.0.last_error.lock().expect("last error lock poisoned") = error.to_string();
        if !self.0.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(service = self.0.service, %error, "cannot connect; failing fast until a connection succeeds");
        }
        self.0.failed.notify_waiters();
    }

    /// A connection attempt succeeded.
    pub fn connected(&self) {
        if self.0.down.swap(false, Ordering::AcqRel) {
            tracing::info!(service = self.0.service, "connected again");
        }
    }

    fn unreachable(&self) -> String {
        let error = self.0.last_error.lock().expect("last error lock poisoned");
        format!("cannot connect: {error}")
    }

    /// A connection from `pool`; see the module documentation for when it
    /// fails at once. The error says why, for logs and readiness.
    pub async fn get<'a, M>(
        &self,
        pool: &'a bb8::Pool<M>,
    ) -> Result<bb8::PooledConnection<'a, M>, String>
    where
        M: bb8::ManageConnection,
        M::Error: Display,
    {
        let failed = self.0.failed.notified();
        tokio::pin!(failed);
        failed.as_mut().enable();
        if self.is_down() {
            // `timeout` polls the future once before it looks at the clock.
            return match tokio::time::timeout(Duration::ZERO, pool.get()).await {
                Ok(got) => got.map_err(|e| self.describe(e)),
                Err(_) => Err(self.unreachable()),
            };
        }
        tokio::select! {
            biased;
            got = pool.get() => got.map_err(|e| self.describe(e)),
            () = failed => Err(self.unreachable()),
        }
    }

    fn describe<E: Display>(&self, error: bb8::RunError<E>) -> String {
        match error {
            bb8::RunError::User(e) => e.to_string(),
            bb8::RunError::TimedOut if self.is_down() => self.unreachable(),
            bb8::RunError::TimedOut => "no free connection within the acquire timeout".to_owned(),
        }
    }

    /// The error sink to build the pool with: connection failures (as
    /// `is_connect_failure` tells them from others) mark the service down.
    pub fn error_sink<E: Display + 'static>(
        &self,
        is_connect_failure: fn(&E) -> bool,
    ) -> Box<dyn bb8::ErrorSink<E>> {
        Box::new(Sink {
            reach: self.clone(),
            is_connect_failure,
        })
    }
}

/// Marks the service reachable whenever bb8 makes a connection.
impl<C: Send + 'static, E: 'static> bb8::CustomizeConnection<C, E> for Reachability {
    fn on_acquire<'a>(
        &'a self,
        _connection: &'a mut C,
    ) -> Pin<Box<dyn Future<Output = Result<(), E>> + Send + 'a>> {
        self.connected();
        Box::pin(async { Ok(()) })
    }
}

struct Sink<E> {
    reach: Reachability,
    is_connect_failure: fn(&E) -> bool,
}

impl<E> std::fmt::Debug for Sink<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("reach", &self.reach).finish()
    }
}

impl<E: Display + 'static> bb8::ErrorSink<E> for Sink<E> {
    fn sink(&self, error: E) {
        if (self.is_connect_failure)(&error) {
            self.reach.connect_failed(&error);
        } else {
            tracing::debug!(service = self.reach.0.service, %error, "pooled connection dropped");
        }
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<E>> {
        Box::new(Sink {
            reach: self.reach.clone(),
            is_connect_failure: self.is_connect_failure,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manager whose connects fail while `refuse` is set.
    #[derive(Clone)]
    struct Flaky {
        refuse: Arc<AtomicBool>,
    }

    impl bb8::ManageConnection for Flaky {
        type Connection = ();
        type Error = String;

        async fn connect(&self) -> Result<(), String> {
            if self.refuse.load(Ordering::Acquire) {
                Err("connection refused".into())
            } else {
                Ok(())
            }
        }

        async fn is_valid(&self, _: &mut ()) -> Result<(), String> {
            Ok(())
        }

        fn has_broken(&self, _: &mut ()) -> bool {
            false
        }
    }

    async fn pool(refuse: &Arc<AtomicBool>, reach: &Reachability) -> bb8::Pool<Flaky> {
        bb8::Pool::builder()
            .max_size(2)
            .connection_timeout(Duration::from_secs(5))
            .error_sink(reach.error_sink(|_: &String| true))
            .connection_customizer(Box::new(reach.clone()))
            .build_unchecked(Flaky {
                refuse: refuse.clone(),
            })
    }

    #[tokio::test]
    async fn an_unreachable_service_fails_at_once_and_is_found_again() {
        let refuse = Arc::new(AtomicBool::new(true));
        let reach = Reachability::new("test");
        let pool = pool(&refuse, &reach).await;
        let started = std::time::Instant::now();
        let first = reach.get(&pool).await.map(|_| ());
        assert!(
            first.unwrap_err().contains("connection refused"),
            "the first failed connect ends the wait"
        );
        assert!(reach.is_down());
        assert!(reach.get(&pool).await.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not the 5 s acquire timeout"
        );

        refuse.store(false, Ordering::Release);
        // A later request, or bb8's retry in the background, connects again.
        let mut found = false;
        for _ in 0..100 {
            if reach.get(&pool).await.is_ok() {
                found = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(found && !reach.is_down());
    }
}

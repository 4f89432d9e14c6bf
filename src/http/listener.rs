//! The accept loop and the life of one connection: how long a client may
//! stay silent or idle, what happens to its connection at shutdown, and how
//! the loop survives running out of file descriptors.
//!
//! Every connection costs a descriptor, and a client that connects and sends
//! nothing costs nothing to keep doing so. So a connection must complete a
//! request head within `--header-timeout-ms` of its accept, and may stay idle
//! between requests for `--keep-alive-timeout-secs`; either way it is closed
//! then. Only a connection with a request in flight is exempt (a parked PBX
//! call waits as long as its wait says). hyper's own header timeout starts at
//! a request's first byte, and h2 has no idle limit at all, so the clock is
//! kept here, over both protocols alike.
//!
//! At shutdown the listener closes and every connection is asked to finish
//! (HTTP/1.1 closes after its current response, h2 sends GOAWAY). Only
//! parked calls keep the process up: once a connection has no request in
//! flight, what it still has to write goes to a client that may not be
//! reading, and it gets [`FLUSH_GRACE`] before it is dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::poll_again::PollAgain;
use crate::shutdown::{phase_reached, Phase};
use crate::state::AppState;

/// How long answering parked calls NAK may take once the server aborts.
const ABORT_GRACE: Duration = Duration::from_secs(5);

/// The most a connection buffers while reading: also the largest request
/// head accepted (larger gets 431), as in nginx's default.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// How long a draining connection with nothing in flight may take to write
/// what it has left before it is dropped.
const FLUSH_GRACE: Duration = Duration::from_secs(1);

/// After a failed accept the loop waits this long, doubling up to
/// [`ACCEPT_BACKOFF_MAX`], so a process out of descriptors does not spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Failed accepts are logged at most once per this interval, with a count.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// What one connection is doing, as its idle clock needs to know.
#[derive(Debug, Clone, Copy)]
struct Activity {
    /// Requests whose handler is running (the head has arrived, the
    /// response is not yet handed to hyper).
    in_flight: usize,
    /// Since when nothing is in flight (the accept, at first).
    idle_since: Instant,
    /// Whether a request head has ever arrived: until then the header
    /// timeout applies, afterwards the keep-alive timeout.
    served: bool,
}

/// Counts one request in flight on its connection for as long as it lives:
/// a drop guard, since hyper drops a handler's future when its client goes.
struct InFlight(Arc<watch::Sender<Activity>>);

impl InFlight {
    fn start(activity: &Arc<watch::Sender<Activity>>) -> InFlight {
        activity.send_modify(|a| {
            a.in_flight += 1;
            a.served = true;
        });
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|a| {
            a.in_flight -= 1;
            if a.in_flight == 0 {
                a.idle_since = Instant::now();
            }
        });
    }
}

/// The connection limits, from the flags.
#[derive(Debug, Clone, Copy)]
struct Limits {
    header: Duration,
    keep_alive: Duration,
}

/// Resolves when the connection has had nothing in flight for longer than
/// its limit allows.
async fn idle_too_long(mut activity: watch::Receiver<Activity>, limits: Limits) {
    loop {
        let now = *activity.borrow_and_update();
        if now.in_flight > 0 {
            if activity.changed().await.is_err() {
                return std::future::pending().await;
            }
            continue;
        }
        let limit = if now.served {
            limits.keep_alive
        } else {
            limits.header
        };
        tokio::select! {
            _ = tokio::time::sleep_until(now.idle_since + limit) => return,
            changed = activity.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }
}

/// Resolves once nothing is in flight on the connection.
async fn settled(activity: &mut watch::Receiver<Activity>) {
    let _ = activity.wait_for(|a| a.in_flight == 0).await;
}

/// Accepts connections until the server leaves [`Phase::Serving`], then
/// stops accepting and waits for the open connections: parked calls keep
/// their full wait. At `--shutdown-timeout-secs` (or [`Phase::Aborting`])
/// the calls still parked are answered NAK, and the wait ends soon after.
pub async fn serve(listener: TcpListener, state: Arc<AppState>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.header_timeout())
        // Heads and bodies here are small; hyper's smallest read buffer
        // keeps a parked call's connection near 18 KiB instead of 23.
        .max_buf_size(READ_BUFFER_BYTES);
    let builder = Arc::new(builder);
    let limits = Limits {
        header: state.config.header_timeout(),
        keep_alive: state.config.keep_alive_timeout(),
    };
    // Every connection task holds a sender; `recv` says `None` once the last
    // one has finished (mini-redis's shutdown-complete channel).
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    let mut phase = state.phase.subscribe();
    let mut failures = AcceptFailures::default();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    failures.reset();
                    accepted
                }
                Err(e) => {
                    state.metrics.accept_errors.inc();
                    let pause = failures.record(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = phase_reached(&mut phase, |p| *p != Phase::Serving) => break,
                    }
                }
            },
            _ = phase_reached(&mut phase, |p| *p != Phase::Serving) => break,
        };
        let connection = connection(
            builder.clone(),
            stream,
            peer,
            state.clone(),
            limits,
            open.clone(),
        );
        // Self-wakes polled in place: in process only (see poll_again).
        if state.broker.wakes_in_place() {
            tokio::spawn(PollAgain::new(connection));
        } else {
            tokio::spawn(connection);
        }
    }
    drop(listener);
    drop(open);
    let drained = all_closed.recv();
    tokio::pin!(drained);
    let timeout = Duration::from_secs(state.config.shutdown_timeout_secs);
    tokio::select! {
        _ = &mut drained => return,
        _ = tokio::time::sleep(timeout) => {
            tracing::warn!(parked_calls = state.parking.parked(), "shutdown timeout: answering parked calls NAK");
            state.phase.send_replace(Phase::Aborting);
        }
        _ = phase_reached(&mut phase, |p| *p == Phase::Aborting) => {}
    }
    // Every parked call answers NAK at once now; give the answers time to
    // be written, then let go of whatever still hangs.
    let _ = tokio::time::timeout(ABORT_GRACE, drained).await;
}

/// Serves one connection until it ends, idles past its limit, or the
/// server drains it. `_open` tells [`serve`] the connection still lives.
async fn connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    limits: Limits,
    _open: mpsc::Sender<()>,
) {
    let _ = stream.set_nodelay(true);
    let (activity, watched) = watch::channel(Activity {
        in_flight: 0,
        idle_since: Instant::now(),
        served: false,
    });
    let activity = Arc::new(activity);
    let service = {
        let state = state.clone();
        service_fn(move |request| {
            let state = state.clone();
            let in_flight = InFlight::start(&activity);
            async move {
                let response = super::route(&state, peer, request).await;
                drop(in_flight);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut phase = state.phase.subscribe();
    let ended = tokio::select! {
        ended = conn.as_mut() => Some(ended),
        _ = idle_too_long(watched.clone(), limits) => {
            tracing::debug!(%peer, "closing a connection idle past its limit");
            return;
        }
        _ = phase_reached(&mut phase, |p| *p != Phase::Serving) => None,
    };
    let ended = match ended {
        Some(ended) => ended,
        None => {
            conn.as_mut().graceful_shutdown();
            let mut watched = watched;
            tokio::select! {
                ended = conn.as_mut() => ended,
                _ = settled(&mut watched) => {
                    match tokio::time::timeout(FLUSH_GRACE, conn.as_mut()).await {
                        Ok(ended) => ended,
                        Err(_) => {
                            tracing::debug!(%peer, "dropping a draining connection whose client does not read");
                            return;
                        }
                    }
                }
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// The accept loop's memory of its failures: the backoff, and when it last
/// said so in the log.
#[derive(Default)]
struct AcceptFailures {
    backoff: Option<Duration>,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    /// Notes one failure; says how long to pause before the next accept.
    fn record(&mut self, error: &std::io::Error) -> Duration {
        let pause = self
            .backoff
            .map_or(ACCEPT_BACKOFF_MIN, |b| (b * 2).min(ACCEPT_BACKOFF_MAX));
        self.backoff = Some(pause);
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(
                error = %error,
                failures = self.unlogged,
                retry_in_ms = pause.as_millis() as u64,
                "accept failed (out of file descriptors?); backing off"
            );
            self.last_logged = Some(now);
            self.unlogged = 0;
        }
        pause
    }

    fn reset(&mut self) {
        self.backoff = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_idles_by_the_header_limit_then_the_keep_alive_one() {
        let limits = Limits {
            header: Duration::from_secs(10),
            keep_alive: Duration::from_secs(75),
        };
        let accepted = Instant::now();
        let (activity, watched) = watch::channel(Activity {
            in_flight: 0,
            idle_since: accepted,
            served: false,
        });
        let activity = Arc::new(activity);
        // Silent since accept: closed at the header limit.
        idle_too_long(watched.clone(), limits).await;
        assert_eq!(accepted.elapsed(), limits.header);

        // A request in flight holds the clock, however long it takes.
        let request = InFlight::start(&activity);
        let idle = tokio::spawn(idle_too_long(watched.clone(), limits));
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!idle.is_finished());
        let answered = Instant::now();
        drop(request);
        idle.await.unwrap();
        assert_eq!(answered.elapsed(), limits.keep_alive);
    }

    #[tokio::test(start_paused = true)]
    async fn accept_failures_back_off_and_log_seldom() {
        let mut failures = AcceptFailures::default();
        let error = std::io::Error::from_raw_os_error(24);
        let pauses: Vec<Duration> = (0..10).map(|_| failures.record(&error)).collect();
        assert_eq!(pauses[0], ACCEPT_BACKOFF_MIN);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(pauses[9], ACCEPT_BACKOFF_MAX);
        // Only the first was logged; the rest are counted for the next line.
        assert_eq!(failures.unlogged, 9);
        failures.reset();
        assert_eq!(failures.record(&error), ACCEPT_BACKOFF_MIN);
    }
}

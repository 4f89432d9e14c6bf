//! The accept loop and the life of one connection: how long a client may
//! stay silent or idle, what happens to its connection at shutdown, and how
//! the loop survives running out of file descriptors.
//!
//! Every connection costs a descriptor, and a client that connects and sends
//! nothing costs nothing to keep doing so. So a connection must complete a
//! request head within `--header-timeout-ms` of its accept, and may stay idle
//! between requests for `--keep-alive-timeout-secs`; either way it is closed
//! then. Only a connection with a request in flight is exempt (a parked PBX
//! call waits as long as its wait says). h2 has no idle limit at all, and
//! hyper's HTTP/1.1 header timeout runs from the moment it waits for a head:
//! on a kept-alive connection, from the last response on. So the clock is
//! kept here, over both protocols alike, and hyper's is only the bound on a
//! kept-alive connection's next head, at the keep-alive limit.
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
use crate::logs::Every;
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
    /// Whether the connection drains and waits for its last request to
    /// end ([`settled`]): only then does that end wake anyone.
    draining: bool,
}

/// Counts one request in flight on its connection for as long as it lives:
/// a drop guard, since hyper drops a handler's future when its client goes.
///
/// A request's start and end wake nobody: the idle clock reads the count
/// when its own timer fires ([`idle_too_long`]). Waking it on every request
/// cost two timer changes and a wake-up of the connection's own task from
/// inside its poll, which tokio treats as a yield, one that may wake its
/// other worker (`docs/performance.md`, "The idle clock wakes nobody").
/// Only a draining connection's last end is announced.
struct InFlight(Arc<watch::Sender<Activity>>);

impl InFlight {
    fn start(activity: &Arc<watch::Sender<Activity>>) -> InFlight {
        activity.send_if_modified(|a| {
            a.in_flight += 1;
            a.served = true;
            false
        });
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_if_modified(|a| {
            a.in_flight -= 1;
            if a.in_flight > 0 {
                return false;
            }
            a.idle_since = Instant::now();
            a.draining
        });
    }
}

/// The connection limits, from the flags.
#[derive(Debug, Clone, Copy)]
struct Limits {
    header: Duration,
    keep_alive: Duration,
}

impl Limits {
    /// When a connection doing `now` is idle past its limit, were nothing
    /// to start from here on; while a request is in flight, the earliest
    /// that can be (it ends at once).
    fn deadline(&self, now: &Activity, at: Instant) -> Instant {
        if now.in_flight > 0 {
            at + self.keep_alive
        } else if now.served {
            now.idle_since + self.keep_alive
        } else {
            now.idle_since + self.header
        }
    }
}

/// Resolves when the connection has had nothing in flight for longer than
/// its limit allows. Requests do not wake it (see [`InFlight`]): it sleeps
/// until the soonest the limit could run out, reads the activity then, and
/// sleeps again until the new soonest while it has not.
async fn idle_too_long(activity: watch::Receiver<Activity>, limits: Limits) {
    loop {
        let now = *activity.borrow();
        let at = Instant::now();
        let deadline = limits.deadline(&now, at);
        if now.in_flight == 0 && deadline <= at {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Resolves once nothing is in flight on the connection, which from here
/// on says so when its last request ends.
async fn settled(activity: &Arc<watch::Sender<Activity>>) {
    activity.send_modify(|a| a.draining = true);
    let mut watched = activity.subscribe();
    let _ = watched.wait_for(|a| a.in_flight == 0).await;
}

/// Accepts connections until the server leaves [`Phase::Serving`], then
/// stops accepting and waits for the open connections: parked calls keep
/// their full wait. At `--shutdown-timeout-secs` (or [`Phase::Aborting`])
/// the calls still parked are answered NAK, and the wait ends soon after.
///
/// Where no other instance shares the calls (the in-process broker), an
/// answer can reach a parked call only here: the server goes on accepting
/// connections until its parked calls are done (or it aborts), answering
/// each new call `status=NAK` at once (`calls::ring`), so a drain gives
/// every parked call its real answer there too.
pub async fn serve(listener: TcpListener, state: Arc<AppState>) {
    let limits = Limits {
        header: state.config.header_timeout(),
        keep_alive: state.config.keep_alive_timeout(),
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Not the header timeout: hyper's would close a kept-alive
        // connection that idles past it between requests (10 s), where the
        // keep-alive limit (75 s) is what a PBX reusing its connection was
        // promised. A new connection's first head is held to the header
        // timeout by the clock here ([`Limits`]).
        .header_read_timeout(limits.header.max(limits.keep_alive))
        // Heads and bodies here are small; hyper's smallest read buffer
        // keeps a parked call's connection near 18 KiB instead of 23.
        .max_buf_size(READ_BUFFER_BYTES);
    let builder = Arc::new(builder);
    // Every connection task holds a sender; `recv` says `None` once the last
    // one has finished (mini-redis's shutdown-complete channel).
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    // Set once this loop stops accepting: the connections then close as
    // soon as nothing is in flight on them.
    let (closing, closed) = watch::channel(false);
    let mut phase = state.phase.subscribe();
    let mut failures = AcceptFailures::default();
    let timeout = Duration::from_secs(state.config.shutdown_timeout_secs);
    // When the drain must end: `--shutdown-timeout-secs` after it began.
    let mut deadline = None;
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
                        _ = stop_accepting(&state, &mut phase, (&mut deadline, timeout)) => break,
                    }
                }
            },
            _ = stop_accepting(&state, &mut phase, (&mut deadline, timeout)) => break,
        };
        let connection = connection(
            builder.clone(),
            stream,
            peer,
            state.clone(),
            limits,
            (open.clone(), closed.clone()),
        );
        // Self-wakes polled in place: in process only (see poll_again).
        if state.broker.wakes_in_place() {
            tokio::spawn(PollAgain::new(connection));
        } else {
            tokio::spawn(connection);
        }
    }
    drop(listener);
    closing.send_replace(true);
    drop(open);
    let drained = all_closed.recv();
    tokio::pin!(drained);
    let deadline = deadline.unwrap_or_else(|| Instant::now() + timeout);
    tokio::select! {
        _ = &mut drained => return,
        _ = tokio::time::sleep_until(deadline) => {
            tracing::warn!(parked_calls = state.parking.parked(), "shutdown timeout: answering parked calls NAK");
            state.phase.send_replace(Phase::Aborting);
        }
        _ = phase_reached(&mut phase, |p| *p == Phase::Aborting) => {}
    }
    // Every parked call answers NAK at once now; give the answers time to
    // be written, then let go of whatever still hangs.
    let _ = tokio::time::timeout(ABORT_GRACE, drained).await;
}

/// Resolves when [`serve`] is to stop accepting connections: once the
/// server drains; where no other instance shares its calls, once its
/// parked calls are done too, it aborts, or the drain's `deadline` (set
/// as it begins, `timeout` later) has come.
async fn stop_accepting(
    state: &AppState,
    phase: &mut watch::Receiver<Phase>,
    (deadline, timeout): (&mut Option<Instant>, Duration),
) {
    phase_reached(phase, |p| *p != Phase::Serving).await;
    let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
    if state.broker.shared() {
        return;
    }
    tokio::select! {
        _ = state.parking.calls_done() => {}
        _ = phase_reached(phase, |p| *p == Phase::Aborting) => {}
        _ = tokio::time::sleep_until(deadline) => {}
    }
}

/// Serves one connection until it ends, idles past its limit, or the
/// server drains it (`closed`: [`serve`] stopped accepting). `_open` tells
/// [`serve`] the connection still lives.
async fn connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    limits: Limits,
    (_open, mut closed): (mpsc::Sender<()>, watch::Receiver<bool>),
) {
    let _ = stream.set_nodelay(true);
    let (activity, watched) = watch::channel(Activity {
        in_flight: 0,
        idle_since: Instant::now(),
        served: false,
        draining: false,
    });
    let activity = Arc::new(activity);
    let service = {
        let state = state.clone();
        let activity = activity.clone();
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
    let ended = tokio::select! {
        ended = conn.as_mut() => Some(ended),
        _ = idle_too_long(watched, limits) => {
            tracing::debug!(%peer, "closing a connection idle past its limit");
            return;
        }
        _ = closed.wait_for(|closed| *closed) => None,
    };
    let ended = match ended {
        Some(ended) => ended,
        None => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                ended = conn.as_mut() => ended,
                _ = settled(&activity) => {
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
struct AcceptFailures {
    backoff: Option<Duration>,
    log: Every,
}

impl Default for AcceptFailures {
    fn default() -> Self {
        AcceptFailures {
            backoff: None,
            log: Every::seldom(),
        }
    }
}

impl AcceptFailures {
    /// Notes one failure; says how long to pause before the next accept.
    fn record(&mut self, error: &std::io::Error) -> Duration {
        let pause = self
            .backoff
            .map_or(ACCEPT_BACKOFF_MIN, |b| (b * 2).min(ACCEPT_BACKOFF_MAX));
        self.backoff = Some(pause);
        if let Some(failures) = self.log.due() {
            tracing::warn!(
                error = %error,
                failures,
                retry_in_ms = pause.as_millis() as u64,
                "accept failed (out of file descriptors?); backing off"
            );
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

    /// A connection accepted now, with a 10 s header and a 75 s keep-alive
    /// limit: its limits, its activity and the idle clock's view of it.
    fn accepted_now() -> (
        Limits,
        Arc<watch::Sender<Activity>>,
        watch::Receiver<Activity>,
    ) {
        let limits = Limits {
            header: Duration::from_secs(10),
            keep_alive: Duration::from_secs(75),
        };
        let (activity, watched) = watch::channel(Activity {
            in_flight: 0,
            idle_since: Instant::now(),
            served: false,
            draining: false,
        });
        (limits, Arc::new(activity), watched)
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_idles_by_the_header_limit_then_the_keep_alive_one() {
        let (limits, activity, watched) = accepted_now();
        let accepted = Instant::now();
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
    async fn requests_wake_the_idle_clock_only_to_end_a_drain() {
        let (limits, activity, watched) = accepted_now();
        let idle = tokio::spawn(idle_too_long(watched.clone(), limits));

        // A request that starts and ends before the header limit wakes
        // nobody, yet moves the clock: the keep-alive limit, from its end.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let request = InFlight::start(&activity);
        assert!(!watched.has_changed().unwrap(), "a start woke the clock");
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(request);
        let answered = Instant::now();
        assert!(!watched.has_changed().unwrap(), "an end woke the clock");
        tokio::time::sleep(Duration::from_secs(70)).await;
        assert!(!idle.is_finished(), "closed by the header limit");
        idle.await.unwrap();
        assert_eq!(answered.elapsed(), limits.keep_alive);

        // Draining: the last request's end is announced, and only it.
        let first = InFlight::start(&activity);
        let second = InFlight::start(&activity);
        let drained = tokio::spawn({
            let activity = activity.clone();
            async move { settled(&activity).await }
        });
        tokio::task::yield_now().await;
        drop(first);
        tokio::task::yield_now().await;
        assert!(!drained.is_finished(), "settled with a request in flight");
        drop(second);
        drained.await.unwrap();
        assert_eq!(watched.borrow().in_flight, 0);
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
        tokio::time::sleep(crate::logs::SELDOM).await;
        assert_eq!(failures.log.due(), Some(10), "nine held back, and this");
        failures.reset();
        assert_eq!(failures.record(&error), ACCEPT_BACKOFF_MIN);
    }
}

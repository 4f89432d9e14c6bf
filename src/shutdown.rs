//! Where a server is in its life, and how a task waits for a phase: the
//! one signal that parked calls, connections and readiness watch (as in
//! tokio's mini-redis).

use tokio::sync::watch;

/// Where a server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepting and serving.
    Serving,
    /// Told to stop: readiness says 503, no new connection is accepted,
    /// parked calls keep their full wait and get their real answer.
    Draining,
    /// Out of time (`--shutdown-timeout-secs`, or a second signal): calls
    /// still parked are answered NAK now, so the PBX is never left hanging.
    Aborting,
}

/// Resolves once the phase seen through `phase` satisfies `reached`.
/// (A helper, so no borrow of the watched value is held across an await.)
pub async fn phase_reached(
    phase: &mut watch::Receiver<Phase>,
    reached: impl FnMut(&Phase) -> bool,
) {
    let _ = phase.wait_for(reached).await.map(|_| ());
}

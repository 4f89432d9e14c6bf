//! The state every handler shares: one [`AppState`] per server, behind an
//! `Arc`. Built at start-up (`server.rs`); everything below imports it from
//! here, so the start-up module stays at the top of the import graph.

use std::sync::Arc;

use tokio::sync::watch;

use crate::auth::Access;
use crate::broker::CallBroker;
use crate::calls::parking::Parking;
use crate::calls::Handoffs;
use crate::config::Config;
use crate::logs::Every;
use crate::metrics::Metrics;
use crate::push::notices::TakeoverNotices;
use crate::push::Pusher;
use crate::shutdown::Phase;
use crate::store::{CallHistory, ResponseLog, Store};

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
    /// Who may call what.
    pub access: Access,
    pub metrics: Metrics,
    /// Where the server is in its life; parked calls and readiness watch it.
    pub phase: watch::Sender<Phase>,
    /// The app's answers, written in batches off the request path.
    pub response_log: ResponseLog,
    /// A row per call, written in batches off the call path.
    pub call_history: CallHistory,
    /// Which replaced phones were told so lately.
    pub takeover_notices: TakeoverNotices,
    /// The app's answers waiting for the calls they won, where the call is
    /// held on this instance.
    pub handoffs: Handoffs,
    /// Readiness checks that found the store or the broker failing, for the
    /// log (a load balancer asks every few seconds; so may anyone).
    pub unready_log: Every,
}

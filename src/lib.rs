//! call-notifier wakes sleeping VoIP apps so they can take incoming calls.
//!
//! A PBX posts `/api/incoming-call/` and holds the request open; we push the
//! phone registered for that SIP account and answer the PBX `status=ACK` the
//! moment the app confirms through `/api/call-response/`, or `status=NAK`.
//!
//! The map of the crate:
//!
//! - [`commands`]: the operator's commands beside `serve` (`push test`,
//!   `device list`, `device remove`): what they print, their exit status.
//! - [`config`]: every flag, its environment variable and its default.
//! - [`server`]: start-up only: builds the shared [`AppState`], binds the
//!   listener, runs until told to stop. `main.rs` only parses flags and
//!   calls it; nothing below imports it.
//! - [`state`]: the [`AppState`] every handler shares.
//! - [`shutdown`]: the server's phase (serving, draining, aborting) and how
//!   a task waits for one.
//! - [`http`]: the accept loop and connection limits, hyper routing, body
//!   parsing, and the one place where errors become HTTP responses.
//! - [`lifecycle`]: the call's life as one pure state machine: the stored
//!   record's transitions every instance shares, and the holder's (which
//!   phone to stop, to tell, when to wake the PBX).
//! - [`calls`]: the wait of one incoming call: open, push and resend, outcome,
//!   cleanup; it runs the [`lifecycle`] machine.
//! - [`broker`]: the [`broker::CallBroker`] boundary that carries an answer
//!   from the request that receives it to the request that waits for it
//!   (in-process or Redis).
//! - [`store`]: devices, apps and the response log, in SQLite or PostgreSQL.
//! - [`pool`]: the database pools' fail-fast layer: no waiting out the
//!   acquire timeout while the database is unreachable.
//! - [`push`]: the [`push::Pusher`] boundary: APNs, FCM, log-only, recording.
//! - [`auth`]: who may call what: device owners, PBX networks, probe limits.
//! - [`outbound`]: the one outgoing HTTP client type (account API, FCM).
//! - [`logs`]: client text escaped for log lines, tokens shortened.
//! - [`metrics`]: the Prometheus metrics of one server.

pub mod allocator;
pub mod auth;
pub mod broker;
pub mod calls;
pub mod commands;
pub mod config;
pub mod http;
pub mod lifecycle;
pub mod logs;
pub mod metrics;
pub mod outbound;
pub mod pool;
pub mod push;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod store;

pub use server::Server;
pub use state::AppState;

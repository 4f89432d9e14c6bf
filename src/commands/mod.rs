//! The operator's commands beside `serve`: `push test`, `device list`,
//! `device remove` and `calls`; what each prints and its exit status.
//!
//! They run against the same database and build the same pusher as the
//! server from the same flags, so what they show is what the server sees
//! and sends. `main.rs` only dispatches to them. Nothing here serves HTTP.

pub mod calls;
pub mod devices;
pub mod push_test;
/// Shared with the call path, which shortens tokens for the call history
/// as `device list` shows them.
pub(crate) mod text;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::store::{self, Store};

/// The store a command works on: the server's `--database-url`, migrated,
/// through one connection (a command runs one query at a time).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    store::open(
        &config.database_url,
        store::PoolOptions {
            max_size: 1,
            acquire_timeout: Duration::from_millis(config.database_timeout_ms),
        },
    )
    .await
    .context("cannot open the database")
}

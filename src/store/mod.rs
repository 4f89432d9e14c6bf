//! Devices, push apps, the response log and the call history: the
//! [`Store`] boundary.
//!
//! Owns the schema, the migrations runner and the connection pools. Two
//! backends share one schema and one set of queries ([`sql`]): SQLite,
//! embedded and the default, and PostgreSQL for production. It must not know
//! about HTTP or pushes: callers get typed rows and a [`StoreError`].

mod batch;
mod call_history;
mod models;
mod response_log;
mod schema;
mod sql;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

pub use batch::{BatchWriter, Promise};
pub use call_history::{history_cutoff, purge_periodically, CallHistory, PURGE_EVERY};
pub use models::{
    App, CallHistoryEntry, CalledDevice, Credentials, Device, EndReason, HangupReason, NewDevice,
    Platform, Registration, Removal, Remover, ResponseLogEntry,
};
pub use response_log::ResponseLog;
pub use sql::{migrate, open, PoolOptions};

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection could be had in time: the database is down, far away or
    /// saturated. Callers answer 503 (or NAK) and move on.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A query failed for another reason.
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    /// A stored value no longer parses (e.g. an unknown platform name).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// The persistence boundary. One implementation per backend family; the rest
/// of the code sees only this trait.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The device of a SIP account registered or updated last, if any:
    /// the one device of an account at the default limit of one. Expired
    /// devices (a SIP proxy's, past `expires_at`) are not returned, and are
    /// deleted as they are found.
    async fn device(&self, sip_user_id: i64) -> Result<Option<Device>, StoreError>;

    /// Every device of a SIP account, oldest registration first: what an
    /// operator lists, and what a call rings. Expired devices are left out
    /// and deleted, as in [`Store::device`].
    async fn devices(&self, sip_user_id: i64) -> Result<Vec<Device>, StoreError>;

    /// Every device of a SIP account as stored, expired ones included,
    /// oldest registration first, changing nothing: what an operator's
    /// `device list` shows (a look must not delete what it looks at).
    async fn listed(&self, sip_user_id: i64) -> Result<Vec<Device>, StoreError>;

    /// Deletes the devices of `sip_user_id`: every one, or with `token` only
    /// the one that has it. Returns the rows deleted, so the caller can say
    /// what went (an empty list: nothing matched).
    async fn remove_devices(
        &self,
        sip_user_id: i64,
        token: Option<&str>,
    ) -> Result<Vec<Device>, StoreError>;

    /// Registers a device of a SIP account, which holds at most
    /// `max_devices` (at least one).
    ///
    /// A device is its (push service, app, token), `android` and `gcm` one
    /// service ([`Platform::same_phone`]): registering one the account
    /// has updates it; one it has not is added, and when the account is full
    /// the devices registered or updated longest ago are deleted to make
    /// room. With `max_devices` 1 the account's one device is replaced
    /// instead: the registration is an update, whatever its token. Atomic
    /// per account: registrations racing each other never leave more than
    /// `max_devices` rows.
    async fn register_device(
        &self,
        device: NewDevice,
        max_devices: usize,
    ) -> Result<Registration, StoreError>;

    /// Removes the one device of `sip_user_id` with this platform, token
    /// and app, as `by` may: the app deletes it; a SIP proxy deletes a
    /// device it registered, and of one the app registered only its own
    /// binding (the app's device stays, and is pushed as before).
    async fn delete_device(
        &self,
        sip_user_id: i64,
        platform: Platform,
        token: &str,
        app_id: &str,
        by: Remover,
    ) -> Result<Removal, StoreError>;

    /// Deletes the device of `sip_user_id` that has `token`, and no other: a
    /// push service declared the token dead, but the phone may have
    /// re-registered with a fresh one meanwhile, and the account's other
    /// devices are alive.
    async fn forget_token(&self, sip_user_id: i64, token: &str) -> Result<bool, StoreError>;

    /// The app with this platform and app id, if it exists.
    async fn app(&self, platform: Platform, app_id: &str) -> Result<Option<App>, StoreError>;

    /// Every app, ordered by platform and app id.
    async fn apps(&self) -> Result<Vec<App>, StoreError>;

    /// Adds an app or replaces its credentials. Says whether it was new.
    async fn put_app(&self, app: &App) -> Result<bool, StoreError>;

    /// Removes an app. Says whether it existed.
    async fn remove_app(&self, platform: Platform, app_id: &str) -> Result<bool, StoreError>;

    /// Marks every device of `sip_user_id` as seen now (the check-in names
    /// the account, not a device). Says whether it has any.
    async fn touch_device(&self, sip_user_id: i64) -> Result<bool, StoreError>;

    /// Records why a call ended on the phone.
    async fn record_hangup(&self, hangup: HangupReason) -> Result<(), StoreError>;

    /// Appends rows to the response log, in one transaction.
    async fn log_responses(&self, entries: &[ResponseLogEntry]) -> Result<(), StoreError>;

    /// Appends calls to the call history, in one transaction.
    async fn log_calls(&self, calls: &[CallHistoryEntry]) -> Result<(), StoreError>;

    /// The calls of `sip_user_id`, newest first: at most `last`, and with
    /// `since` (Unix ms) only those that started then or later.
    async fn calls(
        &self,
        sip_user_id: i64,
        since: Option<i64>,
        last: i64,
    ) -> Result<Vec<CallHistoryEntry>, StoreError>;

    /// Deletes the calls that started before `before` (Unix ms): the
    /// retention's purge. Returns how many went.
    async fn purge_calls(&self, before: i64) -> Result<usize, StoreError>;

    /// Deletes what the apps reported before `before` (Unix ms), the
    /// response log's rows and the hangup reasons: kept as long as the
    /// calls they are about. Returns how many went.
    async fn purge_reports(&self, before: i64) -> Result<usize, StoreError>;

    /// Answers when the database does.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Milliseconds since the Unix epoch: how every timestamp is stored, so both
/// backends use one plain `BIGINT` column type.
pub fn now_millis() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

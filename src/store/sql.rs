//! The diesel-async implementation of [`Store`], for SQLite and PostgreSQL.
//!
//! Every query is written once, in [`diesel_store!`], and expanded for each
//! backend's connection type: diesel's query builder is typed per backend,
//! and a macro keeps one text of each query without a wall of trait bounds.
//!
//! SQLite allows one writer at a time. Rather than let pooled connections
//! race for the write lock and fail with `SQLITE_BUSY`, writes go through a
//! pool of one connection (queued in process, in order), reads through a
//! pool of several (WAL mode lets them run beside the writer). PostgreSQL
//! uses one pool for both.
//!
//! Outages: a connection the server closed is noticed at checkout (a flag
//! the connection keeps, no round trip) and replaced; a query that loses its
//! connection, and a pool that cannot connect, are [`StoreError::Unavailable`]
//! (503, a call: NAK); while the database cannot be reached at all, requests
//! fail at once instead of waiting out `--database-timeout-ms`
//! ([`Reachability`]), and the pool reconnects by itself when it returns.

use std::time::Duration;

use async_trait::async_trait;
use diesel::prelude::*;
use diesel_async::pooled_connection::bb8::{Pool, PooledConnection};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, PoolError, PoolableConnection, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use futures_util::FutureExt;

use super::models::*;
use super::schema::{apps, call_history, devices, hangup_reasons, response_log};
use super::{now_millis, Store, StoreError};
use crate::pool::Reachability;

diesel::define_sql_function! {
    /// SQL's `lower()`, which SQLite and PostgreSQL both have.
    fn lower(text: diesel::sql_types::Text) -> diesel::sql_types::Text;
}

/// The migrations, embedded, one set per backend.
///
/// During a rolling upgrade the previous release keeps serving on the schema
/// the first upgraded instance migrated (README.md, "Upgrading"), so a
/// release's migrations only expand: new tables, indexes, and columns that
/// are nullable or have a default (the previous release's inserts do not
/// name them). Nothing is renamed, retyped, dropped or narrowed in the
/// release whose code stops using it; that contraction ships one release
/// later, when no instance of a release that uses it can still run. Keys and
/// constraints count too: the devices-per-account migration dropped the
/// `sip_user_id` primary key the older code's `ON CONFLICT` named, which is
/// why upgrades across it stop every instance (CHANGELOG.md). `tests/upgrade.rs`
/// runs the release in `.ci/previous-release` on this schema to hold every
/// new migration to the rule.
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

type SqliteConn = SyncConnectionWrapper<diesel::SqliteConnection>;

/// Which backend a `--database-url` names.
enum Backend<'a> {
    Postgres(&'a str),
    Sqlite(&'a str),
}

fn backend(url: &str) -> Backend<'_> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Backend::Postgres(url)
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        Backend::Sqlite(path)
    } else {
        Backend::Sqlite(url.strip_prefix("sqlite:").unwrap_or(url))
    }
}

/// Pool settings from the flags.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    pub max_size: u32,
    pub acquire_timeout: Duration,
}

/// Opens the store a `--database-url` names, runs pending migrations, and
/// returns it behind the [`Store`] trait.
pub async fn open(url: &str, options: PoolOptions) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    migrate(url).await?;
    let reach = Reachability::new("database");
    Ok(match backend(url) {
        Backend::Postgres(url) => {
            let pool = pool::<AsyncPgConnection>(url, options, setup_postgres, &reach).await?;
            std::sync::Arc::new(PgStore {
                read: pool.clone(),
                write: pool,
                reach,
            })
        }
        Backend::Sqlite(path) => {
            // `:memory:` is one database per connection: both pools must be
            // the same single connection, kept forever.
            let memory = path == ":memory:";
            let write = pool::<SqliteConn>(
                path,
                PoolOptions {
                    max_size: 1,
                    ..options
                },
                setup_sqlite,
                &reach,
            )
            .await?;
            let read = if memory {
                write.clone()
            } else {
                pool::<SqliteConn>(path, options, setup_sqlite, &reach).await?
            };
            std::sync::Arc::new(SqliteStore { read, write, reach })
        }
    })
}

/// Applies the pending migrations of the backend a URL names.
///
/// Migrations run on a blocking thread through diesel's sync harness: for
/// PostgreSQL through diesel-async's wrapper, so no libpq is needed.
pub async fn migrate(url: &str) -> anyhow::Result<()> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let applied = match backend(&url) {
            Backend::Postgres(url) => {
                use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
                let mut conn: AsyncConnectionWrapper<AsyncPgConnection> =
                    diesel::Connection::establish(url)?;
                run_migrations(&mut conn, POSTGRES_MIGRATIONS)?
            }
            Backend::Sqlite(path) => {
                let mut conn: diesel::SqliteConnection = diesel::Connection::establish(path)?;
                diesel::connection::SimpleConnection::batch_execute(&mut conn, SQLITE_PRAGMAS)?;
                run_migrations(&mut conn, SQLITE_MIGRATIONS)?
            }
        };
        if applied > 0 {
            tracing::info!(applied, "database migrations applied");
        }
        Ok(())
    })
    .await?
}

fn run_migrations<DB: diesel::backend::Backend>(
    conn: &mut impl MigrationHarness<DB>,
    migrations: EmbeddedMigrations,
) -> anyhow::Result<usize> {
    conn.run_pending_migrations(migrations)
        .map(|done| done.len())
        .map_err(|e| anyhow::anyhow!("database migration failed: {e}"))
}

/// WAL lets readers run beside the one writer; the busy timeout covers
/// another process (e.g. `call-notifier app add`) writing at the same time.
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                              PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;";

fn setup_sqlite(url: &str) -> futures_util::future::BoxFuture<'_, ConnectionResult<SqliteConn>> {
    async move {
        let mut conn = SqliteConn::establish(url).await?;
        conn.batch_execute(SQLITE_PRAGMAS)
            .await
            .map_err(ConnectionError::CouldntSetupConfiguration)?;
        Ok(conn)
    }
    .boxed()
}

fn setup_postgres(
    url: &str,
) -> futures_util::future::BoxFuture<'_, ConnectionResult<AsyncPgConnection>> {
    AsyncPgConnection::establish(url).boxed()
}

async fn pool<C>(
    url: &str,
    options: PoolOptions,
    setup: fn(&str) -> futures_util::future::BoxFuture<'_, ConnectionResult<C>>,
    reach: &Reachability,
) -> anyhow::Result<Pool<C>>
where
    AsyncDieselConnectionManager<C>: bb8::ManageConnection<Connection = C, Error = PoolError>,
    C: PoolableConnection + 'static,
{
    let mut config = ManagerConfig::<C>::default();
    // A connection the server closed says so without a round trip (its
    // driver task has ended); checking that flag on every checkout drops it
    // before a query fails on it. A health query on every checkout would
    // double the round trips of the call path.
    config.recycling_method = RecyclingMethod::CustomFunction(Box::new(|conn: &mut C| {
        let broken = conn.is_broken();
        async move {
            if broken {
                Err(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::ClosedConnection,
                    Box::new("the server closed the connection".to_owned()),
                ))
            } else {
                Ok(())
            }
        }
        .boxed()
    }));
    config.custom_setup = Box::new(setup);
    let manager = AsyncDieselConnectionManager::<C>::new_with_config(url, config);
    let pool = Pool::builder()
        .max_size(options.max_size.max(1))
        .connection_timeout(options.acquire_timeout)
        .test_on_check_out(true)
        .idle_timeout(None)
        .max_lifetime(None)
        .error_sink(reach.error_sink(|e: &PoolError| matches!(e, PoolError::ConnectionError(_))))
        .connection_customizer(Box::new(reach.clone()))
        .build(manager)
        .await?;
    Ok(pool)
}

/// A connection from `pool`, or [`StoreError::Unavailable`] (at once while
/// the database is known unreachable).
async fn checkout<'a, C>(
    reach: &Reachability,
    pool: &'a Pool<C>,
) -> Result<PooledConnection<'a, C>, StoreError>
where
    AsyncDieselConnectionManager<C>: bb8::ManageConnection<Connection = C, Error = PoolError>,
    C: PoolableConnection + 'static,
{
    reach.get(pool).await.map_err(StoreError::Unavailable)
}

/// Maps a query error: a lost connection is an outage (503), not a bug.
///
/// diesel-async reports an error without an SQLSTATE (the connection closed,
/// the socket failed) as `UnableToSendCommand`.
fn query_error(e: diesel::result::Error) -> StoreError {
    use diesel::result::{DatabaseErrorKind, Error};
    match e {
        Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
            info,
        ) => StoreError::Unavailable(info.message().to_owned()),
        e => StoreError::Query(e),
    }
}

fn parse_platform(name: &str) -> Result<Platform, StoreError> {
    Platform::parse(name).ok_or_else(|| StoreError::Corrupt(format!("unknown platform {name:?}")))
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = apps)]
struct AppRow {
    platform: String,
    app_id: String,
    credentials: Option<String>,
}

impl AppRow {
    fn into_app(self) -> Result<App, StoreError> {
        let credentials = match self.credentials {
            None => None,
            Some(json) => Some(serde_json::from_str(&json).map_err(|e| {
                StoreError::Corrupt(format!("credentials of app {}: {e}", self.app_id))
            })?),
        };
        Ok(App {
            platform: parse_platform(&self.platform)?,
            app_id: self.app_id,
            credentials,
        })
    }
}

fn credentials_json(app: &App) -> Option<String> {
    app.credentials
        .as_ref()
        .map(|c| serde_json::to_string(c).expect("credentials serialize to JSON"))
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = call_history)]
struct CallRow {
    created_at: i64,
    sip_user_id: i64,
    unique_key: String,
    devices: String,
    outcome: String,
    waited_ms: i64,
    answered_by: Option<i32>,
    roundtrip_ms: Option<i64>,
}

impl CallRow {
    fn into_entry(self) -> Result<CallHistoryEntry, StoreError> {
        let devices = serde_json::from_str(&self.devices).map_err(|e| {
            StoreError::Corrupt(format!("devices of the call {:?}: {e}", self.unique_key))
        })?;
        Ok(CallHistoryEntry {
            created_at: self.created_at,
            sip_user_id: self.sip_user_id,
            unique_key: self.unique_key,
            devices,
            outcome: self.outcome,
            waited_ms: self.waited_ms,
            answered_by: self.answered_by,
            roundtrip_ms: self.roundtrip_ms,
        })
    }
}

fn devices_json(devices: &[CalledDevice]) -> String {
    serde_json::to_string(devices).expect("called devices serialize to JSON")
}

/// Expands the one text of every query for one backend's connection type.
///
/// `$transaction` opens the transaction a registration runs in, and
/// `$lock_account` takes the account's lock as its first statement: together
/// they make a registration's read of the account and its writes one step,
/// so racing registrations cannot both add a device to a full account.
/// `$append` is the macro that runs a batch's one multi-row `INSERT`
/// (`append_pg`, `append_sqlite`).
macro_rules! diesel_store {
    ($name:ident, $conn:ty, $transaction:ident, $lock_account:path, $append:ident) => {
        /// The [`Store`] over one diesel-async backend.
        pub struct $name {
            /// Connections for reads.
            read: Pool<$conn>,
            /// Connections for writes (one, for SQLite; see the module doc).
            write: Pool<$conn>,
            /// Whether the database answers connection attempts; shared by both pools.
            reach: Reachability,
        }

        impl $name {
            /// The devices of `rows` that have not expired. Expired ones (a
            /// SIP proxy registered them, and their registration lapsed
            /// more than its grace ago) are deleted as they are found: no
            /// sweeper task, and a row is never pushed past its expiry. A
            /// refresh racing the delete wins: only rows still expired go.
            /// The delete failing costs nothing but the row staying a
            /// while longer, so it is logged, not returned.
            async fn live(&self, rows: Vec<Device>) -> Vec<Device> {
                let now = now_millis();
                let (expired, live): (Vec<Device>, Vec<Device>) = rows
                    .into_iter()
                    .partition(|d| d.registration.expired(now));
                if expired.is_empty() {
                    return live;
                }
                let ids: Vec<i64> = expired.iter().map(|d| d.id).collect();
                let deleted = match checkout(&self.reach, &self.write).await {
                    Ok(mut conn) => diesel::delete(
                        devices::table
                            .filter(devices::id.eq_any(&ids))
                            .filter(devices::expires_at.le(now)),
                    )
                    .execute(&mut conn)
                    .await
                    .map_err(query_error),
                    Err(e) => Err(e),
                };
                match deleted {
                    Ok(n) => tracing::info!(deleted = n, "expired SIP-registered devices removed"),
                    Err(e) => tracing::warn!(error = %e, "cannot remove expired devices"),
                }
                live
            }
        }

        #[async_trait]
        impl Store for $name {
            async fn device(&self, sip_user_id: i64) -> Result<Option<Device>, StoreError> {
                let mut conn = checkout(&self.reach, &self.read).await?;
                // The account's few rows (at most the limit, 20), newest
                // last: no `LIMIT ?`, whose re-bind makes SQLite re-prepare
                // the statement each time.
                let all = devices::table
                    .filter(devices::sip_user_id.eq(sip_user_id))
                    .order((devices::updated_at, devices::id))
                    .select(Device::as_select())
                    .load(&mut conn)
                    .await
                    .map_err(query_error)?;
                drop(conn);
                Ok(self.live(all).await.pop())
            }

            async fn register_device(
                &self,
                device: NewDevice,
                max_devices: usize,
            ) -> Result<Registration, StoreError> {
                let max_devices = max_devices.max(1);
                let mut conn = checkout(&self.reach, &self.write).await?;
                conn.$transaction(async |conn| {
                    $lock_account(conn, device.sip_user_id).await?;
                    let now = now_millis();
                    // Updated longest ago first: the order devices are
                    // displaced in.
                    let rows = devices::table
                        .filter(devices::sip_user_id.eq(device.sip_user_id))
                        .order((devices::updated_at, devices::id))
                        .select(Device::as_select())
                        .load(conn)
                        .await?;
                    let is_same = |d: &Device| {
                        let d = &d.registration;
                        (d.platform, &d.app_id) == (device.platform, &device.app_id)
                            && d.platform.same_token(&d.token, &device.token)
                    };
                    // A device whose SIP registration lapsed holds no place:
                    // it goes quietly (it is not told of a takeover) before
                    // any live device is displaced, unless it is the one
                    // registering again, which is refreshed. So does a
                    // second row of that one (an APNs token stored in both
                    // cases before tokens were normalised): one phone, one row.
                    let first_same = rows.iter().find(|d| is_same(d)).map(|d| d.id);
                    let (expired, mut existing): (Vec<Device>, Vec<Device>) =
                        rows.into_iter().partition(|d| {
                            if is_same(d) {
                                Some(d.id) != first_same
                            } else {
                                d.registration.expired(now)
                            }
                        });
                    if !expired.is_empty() {
                        let ids: Vec<i64> = expired.iter().map(|d| d.id).collect();
                        diesel::delete(devices::table.filter(devices::id.eq_any(ids)))
                            .execute(conn)
                            .await?;
                    }
                    let same = existing.iter().position(is_same);
                    // One device per account: whichever it has is replaced.
                    let replaced = same.or_else(|| {
                        (max_devices == 1)
                            .then(|| existing.len().checked_sub(1))
                            .flatten()
                    });
                    // Every field of the registration, on insert and on
                    // update alike (`NewDevice` is both); `created_at` only
                    // on insert.
                    let previous = match replaced {
                        Some(index) => {
                            let previous = existing.remove(index);
                            let device = if same.is_some() {
                                device.clone().merged_over(&previous.registration)
                            } else {
                                device.clone()
                            };
                            diesel::update(devices::table.find(previous.id))
                                .set((
                                    &device,
                                    devices::updated_at.eq(now),
                                    devices::last_seen_at.eq(now),
                                ))
                                .execute(conn)
                                .await?;
                            Some(previous)
                        }
                        None => {
                            diesel::insert_into(devices::table)
                                .values((
                                    &device,
                                    devices::created_at.eq(now),
                                    devices::updated_at.eq(now),
                                    devices::last_seen_at.eq(now),
                                ))
                                .execute(conn)
                                .await?;
                            None
                        }
                    };
                    // Beyond the limit (a new device, or a limit lowered
                    // since the account filled up), the oldest others go.
                    let excess = (existing.len() + 1).saturating_sub(max_devices);
                    let mut displaced: Vec<Device> = existing.drain(..excess).collect();
                    if !displaced.is_empty() {
                        let ids: Vec<i64> = displaced.iter().map(|d| d.id).collect();
                        diesel::delete(devices::table.filter(devices::id.eq_any(ids)))
                            .execute(conn)
                            .await?;
                    }
                    Ok(match previous {
                        None => Registration::Created { displaced },
                        Some(previous) => {
                            if !device
                                .platform
                                .same_token(&previous.registration.token, &device.token)
                            {
                                displaced.push(previous.clone());
                            }
                            Registration::Updated {
                                previous: Box::new(previous),
                                displaced,
                            }
                        }
                    })
                })
                .await
                .map_err(query_error)
            }

            async fn delete_device(
                &self,
                sip_user_id: i64,
                platform: Platform,
                token: &str,
                app_id: &str,
            ) -> Result<bool, StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                let mut delete = diesel::delete(devices::table)
                    .filter(devices::sip_user_id.eq(sip_user_id))
                    .filter(devices::platform.eq(platform.as_str()))
                    .filter(devices::app_id.eq(app_id))
                    .into_boxed();
                // Either case of an APNs token (rows stored before tokens
                // were normalised keep theirs): the account's few rows are
                // found by the index first, so `lower()` costs nothing.
                delete = if platform.is_apns() {
                    delete.filter(lower(devices::token).eq(token.to_ascii_lowercase()))
                } else {
                    delete.filter(devices::token.eq(token))
                };
                let deleted = delete
                .execute(&mut conn)
                .await
                .map_err(query_error)?;
                Ok(deleted > 0)
            }

            async fn forget_token(
                &self,
                sip_user_id: i64,
                token: &str,
            ) -> Result<bool, StoreError> {
                let removed = self.remove_devices(sip_user_id, Some(token)).await?;
                Ok(!removed.is_empty())
            }

            async fn devices(&self, sip_user_id: i64) -> Result<Vec<Device>, StoreError> {
                let all = self.listed(sip_user_id).await?;
                Ok(self.live(all).await)
            }

            async fn listed(&self, sip_user_id: i64) -> Result<Vec<Device>, StoreError> {
                let mut conn = checkout(&self.reach, &self.read).await?;
                devices::table
                    .filter(devices::sip_user_id.eq(sip_user_id))
                    .order((devices::created_at, devices::id))
                    .select(Device::as_select())
                    .load(&mut conn)
                    .await
                    .map_err(query_error)
            }

            async fn remove_devices(
                &self,
                sip_user_id: i64,
                token: Option<&str>,
            ) -> Result<Vec<Device>, StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                let mut delete = diesel::delete(devices::table)
                    .filter(devices::sip_user_id.eq(sip_user_id))
                    .into_boxed();
                if let Some(token) = token {
                    delete = delete.filter(devices::token.eq(token));
                }
                delete
                    .returning(Device::as_returning())
                    .get_results(&mut conn)
                    .await
                    .map_err(query_error)
            }

            async fn app(
                &self,
                platform: Platform,
                app_id: &str,
            ) -> Result<Option<App>, StoreError> {
                let mut conn = checkout(&self.reach, &self.read).await?;
                apps::table
                    .filter(apps::platform.eq(platform.as_str()))
                    .filter(apps::app_id.eq(app_id))
                    .select(AppRow::as_select())
                    .first(&mut conn)
                    .await
                    .optional()
                    .map_err(query_error)?
                    .map(AppRow::into_app)
                    .transpose()
            }

            async fn apps(&self) -> Result<Vec<App>, StoreError> {
                let mut conn = checkout(&self.reach, &self.read).await?;
                apps::table
                    .order((apps::platform, apps::app_id))
                    .select(AppRow::as_select())
                    .load(&mut conn)
                    .await
                    .map_err(query_error)?
                    .into_iter()
                    .map(AppRow::into_app)
                    .collect()
            }

            async fn put_app(&self, app: &App) -> Result<bool, StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                let credentials = credentials_json(app);
                let updated = diesel::update(
                    apps::table
                        .filter(apps::platform.eq(app.platform.as_str()))
                        .filter(apps::app_id.eq(&app.app_id)),
                )
                .set(apps::credentials.eq(&credentials))
                .execute(&mut conn)
                .await
                .map_err(query_error)?;
                if updated > 0 {
                    return Ok(false);
                }
                diesel::insert_into(apps::table)
                    .values((
                        apps::platform.eq(app.platform.as_str()),
                        apps::app_id.eq(&app.app_id),
                        apps::credentials.eq(&credentials),
                        apps::created_at.eq(now_millis()),
                    ))
                    .execute(&mut conn)
                    .await
                    .map_err(query_error)?;
                Ok(true)
            }

            async fn remove_app(
                &self,
                platform: Platform,
                app_id: &str,
            ) -> Result<bool, StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                let deleted = diesel::delete(
                    apps::table
                        .filter(apps::platform.eq(platform.as_str()))
                        .filter(apps::app_id.eq(app_id)),
                )
                .execute(&mut conn)
                .await
                .map_err(query_error)?;
                Ok(deleted > 0)
            }

            async fn touch_device(&self, sip_user_id: i64) -> Result<bool, StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                let touched =
                    diesel::update(devices::table.filter(devices::sip_user_id.eq(sip_user_id)))
                        .set(devices::last_seen_at.eq(now_millis()))
                        .execute(&mut conn)
                        .await
                        .map_err(query_error)?;
                Ok(touched > 0)
            }

            async fn record_hangup(&self, hangup: HangupReason) -> Result<(), StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                diesel::insert_into(hangup_reasons::table)
                    .values((
                        hangup_reasons::sip_user_id.eq(hangup.sip_user_id),
                        hangup_reasons::unique_key.eq(&hangup.unique_key),
                        hangup_reasons::reason.eq(&hangup.reason),
                        hangup_reasons::created_at.eq(hangup.created_at),
                    ))
                    .execute(&mut conn)
                    .await
                    .map_err(query_error)?;
                Ok(())
            }

            async fn log_responses(&self, entries: &[ResponseLogEntry]) -> Result<(), StoreError> {
                let rows: Vec<_> = entries
                    .iter()
                    .map(|entry| {
                        (
                            response_log::platform.eq(entry.platform.as_str()),
                            response_log::roundtrip.eq(entry.roundtrip),
                            response_log::available.eq(entry.available),
                            response_log::created_at.eq(entry.created_at),
                        )
                    })
                    .collect();
                let mut conn = checkout(&self.reach, &self.write).await?;
                $append!(conn, response_log::table, rows).map_err(query_error)
            }

            async fn ping(&self) -> Result<(), StoreError> {
                let mut conn = checkout(&self.reach, &self.read).await?;
                conn.batch_execute("SELECT 1").await.map_err(query_error)
            }

            async fn log_calls(&self, calls: &[CallHistoryEntry]) -> Result<(), StoreError> {
                let rows: Vec<_> = calls
                    .iter()
                    .map(|call| {
                        (
                            call_history::created_at.eq(call.created_at),
                            call_history::sip_user_id.eq(call.sip_user_id),
                            call_history::unique_key.eq(call.unique_key.clone()),
                            call_history::devices.eq(devices_json(&call.devices)),
                            call_history::outcome.eq(call.outcome.clone()),
                            call_history::waited_ms.eq(call.waited_ms),
                            call_history::answered_by.eq(call.answered_by),
                            call_history::roundtrip_ms.eq(call.roundtrip_ms),
                        )
                    })
                    .collect();
                let mut conn = checkout(&self.reach, &self.write).await?;
                $append!(conn, call_history::table, rows).map_err(query_error)
            }

            async fn calls(
                &self,
                sip_user_id: i64,
                since: Option<i64>,
                last: i64,
            ) -> Result<Vec<CallHistoryEntry>, StoreError> {
                let mut conn = checkout(&self.reach, &self.read).await?;
                let mut query = call_history::table
                    .filter(call_history::sip_user_id.eq(sip_user_id))
                    .into_boxed();
                if let Some(since) = since {
                    query = query.filter(call_history::created_at.ge(since));
                }
                query
                    .order((call_history::created_at.desc(), call_history::id.desc()))
                    .limit(last)
                    .select(CallRow::as_select())
                    .load(&mut conn)
                    .await
                    .map_err(query_error)?
                    .into_iter()
                    .map(CallRow::into_entry)
                    .collect()
            }

            async fn purge_calls(&self, before: i64) -> Result<usize, StoreError> {
                let mut conn = checkout(&self.reach, &self.write).await?;
                diesel::delete(call_history::table.filter(call_history::created_at.lt(before)))
                    .execute(&mut conn)
                    .await
                    .map_err(query_error)
            }
        }
    };
}

/// PostgreSQL: a transaction-scoped advisory lock on the account, so
/// registrations of one account take turns and those of others do not wait
/// (a row lock cannot serve: the account may have no row yet).
async fn lock_account_pg(conn: &mut AsyncPgConnection, sip_user_id: i64) -> QueryResult<()> {
    diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
        .bind::<diesel::sql_types::BigInt, _>(sip_user_id)
        .execute(conn)
        .await
        .map(drop)
}

/// SQLite: nothing more to take. The registration's `BEGIN IMMEDIATE` holds
/// the database's write lock from the start, so no other writer (another
/// process included) comes between its read and its writes, and it cannot
/// fail halfway upgrading a read lock.
async fn lock_account_sqlite(_conn: &mut SqliteConn, _sip_user_id: i64) -> QueryResult<()> {
    Ok(())
}

/// PostgreSQL: a batch of rows (the response log's, the call history's) in
/// one multi-row `INSERT`: one round trip, atomic by itself.
macro_rules! append_pg {
    ($conn:expr, $table:expr, $rows:expr) => {
        diesel::insert_into($table)
            .values($rows)
            .execute(&mut $conn)
            .await
            .map(drop)
    };
}

/// SQLite: a batch of rows in one multi-row `INSERT` (diesel writes one when
/// no row leaves a column to its default), run by diesel's synchronous
/// SQLite connection on the connection's blocking thread: one hop to that
/// thread per batch. Through the async wrapper, each row's statement was a
/// hop of its own, which cost a quarter of the embedded set-up throughput.
macro_rules! append_sqlite {
    ($conn:expr, $table:expr, $rows:expr) => {{
        let rows = $rows;
        $conn
            .spawn_blocking(move |conn| {
                diesel::RunQueryDsl::execute(diesel::insert_into($table).values(&rows), conn)
            })
            .await
            .map(drop)
    }};
}

diesel_store!(
    PgStore,
    AsyncPgConnection,
    transaction,
    lock_account_pg,
    append_pg
);
diesel_store!(
    SqliteStore,
    SqliteConn,
    immediate_transaction,
    lock_account_sqlite,
    append_sqlite
);

#[cfg(test)]
mod tests {
    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use diesel::RunQueryDsl;
    use diesel_migrations::MigrationHarness;

    use super::devices;

    /// Rows as the one-device schema held them: two accounts, the second
    /// with `alert_token` set.
    const OLD_ROWS: &str = "INSERT INTO devices (sip_user_id, platform, token, app_id, \
        sandbox, created_at, updated_at, last_seen_at, alert_token) VALUES \
        (7, 'android', 'f7', 'app', FALSE, 1, 2, 3, NULL), \
        (8, 'apns', 'a8', 'app', TRUE, 4, 5, 6, 'b8')";

    /// A second device of account 7, newer than its first.
    const SECOND_DEVICE: &str = "INSERT INTO devices (sip_user_id, platform, token, app_id, \
        sandbox, created_at, updated_at, last_seen_at) VALUES \
        (7, 'gcm', 'g7', 'app', FALSE, 10, 10, 10)";

    type Row = (i64, String, bool, Option<String>);

    /// Reverts migrations, newest first, through the devices migration:
    /// those that came after it go first (and come back with it). A macro,
    /// as `$migrations` is a constant used once per revert.
    macro_rules! revert_through_devices {
        ($conn:expr, $migrations:expr) => {
            loop {
                let version = $conn
                    .revert_last_migration($migrations)
                    .expect("revert a migration");
                if version
                    .to_string()
                    .replace('-', "")
                    .starts_with("20261203010000")
                {
                    break;
                }
            }
        };
    }

    /// The devices migration, on a database of the one-device schema: it
    /// keeps every row, lets an account hold a second device but not the
    /// same one twice, and its down migration keeps each account's newest.
    /// A macro, as the typed queries are per backend (see `diesel_store!`).
    macro_rules! the_devices_migration_keeps_the_rows {
        ($conn:expr, $migrations:expr) => {{
            let conn = $conn;
            let rows = |conn: &mut _| -> Vec<Row> {
                devices::table
                    .select((
                        devices::sip_user_id,
                        devices::token,
                        devices::sandbox,
                        devices::alert_token,
                    ))
                    .order((devices::sip_user_id, devices::token))
                    .load(conn)
                    .expect("read the devices")
            };
            conn.run_pending_migrations($migrations).expect("migrate");
            revert_through_devices!(conn, $migrations);
            conn.batch_execute(OLD_ROWS)
                .expect("rows of the old schema");
            conn.run_pending_migrations($migrations)
                .expect("migrate again");
            let old: Vec<Row> = vec![
                (7, "f7".into(), false, None),
                (8, "a8".into(), true, Some("b8".into())),
            ];
            assert_eq!(rows(conn), old);
            let ids: Vec<i64> = devices::table.select(devices::id).load(conn).expect("ids");
            assert_eq!(ids.len(), 2, "an id each: {ids:?}");
            conn.batch_execute(SECOND_DEVICE).expect("a second device");
            assert!(
                conn.batch_execute(SECOND_DEVICE).is_err(),
                "the same device twice"
            );
            revert_through_devices!(conn, $migrations);
            assert_eq!(
                rows(conn),
                vec![(7, "g7".into(), false, None), old[1].clone()],
                "the newest device of each account"
            );
        }};
    }

    #[test]
    fn the_devices_migration_keeps_the_rows_on_sqlite() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("migrate.sqlite3");
        let mut conn =
            diesel::SqliteConnection::establish(&path.display().to_string()).expect("open SQLite");
        the_devices_migration_keeps_the_rows!(&mut conn, super::SQLITE_MIGRATIONS);
    }

    /// On PostgreSQL when `TEST_DATABASE_URL` is set, in a schema of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_devices_migration_keeps_the_rows_on_postgres() {
        use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
        use diesel_async::AsyncPgConnection;
        let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
            return;
        };
        tokio::task::spawn_blocking(move || {
            let mut conn: AsyncConnectionWrapper<AsyncPgConnection> =
                diesel::Connection::establish(&url).expect("PostgreSQL answers");
            let schema = format!("t_migrate_{}", std::process::id());
            conn.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; \
                 SET search_path TO {schema}"
            ))
            .expect("a schema of its own");
            the_devices_migration_keeps_the_rows!(&mut conn, super::POSTGRES_MIGRATIONS);
            conn.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .expect("drop the schema");
        })
        .await
        .expect("the test ran");
    }
}

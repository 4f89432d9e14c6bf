//! The diesel-async implementation of [`Store`], for SQLite and PostgreSQL.
//!
//! Every query is written once, in `diesel_store!` (`queries.rs`), and expanded for each
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
use queries::{PgStore, SqliteStore};
use rows::*;

mod queries;
mod rows;

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

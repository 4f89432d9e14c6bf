//! Device lookups in a big store: a fresh PostgreSQL schema filled with
//! millions of devices in SQL (`generate_series`), then random lookups by
//! `sip_user_id` through the [`Store`] trait, as the call path does them.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use call_notifier::store::PoolOptions;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};

/// What the lookup measurement found.
pub struct Lookups {
    pub devices: u64,
    pub fill: Duration,
    pub table_size: String,
    pub lookups: usize,
    /// Sorted, in microseconds.
    pub latencies_us: Vec<u64>,
}

/// Devices are inserted this many per statement, so progress shows.
const CHUNK: u64 = 1_000_000;

pub async fn measure(
    admin_url: &str,
    run_id: &str,
    devices: u64,
    lookups: usize,
) -> Result<Lookups> {
    let schema = format!("soak_lookup_{run_id}");
    let mut admin = AsyncPgConnection::establish(admin_url)
        .await
        .with_context(|| format!("PostgreSQL at {admin_url} does not answer"))?;
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .context("cannot create the lookup schema")?;
    let result = fill_and_look_up(admin_url, &schema, devices, lookups).await;
    if std::env::var_os("SOAK_KEEP_LOOKUP_SCHEMA").is_none() {
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .context("cannot drop the lookup schema")?;
    }
    result
}

async fn fill_and_look_up(
    admin_url: &str,
    schema: &str,
    devices: u64,
    lookups: usize,
) -> Result<Lookups> {
    let separator = if admin_url.contains('?') { '&' } else { '?' };
    let url = format!("{admin_url}{separator}options=-c%20search_path%3D{schema}");
    // Opening the store runs the migrations: the real schema, the real indexes.
    let store = call_notifier::store::open(
        &url,
        PoolOptions {
            max_size: 2,
            acquire_timeout: Duration::from_secs(5),
        },
    )
    .await?;
    let mut conn = AsyncPgConnection::establish(&url).await?;
    conn.batch_execute("SET synchronous_commit = off").await?;
    let started = Instant::now();
    let mut from = 1;
    while from <= devices {
        let to = (from + CHUNK - 1).min(devices);
        // FCM-sized tokens (160 characters), a third of them iOS.
        conn.batch_execute(&format!(
            "INSERT INTO devices (sip_user_id, platform, token, app_id, name, os_version, \
             client_version, remote_logging_id, sandbox, created_at, updated_at, last_seen_at) \
             SELECT i, CASE WHEN i % 3 = 0 THEN 'apns' ELSE 'android' END, \
             repeat(md5(i::text), 5), 'com.example.soak', 'phone ' || i, '17.4', '6.1.0', NULL, \
             false, 1700000000000, 1700000000000, 1700000000000 \
             FROM generate_series({from}, {to}) AS i"
        ))
        .await
        .with_context(|| format!("cannot insert devices {from}..={to}"))?;
        eprintln!(
            "soak: {to} of {devices} devices stored ({:.0?})",
            started.elapsed()
        );
        from = to + 1;
    }
    conn.batch_execute("VACUUM ANALYZE devices").await?;
    let fill = started.elapsed();
    let table_size: String = {
        use diesel_async::RunQueryDsl;
        diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(
            "pg_size_pretty(pg_total_relation_size('devices'))",
        ))
        .get_result(&mut conn)
        .await?
    };
    // Warm the pool, then time lookups one at a time, as latency.
    store.device(1).await?;
    let mut latencies_us = Vec::with_capacity(lookups);
    for _ in 0..lookups {
        let id = rand::random_range(1..=devices) as i64;
        let asked = Instant::now();
        let found = store.device(id).await?;
        latencies_us.push(asked.elapsed().as_micros() as u64);
        if found.is_none() {
            bail!("device {id} not found among {devices}");
        }
    }
    latencies_us.sort_unstable();
    Ok(Lookups {
        devices,
        fill,
        table_size,
        lookups,
        latencies_us,
    })
}

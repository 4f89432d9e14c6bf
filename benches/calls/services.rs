//! The backends a bench server runs on, and the harness's own view of the
//! shared services: a fresh PostgreSQL schema for the run (dropped at the
//! end), and Redis's counters and leftovers.
//!
//! Unreachable services fail the run with a message saying so and naming
//! `--no-shared`; nothing here skips silently.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

/// Where the shared services run on development and CI machines; the
/// tests' `TEST_DATABASE_URL` and `TEST_REDIS_URL` point elsewhere.
const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const REDIS_URL: &str = "redis://127.0.0.1:6379/";

fn url(variable: &str, default: &str) -> String {
    std::env::var(variable)
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// Where a bench server keeps its state.
#[derive(Clone)]
pub enum Backend {
    /// The defaults: SQLite in a fresh temporary file, in-process broker.
    Embedded,
    /// PostgreSQL (the run's schema) and Redis, as in production.
    Shared(Arc<Shared>),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Embedded => "sqlite+memory",
            Backend::Shared(shared) if shared.redis_url.starts_with("redis+cluster://") => {
                "postgres+redis-cluster"
            }
            Backend::Shared(_) => "postgres+redis",
        }
    }

    /// The flags that put a server on this backend; `dir` is the server's
    /// own temporary directory, for the SQLite file.
    pub fn server_args(&self, dir: &Path) -> Vec<String> {
        match self {
            Backend::Embedded => vec![
                "--database-url".into(),
                dir.join("bench.sqlite3").display().to_string(),
            ],
            Backend::Shared(shared) => vec![
                "--database-url".into(),
                shared.database_url.clone(),
                "--redis-url".into(),
                shared.redis_url.clone(),
            ],
        }
    }

    /// The Redis URL the server is given, if any.
    pub fn redis_url(&self) -> Option<&str> {
        match self {
            Backend::Embedded => None,
            Backend::Shared(shared) => Some(&shared.redis_url),
        }
    }

    pub fn redis(&self) -> Option<&Redis> {
        match self {
            Backend::Embedded => None,
            Backend::Shared(shared) => Some(&shared.redis),
        }
    }
}

/// PostgreSQL and Redis for one run.
pub struct Shared {
    /// The database URL with the run's schema as its search path.
    pub database_url: String,
    pub redis_url: String,
    pub redis: Redis,
    /// Server versions, for the table header.
    pub versions: String,
    admin_url: String,
    schema: String,
}

impl Shared {
    /// Checks both services answer and makes the run's schema.
    pub async fn open(run_id: &str) -> Result<Shared> {
        let redis_url = url("TEST_REDIS_URL", REDIS_URL);
        let database_url = url("TEST_DATABASE_URL", DATABASE_URL);
        let redis = Redis::connect(&redis_url).await.with_context(|| {
            format!("Redis at {redis_url} does not answer (start it, or pass --no-shared)")
        })?;
        let schema = format!("bench_{run_id}");
        let mut conn = AsyncPgConnection::establish(&database_url)
            .await
            .with_context(|| {
                format!(
                    "PostgreSQL at {database_url} does not answer (start it, or pass --no-shared)"
                )
            })?;
        conn.batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .context("cannot create the run's PostgreSQL schema")?;
        let postgres: String = diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(
            "current_setting('server_version')",
        ))
        .get_result(&mut conn)
        .await
        .context("cannot read PostgreSQL's version")?;
        let versions = format!(
            "PostgreSQL {postgres}, Redis {}",
            redis.info_field("server", "redis_version").await?
        );
        Ok(Shared {
            // As tests/common/mod.rs does: every connection of the server
            // finds its tables in the run's schema.
            database_url: format!(
                "{database_url}{}options=-c%20search_path%3D{schema}",
                if database_url.contains('?') { '&' } else { '?' }
            ),
            redis_url,
            redis,
            versions,
            admin_url: database_url,
            schema,
        })
    }

    /// Drops the run's schema and everything in it.
    pub async fn close(&self) -> Result<()> {
        let mut conn = AsyncPgConnection::establish(&self.admin_url)
            .await
            .context("PostgreSQL does not answer to drop the run's schema")?;
        conn.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .await
            .with_context(|| format!("cannot drop the schema {}", self.schema))?;
        Ok(())
    }
}

/// Redis's counters as the harness samples them around a measurement window.
#[derive(Debug, Clone, Copy)]
pub struct RedisCounters {
    /// `total_commands_processed`: every command, from every client.
    pub commands: u64,
    /// `used_cpu_sys + used_cpu_user` of the Redis process.
    pub cpu: Duration,
}

impl RedisCounters {
    /// Redis's load between `before` and these counters, `window` apart.
    pub fn load_since(&self, before: &RedisCounters, window: Duration) -> RedisLoad {
        // Less the harness's own INFO commands (one stats, two cpu).
        let commands = self.commands.saturating_sub(before.commands + 3);
        RedisLoad {
            commands: commands as f64 / window.as_secs_f64(),
            cpu_percent: crate::stats::cpu_percent(self.cpu.saturating_sub(before.cpu), window),
        }
    }
}

/// Redis's load over a window.
#[derive(Debug, Clone, Copy)]
pub struct RedisLoad {
    /// Commands per second, from every client.
    pub commands: f64,
    /// CPU of the Redis process, % of one core.
    pub cpu_percent: f64,
}

impl RedisLoad {
    /// This load less `background`, floored at zero.
    pub fn less(self, background: RedisLoad) -> RedisLoad {
        RedisLoad {
            commands: (self.commands - background.commands).max(0.0),
            cpu_percent: (self.cpu_percent - background.cpu_percent).max(0.0),
        }
    }
}

/// The harness's own connections to Redis, for counters and leftovers:
/// one, or one per node a `redis+cluster://a,b,c` URL names (its masters:
/// counters are summed over them, leftovers looked for on each).
#[derive(Clone)]
pub struct Redis {
    nodes: Vec<redis::aio::MultiplexedConnection>,
}

impl Redis {
    async fn connect(url: &str) -> Result<Redis> {
        let urls = match url.strip_prefix("redis+cluster://") {
            Some(hosts) => hosts
                .split('/')
                .next()
                .unwrap_or("")
                .split(',')
                .map(|host| format!("redis://{host}/"))
                .collect(),
            None => vec![url.to_owned()],
        };
        let mut nodes = Vec::with_capacity(urls.len());
        for url in urls {
            nodes.push(
                redis::Client::open(url)?
                    .get_multiplexed_async_connection()
                    .await?,
            );
        }
        Ok(Redis { nodes })
    }

    async fn info(&self, section: &str) -> Result<String> {
        let mut conn = self.nodes[0].clone();
        Ok(redis::cmd("INFO")
            .arg(section)
            .query_async(&mut conn)
            .await?)
    }

    /// A number of INFO, summed over the nodes.
    async fn info_sum(&self, section: &str, field: &str) -> Result<f64> {
        let mut sum = 0.0;
        for node in &self.nodes {
            let info: String = redis::cmd("INFO")
                .arg(section)
                .query_async(&mut node.clone())
                .await?;
            let text = info
                .lines()
                .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
                .with_context(|| format!("no {field} in Redis INFO {section}"))?;
            sum += text
                .trim()
                .parse::<f64>()
                .with_context(|| format!("Redis {field} is not a number: {text}"))?;
        }
        Ok(sum)
    }

    async fn info_field(&self, section: &str, field: &str) -> Result<String> {
        let info = self.info(section).await?;
        info.lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .map(|value| value.trim().to_owned())
            .with_context(|| format!("no {field} in Redis INFO {section}"))
    }

    pub async fn counters(&self) -> Result<RedisCounters> {
        let commands = self.info_sum("stats", "total_commands_processed").await?;
        let cpu = self.info_sum("cpu", "used_cpu_sys").await?
            + self.info_sum("cpu", "used_cpu_user").await?;
        Ok(RedisCounters {
            commands: commands as u64,
            cpu: Duration::from_secs_f64(cpu),
        })
    }

    /// Redis's load over the next `window`.
    pub async fn load_over(&self, window: Duration) -> Result<RedisLoad> {
        let before = self.counters().await?;
        let started = tokio::time::Instant::now();
        tokio::time::sleep(window).await;
        Ok(self
            .counters()
            .await?
            .load_since(&before, started.elapsed()))
    }

    /// How many calls whose key starts with `prefix` are still live in
    /// Redis (a record ringing or won: an ended call's tombstone stays its
    /// 70 s by design), and how many of their channels are left: both must
    /// reach zero once the calls are over.
    pub async fn leftovers(&self, prefix: &str) -> Result<(usize, usize)> {
        let pattern = format!("cn:{{{prefix}*");
        let (mut live, mut channels) = (0, 0);
        for node in &self.nodes {
            let mut conn = node.clone();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut conn)
                .await?;
            // The records and pointers only (`cn:{<key>}`; not the meta,
            // the holders or the notices claimed, some of them hashes),
            // one GET each: a cluster node refuses a multi-key command
            // across slots.
            let keys: Vec<String> = keys.into_iter().filter(|k| k.ends_with('}')).collect();
            for chunk in keys.chunks(1000) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("GET").arg(key);
                }
                let records: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
                live += records
                    .iter()
                    .flatten()
                    .filter(|r| r.starts_with("ring ") || r.starts_with("won "))
                    .count();
            }
            for kind in ["CHANNELS", "SHARDCHANNELS"] {
                let names: Vec<String> = redis::cmd("PUBSUB")
                    .arg(kind)
                    .arg(&pattern)
                    .query_async(&mut conn)
                    .await?;
                channels += names.len();
            }
        }
        Ok((live, channels))
    }

    /// Waits until no key or channel of `prefix` is left, for at most
    /// `within`; returns how long that took.
    pub async fn wait_clean(&self, prefix: &str, within: Duration) -> Result<Duration> {
        let started = tokio::time::Instant::now();
        loop {
            let (keys, channels) = self.leftovers(prefix).await?;
            if keys == 0 && channels == 0 {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                bail!("{keys} live records and {channels} channels of finished calls are still in Redis after {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

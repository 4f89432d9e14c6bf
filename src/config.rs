//! Every flag, with its environment variable and its default.
//!
//! Flags are global so they may stand before or after the subcommand
//! (`call-notifier --database-url X migrate` and
//! `call-notifier migrate --database-url X` mean the same). A bad value is
//! rejected by clap with the flag's name; nothing here reads the environment
//! after start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// What `call-notifier --version` prints after the name: the release and the
/// commit it was built from (`build.rs`; `unknown` when built without git
/// and without `CALL_NOTIFIER_COMMIT`), so an operator can tell two builds of
/// one release apart.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CALL_NOTIFIER_COMMIT"),
    ")"
);

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "call-notifier", version = VERSION, about)]
pub struct Cli {
    /// What to do; `serve` when none is given.
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default).
    Serve,
    /// Apply pending database migrations and exit (`serve` also runs them).
    Migrate,
    /// Manage the push apps that devices register against.
    #[command(subcommand)]
    App(Box<AppCommand>),
    /// Send pushes by hand, to check an app's credentials.
    #[command(subcommand)]
    Push(PushCommand),
    /// Look at and remove the devices of a SIP account.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Show the call history of a SIP account, newest first: what each
    /// call pushed to which device, and how it ended.
    Calls(CallsQuery),
}

/// `call-notifier calls`: which calls of one account to show, and how.
#[derive(Debug, Clone, Args)]
pub struct CallsQuery {
    #[arg(long, value_parser = sip_user_id_arg())]
    pub sip_user_id: i64,
    /// How many calls to show at most, the newest.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub last: i64,
    /// Only calls that started at TIME or later: RFC 3339
    /// (`2024-06-01T10:00:00Z`, `2024-06-01T12:00:00+02:00`) or Unix seconds.
    #[arg(long, value_name = "TIME", value_parser = time_arg)]
    pub since: Option<i64>,
    /// One JSON object per call and line, every field.
    #[arg(long)]
    pub json: bool,
}

/// A moment as `--since` takes it, as Unix ms: RFC 3339 with a `Z` or an
/// offset (fractions of a second to the ms), or Unix seconds. Parsed here,
/// without a date crate, so clap names the flag and exits 2 on bad input.
fn time_arg(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<i64>()
            .ok()
            .and_then(|seconds| seconds.checked_mul(1000))
            .ok_or_else(|| "Unix seconds out of range".to_owned());
    }
    rfc3339_millis(text).ok_or_else(|| {
        "expected RFC 3339 (2024-06-01T10:00:00Z, 2024-06-01T12:00:00+02:00) or Unix seconds"
            .to_owned()
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)` as Unix ms.
fn rfc3339_millis(text: &str) -> Option<i64> {
    let number = |from: usize, len: usize| -> Option<i64> {
        let digits = text.get(from..from + len)?;
        digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let at = |index: usize, allowed: &[u8]| {
        text.as_bytes()
            .get(index)
            .is_some_and(|b| allowed.contains(b))
    };
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt ") && at(13, b":") && at(16, b":")) {
        return None;
    }
    let (year, month, day) = (number(0, 4)?, number(5, 2)?, number(8, 2)?);
    let (hour, minute, second) = (number(11, 2)?, number(14, 2)?, number(17, 2)?);
    let mut rest = text.get(19..)?;
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = padded.parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let part = |a: u8, b: u8| -> Option<i64> {
                (a.is_ascii_digit() && b.is_ascii_digit())
                    .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
            };
            let (hours, minutes) = (part(*h1, *h2)?, part(*m1, *m2)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = hours * 60 + minutes;
            if *sign == b'-' {
                -offset
            } else {
                offset
            }
        }
        _ => return None,
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let valid = (1..=12).contains(&month)
        && day >= 1
        && day <= month_days[usize::try_from(month - 1).ok()?]
        && hour <= 23
        && minute <= 59
        && second <= 60;
    if !valid {
        return None;
    }
    // Howard Hinnant's `days_from_civil`, the inverse of the commands'
    // `civil_from_days`. A leap second counts as the second before it.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_minutes * 60;
    Some(seconds * 1000 + millis)
}

/// `call-notifier push ...`
#[derive(Debug, Subcommand)]
pub enum PushCommand {
    /// Send one push with the app's stored credentials and print what the
    /// push service said. Exit status: 0 delivered, 3 token dead, 4 refused
    /// for now, 5 refused, 6 credentials missing or unusable, 7 no such app,
    /// 1 any other error (the database).
    Test(PushTest),
}

/// `call-notifier push test`: one push to one token, as the server would send it.
#[derive(Debug, Clone, Args)]
pub struct PushTest {
    /// `apns`, `android` or `gcm`.
    #[arg(long, value_parser = platform_arg())]
    pub platform: crate::store::Platform,
    /// The app whose credentials send the push.
    #[arg(long = "app-id")]
    pub app_id: String,
    /// The device's push token, as it registered it.
    #[arg(long)]
    pub token: String,
    /// APNs: send to the sandbox environment (development builds).
    #[arg(long)]
    pub sandbox: bool,
    /// A call push (wakes the app as a call does; on iOS it rings through
    /// CallKit) or a text message push.
    #[arg(long, value_enum, default_value = "call")]
    pub kind: PushKind,
}

/// What `push test` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PushKind {
    Call,
    Message,
}

/// `call-notifier device ...`
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// List the devices of a SIP account, tokens shortened.
    List {
        #[arg(long, value_parser = sip_user_id_arg())]
        sip_user_id: i64,
        /// One JSON object per device and line, full token included.
        #[arg(long)]
        json: bool,
    },
    /// Remove the devices of a SIP account (with `--token`, only that one).
    /// Exits non-zero when none matched.
    Remove {
        #[arg(long, value_parser = sip_user_id_arg())]
        sip_user_id: i64,
        /// Remove only the device with this push token.
        #[arg(long)]
        token: Option<String>,
    },
}

/// `--sip-user-id`: a positive 64-bit integer, as the API takes it.
fn sip_user_id_arg() -> clap::builder::RangedI64ValueParser<i64> {
    clap::value_parser!(i64).range(1..)
}

/// `call-notifier app ...`
#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Add an app, or replace its push credentials when it exists.
    Add(AppAdd),
    /// List the apps, one per line.
    List,
    /// Remove an app (its devices stay, but cannot be pushed until it is re-added).
    Remove {
        /// `apns`, `android` or `gcm`.
        #[arg(long, value_parser = platform_arg())]
        platform: crate::store::Platform,
        /// The app id devices register with (the iOS bundle id / Android package name).
        #[arg(long = "app-id")]
        app_id: String,
    },
}

/// `--platform`: one of the store's platforms by name. Parsed here, so the
/// store's type carries no command-line concern.
fn platform_arg() -> impl clap::builder::TypedValueParser<Value = crate::store::Platform> {
    use crate::store::Platform;
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Platform::ALL.map(Platform::as_str))
        .map(|name| Platform::parse(&name).expect("one of the possible values"))
}

/// `call-notifier app add`: an app and where its push credentials are.
///
/// Only paths and names of environment variables are stored, never a secret
/// itself: every instance reads the files from its own disk (or a mounted
/// secret), so several stateless instances share one database row.
#[derive(Debug, Clone, Args)]
pub struct AppAdd {
    /// `apns`, `android` or `gcm`.
    #[arg(long, value_parser = platform_arg())]
    pub platform: crate::store::Platform,
    /// The app id devices register with (the iOS bundle id / Android package name).
    #[arg(long = "app-id")]
    pub app_id: String,
    /// APNs token auth: path of the `.p8` signing key.
    #[arg(long)]
    pub apns_key: Option<PathBuf>,
    /// APNs token auth: the key's id (10 characters).
    #[arg(long)]
    pub apns_key_id: Option<String>,
    /// APNs token auth: the Apple developer team id.
    #[arg(long)]
    pub apns_team_id: Option<String>,
    /// APNs certificate auth: path of the `.p12` bundle.
    #[arg(long)]
    pub apns_cert: Option<PathBuf>,
    /// APNs certificate auth: name of the environment variable holding the `.p12` password.
    #[arg(long)]
    pub apns_cert_password_env: Option<String>,
    /// APNs certificate auth: path of a file holding the `.p12` password.
    #[arg(long)]
    pub apns_cert_password_file: Option<PathBuf>,
    /// APNs topic; `<app id>.voip` when not given.
    #[arg(long)]
    pub apns_topic: Option<String>,
    /// FCM: path of the Firebase service-account JSON (its project id is read from it).
    #[arg(long)]
    pub fcm_service_account: Option<PathBuf>,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The settings of a running server, shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(
        long,
        env = "CALL_NOTIFIER_LISTEN",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub listen: SocketAddr,

    /// Where devices and apps live: an SQLite file path (or `sqlite://path`),
    /// or a `postgres://` URL for PostgreSQL.
    #[arg(
        long,
        env = "CALL_NOTIFIER_DATABASE_URL",
        default_value = "call-notifier.sqlite3",
        global = true
    )]
    pub database_url: String,

    /// Maximum database connections per instance.
    #[arg(
        long,
        env = "CALL_NOTIFIER_DATABASE_POOL_SIZE",
        default_value_t = 10,
        global = true
    )]
    pub database_pool_size: u32,

    /// How long a request waits for a free database connection before it is
    /// answered 503 (or NAK for a call).
    #[arg(
        long,
        env = "CALL_NOTIFIER_DATABASE_TIMEOUT_MS",
        default_value_t = 2000,
        global = true
    )]
    pub database_timeout_ms: u64,

    /// Redis URL (`redis://host:port/db`). Absent: the in-process broker,
    /// which only works when every request reaches this one instance.
    #[arg(long, env = "CALL_NOTIFIER_REDIS_URL", global = true)]
    pub redis_url: Option<String>,

    /// Deprecated, and without effect: one multiplexed connection now
    /// carries every Redis command of an instance (pub/sub uses one more).
    /// Still accepted, so a configuration that sets it keeps starting.
    #[arg(
        long,
        env = "CALL_NOTIFIER_REDIS_POOL_SIZE",
        hide = true,
        global = true
    )]
    pub redis_pool_size: Option<u32>,

    /// How long a Redis connection attempt may take, and Redis may take to
    /// answer one command, in ms. While Redis
    /// cannot be reached at all, commands fail at once instead (a call: NAK).
    #[arg(long, env = "CALL_NOTIFIER_REDIS_TIMEOUT_MS", default_value_t = 1000, global = true,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub redis_timeout_ms: u64,

    /// Deprecated: answers always reach a parked call by publish/subscribe;
    /// the `poll` mode that was kept to compare against the replaced service
    /// now lives in the benchmarks. `pubsub` is still accepted, so a
    /// configuration that sets it keeps starting.
    #[arg(
        long,
        env = "CALL_NOTIFIER_BROKER_MODE",
        value_parser = ["pubsub"],
        hide = true,
        global = true
    )]
    pub broker_mode: Option<String>,

    /// How long the PBX's request is held waiting for the app, in ms.
    #[arg(long, env = "CALL_NOTIFIER_WAIT_MS", default_value_t = 4000, global = true,
          value_parser = clap::value_parser!(u64).range(1..=120_000))]
    pub wait_ms: u64,

    /// Interval between call pushes while nobody answers, in ms.
    #[arg(long, env = "CALL_NOTIFIER_RESEND_INTERVAL_MS", default_value_t = 1000, global = true,
          value_parser = clap::value_parser!(u64).range(1..=120_000))]
    pub resend_interval_ms: u64,

    /// Interval of the fallback check of stored answers, in ms.
    #[arg(long, env = "CALL_NOTIFIER_POLL_INTERVAL_MS", default_value_t = 100, global = true,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub poll_interval_ms: u64,

    /// Public base URL of this service, as phones reach it; pushes carry
    /// `<base>/api/call-response/` as `response_api`. Default: `http://<listen>`.
    #[arg(long, env = "CALL_NOTIFIER_RESPONSE_URL", global = true)]
    pub response_url: Option<String>,

    /// Most PBX requests parked at once; beyond it a call is answered NAK at
    /// once (and logged), so a flood cannot exhaust memory.
    #[arg(
        long,
        env = "CALL_NOTIFIER_MAX_PENDING_CALLS",
        default_value_t = 100_000,
        global = true
    )]
    pub max_pending_calls: usize,

    /// Most devices one SIP account holds, all rung for its calls. At the
    /// limit, a new device displaces the one registered or updated longest
    /// ago. With 1 (the default) a registration replaces the account's
    /// device, as the service this replaces did. At most 20: each is pushed
    /// for every call.
    #[arg(long, env = "CALL_NOTIFIER_MAX_DEVICES_PER_ACCOUNT", default_value_t = 1, global = true,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=20))]
    pub max_devices_per_account: usize,

    // Who may do what.
    /// The operator's account API that decides whether a device request's
    /// HTTP Basic credentials own its `sip_user_id`. `{sip_user_id}` in the
    /// URL is replaced by the id; without it, `?sip_user_id=<id>` is appended.
    #[arg(long, env = "CALL_NOTIFIER_AUTH_URL", global = true)]
    pub auth_url: Option<String>,

    /// How long the account API may take before the device request gets 503.
    #[arg(
        long,
        env = "CALL_NOTIFIER_AUTH_TIMEOUT_MS",
        default_value_t = 2000,
        global = true
    )]
    pub auth_timeout_ms: u64,

    /// How long a confirmed (credentials, sip_user_id) pair is trusted
    /// without asking the account API again; 0 disables the cache.
    #[arg(
        long,
        env = "CALL_NOTIFIER_AUTH_CACHE_SECS",
        default_value_t = 60,
        global = true
    )]
    pub auth_cache_secs: u64,

    /// Serve device endpoints without authentication on a non-loopback
    /// address. Without `--auth-url` the server otherwise refuses to start
    /// there.
    #[arg(long, env = "CALL_NOTIFIER_INSECURE_NO_AUTH", global = true)]
    pub insecure_no_auth: bool,

    /// Networks (CIDR) allowed to post incoming calls; repeatable, or
    /// comma-separated in the environment.
    #[arg(long, env = "CALL_NOTIFIER_PBX_ALLOW", value_delimiter = ',', global = true,
          default_values = ["127.0.0.0/8", "::1/128"])]
    pub pbx_allow: Vec<ipnet::IpNet>,

    /// Proxies (CIDR) whose `X-Forwarded-For` is believed; from anyone else
    /// the header is ignored. Repeatable, or comma-separated in the environment.
    #[arg(
        long,
        env = "CALL_NOTIFIER_TRUSTED_PROXY",
        value_delimiter = ',',
        global = true
    )]
    pub trusted_proxy: Vec<ipnet::IpNet>,

    // Operations.
    /// Networks (CIDR) allowed to read `/metrics`; repeatable, or
    /// comma-separated in the environment.
    #[arg(long, env = "CALL_NOTIFIER_METRICS_ALLOW", value_delimiter = ',', global = true,
          default_values = ["127.0.0.0/8", "::1/128"])]
    pub metrics_allow: Vec<ipnet::IpNet>,

    /// On SIGTERM or Ctrl-C, parked calls keep their full wait; calls still
    /// parked this long after the signal (or at a second signal) are
    /// answered NAK, then the process exits.
    #[arg(
        long,
        env = "CALL_NOTIFIER_SHUTDOWN_TIMEOUT_SECS",
        default_value_t = 30,
        global = true
    )]
    pub shutdown_timeout_secs: u64,

    /// How long a new connection may take, from accept, to send its first
    /// complete request head, in ms; a connection that sends nothing is
    /// closed then, so silent clients cannot use up the file descriptors.
    #[arg(long, env = "CALL_NOTIFIER_HEADER_TIMEOUT_MS", default_value_t = 10_000, global = true,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub header_timeout_ms: u64,

    /// How long a connection may stay idle between requests before it is
    /// closed, in seconds. 75 s, as common proxies use, so a PBX's kept-alive
    /// connection survives the pause between two calls.
    #[arg(long, env = "CALL_NOTIFIER_KEEP_ALIVE_TIMEOUT_SECS", default_value_t = 75, global = true,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub keep_alive_timeout_secs: u64,

    /// How many days the call history keeps a call (`call-notifier calls`),
    /// and with it what the apps reported (the response log, hangup
    /// reasons); older rows are deleted at start-up and every hour. 0 keeps
    /// no history: no call is recorded, and what was stored is deleted.
    #[arg(long, env = "CALL_NOTIFIER_CALL_HISTORY_DAYS", default_value_t = 14, global = true,
          value_parser = clap::value_parser!(u32).range(0..=3650))]
    pub call_history_days: u32,

    /// Log line format.
    #[arg(
        long,
        env = "CALL_NOTIFIER_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    // Push delivery.
    /// Base URL of the FCM HTTP v1 API; tests point it at a local stand-in.
    #[arg(
        long,
        env = "CALL_NOTIFIER_FCM_BASE_URL",
        default_value = "https://fcm.googleapis.com",
        global = true
    )]
    pub fcm_base_url: String,

    /// How long one push may take (token fetch, connect, send, answer)
    /// before it counts as refused for now and is retried, in ms.
    #[arg(long, env = "CALL_NOTIFIER_PUSH_TIMEOUT_MS", default_value_t = 2000, global = true,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub push_timeout_ms: u64,
}

impl Config {
    /// The configuration `call-notifier` runs with when given no flags and no
    /// environment: what tests start from.
    pub fn defaults() -> Self {
        Cli::parse_from(["call-notifier"]).config
    }

    // The duration flags, as `Duration`s.
    pub fn wait(&self) -> Duration {
        Duration::from_millis(self.wait_ms)
    }
    pub fn resend_interval(&self) -> Duration {
        Duration::from_millis(self.resend_interval_ms)
    }
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }
    pub fn push_timeout(&self) -> Duration {
        Duration::from_millis(self.push_timeout_ms)
    }
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }
    pub fn keep_alive_timeout(&self) -> Duration {
        Duration::from_secs(self.keep_alive_timeout_secs)
    }

    /// Pushes of one call at most: `wait / resend_interval - 1`, at least one.
    ///
    /// The last interval of the wait carries no push, since a phone woken
    /// then could not answer in time.
    pub fn max_attempts(&self) -> u32 {
        let slots = self.wait_ms / self.resend_interval_ms;
        u32::try_from(slots.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .max(1)
    }

    /// The full URL pushed to phones as `response_api`.
    pub fn response_api(&self, bound: SocketAddr) -> String {
        let base = match &self.response_url {
            Some(url) => url.clone(),
            None => format!("http://{bound}"),
        };
        format!("{}/api/call-response/", base.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_rfc_3339_or_unix_seconds() {
        assert_eq!(time_arg("1700000000"), Ok(1_700_000_000_000));
        assert_eq!(time_arg("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(time_arg("2023-11-14T22:13:20.123Z"), Ok(1_700_000_000_123));
        assert_eq!(time_arg("2023-11-14t22:13:20.1z"), Ok(1_700_000_000_100));
        assert_eq!(time_arg("2023-11-15T00:13:20+02:00"), Ok(1_700_000_000_000));
        assert_eq!(time_arg("2023-11-14T20:13:20-02:00"), Ok(1_700_000_000_000));
        assert_eq!(time_arg("2000-02-29T00:00:00Z"), Ok(951_782_400_000));
        assert_eq!(time_arg("1969-12-31T23:59:59Z"), Ok(-1000));
        for bad in [
            "",
            "yesterday",
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-02-29T00:00:00Z",
            "2023-13-01T00:00:00Z",
            "2023-11-14T24:00:00Z",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20+2:00",
            "-5",
            "1.5",
            "99999999999999999999",
        ] {
            assert!(time_arg(bad).is_err(), "{bad:?}");
        }
    }
}

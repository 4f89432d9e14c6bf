//! The rows the rest of the service works with.

use std::fmt;
use std::path::PathBuf;

use diesel::backend::Backend;
use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::prelude::*;
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::Text;
use serde::{Deserialize, Serialize, Serializer};

use super::schema::devices;

/// The push platform a device registered through. `android` and `gcm` both
/// go out through FCM HTTP v1: `gcm` is the legacy name old apps still use.
/// Stored as its name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AsExpression, FromSqlRow,
)]
#[serde(rename_all = "lowercase")]
#[diesel(sql_type = Text)]
pub enum Platform {
    Apns,
    Android,
    Gcm,
}

impl Platform {
    pub const ALL: [Platform; 3] = [Platform::Apns, Platform::Android, Platform::Gcm];

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Apns => "apns",
            Platform::Android => "android",
            Platform::Gcm => "gcm",
        }
    }

    pub fn parse(name: &str) -> Option<Platform> {
        Platform::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// iOS VoIP pushes must each be reported to CallKit, so they are resent
    /// only when the push service did not accept the previous one.
    pub fn is_apns(self) -> bool {
        self == Platform::Apns
    }

    /// A token as this platform stores it. APNs tokens are hex, which apps
    /// post in either case: stored in lower case, `EFEF…` and `efef…` are
    /// one device (one row, one VoIP push per call), not two. Other
    /// platforms' tokens are case-sensitive and kept as given.
    pub fn normal_token(self, token: String) -> String {
        if self.is_apns() {
            token.to_ascii_lowercase()
        } else {
            token
        }
    }

    /// Whether a device of this platform with token `a` and one of `other`
    /// with token `b` are one phone: the same token of the same push
    /// service. `android` and `gcm` both push through FCM HTTP v1 (`gcm`
    /// is the legacy name), so an app that moved from one endpoint to the
    /// other is one phone, rung once, not two.
    pub fn same_phone(self, a: &str, other: Platform, b: &str) -> bool {
        self.one_service().contains(&other) && self.same_token(a, b)
    }

    /// The platforms that push through this one's push service: a token
    /// under any of them is one device ([`Platform::same_phone`]).
    pub fn one_service(self) -> &'static [Platform] {
        if self.is_apns() {
            &[Platform::Apns]
        } else {
            &[Platform::Android, Platform::Gcm]
        }
    }

    /// Whether two tokens of this platform name one device: APNs tokens
    /// compare without case, since rows stored before tokens were
    /// normalised may hold upper case.
    pub fn same_token(self, a: &str, b: &str) -> bool {
        if self.is_apns() {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    }
}

impl<DB: Backend> ToSql<Text, DB> for Platform
where
    str: ToSql<Text, DB>,
{
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, DB>) -> serialize::Result {
        self.as_str().to_sql(out)
    }
}

impl<DB: Backend> FromSql<Text, DB> for Platform
where
    String: FromSql<Text, DB>,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        let name = String::from_sql(bytes)?;
        Platform::parse(&name).ok_or_else(|| format!("unknown platform {name:?}").into())
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device registered for a SIP account, as stored: the registration as
/// the app sent it, and its times.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = devices)]
pub struct Device {
    /// The row's own key: an account may hold several devices, so the
    /// account alone no longer names one (what a displaced device is
    /// deleted by).
    pub id: i64,
    #[diesel(embed)]
    pub registration: NewDevice,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_seen_at: i64,
}

/// A registration as the app sent it: what is stored (with its times, as a
/// [`Device`]), and what the registration endpoints answer. The device's
/// field list, once.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable, AsChangeset, Serialize)]
#[diesel(table_name = devices, primary_key(sip_user_id), treat_none_as_null = true)]
pub struct NewDevice {
    /// Sent as text: JSON numbers lose precision past 2^53.
    #[serde(serialize_with = "as_text")]
    pub sip_user_id: i64,
    pub platform: Platform,
    pub token: String,
    #[serde(rename = "app")]
    pub app_id: String,
    pub name: Option<String>,
    pub os_version: Option<String>,
    pub client_version: Option<String>,
    pub remote_logging_id: Option<String>,
    /// APNs only: the app was built against the sandbox environment.
    pub sandbox: bool,
    /// APNs only: the app's regular device token, for visible alerts (a
    /// call that ended, a takeover). A VoIP push must be reported to
    /// CallKit as a call, so anything but a call goes here, never to `token`.
    pub alert_token: Option<String>,
    /// When a device a SIP proxy registered (RFC 8599) expires with its
    /// REGISTER, Unix ms; `None` for a device the app registered, which
    /// never expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Until when a SIP proxy's binding of the device lives, Unix ms: while
    /// it does, the device's REGISTER answers its calls. Apart from
    /// [`NewDevice::expires_at`], so a proxy that binds a device its app
    /// registered refreshes only this, and its lapse never takes the app's
    /// device away.
    #[serde(skip)]
    pub proxy_expires_at: Option<i64>,
}

impl NewDevice {
    /// Whether its SIP registration (and grace) had lapsed at `now` (Unix
    /// ms): it is not pushed, and holds no place in its account.
    pub fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether a SIP proxy's binding of the device lives at `now`.
    pub fn proxy_bound(&self, now: i64) -> bool {
        self.proxy_expires_at.is_some_and(|at| at > now)
    }

    /// This registration, arriving for the device `previous` (the same
    /// token) holds: what each side owns of it. A proxy's registration of a
    /// device its app registered refreshes only the proxy's binding, and
    /// never clears what the app gave (`alert_token`, its name, versions);
    /// the app registering a device its proxy bound keeps the binding.
    pub fn merged_over(self, previous: &NewDevice) -> NewDevice {
        let app_owned = previous.expires_at.is_none();
        if self.expires_at.is_some() && app_owned {
            return NewDevice {
                proxy_expires_at: self.proxy_expires_at,
                ..previous.clone()
            };
        }
        if self.expires_at.is_none() {
            return NewDevice {
                proxy_expires_at: previous.proxy_expires_at,
                ..self
            };
        }
        self
    }
}

fn as_text<S: Serializer>(id: &i64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(id)
}

/// What a registration did, and which devices lost the account to it, so
/// the caller can tell them.
#[derive(Debug, Clone, PartialEq)]
pub enum Registration {
    /// The SIP account did not have this device: it was added.
    /// `displaced`: the devices deleted to stay within the account's limit,
    /// updated longest ago first.
    Created { displaced: Vec<Device> },
    /// The SIP account had this device (at one device per account: any
    /// device), now replaced by this registration. `previous` is what it
    /// was. `displaced` holds the devices that lost the account: those
    /// deleted to stay within the limit, and `previous` when its token
    /// differs (one device per account: the phone that was replaced).
    Updated {
        /// Boxed: a whole row, where the other variant holds a list.
        previous: Box<Device>,
        displaced: Vec<Device>,
    },
}

/// Who removes a device ([`super::Store::delete_device`]): what each may
/// take away follows from who registered it ([`NewDevice::merged_over`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remover {
    /// The app (its `DELETE`): the device, whoever registered it.
    App,
    /// A SIP proxy whose REGISTER ended (RFC 8599: `expires` 0, or its
    /// `DELETE`): a device it registered; of one the app registered, only
    /// the proxy's binding, as when the binding lapses.
    Proxy,
}

/// What [`super::Store::delete_device`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The account has no such device.
    Missing,
    /// The row went.
    Deleted,
    /// The app's device stays; the SIP proxy's binding of it went.
    Unbound,
}

/// Why a call ended, as every phone still ringing for it is told
/// (`call_ended` notices) and as a late answer hears it (410 Gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// Another device of the account took the call.
    AnsweredElsewhere,
    /// The PBX hung up or cancelled the call.
    Cancelled,
    /// Nobody answered within the wait.
    TimedOut,
    /// The service could not go on: shutdown, store or broker lost.
    Failed,
    /// Every device declined (or died, at least one declining): only in a
    /// late answer's 410, never in a notice (a device that answered is
    /// not told).
    NotAvailable,
}

impl EndReason {
    pub const ALL: [EndReason; 5] = [
        EndReason::AnsweredElsewhere,
        EndReason::Cancelled,
        EndReason::TimedOut,
        EndReason::Failed,
        EndReason::NotAvailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::AnsweredElsewhere => "answered_elsewhere",
            EndReason::Cancelled => "cancelled",
            EndReason::TimedOut => "timed_out",
            EndReason::Failed => "failed",
            EndReason::NotAvailable => "not_available",
        }
    }

    pub fn parse(name: &str) -> Option<EndReason> {
        EndReason::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A push app, and where its credentials are.
#[derive(Debug, Clone, PartialEq)]
pub struct App {
    pub platform: Platform,
    pub app_id: String,
    /// `None`: pushes for this app are only logged (development).
    pub credentials: Option<Credentials>,
}

/// Where an app's push credentials are. Stored as JSON in `apps.credentials`;
/// only paths and variable names, never secrets, so the database row can be
/// shared by every instance while each reads the secret from its own disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Credentials {
    /// APNs token-based auth with a `.p8` key.
    ApnsToken {
        key_path: PathBuf,
        key_id: String,
        team_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
    },
    /// APNs certificate auth with a `.p12` bundle.
    ApnsCertificate {
        cert_path: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password_env: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password_file: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
    },
    /// FCM HTTP v1 with a Google service account.
    Fcm { service_account_path: PathBuf },
}

/// One answer an app gave, for the response log.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseLogEntry {
    pub platform: Platform,
    /// Seconds from the push leaving us to the app's answer, as the app reports it.
    pub roundtrip: f64,
    pub available: bool,
    pub created_at: i64,
}

/// Why a call ended on the phone, as the app reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct HangupReason {
    pub sip_user_id: i64,
    pub unique_key: String,
    pub reason: String,
    pub created_at: i64,
}

/// One incoming call, as the call history keeps it: what an operator looks
/// at when a user says "my phone did not ring".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallHistoryEntry {
    /// When the call reached us (Unix ms): when its PBX request arrived.
    pub created_at: i64,
    pub sip_user_id: i64,
    /// The call's `unique_key`; empty when it never got one (no device, or
    /// refused before the lookup).
    pub unique_key: String,
    /// Every device rung, in the order of their index in the call.
    pub devices: Vec<CalledDevice>,
    /// How the call ended: the `outcome` label of the incoming-calls metric
    /// (`ack`, `timeout`, ..., `hung_up`).
    pub outcome: String,
    /// From the PBX's request arriving to the call's end.
    pub waited_ms: i64,
    /// The index of the device whose app took the call (ACK only).
    pub answered_by: Option<i32>,
    /// The answering device's wake-up as the call saw it: from the push's
    /// `message_start_time` to its answer reaching an instance (both wall
    /// clock, so possibly another instance's). Not the app-reported
    /// roundtrip, which only the instance that took the answer knows.
    /// `None` when the answer was found by the fallback check (it carries
    /// no arrival time).
    pub roundtrip_ms: Option<i64>,
}

/// One device of a call in the call history. Stored as JSON in
/// `call_history.devices`, so a call with any number of devices is one row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalledDevice {
    pub platform: Platform,
    /// Shortened as `device list` shows it: enough to find the device, not
    /// enough to push to it. The history outlives the device.
    pub token: String,
    /// Call pushes the push service accepted (the `attempt` of the last).
    pub attempts: u32,
    /// What the push service said to the device's last call push:
    /// `delivered`, or the outcome and its reason (`token_dead UNREGISTERED`,
    /// `failed BadDeviceToken`, `retry` for a push that got no answer);
    /// `None` when no push had been answered by the call's end.
    pub verdict: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(expires_at: Option<i64>, proxy_expires_at: Option<i64>) -> NewDevice {
        NewDevice {
            sip_user_id: 42,
            platform: Platform::Apns,
            token: "voip".into(),
            app_id: "app".into(),
            name: expires_at.is_none().then(|| "Alice's iPhone".into()),
            os_version: None,
            client_version: None,
            remote_logging_id: None,
            sandbox: false,
            alert_token: expires_at.is_none().then(|| "alert".into()),
            expires_at,
            proxy_expires_at,
        }
    }

    #[test]
    fn the_proxy_and_the_app_each_refresh_only_what_they_own() {
        let app = device(None, None);
        let proxy = device(Some(100), Some(100));
        let bound = proxy.clone().merged_over(&app);
        assert_eq!(bound, device(None, Some(100)), "the app's fields stay");
        let again = device(None, None).merged_over(&bound);
        assert_eq!(again.proxy_expires_at, Some(100), "the binding stays");
        assert_eq!(proxy.clone().merged_over(&proxy), proxy, "a proxy's own");
        assert!(!bound.expired(1_000), "an app's device never expires");
        assert!(bound.proxy_bound(99) && !bound.proxy_bound(100));
    }
}

//! The [`Pusher`] boundary: send one push to one device and say what happened.
//!
//! Implementations: [`router::PushRouter`] (the server's default: picks each
//! push's app and sends it through [`apns`] or [`fcm`] with the app's
//! credentials, or [`log::LogPusher`] for apps without credentials) and
//! [`recording::RecordingPusher`] (tests and benchmarks).
//! A pusher never retries and never sleeps: the resend and retry schedule is
//! the call's ([`crate::calls`]), which knows the deadline.

pub mod apns;
pub mod fcm;
pub mod log;
pub mod notices;
pub mod recording;
pub mod router;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::store::{EndReason, NewDevice, Platform};

/// How long a `call_ended` notice lives at the push service: a phone that
/// stays out of reach longer has long stopped ringing by itself, so a
/// refused notice is never retried past it either.
pub const NOTICE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Who a push goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct PushTarget {
    pub platform: Platform,
    pub token: String,
    /// The app the device registered with: picks the credentials.
    pub app_id: String,
    /// APNs only: send to the sandbox environment.
    pub sandbox: bool,
    /// The SIP account, for logs.
    pub sip_user_id: i64,
    /// APNs only: the regular device token, for alert pushes (see
    /// [`crate::store::NewDevice::alert_token`]).
    pub alert_token: Option<String>,
}

impl PushTarget {
    /// Whether this device can be told anything but a call (a `call_ended`
    /// notice, the takeover notice): an Android device always, an iOS
    /// device only through an alert push to its `alert_token` (the iOS
    /// rule, [`PushTarget::token_for`]). The call path asks before it sends
    /// a notice, so a device that cannot be told costs no push.
    pub fn can_be_told(&self) -> bool {
        self.notice_token().is_some()
    }

    /// The token a push of `payload` goes to, `None` when this device
    /// cannot be sent it.
    ///
    /// The iOS rule: since iOS 13 the app must report every VoIP push to
    /// CallKit as a call, and iOS stops waking apps that fail to. So the
    /// VoIP token (`token`) gets a call and nothing else; anything else
    /// goes as an alert push to `alert_token`, or nowhere.
    pub fn token_for(&self, payload: &Payload) -> Option<&str> {
        match payload {
            Payload::Call { .. } => Some(&self.token),
            Payload::CallEnded { .. } | Payload::Message { .. } => self.notice_token(),
        }
    }

    /// The token a notice goes to.
    fn notice_token(&self) -> Option<&str> {
        match self.platform {
            Platform::Apns => self.alert_token.as_deref(),
            Platform::Android | Platform::Gcm => Some(&self.token),
        }
    }
}

impl From<NewDevice> for PushTarget {
    fn from(device: NewDevice) -> Self {
        PushTarget {
            platform: device.platform,
            token: device.token,
            app_id: device.app_id,
            sandbox: device.sandbox,
            sip_user_id: device.sip_user_id,
            alert_token: device.alert_token,
        }
    }
}

/// What a push says. Data-only on both platforms; the keys are the contract
/// the apps read (README, "API"), so they are spelled out here and nowhere else.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// Wake up: a call is waiting.
    Call {
        unique_key: String,
        phonenumber: String,
        caller_id: String,
        /// Full URL of `/api/call-response/`.
        response_api: String,
        /// When the first push of this call left, Unix seconds.
        message_start_time: f64,
        /// Which push of this call this is, from 1.
        attempt: u32,
        /// The PBX's `call_id`, verbatim, when it gave one: the app pairs
        /// the push with the INVITE that follows (CallKit shows two calls
        /// when it cannot). A data key only when given.
        call_id: Option<String>,
    },
    /// The call this device was rung for is over; stop ringing. Sent once
    /// per device that was pushed for the call and did not answer it.
    CallEnded {
        /// The key this device's call push carried.
        unique_key: String,
        reason: EndReason,
        /// Who called (`caller_id`, else `phonenumber`): the argument of the
        /// iOS alert's localized text. Not a data key.
        caller: String,
    },
    /// A text for the user. The service sends one message only: that
    /// another device took over the account (and `push test --kind message`).
    Message { message: String },
}

impl Payload {
    /// The payload as JSON values (APNs custom keys, logs).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut map = Map::new();
        match self {
            Payload::Call {
                unique_key,
                phonenumber,
                caller_id,
                response_api,
                message_start_time,
                attempt,
                call_id,
            } => {
                map.insert("type".into(), "call".into());
                map.insert("unique_key".into(), unique_key.as_str().into());
                map.insert("phonenumber".into(), phonenumber.as_str().into());
                map.insert("caller_id".into(), caller_id.as_str().into());
                map.insert("response_api".into(), response_api.as_str().into());
                map.insert("message_start_time".into(), (*message_start_time).into());
                map.insert("attempt".into(), (*attempt).into());
                if let Some(call_id) = call_id {
                    map.insert("call_id".into(), call_id.as_str().into());
                }
            }
            Payload::CallEnded {
                unique_key, reason, ..
            } => {
                map.insert("type".into(), "call_ended".into());
                map.insert("unique_key".into(), unique_key.as_str().into());
                map.insert("reason".into(), reason.as_str().into());
            }
            Payload::Message { message } => {
                map.insert("type".into(), "message".into());
                map.insert("message".into(), message.as_str().into());
            }
        }
        map
    }

    /// The payload as FCM data: every value a string, numbers as their text.
    pub fn to_string_map(&self) -> Map<String, Value> {
        self.to_json()
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, Value::String(text))
            })
            .collect()
    }

    /// The attempt number of a call push.
    pub fn attempt(&self) -> Option<u32> {
        match self {
            Payload::Call { attempt, .. } => Some(*attempt),
            Payload::CallEnded { .. } | Payload::Message { .. } => None,
        }
    }

    /// Every [`Payload::kind`], for the metrics that start at zero.
    pub const KINDS: [&'static str; 3] = ["call", "call_ended", "message"];

    /// The `kind` label of the `pushes` metric, and the `type` data key.
    pub fn kind(&self) -> &'static str {
        match self {
            Payload::Call { .. } => "call",
            Payload::CallEnded { .. } => "call_ended",
            Payload::Message { .. } => "message",
        }
    }
}

/// What a push service said.
#[derive(Debug, Clone, PartialEq)]
pub enum PushOutcome {
    /// Accepted for delivery.
    Delivered,
    /// The token will never work again (app uninstalled, token rotated): the
    /// device is forgotten and the call ends NAK at once.
    TokenDead(Refusal),
    /// Refused for now (429, 5xx, timeout): try again, after `after` when the
    /// service said so.
    Retry {
        after: Option<Duration>,
        refusal: Refusal,
    },
    /// Refused for good for this call (credentials, malformed request): logged
    /// at error level, the call goes on to its timeout.
    Failed(Refusal),
}

impl PushOutcome {
    /// The label of this outcome in the `pushes` metric.
    pub fn as_str(&self) -> &'static str {
        match self {
            PushOutcome::Delivered => "delivered",
            PushOutcome::TokenDead(_) => "token_dead",
            PushOutcome::Retry { .. } => "retry",
            PushOutcome::Failed(_) => "failed",
        }
    }

    /// Whether the phone may have had the push: the service took it, or it
    /// left and no answer came back. Such a phone is told when its call is
    /// over: a phone left ringing for a call that is over is worse than a
    /// notice for a push that never came (the app drops a notice for a key
    /// it does not know).
    pub fn may_have_reached(&self) -> bool {
        match self {
            PushOutcome::Delivered => true,
            PushOutcome::Retry { refusal, .. } => refusal.in_doubt,
            PushOutcome::TokenDead(_) | PushOutcome::Failed(_) => false,
        }
    }

    /// The push service's reason, [`Reason::NONE`] for a delivered push.
    pub fn reason(&self) -> Reason {
        match self {
            PushOutcome::Delivered => Reason::NONE,
            PushOutcome::TokenDead(refusal)
            | PushOutcome::Retry { refusal, .. }
            | PushOutcome::Failed(refusal) => refusal.reason,
        }
    }
}

/// Why a push was not delivered: the push service's reason code, read once
/// where its answer is parsed so the metric never parses the text, and what
/// was said, for the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: Reason,
    pub detail: String,
    /// The push left and no answer came back (it timed out, or the
    /// connection broke once it was sent): the service may have taken it,
    /// and the phone had it, all the same ([`PushOutcome::may_have_reached`]).
    pub in_doubt: bool,
}

impl Refusal {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Refusal {
            reason,
            detail: detail.into(),
            in_doubt: false,
        }
    }

    /// A refusal no push service gave: the push never left (unknown app,
    /// unusable credentials, the service unreachable).
    pub fn unanswered(detail: impl Into<String>) -> Self {
        Refusal::new(Reason::NONE, detail)
    }

    /// A push that left and got no answer: timed out, or its connection
    /// broke once it was sent.
    pub fn in_doubt(detail: impl Into<String>) -> Self {
        Refusal {
            in_doubt: true,
            ..Refusal::unanswered(detail)
        }
    }

    /// Why a notice for an iOS device without an `alert_token` never left
    /// ([`PushTarget::token_for`]): said the same by every pusher that
    /// sends to APNs or stands in for it.
    pub fn no_alert_token() -> Self {
        Refusal::unanswered(
            "not sent: on iOS a VoIP push only ever rings a call, and this device \
             registered no alert_token for other notices",
        )
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// A push service's reason code, the `reason` label of the `pushes` metric.
///
/// One of the codes the push modules know (a2's `ErrorReason` names for
/// APNs, [`fcm::REASONS`] for FCM), [`Reason::OTHER`] for any other answer a
/// service refused with (a code added later, a body that cannot be read), or
/// [`Reason::NONE`] where the service gave none: a delivered push, or one
/// that got no answer. Never a string taken from an answer as it came, so
/// the metric's series stay few whatever a service (or a man in the middle)
/// sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reason(&'static str);

impl Reason {
    pub const NONE: Reason = Reason("none");
    pub const OTHER: Reason = Reason("other");

    /// A code from a push module's fixed list.
    const fn known(code: &'static str) -> Reason {
        Reason(code)
    }

    /// `code` when it is one of `known`, else [`Reason::OTHER`].
    pub fn bounded(code: &str, known: &[&'static str]) -> Reason {
        known
            .iter()
            .find(|k| **k == code)
            .map_or(Reason::OTHER, |k| Reason::known(k))
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

/// The push boundary.
#[async_trait]
pub trait Pusher: Send + Sync + 'static {
    async fn send(&self, target: &PushTarget, payload: &Payload) -> PushOutcome;
}

/// Why an app's push credentials cannot be used. Each instance reads the
/// files named in the app's row from its own disk, so these are what an
/// operator fixes on the instance that logs them.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no password for the .p12 bundle: {0}")]
    Password(String),
    #[error("cannot open the .p12 bundle {} (wrong password or not a PKCS#12 file): {source}", path.display())]
    Pkcs12 {
        path: PathBuf,
        #[source]
        source: p12_keystore::error::Error,
    },
    #[error("the .p12 bundle {} holds no private key with its certificate", .0.display())]
    Pkcs12Empty(PathBuf),
    #[error("unusable APNs key or certificate {}: {source}", path.display())]
    Apns {
        path: PathBuf,
        #[source]
        source: a2::Error,
    },
    #[error("unusable service-account file {}: {reason}", path.display())]
    ServiceAccount { path: PathBuf, reason: String },
    #[error("the app's credentials are not for {0}")]
    WrongPlatform(Platform),
}

/// Reads a file an app's credentials name.
async fn read_credentials(path: &Path) -> Result<Vec<u8>, CredentialsError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fcm_data_carries_numbers_as_text() {
        let payload = Payload::Call {
            unique_key: "k".into(),
            phonenumber: "+31 6".into(),
            caller_id: "".into(),
            response_api: "http://x/api/call-response/".into(),
            message_start_time: 1.5,
            attempt: 2,
            call_id: None,
        };
        let data = payload.to_string_map();
        assert_eq!(data["attempt"], "2");
        assert_eq!(data["message_start_time"], "1.5");
        assert_eq!(data["type"], "call");
        assert_eq!(data.len(), 7);
    }

    fn device(platform: Platform, alert_token: Option<&str>) -> PushTarget {
        PushTarget {
            platform,
            token: "voip-or-fcm".into(),
            app_id: "com.example.softphone".into(),
            sandbox: false,
            sip_user_id: 1,
            alert_token: alert_token.map(str::to_owned),
        }
    }

    fn notices() -> [Payload; 2] {
        [
            Payload::CallEnded {
                unique_key: "k".into(),
                reason: EndReason::Cancelled,
                caller: "Bob".into(),
            },
            Payload::Message {
                message: "taken over".into(),
            },
        ]
    }

    #[test]
    fn a_call_ended_notice_carries_type_unique_key_and_reason_only() {
        let [ended, _] = notices();
        let data = ended.to_string_map();
        assert_eq!(
            Value::Object(data),
            serde_json::json!({"type": "call_ended", "unique_key": "k", "reason": "cancelled"})
        );
    }

    #[test]
    fn an_ios_device_is_told_anything_but_a_call_only_through_its_alert_token() {
        let call = Payload::Call {
            unique_key: "k".into(),
            phonenumber: "1".into(),
            caller_id: "".into(),
            response_api: "http://x/api/call-response/".into(),
            message_start_time: 1.0,
            attempt: 1,
            call_id: None,
        };
        let bare = device(Platform::Apns, None);
        let alerting = device(Platform::Apns, Some("a1e2"));
        assert!(!bare.can_be_told());
        assert!(alerting.can_be_told());
        assert_eq!(bare.token_for(&call), Some("voip-or-fcm"));
        assert_eq!(alerting.token_for(&call), Some("voip-or-fcm"));
        for notice in notices() {
            assert_eq!(bare.token_for(&notice), None, "{notice:?}");
            assert_eq!(alerting.token_for(&notice), Some("a1e2"), "{notice:?}");
        }
        // Android devices have one token for everything.
        for platform in [Platform::Android, Platform::Gcm] {
            let android = device(platform, None);
            assert!(android.can_be_told());
            for payload in notices().into_iter().chain([call.clone()]) {
                assert_eq!(android.token_for(&payload), Some("voip-or-fcm"));
            }
        }
    }

    #[test]
    fn every_kind_is_listed_for_the_metrics() {
        let [ended, message] = notices();
        let call = Payload::Call {
            unique_key: "k".into(),
            phonenumber: "1".into(),
            caller_id: "".into(),
            response_api: "".into(),
            message_start_time: 1.0,
            attempt: 1,
            call_id: None,
        };
        let kinds = [call, ended, message].map(|p| p.kind());
        assert_eq!(kinds, Payload::KINDS);
        for payload in notices() {
            assert_eq!(payload.to_json()["type"], payload.kind());
        }
    }

    #[test]
    fn a_reason_outside_the_known_set_is_other() {
        const KNOWN: &[&str] = &["UNREGISTERED", "QUOTA_EXCEEDED"];
        assert_eq!(
            Reason::bounded("UNREGISTERED", KNOWN).as_str(),
            "UNREGISTERED"
        );
        for unknown in [
            "SOMETHING_NEW",
            "",
            "unregistered",
            "UNREGISTERED ",
            "\u{202e}x",
        ] {
            assert_eq!(
                Reason::bounded(unknown, KNOWN),
                Reason::OTHER,
                "{unknown:?}"
            );
        }
        assert_eq!(Reason::OTHER.as_str(), "other");
        assert_eq!(PushOutcome::Delivered.reason(), Reason::NONE);
        assert_eq!(
            PushOutcome::Retry {
                after: None,
                refusal: Refusal::unanswered("timed out")
            }
            .reason()
            .as_str(),
            "none"
        );
    }
}

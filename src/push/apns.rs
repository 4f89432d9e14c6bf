//! APNs: pushes to iPhones through the `a2` crate.
//!
//! Owns what this project decides about an APNs push: the request a2 is
//! handed ([`ApnsPush`]: token, topic, push type, priority, expiry,
//! payload), how an app's credentials become a2 clients ([`ApnsApp::load`],
//! `.p12` bundles read in pure Rust), and what APNs' answers mean
//! ([`outcome`]).
//!
//! The iOS rule decides the push type ([`PushTarget::token_for`]): a call
//! goes as a VoIP push to the VoIP token, under the app's topic
//! (`<app id>.voip`); anything else (`call_ended`, the takeover notice) as
//! a visible alert push to the device's `alert_token`, under the topic
//! without `.voip`, with a `loc-key` the app translates ([`Alert`]); or
//! not at all, refused here before a2, when the device has no alert token.
//!
//! a2 owns the HTTP/2 connection to Apple, and a2 0.10 cannot be pointed at
//! another host, so the sending itself is not exercised by the tests; these
//! three parts are. a2 also keeps the response headers to itself, so an APNs
//! `Retry-After` cannot be honoured: refused pushes back off on the call's
//! schedule instead.
//!
//! `DeviceTokenNotForTopic` is the one answer that can mean either a dead
//! token or a wrong configuration (see [`Topic`]): it forgets a device only
//! once APNs has accepted a push under the same topic and environment.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use a2::request::notification::NotificationBuilder;
use a2::request::payload::APS;
use a2::{
    ClientConfig, DefaultNotificationBuilder, Endpoint, ErrorReason, NotificationOptions, Priority,
    PushType,
};
use serde_json::{Map, Value};

use super::{
    read_credentials as read, CredentialsError, Payload, PushOutcome, PushTarget, Reason, Refusal,
};
use crate::store::{Credentials, EndReason, Platform};

/// The clients of one app: a2 binds a client to one environment, and each
/// device says which one its build uses. Built once per credentials and
/// reused; a2 keeps the HTTP/2 connection of each open.
pub struct ApnsApp {
    production: Environment,
    sandbox: Environment,
    /// `apns-topic`: `<app id>.voip` unless the credentials name another.
    topic: String,
}

/// One APNs environment of an app.
struct Environment {
    client: a2::Client,
    /// Whether the app's VoIP topic works here, as far as this client has seen.
    voip_topic: TopicProof,
    /// The same for its alert topic, a topic of its own to APNs.
    alert_topic: TopicProof,
}

impl Environment {
    /// The proof of the topic a push goes out under.
    fn proof(&self, push: &ApnsPush) -> &TopicProof {
        match push.alert {
            None => &self.voip_topic,
            Some(_) => &self.alert_topic,
        }
    }
}

/// Whether APNs accepted a push under an app's topic in one environment
/// since the app's clients were built (at its first push, or when its
/// credentials changed): until it has, a `DeviceTokenNotForTopic` blames the
/// topic, not the token ([`Topic`]).
#[derive(Debug, Default)]
struct TopicProof(AtomicBool);

impl TopicProof {
    /// What `result` means for a push sent under `topic` in this
    /// environment; an accepted push proves the topic.
    fn judge(
        &self,
        result: Result<a2::Response, a2::Error>,
        topic: &str,
        sandbox: bool,
    ) -> PushOutcome {
        let topic = Topic {
            name: topic,
            sandbox,
            proven: self.0.load(Ordering::Acquire),
        };
        let outcome = outcome(result, &topic);
        if outcome == PushOutcome::Delivered {
            self.0.store(true, Ordering::Release);
        }
        outcome
    }
}

/// How an app proves itself to APNs, read from its files.
enum Auth {
    /// A `.p8` signing key: a2 signs the JWT of every request with it
    /// (renewed every 55 minutes).
    Token {
        key_pem: Vec<u8>,
        key_id: String,
        team_id: String,
    },
    /// A client certificate and its key, as PEM.
    Certificate { cert_pem: Vec<u8>, key_pem: Vec<u8> },
}

impl ApnsApp {
    /// Reads the app's key or certificate and builds its two clients.
    /// `timeout` bounds a2's own request timeout; the caller's is tighter.
    pub async fn load(
        app_id: &str,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<Self, CredentialsError> {
        let (auth, path, topic) = match credentials {
            Credentials::ApnsToken {
                key_path,
                key_id,
                team_id,
                topic,
            } => {
                let auth = Auth::Token {
                    key_pem: read(key_path).await?,
                    key_id: key_id.clone(),
                    team_id: team_id.clone(),
                };
                (auth, key_path, topic)
            }
            Credentials::ApnsCertificate {
                cert_path,
                password_env,
                password_file,
                topic,
            } => {
                let password =
                    certificate_password(password_env.as_deref(), password_file.as_deref()).await?;
                let (cert_pem, key_pem) = read_p12(cert_path, &read(cert_path).await?, &password)?;
                (Auth::Certificate { cert_pem, key_pem }, cert_path, topic)
            }
            Credentials::Fcm { .. } => {
                return Err(CredentialsError::WrongPlatform(Platform::Apns));
            }
        };
        let client = |endpoint| {
            let config = ClientConfig {
                endpoint,
                request_timeout_secs: Some(timeout.as_secs().max(1)),
                ..ClientConfig::default()
            };
            match &auth {
                Auth::Token {
                    key_pem,
                    key_id,
                    team_id,
                } => a2::Client::token(key_pem.as_slice(), key_id, team_id, config),
                Auth::Certificate { cert_pem, key_pem } => {
                    a2::Client::certificate_parts(cert_pem, key_pem, config)
                }
            }
            .map(|client| Environment {
                client,
                voip_topic: TopicProof::default(),
                alert_topic: TopicProof::default(),
            })
            .map_err(|source| CredentialsError::Apns {
                path: path.clone(),
                source,
            })
        };
        Ok(ApnsApp {
            production: client(Endpoint::Production)?,
            sandbox: client(Endpoint::Sandbox)?,
            topic: topic.clone().unwrap_or_else(|| default_topic(app_id)),
        })
    }

    /// Sends one push to the environment the device registered for: a call
    /// as a VoIP push, anything else as an alert push to the device's alert
    /// token. A device without one is refused here, before a2.
    pub async fn send(&self, target: &PushTarget, payload: &Payload) -> PushOutcome {
        let Some(push) = ApnsPush::new(target, payload, &self.topic) else {
            return PushOutcome::Failed(Refusal::no_alert_token());
        };
        let environment = if target.sandbox {
            &self.sandbox
        } else {
            &self.production
        };
        let result = environment.client.send(push.payload()).await;
        let outcome = environment
            .proof(&push)
            .judge(result, &push.topic, target.sandbox);
        push.meaning(outcome)
    }
}

/// The topic a push went out under, as [`outcome`] needs to know it.
///
/// APNs answers `DeviceTokenNotForTopic` both to a token of another app (a
/// dead token here) and to every token of an app whose topic is wrong
/// (`--apns-topic` or the app id mistyped, a certificate for another app).
/// Forgetting the device in the second case would delete every iOS device of
/// the app as calls come in. So the answer blames the token only once APNs
/// has accepted a push under this topic in this environment (sandbox and
/// production are told apart: a development build can be the only one that
/// works). Until then the push fails, the device is kept, and the error
/// logged with the app names the topic to check.
#[derive(Debug, Clone, Copy)]
pub struct Topic<'a> {
    pub name: &'a str,
    pub sandbox: bool,
    /// A push under this topic was accepted in this environment.
    pub proven: bool,
}

/// The topic of an app's VoIP pushes when its credentials name none.
pub fn default_topic(app_id: &str) -> String {
    format!("{app_id}.voip")
}

/// The topic of an app's alert pushes: its VoIP topic without `.voip`.
/// APNs takes a VoIP push only under `<bundle id>.voip` and an alert only
/// under the bundle id itself.
pub fn alert_topic(voip_topic: &str) -> &str {
    voip_topic.strip_suffix(".voip").unwrap_or(voip_topic)
}

/// What an alert push shows: the key of a text in the app's
/// `Localizable.strings` and its arguments, so the phone says it in its
/// user's language. The keys are the contract with the app (README).
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub loc_key: &'static str,
    pub loc_args: Vec<String>,
}

impl Alert {
    /// The alert of a notice; `None` for a call, which is never an alert.
    pub fn of(payload: &Payload) -> Option<Alert> {
        let (loc_key, loc_args) = match payload {
            Payload::Call { .. } => return None,
            Payload::CallEnded {
                reason: EndReason::AnsweredElsewhere,
                caller,
                ..
            } => ("CALL_NOTIFIER_ANSWERED_ELSEWHERE", vec![caller.clone()]),
            // Not answered here; `not_available` never reaches a notice
            // (a device that declined is not told), and would mean the same.
            Payload::CallEnded {
                reason:
                    EndReason::Cancelled
                    | EndReason::TimedOut
                    | EndReason::Failed
                    | EndReason::NotAvailable,
                caller,
                ..
            } => ("CALL_NOTIFIER_MISSED_CALL", vec![caller.clone()]),
            // The only message the service sends: the takeover notice.
            Payload::Message { .. } => ("CALL_NOTIFIER_TAKEN_OVER", Vec::new()),
        };
        Some(Alert { loc_key, loc_args })
    }
}

/// One APNs push, owned; [`ApnsPush::payload`] lends it to a2 as the request
/// a2 sends: `POST /3/device/<token>` with these headers and this body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApnsPush {
    pub token: String,
    pub topic: String,
    /// `None`: a VoIP push (a call). `Some`: an alert push showing this.
    pub alert: Option<Alert>,
    /// The custom keys beside `aps`: the contract's, as JSON values.
    pub data: Map<String, Value>,
}

impl ApnsPush {
    /// The push the iOS rule makes of `payload` for `target`, under the
    /// app's VoIP topic `voip_topic`; `None` when the device cannot be
    /// sent it (a notice, and no alert token).
    pub fn new(target: &PushTarget, payload: &Payload, voip_topic: &str) -> Option<Self> {
        let alert = Alert::of(payload);
        let topic = match alert {
            None => voip_topic,
            Some(_) => alert_topic(voip_topic),
        };
        Some(ApnsPush {
            token: target.token_for(payload)?.to_owned(),
            topic: topic.to_owned(),
            alert,
            data: payload.to_json(),
        })
    }

    /// The a2 payload, the contract's keys beside `aps`, and priority 10
    /// (`apns-priority: 10`: neither a call nor the news that it ended can
    /// wait for a power-saving batch).
    ///
    /// A call: `apns-push-type: voip`, `apns-expiration: 0` (delivered now
    /// or never: a late call push would ring for a call long gone), an
    /// empty `aps` (PushKit wakes the app; CallKit shows the call).
    ///
    /// A notice: `apns-push-type: alert`, `aps.alert` with `loc-key` and
    /// `loc-args`, APNs' default expiry (a phone that is off still learns
    /// of the missed call).
    pub fn payload(&self) -> a2::request::payload::Payload<'_> {
        let options = NotificationOptions {
            apns_push_type: Some(match self.alert {
                None => PushType::Voip,
                Some(_) => PushType::Alert,
            }),
            apns_priority: Some(Priority::High),
            apns_expiration: self.alert.is_none().then_some(0),
            apns_topic: Some(&self.topic),
            ..NotificationOptions::default()
        };
        let mut payload = match &self.alert {
            None => a2::request::payload::Payload {
                options,
                device_token: &self.token,
                aps: APS::default(),
                data: Default::default(),
            },
            Some(alert) => DefaultNotificationBuilder::new()
                .set_loc_key(alert.loc_key)
                .set_loc_args(&alert.loc_args)
                .build(&self.token, options),
        };
        payload.data = self
            .data
            .iter()
            .map(|(key, value)| (key.as_str(), value.clone()))
            .collect();
        payload
    }

    /// What an APNs outcome means for the device: an alert push's dead
    /// token is the alert token, not the VoIP token the device is known by,
    /// so it fails the notice and forgets no device (calls still reach it).
    fn meaning(&self, outcome: PushOutcome) -> PushOutcome {
        match (outcome, &self.alert) {
            (PushOutcome::TokenDead(refusal), Some(_)) => PushOutcome::Failed(Refusal {
                detail: format!(
                    "{}: the alert token is dead; the device is kept, calls still reach it",
                    refusal.detail
                ),
                ..refusal
            }),
            (outcome, _) => outcome,
        }
    }
}

/// What an APNs answer means for the call, for a push sent under `topic`.
///
/// a2 parses only the reasons it knows; a body it cannot parse (a reason
/// added after a2 0.10, or no body) arrives without one, so the status code
/// decides then: 410 is always a dead token, 403 a credentials problem, 429
/// and 5xx are worth another try. `DeviceTokenNotForTopic` is a dead token
/// only under a proven topic ([`Topic`]).
pub fn outcome(result: Result<a2::Response, a2::Error>, topic: &Topic) -> PushOutcome {
    use ErrorReason::*;
    let response = match result {
        Ok(_) => return PushOutcome::Delivered,
        Err(a2::Error::ResponseError(response)) => response,
        // Refused before the request left.
        Err(a2::Error::ClientError(e)) if e.is_connect() => {
            return PushOutcome::Retry {
                after: None,
                refusal: Refusal::unanswered(format!("APNs unreachable: {e}")),
            }
        }
        // Sent, and lost on the way back (or not: a2 cannot tell).
        Err(
            e @ (a2::Error::RequestTimeout(_)
            | a2::Error::ConnectionError(_)
            | a2::Error::ClientError(_)),
        ) => {
            return PushOutcome::Retry {
                after: None,
                refusal: Refusal::in_doubt(format!("no answer from APNs: {e}")),
            }
        }
        Err(e) => {
            return PushOutcome::Failed(Refusal::unanswered(format!("APNs push not sent: {e}")))
        }
    };
    let code = response.code;
    let reason = response.error.map(|body| body.reason);
    let said = match &reason {
        Some(reason) => format!("APNs {code} {reason:?}"),
        None => format!("APNs {code} (no reason a2 knows)"),
    };
    let refusal = |detail: String| {
        let label = reason.as_ref().map_or(Reason::OTHER, reason_label);
        Refusal::new(label, detail)
    };
    match (code, &reason) {
        (_, Some(DeviceTokenNotForTopic)) if !topic.proven => {
            let environment = if topic.sandbox {
                "sandbox"
            } else {
                "production"
            };
            PushOutcome::Failed(refusal(format!(
                "{said}: APNs has accepted no push under the topic {:?} in {environment} yet, \
                 so the topic is taken to be wrong, not the token; the device is kept. \
                 Check the app's topic (its id, --apns-topic) and its key or certificate",
                topic.name
            )))
        }
        (410, _) | (_, Some(Unregistered | BadDeviceToken | DeviceTokenNotForTopic)) => {
            PushOutcome::TokenDead(refusal(said))
        }
        (
            _,
            Some(
                TooManyRequests
                | TooManyProviderTokenUpdates
                | InternalServerError
                | ServiceUnavailable
                | Shutdown
                | IdleTimeout,
            ),
        )
        | (429 | 500..=599, _) => PushOutcome::Retry {
            after: None,
            refusal: refusal(said),
        },
        (403, _) => PushOutcome::Failed(refusal(format!(
            "{said}: APNs rejected the app's credentials"
        ))),
        _ => PushOutcome::Failed(refusal(said)),
    }
}

/// The `reason` label of an APNs answer: the name of its reason, every one
/// a2 knows spelled out so that a2 adding one fails the build here.
pub fn reason_label(reason: &ErrorReason) -> Reason {
    use ErrorReason::*;
    Reason::known(match reason {
        BadCollapseId => "BadCollapseId",
        BadDeviceToken => "BadDeviceToken",
        BadExpirationDate => "BadExpirationDate",
        BadMessageId => "BadMessageId",
        BadPriority => "BadPriority",
        BadTopic => "BadTopic",
        DeviceTokenNotForTopic => "DeviceTokenNotForTopic",
        DuplicateHeaders => "DuplicateHeaders",
        IdleTimeout => "IdleTimeout",
        MissingDeviceToken => "MissingDeviceToken",
        MissingTopic => "MissingTopic",
        PayloadEmpty => "PayloadEmpty",
        TopicDisallowed => "TopicDisallowed",
        BadCertificate => "BadCertificate",
        BadCertificateEnvironment => "BadCertificateEnvironment",
        ExpiredProviderToken => "ExpiredProviderToken",
        Forbidden => "Forbidden",
        InvalidProviderToken => "InvalidProviderToken",
        MissingProviderToken => "MissingProviderToken",
        BadPath => "BadPath",
        MethodNotAllowed => "MethodNotAllowed",
        Unregistered => "Unregistered",
        PayloadTooLarge => "PayloadTooLarge",
        TooManyProviderTokenUpdates => "TooManyProviderTokenUpdates",
        TooManyRequests => "TooManyRequests",
        InternalServerError => "InternalServerError",
        ServiceUnavailable => "ServiceUnavailable",
        Shutdown => "Shutdown",
    })
}

/// The `.p12` password: from the environment variable named in the
/// credentials, else the contents of the password file (without its trailing
/// newline), else empty.
async fn certificate_password(
    env: Option<&str>,
    file: Option<&Path>,
) -> Result<String, CredentialsError> {
    match (env, file) {
        (Some(name), _) => std::env::var(name)
            .map_err(|e| CredentialsError::Password(format!("environment variable {name}: {e}"))),
        (None, Some(file)) => String::from_utf8(read(file).await?)
            .map(|text| text.trim_end_matches(['\r', '\n']).to_owned())
            .map_err(|_| CredentialsError::Password(format!("{} is not UTF-8", file.display()))),
        (None, None) => Ok(String::new()),
    }
}

/// Opens a PKCS#12 bundle and returns its certificate chain and its private
/// key as PEM, the form a2's `certificate_parts` takes.
pub fn read_p12(
    path: &Path,
    bundle: &[u8],
    password: &str,
) -> Result<(Vec<u8>, Vec<u8>), CredentialsError> {
    let store = p12_keystore::KeyStore::from_pkcs12(
        bundle,
        password,
        p12_keystore::Pkcs12ImportPolicy::Strict,
    )
    .map_err(|source| CredentialsError::Pkcs12 {
        path: path.to_owned(),
        source,
    })?;
    let Some((_, chain)) = store.private_key_chain() else {
        return Err(CredentialsError::Pkcs12Empty(path.to_owned()));
    };
    if chain.certs().is_empty() {
        return Err(CredentialsError::Pkcs12Empty(path.to_owned()));
    }
    let certs: Vec<pem::Pem> = chain
        .certs()
        .iter()
        .map(|cert| pem::Pem::new("CERTIFICATE", cert.as_der()))
        .collect();
    let key = pem::Pem::new("PRIVATE KEY", chain.key().as_der());
    Ok((
        pem::encode_many(&certs).into_bytes(),
        pem::encode(&key).into_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;

    use a2::request::payload::PayloadLike;
    use a2::{ErrorBody, Response};

    use super::*;

    fn target(sandbox: bool) -> PushTarget {
        PushTarget {
            platform: Platform::Apns,
            token: "a1b2c3d4e5f6".into(),
            app_id: "com.example.softphone".into(),
            sandbox,
            sip_user_id: 42,
            alert_token: None,
        }
    }

    fn call() -> Payload {
        Payload::Call {
            unique_key: "6f1c0a2b9e8d4c3b".into(),
            phonenumber: "+31 50 123 4567".into(),
            caller_id: "Alice \"A\" Ångström".into(),
            response_api: "https://notify.example.com/api/call-response/".into(),
            message_start_time: 1_700_000_000.25,
            attempt: 2,
            call_id: None,
        }
    }

    #[test]
    fn a_call_push_is_a_voip_push_with_the_contract_keys_beside_aps() {
        let push = ApnsPush::new(
            &with_alert_token(target(false)),
            &call(),
            &default_topic("com.example.softphone"),
        )
        .expect("a call always goes");
        assert_eq!(push.alert, None);
        let payload = push.payload();
        assert_eq!(payload.get_device_token(), "a1b2c3d4e5f6");
        let options = payload.get_options();
        assert_eq!(options.apns_topic, Some("com.example.softphone.voip"));
        assert_eq!(options.apns_push_type, Some(PushType::Voip));
        assert_eq!(
            options.apns_push_type.map(|t| t.to_string()),
            Some("voip".into())
        );
        assert_eq!(
            options.apns_priority.as_ref().map(|p| p.to_string()),
            Some("10".into())
        );
        assert_eq!(options.apns_expiration, Some(0));
        assert_eq!(options.apns_id, None);
        assert!(options.apns_collapse_id.is_none());
        assert_eq!(
            payload.to_json_string().expect("serializable"),
            concat!(
                r#"{"aps":{},"attempt":2,"caller_id":"Alice \"A\" Ångström","#,
                r#""message_start_time":1700000000.25,"phonenumber":"+31 50 123 4567","#,
                r#""response_api":"https://notify.example.com/api/call-response/","#,
                r#""type":"call","unique_key":"6f1c0a2b9e8d4c3b"}"#
            )
        );
    }

    /// The regular APNs token of the device [`target`] makes.
    const ALERT_TOKEN: &str = "f0e1d2c3b4a5";

    fn with_alert_token(mut target: PushTarget) -> PushTarget {
        target.alert_token = Some(ALERT_TOKEN.into());
        target
    }

    fn call_ended(reason: EndReason) -> Payload {
        Payload::CallEnded {
            unique_key: "6f1c0a2b9e8d4c3b".into(),
            reason,
            caller: "Alice \"A\" Ångström".into(),
        }
    }

    fn takeover() -> Payload {
        Payload::Message {
            message: "Another device took over".into(),
        }
    }

    /// Asserts that the request handed to a2 is an alert push (priority 10,
    /// APNs' default expiry) to the alert token, under `topic`, with `body`.
    fn assert_alert(push: &ApnsPush, topic: &str, body: &str) {
        let payload = push.payload();
        let options = payload.get_options();
        assert_eq!(options.apns_push_type, Some(PushType::Alert), "{body}");
        assert_eq!(
            options.apns_push_type.map(|t| t.to_string()),
            Some("alert".into())
        );
        assert_eq!(
            options.apns_priority.as_ref().map(|p| p.to_string()),
            Some("10".into())
        );
        assert_eq!(options.apns_expiration, None);
        assert_eq!(options.apns_topic, Some(topic));
        assert_eq!(payload.get_device_token(), ALERT_TOKEN);
        assert_eq!(payload.to_json_string().expect("serializable"), body);
    }

    #[test]
    fn a_call_ended_notice_is_an_alert_to_the_alert_token_under_the_topic_without_voip() {
        for (reason, loc_key) in [
            (
                EndReason::AnsweredElsewhere,
                "CALL_NOTIFIER_ANSWERED_ELSEWHERE",
            ),
            (EndReason::Cancelled, "CALL_NOTIFIER_MISSED_CALL"),
            (EndReason::TimedOut, "CALL_NOTIFIER_MISSED_CALL"),
            (EndReason::Failed, "CALL_NOTIFIER_MISSED_CALL"),
        ] {
            let push = ApnsPush::new(
                &with_alert_token(target(true)),
                &call_ended(reason),
                &default_topic("com.example.softphone"),
            )
            .expect("a device with an alert token is told");
            assert_alert(
                &push,
                "com.example.softphone",
                &format!(
                    concat!(
                        r#"{{"aps":{{"alert":{{"loc-key":"{}","loc-args":["Alice \"A\" Ångström"]}},"#,
                        r#""mutable-content":0}},"reason":"{}","type":"call_ended","unique_key":"6f1c0a2b9e8d4c3b"}}"#
                    ),
                    loc_key, reason
                ),
            );
        }
    }

    #[test]
    fn the_takeover_notice_is_an_alert_without_arguments() {
        // A topic the credentials name: `.voip` comes off it for alerts...
        let push = ApnsPush::new(
            &with_alert_token(target(false)),
            &takeover(),
            "com.example.other.voip",
        )
        .expect("told");
        assert_alert(
            &push,
            "com.example.other",
            concat!(
                r#"{"aps":{"alert":{"loc-key":"CALL_NOTIFIER_TAKEN_OVER","loc-args":[]},"#,
                r#""mutable-content":0},"message":"Another device took over","type":"message"}"#
            ),
        );
        // ...and a topic without it is used as it is.
        assert_eq!(alert_topic("custom.topic"), "custom.topic");
        assert_eq!(alert_topic(".voip.app.voip"), ".voip.app");
    }

    #[test]
    fn a_non_call_payload_never_makes_a_voip_request() {
        let notices = EndReason::ALL
            .map(call_ended)
            .into_iter()
            .chain([takeover()]);
        for notice in notices {
            // With an alert token: an alert to it, never the VoIP token.
            let push = ApnsPush::new(
                &with_alert_token(target(false)),
                &notice,
                &default_topic("com.example.softphone"),
            )
            .expect("told");
            let payload = push.payload();
            assert_eq!(
                payload.get_options().apns_push_type,
                Some(PushType::Alert),
                "{notice:?}"
            );
            assert_eq!(payload.get_device_token(), ALERT_TOKEN, "{notice:?}");
            assert!(
                !payload
                    .get_options()
                    .apns_topic
                    .unwrap_or("")
                    .ends_with(".voip"),
                "{notice:?}"
            );
            // Without one: no request at all.
            assert_eq!(
                ApnsPush::new(&target(false), &notice, "com.example.softphone.voip"),
                None,
                "{notice:?}"
            );
        }
    }

    #[test]
    fn a_dead_alert_token_forgets_no_device() {
        let dead = || PushOutcome::TokenDead(Refusal::new(Reason::OTHER, "APNs 410 Unregistered"));
        let topic = default_topic("com.example.softphone");
        let alert =
            ApnsPush::new(&with_alert_token(target(false)), &takeover(), &topic).expect("told");
        let PushOutcome::Failed(refusal) = alert.meaning(dead()) else {
            panic!("an alert's dead token forgot the device");
        };
        assert!(refusal.detail.contains("alert token is dead"), "{refusal}");
        assert_eq!(refusal.reason, Reason::OTHER);
        // A call's dead token is the device's.
        let voip = ApnsPush::new(&target(false), &call(), &topic).expect("a call");
        assert_eq!(voip.meaning(dead()), dead());
        assert_eq!(
            alert.meaning(PushOutcome::Delivered),
            PushOutcome::Delivered
        );
    }

    const PROVEN: Topic = Topic {
        name: "com.example.softphone.voip",
        sandbox: false,
        proven: true,
    };

    fn answer(code: u16, reason: Option<ErrorReason>) -> Result<Response, a2::Error> {
        Err(a2::Error::ResponseError(Response {
            error: reason.map(|reason| ErrorBody {
                reason,
                timestamp: None,
            }),
            apns_id: None,
            code,
        }))
    }

    fn accepted() -> Result<Response, a2::Error> {
        Ok(Response {
            error: None,
            apns_id: Some("id".into()),
            code: 200,
        })
    }

    /// What an answer means under a topic that has been proven.
    fn refused(code: u16, reason: Option<ErrorReason>) -> PushOutcome {
        outcome(answer(code, reason), &PROVEN)
    }

    fn is_dead(o: &PushOutcome) -> bool {
        matches!(o, PushOutcome::TokenDead(_))
    }
    fn is_retry(o: &PushOutcome) -> bool {
        matches!(o, PushOutcome::Retry { after: None, .. })
    }
    fn is_failed(o: &PushOutcome) -> bool {
        matches!(o, PushOutcome::Failed(_))
    }

    #[test]
    fn apns_answers_map_to_outcomes() {
        assert_eq!(outcome(accepted(), &PROVEN), PushOutcome::Delivered);

        use ErrorReason::*;
        // Dead tokens.
        assert!(is_dead(&refused(410, Some(Unregistered))));
        assert!(is_dead(&refused(400, Some(BadDeviceToken))));
        assert!(is_dead(&refused(400, Some(DeviceTokenNotForTopic))));
        // Worth another try.
        assert!(is_retry(&refused(429, Some(TooManyRequests))));
        assert!(is_retry(&refused(500, Some(InternalServerError))));
        assert!(is_retry(&refused(503, Some(ServiceUnavailable))));
        assert!(is_retry(&refused(503, Some(Shutdown))));
        // Credentials, and requests that will never pass.
        for reason in [
            InvalidProviderToken,
            ExpiredProviderToken,
            MissingProviderToken,
            BadCertificate,
            BadCertificateEnvironment,
            Forbidden,
        ] {
            let o = refused(403, Some(reason));
            assert!(is_failed(&o), "{o:?}");
            let PushOutcome::Failed(refusal) = o else {
                unreachable!()
            };
            assert!(refusal.detail.contains("credentials"), "{refusal:?}");
        }
        assert!(is_failed(&refused(400, Some(BadTopic))));
        assert!(is_failed(&refused(400, Some(TopicDisallowed))));
        assert!(is_failed(&refused(413, Some(PayloadTooLarge))));
    }

    #[test]
    fn a_reason_a2_does_not_know_is_classified_by_status() {
        // What a2 makes of an answer whose reason it cannot parse: no body.
        let body: Option<ErrorBody> = serde_json::from_str(r#"{"reason":"SomethingNew"}"#).ok();
        assert!(body.is_none(), "a2 learned a new reason; pick another");
        assert!(is_dead(&refused(410, None)));
        assert!(is_retry(&refused(429, None)));
        assert!(is_retry(&refused(502, None)));
        assert!(is_failed(&refused(403, None)));
        assert!(is_failed(&refused(400, None)));
        assert_eq!(
            refused(410, None),
            PushOutcome::TokenDead(Refusal::new(Reason::OTHER, "APNs 410 (no reason a2 knows)"))
        );
    }

    #[test]
    fn the_reason_label_is_apns_own_name_or_other_or_none() {
        use ErrorReason::*;
        let label = |o: PushOutcome| o.reason().as_str();
        assert_eq!(label(refused(400, Some(BadDeviceToken))), "BadDeviceToken");
        assert_eq!(label(refused(410, Some(Unregistered))), "Unregistered");
        assert_eq!(
            label(refused(429, Some(TooManyRequests))),
            "TooManyRequests"
        );
        assert_eq!(
            label(refused(403, Some(InvalidProviderToken))),
            "InvalidProviderToken"
        );
        // A reason a2 cannot parse is bounded to `other`.
        assert_eq!(label(refused(400, None)), "other");
        assert_eq!(label(refused(503, None)), "other");
        // No answer, no reason.
        assert_eq!(
            label(outcome(Err(a2::Error::RequestTimeout(2)), &PROVEN)),
            "none"
        );
        assert_eq!(label(outcome(accepted(), &PROVEN)), "none");
        // Every name is a2's variant name, as APNs spells the reason.
        for reason in [BadCollapseId, MissingTopic, PayloadTooLarge, Shutdown] {
            assert_eq!(reason_label(&reason).as_str(), format!("{reason:?}"));
        }
    }

    #[test]
    fn device_token_not_for_topic_keeps_the_device_until_the_topic_is_proven() {
        let unproven = Topic {
            name: "com.example.typo.voip",
            sandbox: true,
            proven: false,
        };
        let not_for_topic = || answer(400, Some(ErrorReason::DeviceTokenNotForTopic));
        let PushOutcome::Failed(refusal) = outcome(not_for_topic(), &unproven) else {
            panic!("an unproven topic is blamed, not the token");
        };
        assert_eq!(refusal.reason.as_str(), "DeviceTokenNotForTopic");
        assert!(
            refusal.detail.contains("\"com.example.typo.voip\"")
                && refusal.detail.contains("sandbox")
                && refusal.detail.contains("device is kept"),
            "{}",
            refusal.detail
        );
        // Other answers mean what they meant, proven or not.
        assert!(is_dead(&outcome(
            answer(400, Some(ErrorReason::BadDeviceToken)),
            &unproven
        )));
        assert!(is_dead(&outcome(
            answer(410, Some(ErrorReason::Unregistered)),
            &unproven
        )));
        // Under a proven topic the token is another app's: dead.
        let dead = outcome(not_for_topic(), &PROVEN);
        assert!(is_dead(&dead), "{dead:?}");
        assert_eq!(dead.reason().as_str(), "DeviceTokenNotForTopic");
    }

    #[test]
    fn an_accepted_push_proves_the_topic_in_its_environment_only() {
        let not_for_topic = || answer(400, Some(ErrorReason::DeviceTokenNotForTopic));
        let (production, sandbox) = (TopicProof::default(), TopicProof::default());
        let topic = "com.example.softphone.voip";
        // A topic nothing was accepted under yet: the device is kept.
        assert!(is_failed(&production.judge(not_for_topic(), topic, false)));
        // Refusals prove nothing.
        production.judge(
            answer(503, Some(ErrorReason::ServiceUnavailable)),
            topic,
            false,
        );
        production.judge(answer(400, Some(ErrorReason::BadDeviceToken)), topic, false);
        assert!(is_failed(&production.judge(not_for_topic(), topic, false)));
        // One accepted push proves it: from now on the token is to blame.
        assert_eq!(
            production.judge(accepted(), topic, false),
            PushOutcome::Delivered
        );
        assert!(is_dead(&production.judge(not_for_topic(), topic, false)));
        assert!(is_dead(&production.judge(not_for_topic(), topic, false)));
        // The other environment has its own proof.
        assert!(is_failed(&sandbox.judge(not_for_topic(), topic, true)));
    }

    #[test]
    fn transport_errors_are_retried_and_local_ones_fail() {
        assert!(is_retry(&outcome(
            Err(a2::Error::RequestTimeout(2)),
            &PROVEN
        )));
        assert!(is_failed(&outcome(
            Err(a2::Error::InvalidOptions("bad".into())),
            &PROVEN
        )));
    }

    /// Runs `openssl` with `args` in `dir`; panics with its stderr if it fails.
    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl binary");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A self-signed certificate and its key in a `.p12`, made by `openssl
    /// pkcs12 -export` with `options`: none for OpenSSL 3's defaults
    /// (AES-256-CBC, PBKDF2, HMAC-SHA256), `-legacy` for what older tools
    /// and macOS Keychain Access export (RC2-40 and 3DES, SHA-1 MAC).
    fn p12(dir: &Path, options: &[&str]) -> PathBuf {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-days",
                "1",
                "-subj",
                "/CN=VoIP Services: com.example.softphone",
            ],
        );
        let mut export = vec![
            "pkcs12",
            "-export",
            "-inkey",
            "key.pem",
            "-in",
            "cert.pem",
            "-out",
            "apns.p12",
            "-passout",
            "pass:secret",
        ];
        export.extend_from_slice(options);
        openssl(dir, &export);
        dir.join("apns.p12")
    }

    fn certificate(dir: &Path, password_file: PathBuf) -> Credentials {
        Credentials::ApnsCertificate {
            cert_path: dir.join("apns.p12"),
            password_env: None,
            password_file: Some(password_file),
            topic: None,
        }
    }

    #[tokio::test]
    async fn a_p12_from_openssl_becomes_two_clients() {
        for options in [&[][..], &["-legacy"][..]] {
            let dir = tempfile::tempdir().expect("a temp dir");
            let path = p12(dir.path(), options);
            let bundle = std::fs::read(&path).expect("the bundle");
            let (cert, key) = read_p12(&path, &bundle, "secret")
                .unwrap_or_else(|e| panic!("{options:?}: the right password opens it: {e}"));
            assert!(String::from_utf8_lossy(&cert).starts_with("-----BEGIN CERTIFICATE-----"));
            assert!(String::from_utf8_lossy(&key).starts_with("-----BEGIN PRIVATE KEY-----"));

            // The password file's trailing newline is not part of the password.
            std::fs::write(dir.path().join("password"), "secret\n").expect("write");
            let app = ApnsApp::load(
                "com.example.softphone",
                &certificate(dir.path(), dir.path().join("password")),
                Duration::from_secs(2),
            )
            .await
            .unwrap_or_else(|e| panic!("{options:?}: {e}"));
            assert_eq!(app.topic, "com.example.softphone.voip");
        }
    }

    #[tokio::test]
    async fn a_wrong_p12_password_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = p12(dir.path(), &[]);
        std::fs::write(dir.path().join("password"), "not-the-secret\n").expect("write");
        let error = ApnsApp::load(
            "com.example.softphone",
            &certificate(dir.path(), dir.path().join("password")),
            Duration::from_secs(2),
        )
        .await
        .err()
        .expect("a wrong password fails");
        assert!(
            matches!(error, CredentialsError::Pkcs12 { .. }),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(text.contains("wrong password"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");

        let missing = certificate(dir.path(), dir.path().join("no-such-file"));
        let error = ApnsApp::load("x", &missing, Duration::from_secs(2))
            .await
            .err();
        assert!(
            matches!(error, Some(CredentialsError::Read { .. })),
            "{error:?}"
        );
    }

    /// A directory holding a fresh APNs token key, `AuthKey_ABC123DEFG.p8`.
    fn p8_key() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("a temp dir");
        openssl(
            dir.path(),
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "AuthKey_ABC123DEFG.p8",
            ],
        );
        dir
    }

    #[tokio::test]
    async fn a_notice_for_a_device_without_an_alert_token_is_refused_before_a2() {
        let dir = p8_key();
        let app = ApnsApp::load(
            "com.example.softphone",
            &Credentials::ApnsToken {
                key_path: dir.path().join("AuthKey_ABC123DEFG.p8"),
                key_id: "ABC123DEFG".into(),
                team_id: "TEAM123456".into(),
                topic: None,
            },
            Duration::from_secs(2),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        // Refused before a2 is asked: no network is reachable from here, so
        // a push that went to a2 would come back as a transport retry.
        for notice in [takeover(), call_ended(EndReason::Cancelled)] {
            assert_eq!(
                app.send(&target(true), &notice).await,
                PushOutcome::Failed(Refusal::no_alert_token()),
                "{notice:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_p8_key_becomes_a_token_client_and_a_bad_one_is_an_error() {
        let dir = p8_key();
        let token = |key_path: PathBuf| Credentials::ApnsToken {
            key_path,
            key_id: "ABC123DEFG".into(),
            team_id: "TEAM123456".into(),
            topic: Some("com.example.other.voip".into()),
        };
        let app = ApnsApp::load(
            "com.example.softphone",
            &token(dir.path().join("AuthKey_ABC123DEFG.p8")),
            Duration::from_secs(2),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(app.topic, "com.example.other.voip");

        std::fs::write(dir.path().join("garbage.p8"), "not a key").expect("write");
        let error = ApnsApp::load(
            "com.example.softphone",
            &token(dir.path().join("garbage.p8")),
            Duration::from_secs(2),
        )
        .await
        .err();
        assert!(
            matches!(error, Some(CredentialsError::Apns { .. })),
            "{error:?}"
        );
    }
}

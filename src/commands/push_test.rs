//! `call-notifier push test`: one push to one token with an app's stored
//! credentials, through the server's own [`PushRouter`] built from the same
//! flags, and what came of it. What an operator runs after `app add`, before
//! a phone misses a call.
//!
//! The push is a real one: a call push wakes the app as a call would (on
//! iOS it rings through CallKit), under a `unique_key` that says it is a
//! test. A message push is the takeover notice; on iOS it goes, as the
//! server sends it, as an alert push, to `--token` taken as the device's
//! alert token (its regular APNs token, not its VoIP token). Nothing is
//! stored or forgotten: a token the push service calls dead is reported,
//! not deleted.

use std::fmt;
use std::sync::Arc;

use super::text::short_token;
use crate::calls::{random_key, unix_seconds};
use crate::config::{Config, PushKind, PushTest};
use crate::logs::Escaped;
use crate::push::router::{PushRouter, Readiness};
use crate::push::{Payload, PushOutcome, PushTarget, Pusher, Refusal};
use crate::store::{Platform, Store, StoreError};

/// How the `unique_key` of a test call push starts, then 32 hex characters.
pub const UNIQUE_KEY_PREFIX: &str = "push-test-";

/// The caller a test call push shows, and the text of a test message push.
pub const TEST_TEXT: &str = "call-notifier push test";

/// The exit statuses of `push test`, so a script can tell the cases apart.
/// 1 stays what it is for every command (an error such as an unreachable
/// database) and 2 is clap's (bad flags).
pub mod exit {
    pub const DELIVERED: u8 = 0;
    pub const TOKEN_DEAD: u8 = 3;
    pub const REFUSED_FOR_NOW: u8 = 4;
    pub const REFUSED: u8 = 5;
    pub const NO_CREDENTIALS: u8 = 6;
    pub const UNKNOWN_APP: u8 = 7;
}

/// What came of a test push.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    /// The push went out; what the push service (or the way to it) said.
    Answered(PushOutcome),
    /// Not sent: no app with that platform and id.
    UnknownApp,
    /// Not sent: the app has no credentials, its pushes are only logged.
    LogOnly,
    /// Not sent: the app's credentials cannot be used; why.
    Unusable(String),
}

impl Finding {
    /// The process's exit status: 0 only for a delivered push.
    pub fn exit_code(&self) -> u8 {
        match self {
            Finding::Answered(PushOutcome::Delivered) => exit::DELIVERED,
            Finding::Answered(PushOutcome::TokenDead(_)) => exit::TOKEN_DEAD,
            Finding::Answered(PushOutcome::Retry { .. }) => exit::REFUSED_FOR_NOW,
            Finding::Answered(PushOutcome::Failed(_)) => exit::REFUSED,
            Finding::LogOnly | Finding::Unusable(_) => exit::NO_CREDENTIALS,
            Finding::UnknownApp => exit::UNKNOWN_APP,
        }
    }
}

/// The finding, with what it was about, as the command prints it.
struct Printout<'a> {
    test: &'a PushTest,
    finding: &'a Finding,
}

impl fmt::Display for Printout<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let PushTest {
            platform, app_id, ..
        } = self.test;
        let app_id = Escaped(app_id);
        let service = service(*platform);
        match self.finding {
            Finding::Answered(PushOutcome::Delivered) => {
                write!(f, "delivered: {service} accepted the push")
            }
            Finding::Answered(PushOutcome::TokenDead(refusal)) => write!(
                f,
                "token dead: {} (a call would forget the device with this token)",
                detail(refusal)
            ),
            Finding::Answered(PushOutcome::Retry { after, refusal }) => {
                write!(
                    f,
                    "refused for now: {} (a call would try again",
                    detail(refusal)
                )?;
                if let Some(after) = after {
                    write!(f, " after {} s", after.as_secs())?;
                }
                f.write_str(")")
            }
            Finding::Answered(PushOutcome::Failed(refusal)) => {
                write!(f, "refused: {}", detail(refusal))
            }
            Finding::UnknownApp => write!(
                f,
                "no {platform} app {app_id}: add it with \
                 `call-notifier app add --platform {platform} --app-id {app_id} ...`"
            ),
            Finding::LogOnly => write!(
                f,
                "not sent: the {platform} app {app_id} has no push credentials (log-only); \
                 give them with `call-notifier app add`"
            ),
            Finding::Unusable(error) => write!(
                f,
                "credentials cannot be used: the {platform} app {app_id}: {}",
                Escaped(error)
            ),
        }
    }
}

/// A refusal's text, escaped: it may quote what a push service sent.
fn detail(refusal: &Refusal) -> Escaped<'_> {
    Escaped(&refusal.detail)
}

/// Who answers a platform's pushes.
fn service(platform: Platform) -> &'static str {
    match platform {
        Platform::Apns => "APNs",
        Platform::Android | Platform::Gcm => "FCM",
    }
}

/// Sends the test push and prints what came of it, a line before sending
/// and one after. Only the database failing is an error; every answer of
/// the push service, and an app that cannot push, is a [`Finding`].
pub async fn run(
    store: Arc<dyn Store>,
    config: &Config,
    test: &PushTest,
) -> Result<Finding, StoreError> {
    let router = PushRouter::new(store, config);
    let finding = match router.readiness(test.platform, &test.app_id).await? {
        Readiness::Unknown => Finding::UnknownApp,
        Readiness::LogOnly => Finding::LogOnly,
        Readiness::Unusable(error) => Finding::Unusable(error),
        Readiness::Ready => {
            let payload = payload(test.kind, config);
            println!("{}", announce(test, &payload));
            Finding::Answered(router.send(&target(test), &payload).await)
        }
    };
    println!(
        "{}",
        Printout {
            test,
            finding: &finding
        }
    );
    Ok(finding)
}

/// Who the test push goes to. On iOS only a call goes to the VoIP token;
/// a message goes as an alert, so `--token` is then the alert token.
fn target(test: &PushTest) -> PushTarget {
    PushTarget {
        platform: test.platform,
        token: test.token.clone(),
        app_id: test.app_id.clone(),
        sandbox: test.sandbox,
        // No SIP account: the logs of the push say 0.
        sip_user_id: 0,
        alert_token: (test.platform.is_apns() && test.kind == PushKind::Message)
            .then(|| test.token.clone()),
    }
}

/// The line printed before the push leaves.
fn announce(test: &PushTest, payload: &Payload) -> String {
    let what = match payload {
        Payload::Call { unique_key, .. } => format!("call push {unique_key}"),
        other if test.platform.is_apns() => format!("{} push (an alert)", other.kind()),
        other => format!("{} push", other.kind()),
    };
    let environment = match (test.platform, test.sandbox) {
        (Platform::Apns, true) => " (sandbox)",
        (Platform::Apns, false) => " (production)",
        _ => "",
    };
    format!(
        "sending a {what} to token {} of {} app {}{environment}",
        short_token(&test.token),
        test.platform,
        Escaped(&test.app_id)
    )
}

/// A test push: a call push whose key, number and caller say it is a test
/// (the app's answer to it gets 404, as no call waits), or a text.
fn payload(kind: PushKind, config: &Config) -> Payload {
    match kind {
        PushKind::Call => Payload::Call {
            unique_key: format!("{UNIQUE_KEY_PREFIX}{}", random_key()),
            phonenumber: "push-test".into(),
            caller_id: TEST_TEXT.into(),
            response_api: config.response_api(config.listen),
            message_start_time: unix_seconds(),
            attempt: 1,
            call_id: None,
        },
        PushKind::Message => Payload::Message {
            message: TEST_TEXT.into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use a2::request::payload::PayloadLike;

    use super::*;
    use crate::push::apns::{default_topic, ApnsPush};

    fn test(platform: Platform, kind: PushKind) -> PushTest {
        PushTest {
            platform,
            app_id: "com.example.softphone".into(),
            token: "a1b2c3d4e5f60718293a4b5c6d7e8f90".into(),
            sandbox: true,
            kind,
        }
    }

    /// What `push test --platform apns` hands to a2: a2 cannot be pointed
    /// at a stand-in, so the request is checked here, as `push::apns` does
    /// for the server's pushes.
    #[test]
    fn an_apns_test_call_push_is_the_servers_voip_push_with_a_test_key() {
        let mut config = Config::defaults();
        config.response_url = Some("https://notify.example.com".into());
        let test = test(Platform::Apns, PushKind::Call);
        let mut payload = payload(test.kind, &config);
        // A time a double carries exactly: a2's JSON, read back, may round
        // the last digit of an arbitrary one.
        if let Payload::Call {
            message_start_time, ..
        } = &mut payload
        {
            *message_start_time = 1_700_000_000.25;
        }
        let push = ApnsPush::new(&target(&test), &payload, &default_topic(&test.app_id))
            .expect("a call always goes");
        let a2 = push.payload();
        assert_eq!(a2.get_device_token(), test.token);
        assert_eq!(
            a2.get_options().apns_topic,
            Some("com.example.softphone.voip")
        );
        let mut json: serde_json::Value =
            serde_json::from_str(&a2.to_json_string().expect("serializable")).expect("JSON");
        let fields = json.as_object_mut().expect("an object");
        assert_eq!(fields.remove("aps"), Some(serde_json::json!({})));
        // Beside `aps`, exactly the call push the server sends (its keys are
        // checked in `push::apns` and `push`), with a test's values.
        assert_eq!(*fields, payload.to_json());
        let key = json["unique_key"].as_str().expect("a key");
        let hex = key.strip_prefix(UNIQUE_KEY_PREFIX).expect("a test key");
        assert_eq!(hex.len(), 32);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{key}");
        assert_eq!(json["caller_id"], TEST_TEXT);
        assert_eq!(
            json["response_api"],
            "https://notify.example.com/api/call-response/"
        );
        assert_eq!(json["attempt"], 1);
        assert!(announce(&test, &payload)
            .ends_with("to token a1b2c3d4…8f90 of apns app com.example.softphone (sandbox)"));
    }

    /// `push test --platform apns --kind message`: the takeover alert, as
    /// the server sends it, to `--token` as the alert token.
    #[test]
    fn an_apns_test_message_push_is_the_takeover_alert_to_the_given_token() {
        let test = test(Platform::Apns, PushKind::Message);
        let payload = payload(test.kind, &Config::defaults());
        let push = ApnsPush::new(&target(&test), &payload, &default_topic(&test.app_id))
            .expect("the given token is the alert token");
        let a2 = push.payload();
        assert_eq!(a2.get_device_token(), test.token);
        let options = a2.get_options();
        assert_eq!(options.apns_push_type, Some(a2::PushType::Alert));
        assert_eq!(options.apns_topic, Some("com.example.softphone"));
        assert_eq!(
            a2.to_json_string().expect("serializable"),
            concat!(
                r#"{"aps":{"alert":{"loc-key":"CALL_NOTIFIER_TAKEN_OVER","loc-args":[]},"#,
                r#""mutable-content":0},"message":"call-notifier push test","type":"message"}"#
            )
        );
        assert!(announce(&test, &payload).starts_with("sending a message push (an alert) to token"));
        // An Android message push has no alert token to go to.
        assert_eq!(
            target(&self::test(Platform::Android, PushKind::Message)).alert_token,
            None
        );
    }

    #[test]
    fn only_a_delivered_push_exits_zero_and_every_verdict_has_its_own_status() {
        let refusal = || Refusal::unanswered("x");
        let verdicts = [
            Finding::Answered(PushOutcome::Delivered),
            Finding::Answered(PushOutcome::TokenDead(refusal())),
            Finding::Answered(PushOutcome::Retry {
                after: None,
                refusal: refusal(),
            }),
            Finding::Answered(PushOutcome::Failed(refusal())),
            Finding::Unusable("x".into()),
            Finding::UnknownApp,
        ];
        let codes: Vec<u8> = verdicts.iter().map(Finding::exit_code).collect();
        assert_eq!(codes, [0, 3, 4, 5, 6, 7]);
        assert_eq!(Finding::LogOnly.exit_code(), exit::NO_CREDENTIALS);
    }
}

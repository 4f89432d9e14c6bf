//! The pusher of apps without credentials: logs what it would send and
//! reports it delivered. Lets a development set-up, or a PBX integration
//! test, run the whole call path without Apple or Google. It keeps the iOS
//! rule as the real pushers do: a notice for an iOS device without an alert
//! token is refused, not logged as sent.

use async_trait::async_trait;

use super::{Payload, PushOutcome, PushTarget, Pusher, Refusal};
use crate::logs::{redact, Escaped};

#[derive(Debug, Default, Clone)]
pub struct LogPusher;

#[async_trait]
impl Pusher for LogPusher {
    async fn send(&self, target: &PushTarget, payload: &Payload) -> PushOutcome {
        let Some(token) = target.token_for(payload) else {
            return PushOutcome::Failed(Refusal::no_alert_token());
        };
        tracing::info!(
            platform = %target.platform,
            app = %Escaped(&target.app_id),
            sip_user_id = target.sip_user_id,
            kind = payload.kind(),
            token = %redact(token),
            payload = %Escaped(&serde_json::Value::Object(payload.to_json()).to_string()),
            "push not sent: the app has no push credentials (log-only)"
        );
        PushOutcome::Delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EndReason, Platform};

    #[tokio::test]
    async fn a_log_only_app_keeps_the_ios_rule() {
        let mut target = PushTarget {
            platform: Platform::Apns,
            token: "a1".into(),
            app_id: "com.example.softphone".into(),
            sandbox: false,
            sip_user_id: 1,
            alert_token: None,
        };
        let ended = Payload::CallEnded {
            unique_key: "k".into(),
            reason: EndReason::TimedOut,
            caller: "Bob".into(),
        };
        assert_eq!(
            LogPusher.send(&target, &ended).await,
            PushOutcome::Failed(Refusal::no_alert_token())
        );
        target.alert_token = Some("b2".into());
        assert_eq!(
            LogPusher.send(&target, &ended).await,
            PushOutcome::Delivered
        );
        target.platform = Platform::Android;
        target.alert_token = None;
        assert_eq!(
            LogPusher.send(&target, &ended).await,
            PushOutcome::Delivered
        );
    }
}

//! The pusher of apps without credentials: logs what it would send and
//! reports it delivered. Lets a development set-up, or a PBX integration
//! test, run the whole call path without Apple or Google.

use async_trait::async_trait;

use super::{Payload, PushOutcome, PushTarget, Pusher};
use crate::logs::{redact, Escaped};

#[derive(Debug, Default, Clone)]
pub struct LogPusher;

#[async_trait]
impl Pusher for LogPusher {
    async fn send(&self, target: &PushTarget, payload: &Payload) -> PushOutcome {
        tracing::info!(
            platform = %target.platform,
            app = %Escaped(&target.app_id),
            sip_user_id = target.sip_user_id,
            token = %redact(&target.token),
            payload = %Escaped(&serde_json::Value::Object(payload.to_json()).to_string()),
            "push not sent: the app has no push credentials (log-only)"
        );
        PushOutcome::Delivered
    }
}

//! FCM HTTP v1: data-only pushes to Android phones (`android` devices, and
//! `gcm` devices, whose legacy API Google shut down).
//!
//! Owns the message we send (`POST {base}/v1/projects/{project}/messages:send`,
//! [`message`]), the OAuth2 access token that authorises it (a yup-oauth2
//! authenticator per service account, which caches and refreshes the
//! token), and what FCM's answers mean ([`outcome`]). One HTTP client serves
//! every app and the token requests: HTTP/2 negotiated by ALPN with Google,
//! HTTP/1.1 to a plain `http://` URL (the tests' stand-ins).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use yup_oauth2::authenticator::Authenticator;
use yup_oauth2::{CustomHyperClientBuilder, ServiceAccountAuthenticator};

use super::{
    read_credentials, CredentialsError, Payload, PushOutcome, PushTarget, Reason, Refusal,
};
use crate::outbound::{self, HttpClient};

/// The OAuth2 scope of FCM HTTP v1.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// The reasons FCM gives that the `pushes` metric names: FCM v1's error
/// codes (`FcmError.errorCode`), then the `google.rpc` statuses FCM answers
/// with where it gives no code (an expired access token, a wrong project).
/// Anything else is `other`.
pub const REASONS: &[&str] = &[
    "UNSPECIFIED_ERROR",
    "INVALID_ARGUMENT",
    "UNREGISTERED",
    "SENDER_ID_MISMATCH",
    "QUOTA_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
    "THIRD_PARTY_AUTH_ERROR",
    "NOT_FOUND",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "UNAUTHENTICATED",
];

/// The most of an FCM answer we read: error bodies are small.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What every FCM app shares.
pub struct FcmEndpoint {
    /// For FCM and Google's token endpoint alike: `String`-bodied, as
    /// yup-oauth2 takes it.
    pub http: HttpClient<String>,
    /// `--fcm-base-url`, without a trailing slash.
    pub base_url: String,
    /// TTL of call pushes: no longer than the wait, since a phone woken after
    /// it would answer a call that is gone.
    pub call_ttl: Duration,
}

impl FcmEndpoint {
    pub fn new(base_url: &str, call_ttl: Duration) -> Self {
        FcmEndpoint {
            http: outbound::client(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            call_ttl,
        }
    }
}

/// One app's FCM sender: its project and its service account's tokens.
pub struct FcmApp {
    endpoint: Arc<FcmEndpoint>,
    project_id: String,
    authenticator: Authenticator<outbound::Connector>,
    /// One token request at a time: a burst of calls on a cold cache waits
    /// for one token instead of asking Google once per call.
    token_lock: tokio::sync::Mutex<()>,
    /// FCM said 401 to the cached token (revoked early): fetch a fresh one.
    token_rejected: AtomicBool,
}

/// Reads a service-account file: its key and its usable `project_id`.
async fn service_account(
    path: &Path,
) -> Result<(yup_oauth2::ServiceAccountKey, String), CredentialsError> {
    let bad = |reason: String| CredentialsError::ServiceAccount {
        path: path.to_owned(),
        reason,
    };
    let bytes = read_credentials(path).await?;
    let key = yup_oauth2::parse_service_account_key(&bytes).map_err(|e| bad(e.to_string()))?;
    let project_id = key
        .project_id
        .clone()
        .filter(|id| {
            !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        })
        .ok_or_else(|| bad("no usable project_id".into()))?;
    Ok((key, project_id))
}

/// The Firebase project a service-account file belongs to: what a SIP
/// proxy names in RFC 8599's `pn-param` for FCM.
pub async fn project_id(path: &Path) -> Result<String, CredentialsError> {
    service_account(path).await.map(|(_, project)| project)
}

impl FcmApp {
    /// Reads the service-account file: its key, its `token_uri` and its
    /// project id. Fetches no token yet.
    pub async fn load(path: &Path, endpoint: Arc<FcmEndpoint>) -> Result<Self, CredentialsError> {
        let bad = |reason: String| CredentialsError::ServiceAccount {
            path: path.to_owned(),
            reason,
        };
        let (key, project_id) = service_account(path).await?;
        let authenticator = ServiceAccountAuthenticator::with_client(
            key,
            CustomHyperClientBuilder::from(endpoint.http.clone()),
        )
        .build()
        .await
        .map_err(|e| bad(e.to_string()))?;
        Ok(FcmApp {
            endpoint,
            project_id,
            authenticator,
            token_lock: tokio::sync::Mutex::new(()),
            token_rejected: AtomicBool::new(false),
        })
    }

    /// Sends one push. Never retries: [`PushOutcome::Retry`] says when to.
    pub async fn send(&self, target: &PushTarget, payload: &Payload) -> PushOutcome {
        let token = match self.access_token().await {
            Ok(token) => token,
            Err(e) => return token_outcome(e),
        };
        let url = format!(
            "{}/v1/projects/{}/messages:send",
            self.endpoint.base_url, self.project_id
        );
        let body = message(target, payload, self.endpoint.call_ttl).to_string();
        let request = match Request::post(url)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/json")
            .body(body)
        {
            Ok(request) => request,
            Err(e) => {
                return PushOutcome::Failed(Refusal::unanswered(format!(
                    "cannot build the FCM request: {e}"
                )))
            }
        };
        let response = match self.endpoint.http.request(request).await {
            Ok(response) => response,
            // Refused before the request left, or lost once it had.
            Err(e) if e.is_connect() => {
                return PushOutcome::Retry {
                    after: None,
                    refusal: Refusal::unanswered(format!("FCM unreachable: {e}")),
                }
            }
            Err(e) => {
                return PushOutcome::Retry {
                    after: None,
                    refusal: Refusal::in_doubt(format!("no answer from FCM: {e}")),
                }
            }
        };
        let status = response.status();
        let after = retry_after(response.headers());
        // An unreadable error body still has its status to go by.
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map(|body| body.to_bytes())
            .unwrap_or_default();
        if status == StatusCode::UNAUTHORIZED {
            self.token_rejected.store(true, Ordering::Release);
        }
        outcome(status, after, &body)
    }

    /// The cached access token, or a fresh one from the `token_uri`.
    async fn access_token(&self) -> Result<String, yup_oauth2::Error> {
        let _one_at_a_time = self.token_lock.lock().await;
        let scopes = [SCOPE];
        let token = if self.token_rejected.swap(false, Ordering::AcqRel) {
            let fresh = self.authenticator.force_refreshed_token(&scopes).await;
            if fresh.is_err() {
                self.token_rejected.store(true, Ordering::Release);
            }
            fresh?
        } else {
            self.authenticator.token(&scopes).await?
        };
        token
            .token()
            .map(str::to_owned)
            .ok_or(yup_oauth2::Error::MissingAccessToken)
    }
}

/// The FCM v1 request body: data-only, every value a string, Android
/// priority HIGH so a dozing phone wakes at once. A call push lives no
/// longer than the wait (`ttl`, whole seconds rounded down). A `call_ended`
/// notice lives [`super::NOTICE_TTL`] and collapses under the call's `unique_key`,
/// so a phone that was offline gets one, not one per resend. A text push
/// keeps FCM's default, so a phone that is off learns it later.
pub fn message(target: &PushTarget, payload: &Payload, call_ttl: Duration) -> Value {
    let mut android = json!({ "priority": "HIGH" });
    match payload {
        Payload::Call { .. } => android["ttl"] = format!("{}s", call_ttl.as_secs()).into(),
        Payload::CallEnded { unique_key, .. } => {
            android["ttl"] = format!("{}s", super::NOTICE_TTL.as_secs()).into();
            android["collapse_key"] = unique_key.as_str().into();
        }
        Payload::Message { .. } => {}
    }
    json!({
        "message": {
            "token": target.token,
            "data": payload.to_string_map(),
            "android": android,
        }
    })
}

/// `Retry-After` in seconds, when present (the HTTP-date form is ignored).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

/// A `google.rpc.Status` error body, as FCM v1 sends it.
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: Status,
}

#[derive(Debug, Default, Deserialize)]
struct Status {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<Detail>,
}

/// One entry of `details`: an `FcmError` carries `errorCode`, a
/// `BadRequest` carries `fieldViolations`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Detail {
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    field_violations: Vec<FieldViolation>,
}

#[derive(Debug, Default, Deserialize)]
struct FieldViolation {
    #[serde(default)]
    field: String,
    #[serde(default)]
    description: String,
}

impl Status {
    fn error_codes(&self) -> impl Iterator<Item = &str> {
        self.details
            .iter()
            .filter_map(|d| d.error_code.as_deref())
            .chain(std::iter::once(self.status.as_str()))
    }

    fn says(&self, code: &str) -> bool {
        self.error_codes().any(|c| c == code)
    }

    /// The `reason` label: the first code FCM gave that [`REASONS`] knows
    /// (its own error code before the generic status), else `other`.
    fn reason(&self) -> Reason {
        self.error_codes()
            .map(|code| Reason::bounded(code, REASONS))
            .find(|reason| *reason != Reason::OTHER)
            .unwrap_or(Reason::OTHER)
    }

    /// Whether an INVALID_ARGUMENT is about the registration token (dead)
    /// rather than about the rest of the message (our bug).
    fn blames_the_token(&self) -> bool {
        let violations = self
            .details
            .iter()
            .flat_map(|d| &d.field_violations)
            .any(|v| v.field.ends_with("token") || v.description.to_lowercase().contains("token"));
        violations || self.message.to_lowercase().contains("registration token")
    }
}

/// What an FCM answer means for the call.
pub fn outcome(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> PushOutcome {
    if status.is_success() {
        return PushOutcome::Delivered;
    }
    let error = serde_json::from_slice::<ErrorBody>(body)
        .unwrap_or_default()
        .error;
    let said = match error.error_codes().find(|c| !c.is_empty()) {
        Some(code) => format!("FCM {} {code}: {}", status.as_u16(), error.message),
        None => format!("FCM {}", status.as_u16()),
    };
    let refusal = |detail: String| Refusal::new(error.reason(), detail);
    if error.says("UNREGISTERED")
        || (status == StatusCode::BAD_REQUEST
            && error.says("INVALID_ARGUMENT")
            && error.blames_the_token())
    {
        return PushOutcome::TokenDead(refusal(said));
    }
    match status.as_u16() {
        429 | 500..=599 => PushOutcome::Retry {
            after: retry_after,
            refusal: refusal(said),
        },
        401 | 403 => PushOutcome::Failed(refusal(format!(
            "{said}: FCM rejected the app's service account"
        ))),
        _ => PushOutcome::Failed(refusal(said)),
    }
}

/// What a failed token request means: Google unreachable or answering
/// nonsense is worth another try; a refused service account is not.
fn token_outcome(e: yup_oauth2::Error) -> PushOutcome {
    use yup_oauth2::Error::*;
    match e {
        HttpError(_) | HttpClientError(_) | JSONError(_) | MissingAccessToken => {
            PushOutcome::Retry {
                after: None,
                refusal: Refusal::unanswered(format!("no FCM access token: {e}")),
            }
        }
        e => PushOutcome::Failed(Refusal::unanswered(format!(
            "the token endpoint refused the app's service account: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Platform;

    fn target() -> PushTarget {
        PushTarget {
            platform: Platform::Android,
            token: "fcm-token-1".into(),
            app_id: "com.example.softphone".into(),
            sandbox: false,
            sip_user_id: 7,
            alert_token: None,
        }
    }

    #[test]
    fn a_call_message_is_data_only_high_priority_and_lives_no_longer_than_the_wait() {
        let payload = Payload::Call {
            unique_key: "k".into(),
            phonenumber: "+31501234567".into(),
            caller_id: "Bob".into(),
            response_api: "http://127.0.0.1:1/api/call-response/".into(),
            message_start_time: 1_700_000_000.5,
            attempt: 3,
            call_id: None,
        };
        let body = message(&target(), &payload, Duration::from_millis(4_500));
        assert_eq!(
            body,
            json!({"message": {
                "token": "fcm-token-1",
                "data": {
                    "type": "call", "unique_key": "k", "phonenumber": "+31501234567",
                    "caller_id": "Bob", "response_api": "http://127.0.0.1:1/api/call-response/",
                    "message_start_time": "1700000000.5", "attempt": "3",
                },
                "android": {"priority": "HIGH", "ttl": "4s"},
            }})
        );
        let text = Payload::Message {
            message: "hi".into(),
        };
        assert_eq!(
            message(&target(), &text, Duration::from_secs(4))["message"]["android"],
            json!({"priority": "HIGH"})
        );
    }

    #[test]
    fn a_call_ended_message_says_why_and_collapses_under_the_calls_key() {
        let payload = Payload::CallEnded {
            unique_key: "k-1".into(),
            reason: crate::store::EndReason::AnsweredElsewhere,
            caller: "Bob".into(),
        };
        assert_eq!(
            message(&target(), &payload, Duration::from_secs(4)),
            json!({"message": {
                "token": "fcm-token-1",
                "data": {"type": "call_ended", "unique_key": "k-1", "reason": "answered_elsewhere"},
                "android": {"priority": "HIGH", "ttl": "60s", "collapse_key": "k-1"},
            }})
        );
    }

    fn error(code: u16, status: &str, message: &str, details: Value) -> Vec<u8> {
        json!({"error": {"code": code, "message": message, "status": status, "details": details}})
            .to_string()
            .into_bytes()
    }

    fn fcm_error(code: &str) -> Value {
        json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}])
    }

    #[test]
    fn fcm_answers_map_to_outcomes() {
        let ok = outcome(StatusCode::OK, None, br#"{"name":"projects/p/messages/1"}"#);
        assert_eq!(ok, PushOutcome::Delivered);

        let unregistered = error(
            404,
            "NOT_FOUND",
            "Requested entity was not found.",
            fcm_error("UNREGISTERED"),
        );
        assert!(matches!(
            outcome(StatusCode::NOT_FOUND, None, &unregistered),
            PushOutcome::TokenDead(refusal) if refusal.detail.contains("UNREGISTERED")
        ));

        let bad_token = error(
            400,
            "INVALID_ARGUMENT",
            "The registration token is not a valid FCM registration token",
            json!([
                {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INVALID_ARGUMENT"},
                {"@type": "type.googleapis.com/google.rpc.BadRequest",
                 "fieldViolations": [{"field": "message.token", "description": "Invalid registration token"}]},
            ]),
        );
        assert!(matches!(
            outcome(StatusCode::BAD_REQUEST, None, &bad_token),
            PushOutcome::TokenDead(_)
        ));

        // INVALID_ARGUMENT about another field is our bug, not a dead token.
        let bad_ttl = error(
            400,
            "INVALID_ARGUMENT",
            "Invalid value at 'message.android.ttl'",
            json!([{"@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": "message.android.ttl", "description": "Invalid value"}]}]),
        );
        assert!(matches!(
            outcome(StatusCode::BAD_REQUEST, None, &bad_ttl),
            PushOutcome::Failed(_)
        ));

        // A 404 that does not say UNREGISTERED (a wrong project) forgets no device.
        assert!(matches!(
            outcome(StatusCode::NOT_FOUND, None, b"<html>not found</html>"),
            PushOutcome::Failed(_)
        ));

        let quota = error(
            429,
            "RESOURCE_EXHAUSTED",
            "quota",
            fcm_error("QUOTA_EXCEEDED"),
        );
        assert_eq!(
            outcome(
                StatusCode::TOO_MANY_REQUESTS,
                Some(Duration::from_secs(7)),
                &quota
            ),
            PushOutcome::Retry {
                after: Some(Duration::from_secs(7)),
                refusal: Refusal::new(
                    Reason::bounded("QUOTA_EXCEEDED", REASONS),
                    "FCM 429 QUOTA_EXCEEDED: quota"
                )
            }
        );
        assert!(matches!(
            outcome(StatusCode::SERVICE_UNAVAILABLE, None, b""),
            PushOutcome::Retry { after: None, .. }
        ));
        assert!(matches!(
            outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                &error(500, "INTERNAL", "", fcm_error("INTERNAL"))
            ),
            PushOutcome::Retry { .. }
        ));

        for status in [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN] {
            let body = error(status.as_u16(), "UNAUTHENTICATED", "bad token", json!([]));
            assert!(matches!(
                outcome(status, None, &body),
                PushOutcome::Failed(refusal) if refusal.detail.contains("service account")
            ));
        }
        let mismatch = error(
            403,
            "PERMISSION_DENIED",
            "SenderId mismatch",
            fcm_error("SENDER_ID_MISMATCH"),
        );
        assert!(matches!(
            outcome(StatusCode::FORBIDDEN, None, &mismatch),
            PushOutcome::Failed(_)
        ));
    }

    #[test]
    fn the_reason_label_is_fcm_code_bounded_to_the_known_set() {
        let label = |status: u16, body: &[u8]| {
            let status = StatusCode::from_u16(status).expect("a status");
            outcome(status, None, body).reason().as_str()
        };
        let with_code =
            |status: u16, rpc: &str, code: &str| error(status, rpc, "m", fcm_error(code));
        // FCM's own code wins over the generic status beside it.
        assert_eq!(
            label(404, &with_code(404, "NOT_FOUND", "UNREGISTERED")),
            "UNREGISTERED"
        );
        for code in [
            "INVALID_ARGUMENT",
            "QUOTA_EXCEEDED",
            "UNAVAILABLE",
            "INTERNAL",
            "SENDER_ID_MISMATCH",
            "THIRD_PARTY_AUTH_ERROR",
        ] {
            assert_eq!(label(400, &with_code(400, "X", code)), code);
        }
        // Without a code, a status FCM uses.
        assert_eq!(
            label(401, &error(401, "UNAUTHENTICATED", "expired", json!([]))),
            "UNAUTHENTICATED"
        );
        // A code nobody knows yet, and answers without one, are `other`.
        assert_eq!(
            label(400, &with_code(400, "FAILED_PRECONDITION", "NEW_CODE")),
            "other"
        );
        assert_eq!(label(404, b"<html>not found</html>"), "other");
        assert_eq!(label(503, b""), "other");
        // A delivered push has none.
        assert_eq!(label(200, b"{}"), "none");
    }

    /// The stand-ins of the tests are plain HTTP/1.1: a client that forced
    /// HTTP/2 would open with the HTTP/2 preface (`PRI * HTTP/2.0`) instead.
    #[tokio::test]
    async fn a_plain_http_url_gets_http1() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("an address");
        let request = Request::post(format!("http://{addr}/x"))
            .body(String::from("{}"))
            .expect("a request");
        let client: HttpClient<String> = outbound::client();
        let sending = tokio::spawn(async move { client.request(request).await.is_ok() });
        let (mut stream, _) = listener.accept().await.expect("a connection");
        let mut head = [0u8; 16];
        stream.read_exact(&mut head).await.expect("a request head");
        assert_eq!(&head, b"POST /x HTTP/1.1");
        sending.abort();
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, "12".parse().expect("a header value"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(12)));
        headers.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT"
                .parse()
                .expect("a header value"),
        );
        assert_eq!(retry_after(&headers), None);
    }
}

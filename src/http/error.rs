//! Errors as HTTP: every handler error becomes a response here, and only here.
//!
//! Client mistakes name the field and the rule they broke; outages are 503;
//! anything unexpected is logged and answered with a bare 500 that leaks
//! nothing.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ACCEPT_ENCODING, ALLOW, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};

use crate::auth::AuthError;
use crate::broker::BrokerError;
use crate::store::StoreError;

/// What a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field is missing or breaks a rule.
    #[error("{field}: {rule}")]
    Invalid { field: &'static str, rule: String },
    /// The body as a whole cannot be read (malformed JSON or form).
    #[error("malformed body: {0}")]
    Malformed(String),
    /// Not found; the text is what the client may know.
    #[error("{0}")]
    NotFound(&'static str),
    /// A field is well formed but names nothing this server serves (an
    /// unknown push provider or app): 404 naming the field, which a SIP
    /// proxy turns into `555 Push Notification Service Not Supported`.
    #[error("{field}: {rule}")]
    Unknown { field: &'static str, rule: String },
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("unsupported content type {0:?}; send application/x-www-form-urlencoded or application/json")]
    UnsupportedMediaType(String),
    /// A body in a content coding this server does not decode; the
    /// response's `Accept-Encoding: identity` says what it reads.
    #[error("unsupported content encoding {0:?}; send the body unencoded (no Content-Encoding, or identity)")]
    UnsupportedEncoding(String),
    /// A body in a transfer coding other than `chunked` (RFC 9112, 6.1).
    #[error(
        "unsupported transfer coding {0:?}; send the body with a Content-Length, or chunked alone"
    )]
    UnsupportedTransferCoding(String),
    #[error("request body not received in time")]
    Timeout,
    /// Who sent the request may not do this, or not now (a limit: 429).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A dependency is down: `what` names it to the client (`database`,
    /// `broker`), `detail` goes to the log only.
    #[error("{what} unavailable: {detail}")]
    Unavailable { what: &'static str, detail: String },
    /// A bug or an unexpected failure; logged, never shown.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A field that breaks a rule.
    pub fn invalid(field: &'static str, rule: impl Into<String>) -> Self {
        ApiError::Invalid {
            field,
            rule: rule.into(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } | ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) | ApiError::Unknown { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) | ApiError::UnsupportedEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            ApiError::UnsupportedTransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Timeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Auth(AuthError::Missing | AuthError::Rejected) => StatusCode::UNAUTHORIZED,
            ApiError::Auth(AuthError::Forbidden) => StatusCode::FORBIDDEN,
            ApiError::Auth(AuthError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Auth(AuthError::Throttled { .. }) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The response. JSON `{"error": ...}`, plus `"field"` when one is to blame.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let status = self.status();
        let body = match &self {
            ApiError::Invalid { field, rule } | ApiError::Unknown { field, rule } => {
                serde_json::json!({
                    "error": format!("{field}: {rule}"),
                    "field": field,
                    "rule": rule,
                })
            }
            ApiError::Unavailable { what, detail } => unavailable(what, detail),
            ApiError::Auth(AuthError::Unavailable(detail)) => unavailable("account API", detail),
            ApiError::Auth(AuthError::Throttled { rule, .. }) => serde_json::json!({
                "error": self.to_string(),
                "rule": rule,
            }),
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "answering 500");
                serde_json::json!({ "error": "internal server error" })
            }
            other => serde_json::json!({ "error": other.to_string() }),
        };
        let mut response = super::json(status, &body);
        let headers = response.headers_mut();
        match self {
            ApiError::MethodNotAllowed(allow) => {
                headers.insert(ALLOW, super::allow(allow));
            }
            // RFC 9110, 15.5.16: the codings that would have been read.
            ApiError::UnsupportedEncoding(_) => {
                headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
            }
            ApiError::Auth(AuthError::Missing | AuthError::Rejected) => {
                let challenge = HeaderValue::from_static("Basic realm=\"call-notifier\"");
                headers.insert(WWW_AUTHENTICATE, challenge);
            }
            ApiError::Auth(AuthError::Throttled { retry_after, .. }) => {
                // Whole seconds, rounded up: a client retrying on time is let in.
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            }
            _ => {}
        }
        response
    }
}

/// A 503 body that names the dependency, and a log line with the details.
fn unavailable(what: &str, detail: &str) -> serde_json::Value {
    tracing::warn!(dependency = what, %detail, "answering 503");
    serde_json::json!({ "error": format!("{what} temporarily unavailable") })
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(detail) => ApiError::Unavailable {
                what: "database",
                detail,
            },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::Unavailable(detail) => ApiError::Unavailable {
                what: "broker",
                detail,
            },
        }
    }
}

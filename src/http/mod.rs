//! The HTTP edge: accept loop, routing, and one module per endpoint group.
//!
//! Handlers parse and validate, call into [`crate::calls`], the store or the
//! broker, and return `Result<Response, ApiError>`; [`error`] is the one
//! place errors become responses. No business logic lives here.

mod app_events;
mod body;
mod calls;
mod devices;
pub mod error;
mod health;
mod listener;
mod poll_again;
mod sip;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

pub use body::{Fields, MAX_BODY_BYTES};
use error::ApiError;
pub use listener::serve;

use crate::state::AppState;
use crate::store::Platform;

/// The one response body type.
pub type Body = Full<Bytes>;

/// The longest any request but the PBX's may take, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The readiness verdict, as `/health/ready` answers it.
pub async fn readiness(state: &AppState) -> Response<Body> {
    health::ready(state).await
}

/// The routes. Paths work with and without the trailing slash. `HEAD`
/// answers as `GET` without the body, on either protocol; `OPTIONS` says
/// what a path answers.
async fn route(
    state: &Arc<AppState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Body> {
    let path = request.uri().path();
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path)
        .to_owned();
    let method = request.method().clone();
    if method == Method::OPTIONS {
        return options(&path);
    }
    let head = method == Method::HEAD;
    let routed = if head { Method::GET } else { method.clone() };
    // The PBX's request is bounded by its wait; every other one by this, so
    // a database or account API that hangs costs a client 503, not forever.
    let bounded = path != "/api/incoming-call";
    let handled = async {
        match (path.as_str(), &routed) {
            ("/api/incoming-call", &Method::POST) => {
                calls::incoming_call(state, peer, request).await
            }
            ("/api/incoming-call/cancel", &Method::POST) => {
                calls::cancel_call(state, peer, request).await
            }
            ("/api/call-response", &Method::POST) => {
                calls::call_response(state, peer, request).await
            }
            ("/api/check-in", &Method::POST) => app_events::check_in(state, peer, request).await,
            ("/api/hangup-reason", &Method::POST) => {
                app_events::hangup_reason(state, peer, request).await
            }
            ("/api/sip-registration", &Method::POST) => sip::register(state, peer, request).await,
            ("/api/sip-registration", &Method::DELETE) => {
                sip::unregister(state, peer, request).await
            }
            (path, &Method::POST) if device_platform(path).is_some() => {
                let platform = device_platform(path).expect("matched above");
                devices::register(state, peer, platform, request).await
            }
            (path, &Method::DELETE) if device_platform(path).is_some() => {
                let platform = device_platform(path).expect("matched above");
                devices::unregister(state, peer, platform, request).await
            }
            ("/health" | "/health/ready", &Method::GET) => Ok(health::ready(state).await),
            ("/health/live", &Method::GET) => Ok(health::live()),
            ("/metrics", &Method::GET) => {
                let source = state.access.network.client_ip(peer.ip(), request.headers());
                health::metrics(state, source)
            }
            ("/openapi.json", &Method::GET) => Ok(openapi()),
            (path, _) => Err(match methods_of(path) {
                Some(methods) => ApiError::MethodNotAllowed(methods),
                None => ApiError::NotFound("no such endpoint"),
            }),
        }
    };
    let result = if bounded {
        match tokio::time::timeout(REQUEST_TIMEOUT, handled).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::Unavailable {
                what: "service",
                detail: format!("{method} {path} took longer than {REQUEST_TIMEOUT:?}"),
            }),
        }
    } else {
        handled.await
    };
    let response = result.unwrap_or_else(ApiError::into_response);
    if head {
        without_body(response)
    } else {
        response
    }
}

/// The methods a route answers, as [`ROUTES`] lists them.
fn methods_of(path: &str) -> Option<&'static str> {
    ROUTES
        .iter()
        .find(|(route, _)| *route == path)
        .map(|(_, methods)| *methods)
}

/// The `Allow` header of a route: its methods, `HEAD` wherever `GET` is,
/// and `OPTIONS` everywhere.
pub(crate) fn allow(methods: &str) -> HeaderValue {
    let mut allow = methods.to_owned();
    if methods.split(", ").any(|m| m == "GET") {
        allow.push_str(", HEAD");
    }
    allow.push_str(", OPTIONS");
    HeaderValue::from_str(&allow).expect("method names are header-safe")
}

/// `OPTIONS`: 204 with `Allow` for a route, 404 for anything else.
fn options(path: &str) -> Response<Body> {
    match methods_of(path) {
        Some(methods) => {
            let mut response = Response::new(Body::default());
            *response.status_mut() = StatusCode::NO_CONTENT;
            response.headers_mut().insert(ALLOW, allow(methods));
            response
        }
        None => ApiError::NotFound("no such endpoint").into_response(),
    }
}

/// A `HEAD` answer: the `GET` answer's status and headers, its length, and
/// no body. hyper drops the body of a HEAD answer over HTTP/1.1 but sends
/// it over h2, where a HEAD answer must carry none.
fn without_body(response: Response<Body>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    if let Some(length) = body.size_hint().exact() {
        parts
            .headers
            .insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    Response::from_parts(parts, Body::default())
}

/// Every route (path without its trailing slash) and the methods it answers
/// (besides `HEAD` and `OPTIONS`, see [`allow`]): what 405s are made from,
/// and what the test of `docs/openapi.json` holds the document to.
pub const ROUTES: &[(&str, &str)] = &[
    ("/api/incoming-call", "POST"),
    ("/api/incoming-call/cancel", "POST"),
    ("/api/call-response", "POST"),
    ("/api/apns-device", "POST, DELETE"),
    ("/api/android-device", "POST, DELETE"),
    ("/api/gcm-device", "POST, DELETE"),
    ("/api/sip-registration", "POST, DELETE"),
    ("/api/check-in", "POST"),
    ("/api/hangup-reason", "POST"),
    ("/health", "GET"),
    ("/health/live", "GET"),
    ("/health/ready", "GET"),
    ("/metrics", "GET"),
    ("/openapi.json", "GET"),
];

/// The OpenAPI 3 document of this API, kept in the repository.
const OPENAPI: &str = include_str!("../../docs/openapi.json");

fn openapi() -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The platform of a device endpoint path.
fn device_platform(path: &str) -> Option<Platform> {
    let name = path.strip_prefix("/api/")?.strip_suffix("-device")?;
    Platform::parse(name)
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A plain-text response.
pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

pub use body::{Fields, MAX_BODY_BYTES};
use error::ApiError;

use crate::server::{phase_reached, AppState, Phase};
use crate::store::Platform;

/// The one response body type.
pub type Body = Full<Bytes>;

/// How long answering parked calls NAK may take once the server aborts.
const ABORT_GRACE: Duration = Duration::from_secs(5);

/// The longest any request but the PBX's may take, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The most a connection buffers while reading: also the largest request
/// head accepted (larger gets 431), as in nginx's default.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until the server leaves [`Phase::Serving`], then
/// stops accepting and waits for the open connections: parked calls keep
/// their full wait. At `--shutdown-timeout-secs` (or [`Phase::Aborting`])
/// the calls still parked are answered NAK, and the wait ends soon after.
pub async fn serve(listener: TcpListener, state: Arc<AppState>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // Heads and bodies here are small; hyper's smallest read buffer
        // keeps a parked call's connection near 15 KiB instead of 23.
        .max_buf_size(READ_BUFFER_BYTES);
    let graceful = GracefulShutdown::new();
    let mut phase = state.phase.subscribe();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, usually: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = phase_reached(&mut phase, |p| *p != Phase::Serving) => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |request| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(route(&state, peer, request).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    let timeout = Duration::from_secs(state.config.shutdown_timeout_secs);
    tokio::select! {
        _ = &mut drained => return,
        _ = tokio::time::sleep(timeout) => {
            tracing::warn!(parked_calls = state.parking.parked(), "shutdown timeout: answering parked calls NAK");
            state.phase.send_replace(Phase::Aborting);
        }
        _ = phase_reached(&mut phase, |p| *p == Phase::Aborting) => {}
    }
    // Every parked call answers NAK at once now; give the answers time to
    // be written, then let go of whatever still hangs.
    let _ = tokio::time::timeout(ABORT_GRACE, drained).await;
}

/// The readiness verdict, as `/health/ready` answers it.
pub async fn readiness(state: &AppState) -> Response<Body> {
    health::ready(state).await
}

/// The routes. Paths work with and without the trailing slash.
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
    // The PBX's request is bounded by its wait; every other one by this, so
    // a database or account API that hangs costs a client 503, not forever.
    let bounded = path != "/api/incoming-call";
    let handled = async {
        match (path.as_str(), &method) {
            ("/api/incoming-call", &Method::POST) => {
                calls::incoming_call(state, peer, request).await
            }
            ("/api/call-response", &Method::POST) => {
                calls::call_response(state, peer, request).await
            }
            ("/api/check-in", &Method::POST) => app_events::check_in(state, peer, request).await,
            ("/api/hangup-reason", &Method::POST) => {
                app_events::hangup_reason(state, peer, request).await
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
            (path, _) => Err(match ROUTES.iter().find(|(route, _)| *route == path) {
                Some((_, allow)) => ApiError::MethodNotAllowed(allow),
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
    result.unwrap_or_else(ApiError::into_response)
}

/// Every route (path without its trailing slash) and the methods it answers,
/// as an `Allow` header: what 405s are made from, and what the test of
/// `docs/openapi.json` holds the document to.
pub const ROUTES: &[(&str, &str)] = &[
    ("/api/incoming-call", "POST"),
    ("/api/call-response", "POST"),
    ("/api/apns-device", "POST, DELETE"),
    ("/api/android-device", "POST, DELETE"),
    ("/api/gcm-device", "POST, DELETE"),
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

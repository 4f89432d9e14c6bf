//! The HTTP edge: accept loop, routing, and one module per endpoint group.
//!
//! Handlers parse and validate, call into [`crate::calls`], the store or the
//! broker, and return `Result<Response, ApiError>`; [`error`] is the one
//! place errors become responses. No business logic lives here.

mod body;
mod calls;
mod devices;
pub mod error;
mod health;

use std::convert::Infallible;
use std::future::Future;
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

use crate::server::AppState;
use crate::store::Platform;

/// The one response body type.
pub type Body = Full<Bytes>;

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until `shutdown` resolves, then stops accepting and
/// waits for the open connections to finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
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
            _ = &mut shutdown => break,
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
    graceful.shutdown().await;
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
    let result = match (path.as_str(), &method) {
        ("/api/incoming-call", &Method::POST) => calls::incoming_call(state, peer, request).await,
        ("/api/call-response", &Method::POST) => calls::call_response(state, request).await,
        (device, method) if device_platform(device).is_some() => {
            let platform = device_platform(device).expect("matched above");
            match *method {
                Method::POST => devices::register(state, platform, request).await,
                Method::DELETE => devices::unregister(state, platform, request).await,
                _ => Err(ApiError::MethodNotAllowed("POST, DELETE")),
            }
        }
        ("/health" | "/health/ready", &Method::GET) => Ok(health::ready(state).await),
        ("/health/live", &Method::GET) => Ok(health::live()),
        ("/api/incoming-call" | "/api/call-response", _) => Err(ApiError::MethodNotAllowed("POST")),
        ("/health" | "/health/ready" | "/health/live", _) => Err(ApiError::MethodNotAllowed("GET")),
        _ => Err(ApiError::NotFound("no such endpoint")),
    };
    result.unwrap_or_else(ApiError::into_response)
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

//! `/health/live`: the process answers. `/health/ready` (and `/health`): the
//! store and the broker answer in time, so a load balancer may send calls.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use super::error::ApiError;
use super::{json, Body};
use crate::auth::{AuthError, ClientAddr};
use crate::shutdown::Phase;
use crate::state::AppState;

/// How long a dependency may take to answer a readiness check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// `/metrics`, to `--metrics-allow` networks only.
pub(super) fn metrics(state: &AppState, source: ClientAddr) -> Result<Response<Body>, ApiError> {
    if !source.within(&state.config.metrics_allow) {
        return Err(AuthError::Forbidden.into());
    }
    state
        .metrics
        .parked
        .set(i64::try_from(state.parking.parked()).unwrap_or(i64::MAX));
    let mut response = Response::new(Full::new(Bytes::from(state.metrics.render())));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}

pub(super) fn live() -> Response<Body> {
    json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

pub(super) async fn ready(state: &AppState) -> Response<Body> {
    let (store, broker) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, state.store.ping()),
        tokio::time::timeout(CHECK_TIMEOUT, state.broker.ping()),
    );
    // The verdicts are words: an error's text names hosts, users and
    // databases, and anyone may ask. It goes to the log.
    let verdict = |what: &str, result: Result<Result<(), String>, _>| match result {
        Ok(Ok(())) => "ok",
        Ok(Err(error)) => {
            if let Some(checks) = state.unready_log.due() {
                tracing::warn!(%error, checks, "readiness: the {what} failed");
            }
            "unavailable"
        }
        Err(_) => "timed out",
    };
    let store = verdict("store", store.map(|r| r.map_err(|e| e.to_string())));
    let broker = verdict("broker", broker.map(|r| r.map_err(|e| e.to_string())));
    let draining = *state.phase.borrow() != Phase::Serving;
    let healthy = store == "ok" && broker == "ok" && !draining;
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &serde_json::json!({
            "status": if draining { "draining" } else if healthy { "ok" } else { "unavailable" },
            "store": store,
            "broker": broker,
            "parked_calls": state.parking.parked(),
            "waiting_keys": state.broker.waiting(),
        }),
    )
}

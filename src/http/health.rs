//! `/health/live`: the process answers. `/health/ready` (and `/health`): the
//! store and the broker answer in time, so a load balancer may send calls.

use std::time::Duration;

use hyper::{Response, StatusCode};

use super::{json, Body};
use crate::server::AppState;

/// How long a dependency may take to answer a readiness check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) fn live() -> Response<Body> {
    json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

pub(super) async fn ready(state: &AppState) -> Response<Body> {
    let (store, broker) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, state.store.ping()),
        tokio::time::timeout(CHECK_TIMEOUT, state.broker.ping()),
    );
    let verdict = |result: Result<Result<(), String>, _>| match result {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => e,
        Err(_) => "timed out".to_owned(),
    };
    let store = verdict(store.map(|r| r.map_err(|e| e.to_string())));
    let broker = verdict(broker.map(|r| r.map_err(|e| e.to_string())));
    let healthy = store == "ok" && broker == "ok";
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &serde_json::json!({
            "status": if healthy { "ok" } else { "unavailable" },
            "store": store,
            "broker": broker,
            "parked_calls": state.parking.parked(),
            "waiting_keys": state.broker.waiting(),
        }),
    )
}

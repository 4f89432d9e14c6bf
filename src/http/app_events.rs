//! The app's side endpoints the service this replaces also had,
//! authenticated like the device endpoints: `/api/check-in/` (the app is
//! alive) and `/api/hangup-reason/` (why a call ended on the phone).

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::body::Source;
use super::devices::read_authorized;
use super::error::ApiError;
use super::{json, Body};
use crate::logs::Escaped;
use crate::state::AppState;
use crate::store::{now_millis, HangupReason};

const NO_DEVICE: ApiError = ApiError::NotFound("no device for this sip_user_id");

/// Updates the last-seen time of every device of the account: the check-in
/// names the account, not one of its devices.
pub(super) async fn check_in(
    state: &Arc<AppState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (_, fields) = read_authorized(state, peer, request, Source::Body).await?;
    let sip_user_id = fields.sip_user_id()?;
    if !state.store.touch_device(sip_user_id).await? {
        return Err(NO_DEVICE);
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "sip_user_id": sip_user_id.to_string() }),
    ))
}

/// Records and logs why a call ended on the phone.
pub(super) async fn hangup_reason(
    state: &Arc<AppState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (_, fields) = read_authorized(state, peer, request, Source::Body).await?;
    let hangup = HangupReason {
        sip_user_id: fields.sip_user_id()?,
        unique_key: fields.required_text("unique_key", crate::broker::PUSH_KEY_MAX)?,
        reason: fields.required_text("reason", 255)?,
        created_at: now_millis(),
    };
    if state.store.device(hangup.sip_user_id).await?.is_none() {
        return Err(NO_DEVICE);
    }
    tracing::info!(
        sip_user_id = hangup.sip_user_id,
        unique_key = %Escaped(&hangup.unique_key),
        reason = %Escaped(&hangup.reason),
        "the app reported why a call ended"
    );
    state.store.record_hangup(hangup.clone()).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "sip_user_id": hangup.sip_user_id.to_string(),
            "unique_key": hangup.unique_key,
            "reason": hangup.reason,
        }),
    ))
}

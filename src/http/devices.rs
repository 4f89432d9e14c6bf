//! `POST` / `DELETE /api/{apns,android,gcm}-device/`: the app registers the
//! push token that wakes it for its SIP account's calls.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};

use super::body::{self, Fields, Source};
use super::error::ApiError;
use super::{json, Body};
use crate::auth::AuthError;
use crate::metrics::{PlatformLabel, PushLabels, ResultLabel};
use crate::push::{Payload, PushTarget};
use crate::server::AppState;
use crate::store::{Device, NewDevice, Platform, Registration};

/// What the phone that lost its SIP account to another device is told.
const TAKEN_OVER: &str = "Another device has been registered for your account; this device will no longer receive calls.";

/// A push token: 1 to 250 characters, no whitespace.
fn token(fields: &Fields) -> Result<String, ApiError> {
    let token = fields.required_text("token", 250)?;
    if token.chars().any(char::is_whitespace) {
        return Err(ApiError::invalid("token", "must not contain whitespace"));
    }
    Ok(token)
}

/// Reads an app request and checks that its credentials own its
/// `sip_user_id`. Missing credentials are refused before the body is read.
pub(super) async fn read_authorized(
    state: &AppState,
    peer: SocketAddr,
    request: Request<Incoming>,
    source: Source,
) -> Result<(Parts, Fields), ApiError> {
    if state.access.requires_credentials() && !request.headers().contains_key(AUTHORIZATION) {
        return Err(AuthError::Missing.into());
    }
    let client = state.access.network.client_ip(peer.ip(), request.headers());
    let (parts, fields) = body::read(request, source).await?;
    let verdict = state
        .access
        .authorize_device(&parts.headers, fields.sip_user_id()?, client)
        .await;
    let result = match &verdict {
        Ok(how) => how,
        Err(e) => e.as_str(),
    };
    if result != "open" {
        state
            .metrics
            .auth_checks
            .get_or_create(&ResultLabel { result })
            .inc();
    }
    verdict?;
    Ok((parts, fields))
}

fn parse_device(platform: Platform, fields: &Fields) -> Result<NewDevice, ApiError> {
    Ok(NewDevice {
        sip_user_id: fields.sip_user_id()?,
        platform,
        token: token(fields)?,
        app_id: fields.required_text("app", 255)?,
        name: fields.optional_text("name", 255)?,
        os_version: fields.optional_text("os_version", 255)?,
        client_version: fields.optional_text("client_version", 255)?,
        remote_logging_id: fields.optional_text("remote_logging_id", 255)?,
        sandbox: fields.boolean("sandbox", false)?,
    })
}

pub(super) async fn register(
    state: &Arc<AppState>,
    peer: SocketAddr,
    platform: Platform,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (_, fields) = read_authorized(state, peer, request, Source::Body).await?;
    let device = parse_device(platform, &fields)?;
    if state.store.app(platform, &device.app_id).await?.is_none() {
        return Err(ApiError::NotFound("app unknown for this platform"));
    }
    let body = serde_json::json!({
        "sip_user_id": device.sip_user_id.to_string(),
        "platform": platform.as_str(),
        "token": device.token,
        "app": device.app_id,
        "name": device.name,
        "os_version": device.os_version,
        "client_version": device.client_version,
        "remote_logging_id": device.remote_logging_id,
        "sandbox": device.sandbox,
    });
    let token = device.token.clone();
    let (status, result) = match state.store.register_device(device).await? {
        Registration::Created => (StatusCode::CREATED, "created"),
        Registration::Updated { previous } => {
            if previous.token != token {
                notify_taken_over(state, previous);
            }
            (StatusCode::OK, "updated")
        }
    };
    let labels = PushLabels {
        platform: platform.as_str(),
        outcome: result,
    };
    state.metrics.registrations.get_or_create(&labels).inc();
    Ok(json(status, &body))
}

/// Tells the phone that lost its SIP account, without delaying the reply.
fn notify_taken_over(state: &Arc<AppState>, previous: Device) {
    let pusher = state.pusher.clone();
    tokio::spawn(async move {
        let target = PushTarget::from(previous);
        let outcome = pusher
            .send(
                &target,
                &Payload::Message {
                    message: TAKEN_OVER.to_owned(),
                },
            )
            .await;
        tracing::info!(
            sip_user_id = target.sip_user_id,
            ?outcome,
            "told the previous device it was replaced"
        );
    });
}

pub(super) async fn unregister(
    state: &Arc<AppState>,
    peer: SocketAddr,
    platform: Platform,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (_, fields) = read_authorized(state, peer, request, Source::QueryAndBody).await?;
    let sip_user_id = fields.sip_user_id()?;
    let token = token(&fields)?;
    let app_id = fields.required_text("app", 255)?;
    if state
        .store
        .delete_device(sip_user_id, platform, &token, &app_id)
        .await?
    {
        let labels = PlatformLabel {
            platform: platform.as_str(),
        };
        state.metrics.deletions.get_or_create(&labels).inc();
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "deleted": true }),
        ))
    } else {
        Err(ApiError::NotFound("no such device"))
    }
}

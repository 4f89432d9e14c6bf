//! `POST` / `DELETE /api/{apns,android,gcm}-device/`: the app registers the
//! push token that wakes it for its SIP account's calls.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};

use super::body::{self, Fields, Source};
use super::error::ApiError;
use super::{json, Body};
use crate::auth::{credentials, AuthError, Authorized};
use crate::logs::{is_invisible_format, redact};
use crate::push::{Payload, PushOutcome, PushTarget};
use crate::state::AppState;
use crate::store::{NewDevice, Platform, Registration, Removal, Remover};

/// What the phone that lost its SIP account to another device is told.
const TAKEN_OVER: &str = "Another device has been registered for your account; this device will no longer receive calls.";

/// A push token: text (not a JSON number) of 1 to 250 characters, no
/// whitespace, no control characters ([`Fields::text`] refuses those) and no invisible formatting characters:
/// a token is written to logs and handed to push services, and a U+202E in
/// one reversed the log lines it was written to. An APNs device token is
/// hex (Apple's are 32 bytes as 64 hex digits; no length is assumed), and
/// comes back in lower case ([`Platform::normal_token`]).
fn token(platform: Platform, fields: &Fields) -> Result<String, ApiError> {
    check_token(
        "token",
        platform,
        fields.required_string("token", TOKEN_MAX)?,
    )
}

/// The longest push token.
pub(super) const TOKEN_MAX: usize = 250;

/// Holds a token to the rules of [`token`], naming `field` when it breaks
/// one: the app sends its token as `token`, a SIP proxy inside `pn_prid`.
pub(super) fn check_token(
    field: &'static str,
    platform: Platform,
    token: String,
) -> Result<String, ApiError> {
    if token.is_empty() || token.chars().count() > TOKEN_MAX {
        return Err(ApiError::invalid(
            field,
            format!("a token must be 1 to {TOKEN_MAX} characters"),
        ));
    }
    if token.chars().any(char::is_whitespace) {
        return Err(ApiError::invalid(field, "must not contain whitespace"));
    }
    if token.chars().any(is_invisible_format) {
        return Err(ApiError::invalid(
            field,
            "must not contain invisible formatting characters (bidirectional marks, \
             embeddings, overrides and isolates, zero-width characters, line and \
             paragraph separators, tag characters)",
        ));
    }
    if platform.is_apns() && !token.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::invalid(
            field,
            "must be hexadecimal digits (0-9, a-f, A-F) for apns",
        ));
    }
    Ok(platform.normal_token(token))
}

/// Reads an app request and checks that its credentials own its
/// `sip_user_id`. Missing credentials are refused before the body is read.
pub(super) async fn read_authorized(
    state: &AppState,
    peer: SocketAddr,
    request: Request<Incoming>,
    source: Source,
) -> Result<(Parts, Fields), ApiError> {
    if state.access.requires_credentials() && credentials(request.headers()).is_none() {
        return Err(AuthError::Missing.into());
    }
    let client = state.access.network.client_ip(peer.ip(), request.headers());
    let (parts, fields) = body::read(request, source).await?;
    let verdict = state
        .access
        .authorize_device(&parts.headers, fields.sip_user_id()?, client)
        .await;
    match &verdict {
        Ok(Authorized::Open) => {}
        Ok(how) => state.metrics.auth_check(how.as_str()),
        Err(e) => state.metrics.auth_check(e.as_str()),
    }
    verdict?;
    Ok((parts, fields))
}

fn parse_device(platform: Platform, fields: &Fields) -> Result<NewDevice, ApiError> {
    Ok(NewDevice {
        sip_user_id: fields.sip_user_id()?,
        platform,
        token: token(platform, fields)?,
        app_id: fields.required_string("app", 255)?,
        name: fields.optional_text("name", 255)?,
        os_version: fields.optional_text("os_version", 255)?,
        client_version: fields.optional_text("client_version", 255)?,
        remote_logging_id: fields.optional_text("remote_logging_id", 255)?,
        sandbox: fields.boolean("sandbox", false)?,
        alert_token: alert_token(platform, fields)?,
        // The app's own registrations never expire.
        expires_at: None,
        proxy_expires_at: None,
    })
}

/// The optional `alert_token` of an iOS device: its regular APNs token, hex
/// like every APNs token. Other platforms have no such thing.
///
/// Absent or JSON null: none. Present, it must be a token: text (a token
/// sent as a JSON number has lost digits already) of 1 to 250 hex digits,
/// so an empty or blank one is refused rather than taken as absent, as the
/// document's pattern says.
fn alert_token(platform: Platform, fields: &Fields) -> Result<Option<String>, ApiError> {
    const FIELD: &str = "alert_token";
    if fields.text(FIELD, 250)?.is_none() {
        return Ok(None);
    }
    if !platform.is_apns() {
        return Err(ApiError::invalid(FIELD, "is for apns devices only"));
    }
    let token = fields.required_string(FIELD, 250)?;
    if !token.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::invalid(
            FIELD,
            "must be hex digits only (an APNs device token), without whitespace",
        ));
    }
    Ok(Some(platform.normal_token(token)))
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
    store_registration(state, device).await
}

/// Stores a registration (the app's, or a SIP proxy's) within the account's
/// `--max-devices-per-account`, tells the devices it displaced, and answers
/// 201 created / 200 updated with the registration as stored.
pub(super) async fn store_registration(
    state: &Arc<AppState>,
    device: NewDevice,
) -> Result<Response<Body>, ApiError> {
    let platform = device.platform;
    let body = serde_json::to_value(&device).expect("a registration serializes to JSON");
    let registration = state
        .store
        .register_device(device, state.config.max_devices_per_account)
        .await?;
    let (status, result, displaced) = match registration {
        Registration::Created { displaced } => (StatusCode::CREATED, "created", displaced),
        Registration::Updated { displaced, .. } => (StatusCode::OK, "updated", displaced),
    };
    for device in displaced {
        notify_taken_over(state, device.registration);
    }
    state.metrics.registration(platform, result);
    Ok(json(status, &body))
}

/// Tells a phone that lost its SIP account (replaced, or displaced by a
/// newer device at the account's limit), without delaying the reply.
///
/// An iOS phone only through its `alert_token`: iOS makes the app report
/// every VoIP push to CallKit as a call, and stops waking an app that does
/// not, so the pusher sends this notice as an alert push to that token,
/// never as a VoIP push; an `apns` device without one is not told. Each
/// token is told at most once a minute, each account sends a few a minute
/// ([`crate::push::notices`]), so an account re-registered in a loop does
/// not push the phones it replaced in a loop.
fn notify_taken_over(state: &Arc<AppState>, previous: NewDevice) {
    if previous.platform.is_apns() && previous.alert_token.is_none() {
        tracing::info!(
            sip_user_id = previous.sip_user_id,
            token = %redact(&previous.token),
            "the previous device is an iOS device without an alert token; it is not told it was replaced"
        );
        return;
    }
    if let Err(held_back) = state
        .takeover_notices
        .may_tell(previous.sip_user_id, &previous.token)
    {
        tracing::info!(
            sip_user_id = previous.sip_user_id,
            token = %redact(&previous.token),
            "the previous device is not told it was replaced: {held_back}"
        );
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        let target = PushTarget::from(previous);
        let notice = Payload::Message {
            message: TAKEN_OVER.to_owned(),
        };
        let sent_at = std::time::Instant::now();
        let outcome = state.pusher.send(&target, &notice).await;
        // Counted like every other push (`kind="message"`).
        state.metrics.push(
            target.platform,
            notice.kind(),
            &outcome,
            sent_at.elapsed().as_secs_f64(),
        );
        // Said as it went: a notice the push service refused was not sent.
        if matches!(outcome, PushOutcome::Delivered) {
            tracing::info!(
                sip_user_id = target.sip_user_id,
                "told the previous device it was replaced"
            );
        } else {
            tracing::warn!(
                sip_user_id = target.sip_user_id,
                ?outcome,
                "the notice that the previous device was replaced was not delivered"
            );
        }
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
    let token = token(platform, &fields)?;
    let app_id = fields.required_string("app", 255)?;
    delete_device(
        state,
        sip_user_id,
        platform,
        &token,
        &app_id,
        Remover::App,
        "deleted",
    )
    .await
}

/// Removes the one device named, as `by` may ([`Remover`]): 200 with
/// `{said: true}` (each API has its word), 404 when the account has no
/// such device.
pub(super) async fn delete_device(
    state: &AppState,
    sip_user_id: i64,
    platform: Platform,
    token: &str,
    app_id: &str,
    by: Remover,
    said: &'static str,
) -> Result<Response<Body>, ApiError> {
    match state
        .store
        .delete_device(sip_user_id, platform, token, app_id, by)
        .await?
    {
        Removal::Missing => return Err(ApiError::NotFound("no such device")),
        Removal::Deleted => state.metrics.deletion(platform),
        Removal::Unbound => {}
    }
    Ok(json(StatusCode::OK, &serde_json::json!({ said: true })))
}

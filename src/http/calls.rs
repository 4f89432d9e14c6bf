//! `/api/incoming-call/` and `/api/incoming-call/cancel/` (the PBX), and
//! `/api/call-response/` (the app).

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::body::{self, Fields, Source};
use super::error::ApiError;
use super::{json, text, Body};
use crate::auth::AuthError;
use crate::broker::{Named, PUSH_KEY_MAX};
use crate::calls::{self, CallResponse, IncomingCall, Outcome, Verdict};
use crate::state::AppState;

/// Callers whose number is withheld: they still ring, and are pushed as given.
const WITHHELD: [&str; 5] = [
    "anonymous",
    "unknown",
    "private",
    "restricted",
    "unavailable",
];

/// A phone number: digits once `+ ( ) - x` and spaces are removed, or a
/// withheld caller (empty or one of [`WITHHELD`], any case).
fn check_phonenumber(number: &str) -> Result<(), ApiError> {
    let trimmed = number.trim();
    if trimmed.is_empty() || WITHHELD.iter().any(|w| trimmed.eq_ignore_ascii_case(w)) {
        return Ok(());
    }
    let digits: Vec<char> = trimmed
        .chars()
        .filter(|c| !matches!(c, '+' | '(' | ')' | '-' | 'x' | ' '))
        .collect();
    if !digits.is_empty() && digits.iter().all(char::is_ascii_digit) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "phonenumber",
            "must be digits (with + ( ) - x and spaces allowed) or a withheld caller (anonymous, unknown, private, restricted, unavailable)",
        ))
    }
}

fn parse_incoming_call(fields: &Fields) -> Result<IncomingCall, ApiError> {
    let sip_user_id = fields.sip_user_id()?;
    let phonenumber = fields
        .text("phonenumber", 32)?
        .ok_or_else(|| ApiError::invalid("phonenumber", "is required"))?;
    check_phonenumber(&phonenumber)?;
    Ok(IncomingCall {
        sip_user_id,
        phonenumber,
        caller_id: fields.text("caller_id", 255)?.unwrap_or_default(),
        call_id: fields.call_id()?,
    })
}

/// Refuses a request from outside `--pbx-allow` (the voice platform: the
/// PBX, and the SIP proxy beside it) with 403. Checked before the body is
/// read: a stranger gets nothing but 403. `what` names the request in the
/// log line, said at most every 10 s with a count of the refusals.
pub(super) fn pbx_only(
    state: &AppState,
    peer: SocketAddr,
    request: &Request<Incoming>,
    what: &str,
) -> Result<(), ApiError> {
    let source = state.access.network.client_ip(peer.ip(), request.headers());
    if state.access.network.pbx_allowed(source) {
        return Ok(());
    }
    if let Some(refused) = state.access.pbx_refusals.due() {
        tracing::warn!(%source, refused, "{what} from outside --pbx-allow refused");
    }
    Err(AuthError::Forbidden.into())
}

/// The PBX parks here until the app answers or the wait runs out.
pub(super) async fn incoming_call(
    state: &Arc<AppState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    pbx_only(state, peer, &request, "incoming call")?;
    let (_, fields) = body::read(request, Source::Body).await?;
    let call = parse_incoming_call(&fields)?;
    Ok(match calls::ring(state, call).await {
        Outcome::Ack => text(StatusCode::OK, "status=ACK"),
        Outcome::Nak(_) => text(StatusCode::OK, "status=NAK"),
    })
}

/// The app, awake and SIP-registered, says whether it takes the call.
pub(super) async fn call_response(
    state: &Arc<AppState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let source = state.access.network.client_ip(peer.ip(), request.headers());
    // A source over the unknown-key limit is refused here, hit or miss,
    // before its body is read or the broker hears of its key: a guess that
    // hit would otherwise still act on the call, and tell the guesser so.
    state.access.probes.check(source)?;
    let (_, fields) = body::read(request, Source::Body).await?;
    // One 404 for unknown and too late: a prober learns nothing from it.
    let unknown = || match state.access.probes.miss(source) {
        Err(refused) => ApiError::from(refused),
        Ok(()) => ApiError::NotFound("not found"),
    };
    let unique_key = fields.required_text("unique_key", PUSH_KEY_MAX)?;
    let message_start_time = fields.unix_seconds("message_start_time")?;
    let response = CallResponse {
        unique_key,
        message_start_time,
        available: fields.boolean("available", true)?,
    };
    let unique_key = response.unique_key.clone();
    match calls::answer(state, response).await? {
        Verdict::Taken { .. } | Verdict::Repeat => Ok(text(StatusCode::ACCEPTED, "")),
        // Not a probe: the key was issued. The app stops ringing.
        Verdict::Gone(reason) => Ok(json(
            StatusCode::GONE,
            &serde_json::json!({ "unique_key": unique_key, "reason": reason.as_str() }),
        )),
        Verdict::Unknown => Err(unknown()),
    }
}

/// The PBX gives up on a call it parked (its caller hung up) while it keeps
/// the request open, or from another instance than the one it parked on.
pub(super) async fn cancel_call(
    state: &Arc<AppState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    pbx_only(state, peer, &request, "call cancel")?;
    let (_, fields) = body::read(request, Source::Body).await?;
    let (key, by) = match fields.call_id()? {
        Some(call_id) => (call_id, Named::CallId),
        None => fields
            .optional_text("unique_key", PUSH_KEY_MAX)?
            .map(|key| (key, Named::UniqueKey))
            .ok_or_else(|| ApiError::invalid("call_id", "call_id or unique_key is required"))?,
    };
    let account = fields.optional_sip_user_id()?;
    if calls::cancel(state, &key, account, by).await? {
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "cancelled": true }),
        ))
    } else {
        Err(ApiError::NotFound("no call is ringing under this key"))
    }
}

#[cfg(test)]
mod tests {
    use super::check_phonenumber;

    #[test]
    fn phone_numbers() {
        for ok in [
            "+31 (0)50-123 4567",
            "0612345678",
            "",
            "Anonymous",
            "UNKNOWN",
            "private",
            "123x45",
        ] {
            assert!(check_phonenumber(ok).is_ok(), "{ok}");
        }
        for bad in ["+", "abc", "12a", "()"] {
            assert!(check_phonenumber(bad).is_err(), "{bad}");
        }
    }
}

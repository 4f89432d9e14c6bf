//! `POST` / `DELETE /api/{apns,android,gcm}-device/`: the app registers the
//! push token that wakes it for its SIP account's calls.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};

use super::body::{self, Fields, Source};
use super::error::ApiError;
use super::{json, Body};
use crate::auth::AuthError;
use crate::metrics::{PlatformLabel, PushLabels, ResultLabel};
use crate::push::{redact, Payload, PushTarget};
use crate::server::AppState;
use crate::store::{Device, NewDevice, Platform, Registration};

/// What the phone that lost its SIP account to another device is told.
const TAKEN_OVER: &str = "Another device has been registered for your account; this device will no longer receive calls.";

/// A push token: 1 to 250 characters, no whitespace, no control characters
/// ([`Fields::text`] refuses those) and no invisible formatting characters:
/// a token is written to logs and handed to push services, and a U+202E in
/// one reversed the log lines it was written to. An APNs device token is
/// hex (Apple's are 32 bytes as 64 hex digits; no length is assumed).
fn token(platform: Platform, fields: &Fields) -> Result<String, ApiError> {
    let token = fields.required_text("token", 250)?;
    if token.chars().any(char::is_whitespace) {
        return Err(ApiError::invalid("token", "must not contain whitespace"));
    }
    if token.chars().any(is_invisible_format) {
        return Err(ApiError::invalid(
            "token",
            "must not contain invisible formatting characters (bidirectional marks, \
             embeddings, overrides and isolates, zero-width characters)",
        ));
    }
    if platform.is_apns() && !token.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::invalid(
            "token",
            "must be hexadecimal digits (0-9, a-f, A-F) for apns",
        ));
    }
    Ok(token)
}

/// Unicode format characters that change how the text around them is shown
/// without showing themselves: the soft hyphen, the bidirectional marks
/// (U+061C, U+200E, U+200F), embeddings and overrides (U+202A to U+202E)
/// and isolates (U+2066 to U+2069), and the zero-width and other invisible
/// ones (U+180E, U+200B to U+200D, U+2060 to U+206F, U+FEFF, U+FFF9 to
/// U+FFFB).
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

/// Reads an app request and checks that its credentials own its
/// `sip_user_id`. Missing credentials are refused before the body is read.
pub(super) async fn read_authorized(
    state: &AppState,
    request: Request<Incoming>,
    source: Source,
) -> Result<(Parts, Fields), ApiError> {
    if state.access.requires_credentials() && !request.headers().contains_key(AUTHORIZATION) {
        return Err(AuthError::Missing.into());
    }
    let (parts, fields) = body::read(request, source).await?;
    let verdict = state
        .access
        .authorize_device(&parts.headers, fields.sip_user_id()?)
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
        token: token(platform, fields)?,
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
    platform: Platform,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (_, fields) = read_authorized(state, request, Source::Body).await?;
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
///
/// Not an iOS phone: iOS makes the app report every VoIP push to CallKit as
/// a call, and stops waking an app that does not, so a takeover notice must
/// not be a VoIP push. It would be an alert push to the app's regular token,
/// which devices do not register yet; until they do, an `apns` device is not
/// told. Each token is told at most once per [`NOTICE_INTERVAL`], so an
/// account re-registered in a loop does not push the phone it replaced in a
/// loop.
fn notify_taken_over(state: &Arc<AppState>, previous: Device) {
    if previous.platform.is_apns() {
        tracing::info!(
            sip_user_id = previous.sip_user_id,
            token = ?redact(&previous.token),
            "the previous device is an iOS device without an alert token; it is not told it was replaced"
        );
        return;
    }
    if !RECENT_NOTICES
        .lock()
        .expect("the notice lock is never poisoned")
        .first_within_interval(&previous.token, Instant::now())
    {
        tracing::info!(
            sip_user_id = previous.sip_user_id,
            token = ?redact(&previous.token),
            "the previous device was told it was replaced within the minute; not telling it again"
        );
        return;
    }
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
    platform: Platform,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (_, fields) = read_authorized(state, request, Source::QueryAndBody).await?;
    let sip_user_id = fields.sip_user_id()?;
    let token = token(platform, &fields)?;
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

/// How often one token may be told that another device took over.
const NOTICE_INTERVAL: Duration = Duration::from_secs(60);

/// The most tokens [`RecentNotices`] remembers: 10,000 takeovers a minute is
/// far beyond any real traffic, and about 400 KiB.
const MAX_RECENT_NOTICES: usize = 10_000;

/// The tokens told within the last [`NOTICE_INTERVAL`] that they were
/// replaced. One per process: a process is one server outside the tests.
static RECENT_NOTICES: LazyLock<Mutex<RecentNotices>> =
    LazyLock::new(|| Mutex::new(RecentNotices::new(MAX_RECENT_NOTICES)));

/// Recently told tokens, oldest first, as hashes (keyed per process, so
/// nobody can pick tokens that collide; a collision would only hold back a
/// notice). Bounded: when it holds `capacity` tokens all told within the
/// interval, further notices are held back rather than an entry forgotten,
/// so a flood of takeovers cannot buy a second notice for a token.
struct RecentNotices {
    hasher: RandomState,
    capacity: usize,
    order: VecDeque<(Instant, u64)>,
    told: HashSet<u64>,
}

impl RecentNotices {
    fn new(capacity: usize) -> Self {
        RecentNotices {
            hasher: RandomState::new(),
            capacity,
            order: VecDeque::new(),
            told: HashSet::new(),
        }
    }

    /// Whether `token` may be told now, noting it if so.
    fn first_within_interval(&mut self, token: &str, now: Instant) -> bool {
        while let Some(&(at, hash)) = self.order.front() {
            if now.saturating_duration_since(at) < NOTICE_INTERVAL {
                break;
            }
            self.order.pop_front();
            self.told.remove(&hash);
        }
        let hash = self.hasher.hash_one(token);
        if self.told.contains(&hash) || self.order.len() >= self.capacity {
            return false;
        }
        self.order.push_back((now, hash));
        self.told.insert(hash);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_told_once_per_interval() {
        let mut recent = RecentNotices::new(100);
        let start = Instant::now();
        assert!(recent.first_within_interval("a", start));
        assert!(!recent.first_within_interval("a", start));
        assert!(recent.first_within_interval("b", start));
        let later = start + NOTICE_INTERVAL - Duration::from_millis(1);
        assert!(!recent.first_within_interval("a", later));
        assert!(recent.first_within_interval("a", start + NOTICE_INTERVAL));
        assert!(!recent.first_within_interval("a", start + NOTICE_INTERVAL));
    }

    #[test]
    fn a_full_table_holds_notices_back_and_frees_up_as_entries_age() {
        let mut recent = RecentNotices::new(3);
        let start = Instant::now();
        for token in ["a", "b", "c"] {
            assert!(recent.first_within_interval(token, start));
        }
        // Full: nobody new is told, and nobody told is forgotten.
        assert!(!recent.first_within_interval("d", start));
        assert!(!recent.first_within_interval("a", start));
        assert_eq!(recent.order.len(), 3);
        // Once the oldest have aged out there is room again.
        let later = start + NOTICE_INTERVAL;
        assert!(recent.first_within_interval("d", later));
        assert_eq!((recent.order.len(), recent.told.len()), (1, 1));
    }

    #[test]
    fn invisible_formatting_characters_are_recognised() {
        for c in [
            '\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}', '\u{200E}', '\u{200F}', '\u{061C}',
            '\u{200B}', '\u{FEFF}',
        ] {
            assert!(is_invisible_format(c), "{c:?}");
        }
        for c in ['a', '0', '-', ':', '_', 'é', '\u{05D0}'] {
            assert!(!is_invisible_format(c), "{c:?}");
        }
    }
}

//! `POST` / `DELETE /api/sip-registration/`: a SIP proxy (Kamailio,
//! OpenSIPS, FreeSWITCH) hands over the push parameters of a REGISTER's
//! Contact (RFC 8599: `pn-provider`, `pn-prid`, `pn-param`) and its expiry.
//!
//! The proxy belongs to the voice platform, like the PBX: `--pbx-allow`
//! networks only, no Basic auth. A device stored here expires with its SIP
//! registration (plus [`GRACE_MS`]), and its REGISTER answers a call ringing for
//! it ([`calls::registered`]).

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response};

use super::body::{self, Fields, Source};
use super::calls::pbx_only;
use super::devices::{check_token, delete_device, store_registration, TOKEN_MAX};
use super::error::ApiError;
use super::Body;
use crate::calls::{self, Verdict};
use crate::logs::redact;
use crate::push::fcm;
use crate::state::AppState;
use crate::store::{now_millis, Credentials, NewDevice, Platform, Remover};

/// How long a proxy-registered device outlives its SIP registration, in ms.
///
/// Phones refresh a registration close to its expiry, over a mobile network
/// where the refresh can take seconds, and the proxy posts it only after its
/// registrar has saved it: without a grace the device would blink out of
/// the store for that gap, and a call arriving then would get NAK. A
/// registration the phone let lapse (asleep: the very case pushes exist
/// for) stays pushable this long after, and no longer, so a phone that left
/// for good is not pushed for its hour-long registration and more.
pub const GRACE_MS: i64 = 30_000;

/// The longest `expires` taken: RFC 3261's limit on an Expires value.
const EXPIRES_MAX: i64 = u32::MAX as i64;

/// The longest `pn_prid`: two tokens and their `:remote&` / `:voip`.
const PRID_MAX: usize = 2 * TOKEN_MAX + 16;

/// The longest `pn_param`: a team id, a bundle id and the services.
const PARAM_MAX: usize = 255;

/// The push service a REGISTER names (`pn_provider`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provider {
    /// APNs; `sandbox` for `apns.dev` (the development environment, the
    /// name Linphone and Flexisip use).
    Apns {
        sandbox: bool,
    },
    Fcm,
}

impl Provider {
    fn parse(fields: &Fields) -> Result<Provider, ApiError> {
        const FIELD: &str = "pn_provider";
        match fields.required_string(FIELD, 32)?.as_str() {
            "apns" => Ok(Provider::Apns { sandbox: false }),
            "apns.dev" => Ok(Provider::Apns { sandbox: true }),
            "fcm" => Ok(Provider::Fcm),
            _ => Err(ApiError::Unknown {
                field: FIELD,
                rule: "names no push service served here (apns, apns.dev, fcm)".into(),
            }),
        }
    }

    fn platform(self) -> Platform {
        match self {
            Provider::Apns { .. } => Platform::Apns,
            Provider::Fcm => Platform::Android,
        }
    }
}

/// A device as the proxy names it: the account, the app, the tokens.
struct ProxyDevice {
    sip_user_id: i64,
    provider: Provider,
    app_id: String,
    /// The VoIP token (APNs), or the FCM token: what a call rings.
    token: String,
    /// APNs: the regular token of the dual form, for alerts.
    alert_token: Option<String>,
}

/// Parses the fields both methods share and finds the app. Every field is
/// checked (400) before the app is looked up (404), so bad input never
/// reads as an unsupported service.
async fn parse(state: &AppState, fields: &Fields) -> Result<ProxyDevice, ApiError> {
    let sip_user_id = fields.sip_user_id()?;
    let provider = Provider::parse(fields)?;
    let prid = fields.required_string("pn_prid", PRID_MAX)?;
    let param = fields.required_string("pn_param", PARAM_MAX)?;
    let (token, alert_token) = match provider {
        Provider::Apns { .. } => apns_tokens(prid)?,
        // An FCM token holds a `:` itself: it is taken whole.
        Provider::Fcm => (check_token("pn_prid", Platform::Android, prid)?, None),
    };
    let app_id = match provider {
        Provider::Apns { .. } => {
            let bundle = apns_bundle(&param)?;
            match state.store.app(Platform::Apns, bundle).await? {
                Some(_) => bundle.to_owned(),
                None => return Err(no_app("no apns app has this bundle id")),
            }
        }
        Provider::Fcm => fcm_app(state, &param).await?,
    };
    Ok(ProxyDevice {
        sip_user_id,
        provider,
        app_id,
        token,
        alert_token,
    })
}

fn no_app(rule: &str) -> ApiError {
    ApiError::Unknown {
        field: "pn_param",
        rule: rule.into(),
    }
}

/// An APNs `pn_prid`: one VoIP token, or the dual form
/// `<token>:remote&<token>:voip` (either order), whose `remote` token is the
/// device's alert token. A plain token is taken as the VoIP token
/// (`pn_param` says `voip`). APNs tokens are hex, so `:` and `&` cannot be
/// part of one.
fn apns_tokens(prid: String) -> Result<(String, Option<String>), ApiError> {
    const FIELD: &str = "pn_prid";
    if !prid.contains([':', '&']) {
        return Ok((check_token(FIELD, Platform::Apns, prid)?, None));
    }
    let (mut voip, mut remote) = (None, None);
    for part in prid.split('&') {
        let slot = match part.rsplit_once(':') {
            Some((token, "voip")) => (&mut voip, token),
            Some((token, "remote")) => (&mut remote, token),
            _ => {
                return Err(ApiError::invalid(
                    FIELD,
                    "must be a token, or tokens each followed by :voip or :remote, joined by &",
                ))
            }
        };
        if slot.0.is_some() {
            return Err(ApiError::invalid(
                FIELD,
                "names a :voip or :remote token twice",
            ));
        }
        *slot.0 = Some(check_token(FIELD, Platform::Apns, slot.1.to_owned())?);
    }
    let voip = voip.ok_or_else(|| {
        ApiError::invalid(
            FIELD,
            "has no :voip token: a call can only ring a VoIP token",
        )
    })?;
    Ok((voip, remote))
}

/// The bundle id (the app id) of an APNs `pn_param`:
/// `<team id>.<bundle id>.<services>`, where the services are `voip`,
/// `remote&voip` or `voip&remote`. Without `voip` a call cannot ring the
/// device: 400.
fn apns_bundle(param: &str) -> Result<&str, ApiError> {
    const FIELD: &str = "pn_param";
    let shape = || {
        ApiError::invalid(
            FIELD,
            "must be <team id>.<bundle id>.voip (or .remote&voip) for apns",
        )
    };
    let (team, rest) = param.split_once('.').ok_or_else(shape)?;
    let (bundle, services) = rest.rsplit_once('.').ok_or_else(shape)?;
    let services: Vec<&str> = services.split('&').collect();
    if team.is_empty()
        || !team.chars().all(|c| c.is_ascii_alphanumeric())
        || bundle.is_empty()
        || !bundle
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
        || !services.iter().all(|s| ["voip", "remote"].contains(s))
    {
        return Err(shape());
    }
    if !services.contains(&"voip") {
        return Err(ApiError::invalid(
            FIELD,
            "has no voip service: a call can only ring a VoIP push (add .voip)",
        ));
    }
    Ok(bundle)
}

/// The `android` app whose FCM service account belongs to the Firebase
/// project `project`. Where several do, they share the project's
/// credentials and any can carry the push: the first by app id.
async fn fcm_app(state: &AppState, project: &str) -> Result<String, ApiError> {
    if !project
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(ApiError::invalid(
            "pn_param",
            "must be a Firebase project id (letters, digits, - _ . :) for fcm",
        ));
    }
    // `apps()` is ordered by platform and app id: the first match wins.
    for app in state.store.apps().await? {
        let Some(Credentials::Fcm {
            service_account_path,
        }) = app
            .credentials
            .filter(|_| app.platform == Platform::Android)
        else {
            continue;
        };
        match fcm::project_id(&service_account_path).await {
            Ok(id) if id == project => return Ok(app.app_id),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(app = %app.app_id, error = %e, "cannot read the project of an android app")
            }
        }
    }
    Err(no_app(
        "no android app's service account belongs to this Firebase project",
    ))
}

/// `POST`: a REGISTER's push parameters. 201 created, 200 refreshed (the
/// registration's JSON, as the app API answers); `expires` 0 removes the
/// device, as `DELETE` does.
pub(super) async fn register(
    state: &Arc<AppState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    pbx_only(state, peer, &request, "SIP registration")?;
    let (_, fields) = body::read(request, Source::Body).await?;
    let expires = fields.integer(
        "expires",
        0..=EXPIRES_MAX,
        "must be whole seconds from 0 to 4294967295 (0 removes the device)",
    )?;
    let user_agent = fields.optional_text("user_agent", 255)?;
    let device = parse(state, &fields).await?;
    if expires == 0 {
        return remove(state, device).await;
    }
    let (sip_user_id, token) = (device.sip_user_id, device.token.clone());
    let until = now_millis() + expires * 1000 + GRACE_MS;
    let stored = NewDevice {
        sip_user_id,
        platform: device.provider.platform(),
        token: device.token,
        app_id: device.app_id,
        name: None,
        os_version: None,
        // The User-Agent names the SIP client and its version.
        client_version: user_agent,
        remote_logging_id: None,
        sandbox: device.provider == Provider::Apns { sandbox: true },
        alert_token: device.alert_token,
        expires_at: Some(until),
        proxy_expires_at: Some(until),
    };
    // The REGISTER answers the call ringing for its device (if one is)
    // while it is stored, not after: the phone is awake and the proxy has
    // saved its contact whatever the database says, and the PBX hears ACK a
    // database write sooner. The proxy's answer does not depend on the
    // call: a failure there leaves the app's call-response to answer it.
    let (response, answered) = tokio::join!(
        store_registration(state, stored),
        calls::registered(state, sip_user_id, &token)
    );
    match answered {
        Ok(Some(Verdict::Taken { .. } | Verdict::Repeat)) => tracing::info!(
            sip_user_id,
            token = %redact(&token),
            "a REGISTER answered the call ringing for its device"
        ),
        // Why a REGISTER answered nothing, for whoever reads a call's
        // logs: most REGISTERs are refreshes with no call (debug); one that
        // finds its call over came too late for it (or, with Redis
        // failing, found what a failover left).
        Ok(Some(Verdict::Gone(reason))) => tracing::info!(
            sip_user_id,
            token = %redact(&token),
            reason = reason.as_str(),
            "a REGISTER came after the call ringing for its device was over"
        ),
        Ok(None | Some(Verdict::Unknown)) => tracing::debug!(
            sip_user_id,
            token = %redact(&token),
            "a REGISTER found no call ringing for its device"
        ),
        Err(e) => tracing::warn!(sip_user_id, error = %e, "cannot answer a call with a REGISTER"),
    }
    response
}

/// `DELETE`: the proxy removed the registration. Fields in the query
/// string, the body, or both.
pub(super) async fn unregister(
    state: &Arc<AppState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    pbx_only(state, peer, &request, "SIP deregistration")?;
    let (_, fields) = body::read(request, Source::QueryAndBody).await?;
    let device = parse(state, &fields).await?;
    remove(state, device).await
}

/// Removes the proxy's registration at once: the device, when the proxy
/// registered it; when its app did, only the binding (the app's device
/// stays, and its calls are pushed as before: an explicit de-REGISTER is
/// the binding lapsing early). 200 `{"removed": true}`, or 404 when the
/// account has no such device (a de-REGISTER of a registration already
/// gone: the proxy ignores it).
async fn remove(state: &AppState, device: ProxyDevice) -> Result<Response<Body>, ApiError> {
    delete_device(
        state,
        device.sip_user_id,
        device.provider.platform(),
        &device.token,
        &device.app_id,
        Remover::Proxy,
        "removed",
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::{apns_bundle, apns_tokens};

    #[test]
    fn apns_pn_param_forms() {
        assert_eq!(
            apns_bundle("ABCD123456.com.example.app.voip").ok(),
            Some("com.example.app")
        );
        assert_eq!(
            apns_bundle("ABCD123456.org.linphone.phone.remote&voip").ok(),
            Some("org.linphone.phone")
        );
        assert_eq!(apns_bundle("ABCD123456.app.voip&remote").ok(), Some("app"));
        for bad in [
            "ABCD.app.remote",
            "app.voip",
            ".app.voip",
            "T.app.",
            "T..voip",
            "T.a b.voip",
        ] {
            assert!(apns_bundle(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn apns_pn_prid_forms() {
        assert_eq!(apns_tokens("ab12".into()).ok(), Some(("ab12".into(), None)));
        assert_eq!(
            apns_tokens("ab12:voip".into()).ok(),
            Some(("ab12".into(), None))
        );
        assert_eq!(
            apns_tokens("cd34:remote&ab12:voip".into()).ok(),
            Some(("ab12".into(), Some("cd34".into())))
        );
        for bad in [
            "cd34:remote",
            "a:voip&b:voip",
            "ab:fax",
            "zz:voip",
            ":voip",
            "a&b",
        ] {
            assert!(apns_tokens(bad.into()).is_err(), "{bad}");
        }
    }
}

//! Who may do what: the device endpoints answer only to the owner of the SIP
//! account (HTTP Basic, checked by the operator's account API) and slow down
//! whoever keeps failing, the PBX endpoint only to PBX networks, and
//! call-response (unauthenticated, for speed) refuses whoever keeps
//! probing unknown keys. [`Windows`], the counting behind every limit, also
//! serves the push side's limit on takeover notices.
//!
//! This module decides; it does not build responses. [`AuthError`] becomes
//! 401/403/429/503 in `http::error`, like every other error.

mod account_api;
mod logins;
mod network;
mod windows;

use std::time::Duration;

use hyper::HeaderMap;

pub use account_api::AccountApi;
pub use logins::LoginLimiter;
pub use network::{ClientAddr, Network, ProbeLimiter};
pub(crate) use windows::Windows;

use crate::config::Config;
use crate::logs::Every;

/// Why a request may not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials were sent.
    #[error("authentication required")]
    Missing,
    /// The account API does not know these credentials.
    #[error("invalid credentials")]
    Rejected,
    /// The credentials are valid but do not own the SIP account, or the
    /// source address may not use this endpoint.
    #[error("forbidden")]
    Forbidden,
    /// The account API did not answer in time, or answered something else.
    #[error("account API unavailable: {0}")]
    Unavailable(String),
    /// The source (or the account) is over a limit; `rule` names it to the
    /// client, who may try again after `retry_after`.
    #[error("too many requests: {rule}")]
    Throttled {
        rule: &'static str,
        retry_after: Duration,
    },
}

/// How a device request was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authorized {
    /// No account API is configured: device requests are not authenticated.
    Open,
    /// The account API confirmed these credentials for this account lately.
    Cached,
    /// The account API confirmed them just now.
    Confirmed,
}

impl Authorized {
    /// The label of this verdict in the `auth_checks` metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Authorized::Open => "open",
            Authorized::Cached => "cached",
            Authorized::Confirmed => "ok",
        }
    }
}

/// The access rules of one server.
pub struct Access {
    /// `None`: device requests are not authenticated (development on
    /// loopback, or `--insecure-no-auth`).
    accounts: Option<AccountApi>,
    pub network: Network,
    pub probes: ProbeLimiter,
    pub logins: LoginLimiter,
    /// Requests from outside `--pbx-allow`, for the log: anyone may send
    /// them at any rate.
    pub pbx_refusals: Every,
}

impl AuthError {
    /// The label of this verdict in the `auth_checks` metric.
    pub fn as_str(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Rejected => "rejected",
            AuthError::Forbidden => "forbidden",
            AuthError::Unavailable(_) => "unavailable",
            AuthError::Throttled { .. } => "throttled",
        }
    }
}

impl Access {
    /// Builds the rules from the flags, refusing an unauthenticated server
    /// on a non-loopback address unless told to accept the risk.
    pub fn from_config(config: &Config) -> anyhow::Result<Access> {
        let accounts = match &config.auth_url {
            Some(url) => Some(AccountApi::new(
                url.clone(),
                Duration::from_millis(config.auth_timeout_ms),
                Duration::from_secs(config.auth_cache_secs),
            )?),
            None if config.listen.ip().is_loopback() => None,
            None if config.insecure_no_auth => {
                tracing::warn!(
                    listen = %config.listen,
                    "--insecure-no-auth: anyone who reaches this address can register a phone for any SIP account"
                );
                None
            }
            None => anyhow::bail!(
                "refusing to serve device registrations without authentication on {}: set --auth-url to the \
                 operator's account API, or pass --insecure-no-auth to accept the risk",
                config.listen
            ),
        };
        Ok(Access {
            accounts,
            network: Network::new(config.pbx_allow.clone(), config.trusted_proxy.clone()),
            probes: ProbeLimiter::default(),
            logins: LoginLimiter::default(),
            pbx_refusals: Every::seldom(),
        })
    }

    /// Whether the `Authorization` header of a device request from `client`
    /// owns `sip_user_id`, and how it knows ([`Authorized`]). A source or account over its limit
    /// of failed logins is refused before the account API is asked (or the
    /// cache looked at, which would tell a guesser a right password).
    pub async fn authorize_device(
        &self,
        headers: &HeaderMap,
        sip_user_id: i64,
        client: ClientAddr,
    ) -> Result<Authorized, AuthError> {
        let Some(accounts) = &self.accounts else {
            return Ok(Authorized::Open);
        };
        let header = credentials(headers).ok_or(AuthError::Missing)?;
        self.logins.attempt(client, sip_user_id)?;
        let verdict = accounts.authorize(header, sip_user_id, client).await;
        match &verdict {
            Ok(_) => self.logins.succeeded(client, sip_user_id),
            Err(AuthError::Rejected | AuthError::Forbidden) => {
                self.logins.failed(client, sip_user_id)
            }
            Err(_) => self.logins.undecided(client, sip_user_id),
        }
        verdict
    }

    /// Whether device requests need credentials at all: they do whenever an
    /// account API is configured. Lets handlers refuse early, before parsing.
    pub fn requires_credentials(&self) -> bool {
        self.accounts.is_some()
    }
}

/// A request's credentials: its `Authorization` header, unless it has
/// none or an empty one (which the account API is not asked about, nor
/// counted as a failed login).
pub fn credentials(headers: &HeaderMap) -> Option<&hyper::header::HeaderValue> {
    headers
        .get(hyper::header::AUTHORIZATION)
        .filter(|value| !value.as_bytes().iter().all(u8::is_ascii_whitespace))
}

//! The operator's account API: "do these HTTP Basic credentials own this
//! SIP account?", asked over HTTP and remembered for a while.
//!
//! The contract (README, "Authentication"): `GET <auth-url>` with the
//! caller's `Authorization` header forwarded, the SIP account in the URL,
//! and the client's address as `X-Forwarded-For` (when known), so the
//! account API can tell our clients apart. 200 means yes; 401 and 403 pass through; anything else, or no answer
//! within the timeout, is an outage (503).
//!
//! Confirmed pairs are cached under a SHA-256 of header and id, never the
//! header itself, so a registration storm after a PBX restart does not
//! become an account-API storm, and a memory dump shows no passwords.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::{Request, StatusCode};

use super::{AuthError, Authorized, ClientAddr};
use crate::outbound::{self, HttpClient};

/// Most cached pairs; beyond it expired ones are dropped, then all.
const CACHE_CAP: usize = 100_000;

type CacheKey = [u8; 32];

pub struct AccountApi {
    /// The URL, with `{sip_user_id}` where the id goes (or none: query string).
    url: String,
    timeout: Duration,
    ttl: Duration,
    client: HttpClient,
    /// Confirmed pairs and when they stop being trusted.
    confirmed: Mutex<HashMap<CacheKey, Instant>>,
}

impl AccountApi {
    pub fn new(url: String, timeout: Duration, ttl: Duration) -> anyhow::Result<AccountApi> {
        let probe = url.replace("{sip_user_id}", "1");
        let uri: hyper::Uri = probe
            .parse()
            .map_err(|e| anyhow::anyhow!("--auth-url {url:?} is not a URL: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            anyhow::bail!("--auth-url {url:?} must be an http:// or https:// URL");
        }
        Ok(AccountApi {
            url,
            timeout,
            ttl,
            client: outbound::client(),
            confirmed: Mutex::new(HashMap::new()),
        })
    }

    fn url_for(&self, sip_user_id: i64) -> String {
        if self.url.contains("{sip_user_id}") {
            self.url.replace("{sip_user_id}", &sip_user_id.to_string())
        } else {
            let separator = if self.url.contains('?') { '&' } else { '?' };
            format!("{}{separator}sip_user_id={sip_user_id}", self.url)
        }
    }

    fn cache_key(header: &HeaderValue, sip_user_id: i64) -> CacheKey {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(header.as_bytes());
        context.update(b"\0");
        context.update(sip_user_id.to_string().as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(context.finish().as_ref());
        key
    }

    /// Says whether `header` owns `sip_user_id`, and whether the cache knew. `client` is who asks, for the account API.
    pub async fn authorize(
        &self,
        header: &HeaderValue,
        sip_user_id: i64,
        client: ClientAddr,
    ) -> Result<Authorized, AuthError> {
        let key = Self::cache_key(header, sip_user_id);
        let now = Instant::now();
        if self
            .confirmed
            .lock()
            .expect("auth cache lock")
            .get(&key)
            .is_some_and(|until| *until > now)
        {
            return Ok(Authorized::Cached);
        }
        self.ask(header, sip_user_id, client).await?;
        if !self.ttl.is_zero() {
            let mut confirmed = self.confirmed.lock().expect("auth cache lock");
            if confirmed.len() >= CACHE_CAP {
                confirmed.retain(|_, until| *until > now);
                if confirmed.len() >= CACHE_CAP {
                    confirmed.clear();
                }
            }
            confirmed.insert(key, now + self.ttl);
        }
        Ok(Authorized::Confirmed)
    }

    async fn ask(
        &self,
        header: &HeaderValue,
        sip_user_id: i64,
        client: ClientAddr,
    ) -> Result<(), AuthError> {
        let mut request = Request::get(self.url_for(sip_user_id))
            .header(AUTHORIZATION, header.clone())
            .header(hyper::header::ACCEPT, "application/json");
        if let Some(ip) = client.ip() {
            request = request.header("x-forwarded-for", ip.to_string());
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| AuthError::Unavailable(format!("cannot build the request: {e}")))?;
        let status = match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => return Err(AuthError::Unavailable("no answer in time".into())),
            Ok(Err(e)) => return Err(AuthError::Unavailable(e.to_string())),
            Ok(Ok(response)) => response.status(),
        };
        tracing::debug!(sip_user_id, %status, "account API answered");
        match status {
            StatusCode::OK => Ok(()),
            StatusCode::UNAUTHORIZED => Err(AuthError::Rejected),
            StatusCode::FORBIDDEN => Err(AuthError::Forbidden),
            other => Err(AuthError::Unavailable(format!(
                "account API answered {other}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(url: &str) -> AccountApi {
        AccountApi::new(url.into(), Duration::from_secs(1), Duration::from_secs(60)).unwrap()
    }

    #[tokio::test]
    async fn the_id_goes_where_the_url_says() {
        assert_eq!(api("http://a/x/{sip_user_id}/").url_for(7), "http://a/x/7/");
        assert_eq!(api("http://a/x").url_for(7), "http://a/x?sip_user_id=7");
        assert_eq!(
            api("http://a/x?k=v").url_for(7),
            "http://a/x?k=v&sip_user_id=7"
        );
    }

    #[tokio::test]
    async fn bad_urls_are_refused_at_start() {
        assert!(AccountApi::new("ftp://a/".into(), Duration::ZERO, Duration::ZERO).is_err());
        assert!(AccountApi::new("not a url".into(), Duration::ZERO, Duration::ZERO).is_err());
    }

    #[test]
    fn cache_keys_differ_by_password_and_account() {
        let a = HeaderValue::from_static("Basic dXNlcjpvbmU=");
        let b = HeaderValue::from_static("Basic dXNlcjp0d28=");
        assert_ne!(AccountApi::cache_key(&a, 1), AccountApi::cache_key(&b, 1));
        assert_ne!(AccountApi::cache_key(&a, 1), AccountApi::cache_key(&a, 2));
        assert_eq!(AccountApi::cache_key(&a, 1), AccountApi::cache_key(&a, 1));
    }
}

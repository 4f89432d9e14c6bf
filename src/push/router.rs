//! The server's pusher: sends each push through the app its device
//! registered with, by that app's platform and credentials.
//!
//! Owns the cache of apps and of their built senders. An app is looked up
//! at most once per [`CACHE_TTL`]; its senders (a2 clients, an FCM token
//! authenticator) are built once per credentials and kept while the
//! credentials stay the same, so connections and access tokens are reused
//! and an `app add` that changes them is picked up within the TTL on every
//! instance. Apps that share a service account (an app's `android` and
//! `gcm` rows, usually) share its FCM sender and so its access token.
//! Credentials that cannot be used are logged once per TTL, and their
//! pushes fail without a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::apns::ApnsApp;
use super::fcm::{FcmApp, FcmEndpoint};
use super::log::LogPusher;
use super::{CredentialsError, Payload, PushOutcome, PushTarget, Pusher, Refusal};
use crate::config::Config;
use crate::logs::Escaped;
use crate::store::{App, Credentials, Platform, Store, StoreError};

/// How long an app's row is trusted before it is read again.
pub const CACHE_TTL: Duration = Duration::from_secs(30);

/// Where the pushes of one app go.
#[derive(Clone)]
enum Route {
    /// No such app for this platform (removed since the device registered).
    Unknown,
    /// The app has no credentials: pushes are only logged.
    LogOnly,
    Apns(Arc<ApnsApp>),
    Fcm(Arc<FcmApp>),
    /// The credentials could not be loaded; the error says why.
    Broken(Arc<str>),
}

/// Whether an app's pushes can go out, as far as can be told without
/// sending one: what `call-notifier push test` reports before it sends, so
/// an unknown app or unusable credentials are told apart from what the push
/// service answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// No app with this platform and id.
    Unknown,
    /// The app has no credentials: its pushes are only logged.
    LogOnly,
    /// Its credentials loaded: a push goes to APNs or FCM.
    Ready,
    /// Its credentials cannot be used; the text says why.
    Unusable(String),
}

/// One app's cache entry.
struct Cached {
    /// When the app's row was last read.
    checked: Instant,
    /// The credentials `route` was built from.
    credentials: Option<Credentials>,
    route: Route,
}

/// The cache slot of one (platform, app id). Its lock is held while the
/// slot is refreshed, so concurrent pushes of a cold app wait for one build.
type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// The [`Pusher`] the server runs with unless a test swaps in another.
pub struct PushRouter {
    /// Where the apps and their credentials' paths are.
    store: Arc<dyn Store>,
    /// The FCM base URL, TTL and HTTP client every FCM sender shares.
    fcm: Arc<FcmEndpoint>,
    /// `--push-timeout-ms`: bounds each push, app lookup included.
    timeout: Duration,
    /// How long an app's row is trusted: [`CACHE_TTL`] outside tests.
    cache_ttl: Duration,
    /// One slot per app pushed to; a handful, as apps are few.
    slots: Mutex<HashMap<(Platform, String), Slot>>,
    /// The FCM senders in use, by service-account file; held by the routes.
    fcm_senders: Mutex<HashMap<PathBuf, Weak<FcmApp>>>,
}

impl PushRouter {
    pub fn new(store: Arc<dyn Store>, config: &Config) -> Self {
        PushRouter {
            store,
            fcm: Arc::new(FcmEndpoint::new(&config.fcm_base_url, config.wait())),
            timeout: config.push_timeout(),
            cache_ttl: CACHE_TTL,
            slots: Mutex::new(HashMap::new()),
            fcm_senders: Mutex::new(HashMap::new()),
        }
    }

    /// Replaces [`CACHE_TTL`] (tests).
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// Looks the app up and loads its credentials as a push would (keeping
    /// them for the next push), and says whether its pushes can go out.
    pub async fn readiness(
        &self,
        platform: Platform,
        app_id: &str,
    ) -> Result<Readiness, StoreError> {
        Ok(match self.route(platform, app_id).await? {
            Route::Unknown => Readiness::Unknown,
            Route::LogOnly => Readiness::LogOnly,
            Route::Apns(_) | Route::Fcm(_) => Readiness::Ready,
            Route::Broken(error) => Readiness::Unusable(error.to_string()),
        })
    }

    async fn dispatch(&self, target: &PushTarget, payload: &Payload) -> PushOutcome {
        let route = match self.route(target.platform, &target.app_id).await {
            Ok(route) => route,
            Err(e) => {
                return PushOutcome::Retry {
                    after: None,
                    refusal: Refusal::unanswered(format!("cannot look up the app: {e}")),
                }
            }
        };
        let outcome = match route {
            Route::Unknown => return PushOutcome::Failed(Refusal::unanswered("unknown app")),
            Route::Broken(error) => {
                return PushOutcome::Failed(Refusal::unanswered(format!(
                    "unusable push credentials: {error}"
                )))
            }
            Route::LogOnly => return LogPusher.send(target, payload).await,
            Route::Apns(app) => app.send(target, payload).await,
            Route::Fcm(app) => app.send(target, payload).await,
        };
        if let PushOutcome::Failed(refusal) = &outcome {
            tracing::error!(
                platform = %target.platform,
                app = %Escaped(&target.app_id),
                reason = %refusal,
                "the push service refused the push for good"
            );
        }
        outcome
    }

    /// The route of an app: cached, or read and built anew.
    async fn route(&self, platform: Platform, app_id: &str) -> Result<Route, StoreError> {
        let slot = self
            .slots
            .lock()
            .expect("the slot map lock is never poisoned")
            .entry((platform, app_id.to_owned()))
            .or_default()
            .clone();
        let mut cached = slot.lock().await;
        if let Some(c) = cached
            .as_ref()
            .filter(|c| c.checked.elapsed() < self.cache_ttl)
        {
            return Ok(c.route.clone());
        }
        let app = match self.store.app(platform, app_id).await {
            Ok(app) => app,
            Err(e) => match cached.as_mut() {
                // Keep pushing with what we knew while the database is away,
                // without waiting for it on every push.
                Some(c) => {
                    tracing::warn!(
                        %platform,
                        app = %Escaped(app_id),
                        error = %e,
                        "cannot re-read the app; using the cached one"
                    );
                    c.checked = Instant::now();
                    return Ok(c.route.clone());
                }
                None => return Err(e),
            },
        };
        let credentials = app.as_ref().and_then(|app| app.credentials.clone());
        let unchanged = cached
            .as_ref()
            .filter(|c| app.is_some() && c.credentials == credentials)
            .map(|c| c.route.clone())
            .filter(|route| matches!(route, Route::Apns(_) | Route::Fcm(_)));
        let route = match unchanged {
            Some(route) => route,
            None => self.build(platform, app_id, app).await,
        };
        *cached = Some(Cached {
            checked: Instant::now(),
            credentials,
            route: route.clone(),
        });
        Ok(route)
    }

    /// Builds the senders of an app from its credentials.
    async fn build(&self, platform: Platform, app_id: &str, app: Option<App>) -> Route {
        let Some(credentials) = app.map(|app| app.credentials) else {
            return Route::Unknown;
        };
        let Some(credentials) = credentials else {
            return Route::LogOnly;
        };
        let built = match (platform, &credentials) {
            (
                Platform::Apns,
                Credentials::ApnsToken { .. } | Credentials::ApnsCertificate { .. },
            ) => ApnsApp::load(app_id, &credentials, self.timeout)
                .await
                .map(|app| Route::Apns(Arc::new(app))),
            (
                Platform::Android | Platform::Gcm,
                Credentials::Fcm {
                    service_account_path,
                },
            ) => self.fcm_sender(service_account_path).await.map(Route::Fcm),
            _ => Err(CredentialsError::WrongPlatform(platform)),
        };
        match built {
            Ok(route) => {
                tracing::info!(%platform, app = %Escaped(app_id), "push credentials loaded");
                route
            }
            Err(e) => {
                tracing::error!(
                    %platform,
                    app = %Escaped(app_id),
                    error = %e,
                    retry_in_s = self.cache_ttl.as_secs(),
                    "cannot load the app's push credentials; its pushes fail until they are fixed"
                );
                Route::Broken(e.to_string().into())
            }
        }
    }

    /// The FCM sender of a service account: the one in use, or a new one.
    async fn fcm_sender(&self, path: &Path) -> Result<Arc<FcmApp>, CredentialsError> {
        let in_use = self.senders().get(path).and_then(Weak::upgrade);
        if let Some(sender) = in_use {
            return Ok(sender);
        }
        let sender = Arc::new(FcmApp::load(path, self.fcm.clone()).await?);
        let mut senders = self.senders();
        senders.retain(|_, sender| sender.strong_count() > 0);
        senders.insert(path.to_owned(), Arc::downgrade(&sender));
        Ok(sender)
    }

    fn senders(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Weak<FcmApp>>> {
        self.fcm_senders
            .lock()
            .expect("the sender map lock is never poisoned")
    }
}

#[async_trait]
impl Pusher for PushRouter {
    async fn send(&self, target: &PushTarget, payload: &Payload) -> PushOutcome {
        match tokio::time::timeout(self.timeout, self.dispatch(target, payload)).await {
            Ok(outcome) => outcome,
            Err(_) => PushOutcome::Retry {
                after: None,
                refusal: Refusal::in_doubt(format!(
                    "no answer within {} ms",
                    self.timeout.as_millis()
                )),
            },
        }
    }
}

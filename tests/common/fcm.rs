//! Stand-ins for FCM HTTP v1 and Google's OAuth2 token endpoint, a
//! service-account file that points the real FCM pusher at them, and a test
//! server that pushes through them.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use call_notifier::config::Config;
use serde_json::json;

use super::stand_in::{Answer, Received, StandIn};
use super::{eventually, start_pushing_to_fcm, Backend, Reply, TestServer};

pub const PROJECT: &str = "test-project";
pub const CLIENT_EMAIL: &str = "pusher@test-project.iam.gserviceaccount.com";

/// Google's token endpoint: a fresh token per request, valid for an hour.
pub fn token_endpoint() -> impl Fn(&Received) -> Answer + Send + Sync + 'static {
    let issued = AtomicUsize::new(0);
    move |_| {
        let n = issued.fetch_add(1, Ordering::Relaxed) + 1;
        Answer::json(
            200,
            json!({"access_token": format!("ya29.test-token-{n}"), "expires_in": 3600, "token_type": "Bearer"}),
        )
    }
}

/// FCM accepting a message.
pub fn fcm_accepts() -> Answer {
    Answer::json(
        200,
        json!({"name": format!("projects/{PROJECT}/messages/1")}),
    )
}

/// An RSA key made for this test run (PKCS#8 PEM), made once per process.
pub fn rsa_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("the openssl binary");
        assert!(
            out.status.success(),
            "openssl genpkey: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("PEM is text")
    })
}

/// Writes a service-account file whose tokens come from `token_uri`.
pub fn service_account(dir: &Path, name: &str, project: &str, token_uri: &str) -> PathBuf {
    let path = dir.join(name);
    let key = json!({
        "type": "service_account",
        "project_id": project,
        "private_key_id": "0123456789abcdef",
        "private_key": rsa_key(),
        "client_email": CLIENT_EMAIL,
        "client_id": "123456789",
        "auth_uri": "http://127.0.0.1:9/auth",
        "token_uri": token_uri,
    });
    std::fs::write(&path, key.to_string()).expect("write the service account");
    path
}

/// Answers with `first`, one per request, then with `then`; and notes when
/// each request came in `arrivals`.
pub fn script(
    first: impl IntoIterator<Item = Answer>,
    then: impl Fn(&Received) -> Answer + Send + Sync + 'static,
    arrivals: Arc<Mutex<Vec<Instant>>>,
) -> impl Fn(&Received) -> Answer + Send + Sync + 'static {
    let first = Mutex::new(first.into_iter().collect::<VecDeque<_>>());
    move |request| {
        arrivals.lock().expect("lock").push(Instant::now());
        let scripted = first.lock().expect("lock").pop_front();
        scripted.unwrap_or_else(|| then(request))
    }
}

/// FCM and Google's token endpoint, stood in for, and a service account
/// whose tokens come from that token endpoint.
pub struct StandIns {
    pub fcm: StandIn,
    pub google: StandIn,
    /// Where the service account lives; a test may put more files here.
    pub dir: tempfile::TempDir,
    pub account: PathBuf,
}

impl StandIns {
    /// Starts both; FCM answers with `fcm(request)`.
    pub async fn start(fcm: impl Fn(&Received) -> Answer + Send + Sync + 'static) -> StandIns {
        let google = StandIn::start(token_endpoint()).await;
        let fcm = StandIn::start(fcm).await;
        let dir = tempfile::tempdir().expect("a temp dir");
        let account = service_account(
            dir.path(),
            "service-account.json",
            PROJECT,
            &format!("{}/token", google.url()),
        );
        StandIns {
            fcm,
            google,
            dir,
            account,
        }
    }
}

/// A test server (no recording pusher) whose FCM and token endpoint are
/// stand-ins; everything else as [`TestServer`].
pub struct FcmServer {
    pub server: TestServer,
    pub fcm: StandIn,
    /// When each request reached the FCM stand-in.
    pub arrivals: Arc<Mutex<Vec<Instant>>>,
    pub google: StandIn,
    /// Where the service account lives; a test may put more files here.
    pub dir: tempfile::TempDir,
}

impl std::ops::Deref for FcmServer {
    type Target = TestServer;

    fn deref(&self) -> &TestServer {
        &self.server
    }
}

impl FcmServer {
    /// Starts the stand-ins (FCM accepting every push) and a server on
    /// `backend` pushing to them, with `tweak` applied to its config.
    pub async fn start(backend: &Backend, tweak: impl FnOnce(&mut Config)) -> FcmServer {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let StandIns {
            fcm,
            google,
            dir,
            account,
        } = StandIns::start(script([], |_| fcm_accepts(), arrivals.clone())).await;
        let server = start_pushing_to_fcm(backend, account, |config| {
            config.fcm_base_url = fcm.url();
            tweak(config);
        })
        .await;
        FcmServer {
            server,
            fcm,
            arrivals,
            google,
            dir,
        }
    }

    /// FCM answers the next pushes with `answers`, then accepts again.
    pub fn fcm_answers(&self, answers: impl IntoIterator<Item = Answer>) {
        self.fcm
            .answer_with(script(answers, |_| fcm_accepts(), self.arrivals.clone()));
    }

    /// Waits until FCM received `count` pushes, for at most `within`.
    pub async fn pushes(&self, count: usize, within: Duration) -> Vec<Received> {
        let arrived = eventually(within, || async { self.fcm.hits() >= count }).await;
        let received = self.fcm.received();
        assert!(
            arrived,
            "{count} pushes within {within:?}: got {received:?}"
        );
        received
    }

    /// Waits until FCM received a push for the call `unique_key`, for at
    /// most `within`.
    pub async fn push_for(&self, unique_key: &str, within: Duration) -> Received {
        let find = || {
            self.fcm
                .received()
                .into_iter()
                .find(|p| p.json()["message"]["data"]["unique_key"] == unique_key)
        };
        let arrived = eventually(within, || async { find().is_some() }).await;
        assert!(arrived, "no push for {unique_key} within {within:?}");
        find().expect("arrived")
    }

    pub fn name(&self) -> &'static str {
        self.backend.name()
    }

    /// The PBX's request, running beside the test.
    pub fn ring(&self, user: &str, key: &str) -> tokio::task::JoinHandle<Reply> {
        self.client.park(user, key)
    }

    /// The app, woken by `push`: answers with what the push carried.
    pub async fn answer(&self, push: &Received, available: bool) -> Reply {
        let data = &push.json()["message"]["data"];
        let text = |key: &str| data[key].as_str().expect("a string").to_owned();
        self.client
            .post(
                "/api/call-response/",
                &[
                    ("unique_key", &text("unique_key")),
                    ("message_start_time", &text("message_start_time")),
                    ("available", if available { "true" } else { "false" }),
                ],
            )
            .await
    }
}

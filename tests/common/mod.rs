//! What every black-box test shares: the backends to run against, a real
//! server on an ephemeral port, and a real HTTP client.
//!
//! A scenario meant for every backend runs through [`on_every_backend`]: the
//! embedded defaults (SQLite + in-process broker), and again PostgreSQL +
//! Redis when `TEST_DATABASE_URL` and `TEST_REDIS_URL` are set (and Redis
//! Cluster with `TEST_REDIS_CLUSTER_URL`). A test meant for the embedded
//! backend only takes [`Backend::embedded`]. A set variable whose service
//! does not answer fails the test: nothing here skips.
//!
//! Every wait here is bounded by [`BOUND`], so a broken server fails a test
//! in seconds instead of hanging it.

#![allow(dead_code)]

pub mod digest;
pub mod fault;
pub mod fcm;
pub mod process;
pub mod stand_in;

use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use call_notifier::config::Config;
use call_notifier::push::recording::{Recorded, RecordingPusher};
use call_notifier::push::Payload;
use call_notifier::server::Running;
use call_notifier::store::{App, Credentials, Device, EndReason, NewDevice, Platform};
use call_notifier::Server;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// The app id every test device registers with.
pub const APP: &str = "com.example.softphone";

/// The bound on every wait in a test: far past any wait, timeout or
/// recovery the tests configure, so only a server that never answers (a
/// broken build) reaches it, and fails the test instead of hanging it.
pub const BOUND: Duration = Duration::from_secs(30);

/// The bound on a wait for a push. A push goes out the moment a call
/// parks, and again every resend interval (a second at most here), so a
/// push that has not come by then never will: a call the server refused to
/// park, say. Shorter than [`BOUND`], so such a build fails sooner.
pub const PUSH_BOUND: Duration = Duration::from_secs(10);

/// Awaits `future`, failing the test (naming `what`) after [`BOUND`].
pub async fn bounded<F: Future>(what: impl Display, future: F) -> F::Output {
    bounded_by(BOUND, what, future).await
}

/// Awaits `future`, failing the test (naming `what`) after `bound`.
pub async fn bounded_by<F: Future>(bound: Duration, what: impl Display, future: F) -> F::Output {
    tokio::time::timeout(bound, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {bound:?}"))
}

/// Where a test's server keeps its state.
#[derive(Clone, Debug)]
pub enum Backend {
    /// SQLite in a fresh temporary file, in-process broker.
    Embedded { dir: Arc<tempfile::TempDir> },
    /// PostgreSQL (a fresh schema) and Redis.
    Shared {
        database_url: String,
        redis_url: String,
    },
}

impl Backend {
    /// SQLite in a fresh temporary directory, in-process broker: for a test
    /// meant for the embedded backend only. Creates no PostgreSQL schema.
    pub fn embedded() -> Backend {
        Backend::Embedded {
            dir: Arc::new(tempfile::tempdir().expect("a temp dir")),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Embedded { .. } => "sqlite+memory",
            Backend::Shared { redis_url, .. } if is_cluster(redis_url) => "postgres+redis-cluster",
            Backend::Shared { .. } => "postgres+redis",
        }
    }

    pub fn redis_url(&self) -> Option<&str> {
        match self {
            Backend::Embedded { .. } => None,
            Backend::Shared { redis_url, .. } => Some(redis_url),
        }
    }

    /// A config for a server on this backend, on an ephemeral loopback port.
    pub fn config(&self) -> Config {
        let mut config = Config::defaults();
        config.listen = "127.0.0.1:0".parse().expect("an address");
        match self {
            Backend::Embedded { dir } => {
                config.database_url = dir.path().join("test.sqlite3").display().to_string();
                config.redis_url = None;
            }
            Backend::Shared {
                database_url,
                redis_url,
            } => {
                config.database_url = database_url.clone();
                config.redis_url = Some(redis_url.clone());
            }
        }
        config
    }
}

/// The backends this run covers: always the embedded one, and PostgreSQL +
/// Redis when both URLs are set. Tests reach them through
/// [`on_every_backend`].
async fn backends() -> Vec<Backend> {
    let mut all = vec![Backend::embedded()];
    match (
        std::env::var("TEST_DATABASE_URL").ok(),
        std::env::var("TEST_REDIS_URL").ok(),
    ) {
        (Some(database_url), Some(redis_url)) => all.push(Backend::Shared {
            database_url: fresh_schema(&database_url).await,
            redis_url,
        }),
        (None, None) => {}
        _ => panic!("set both TEST_DATABASE_URL and TEST_REDIS_URL, or neither"),
    }
    // A Redis Cluster, when there is one: `redis+cluster://host:port,...`.
    if let Ok(redis_url) = std::env::var("TEST_REDIS_CLUSTER_URL") {
        let database_url = std::env::var("TEST_DATABASE_URL")
            .expect("TEST_REDIS_CLUSTER_URL needs TEST_DATABASE_URL too");
        all.push(Backend::Shared {
            database_url: fresh_schema(&database_url).await,
            redis_url,
        });
    }
    all
}

pub fn is_cluster(redis_url: &str) -> bool {
    redis_url.starts_with("redis+cluster://")
}

/// Makes an empty PostgreSQL schema for one test and returns a URL whose
/// connections use it, so tests never see each other's rows.
pub async fn fresh_schema(url: &str) -> String {
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
    let schema = format!("t_{}", call_notifier::calls::random_key());
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .unwrap_or_else(|e| panic!("TEST_DATABASE_URL is set but PostgreSQL does not answer: {e}"));
    conn.batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .expect("create a test schema");
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-c%20search_path%3D{schema}")
}

/// A running server, a client for it, and what it pushed.
pub struct TestServer {
    pub running: Running,
    /// Every push the server sent, when it was started with [`start`]; a
    /// server started with [`start_pushing_to_fcm`] pushes for real, and
    /// this records nothing.
    pub pusher: RecordingPusher,
    pub backend: Backend,
    pub client: TestClient,
}

/// Starts a server on `backend` with `tweak` applied to its config, pushing
/// through a [`RecordingPusher`], with the test app registered for every
/// platform.
pub async fn start(backend: &Backend, tweak: impl FnOnce(&mut Config)) -> TestServer {
    try_start(backend, tweak)
        .await
        .unwrap_or_else(|e| panic!("server on {} did not start: {e:#}", backend.name()))
}

/// [`start`], for a test of a server that may refuse to start: its error.
pub async fn try_start(
    backend: &Backend,
    tweak: impl FnOnce(&mut Config),
) -> anyhow::Result<TestServer> {
    let pusher = RecordingPusher::new();
    let apps = Platform::ALL.map(|platform| App {
        platform,
        app_id: APP.into(),
        credentials: None,
    });
    launch(backend, Some(pusher), &apps, tweak).await
}

/// Starts a server on `backend` whose pushes go through the real FCM
/// pusher: the test app is registered for Android and GCM with the service
/// account at `service_account`.
pub async fn start_pushing_to_fcm(
    backend: &Backend,
    service_account: PathBuf,
    tweak: impl FnOnce(&mut Config),
) -> TestServer {
    let apps = [Platform::Android, Platform::Gcm].map(|platform| App {
        platform,
        app_id: APP.into(),
        credentials: Some(Credentials::Fcm {
            service_account_path: service_account.clone(),
        }),
    });
    launch(backend, None, &apps, tweak)
        .await
        .unwrap_or_else(|e| panic!("server on {} did not start: {e:#}", backend.name()))
}

/// The one place a test server is built: config from the backend, then
/// `tweak`, then the pusher (a recording one, or the real per-app ones) and
/// the apps.
async fn launch(
    backend: &Backend,
    recording: Option<RecordingPusher>,
    apps: &[App],
    tweak: impl FnOnce(&mut Config),
) -> anyhow::Result<TestServer> {
    let mut config = backend.config();
    tweak(&mut config);
    let mut server = Server::new(config);
    if let Some(pusher) = &recording {
        server = server.with_pusher(Arc::new(pusher.clone()));
    }
    let running = bounded("the server starting", server.start()).await?;
    for app in apps {
        running
            .state
            .store
            .put_app(app)
            .await
            .expect("add the test app");
    }
    let client = TestClient::new(running.url());
    Ok(TestServer {
        running,
        pusher: recording.unwrap_or_default(),
        backend: backend.clone(),
        client,
    })
}

impl TestServer {
    /// The app's answer `available` to `push` under `key`, which must be
    /// accepted (202).
    pub async fn answer_accepted(&self, key: &str, push: &Recorded) {
        let answer = self
            .client
            .call_response(key, start_time_of(push), true)
            .await;
        assert_eq!(
            answer.status,
            StatusCode::ACCEPTED,
            "{}: {}",
            self.backend.name(),
            answer.body
        );
    }

    /// The PBX's cancel of every leg of `call_id`, which must have ended a
    /// ringing call: 200 `{"cancelled": true}`.
    pub async fn cancel_ringing(&self, call_id: &str) {
        let cancel = self
            .client
            .post("/api/incoming-call/cancel/", &[("call_id", call_id)])
            .await;
        assert_eq!(
            cancel.status,
            StatusCode::OK,
            "{}: {}",
            self.backend.name(),
            cancel.body
        );
        assert_eq!(cancel.json(), serde_json::json!({"cancelled": true}));
    }

    /// Waits until at least `count` pushes went to `token`, and returns
    /// them all.
    pub async fn pushes(&self, token: &str, count: usize) -> Vec<Recorded> {
        bounded_by(
            PUSH_BOUND,
            format_args!("{}: {count} pushes to {token}", self.backend.name()),
            self.pusher.wait_for(token, count),
        )
        .await
    }

    /// Waits for the first push to `token`.
    pub async fn push(&self, token: &str) -> Recorded {
        self.pushes(token, 1).await.remove(0)
    }

    /// Waits for the push to `token` for the call `unique_key`.
    pub async fn call_push(&self, token: &str, unique_key: &str) -> Recorded {
        bounded_by(
            PUSH_BOUND,
            format_args!("{}: a push for {unique_key}", self.backend.name()),
            async {
                let mut seen = 0;
                loop {
                    let sent = self.pusher.wait_for(token, seen + 1).await;
                    if let Some(push) = sent.iter().find(|p| key_of(p) == Some(unique_key)) {
                        return push.clone();
                    }
                    seen = sent.len();
                }
            },
        )
        .await
    }

    /// Waits for the `call_ended` notice to `token`, and returns its
    /// `unique_key` and reason.
    pub async fn notice(&self, token: &str) -> (String, EndReason) {
        bounded_by(
            PUSH_BOUND,
            format_args!("{}: a call_ended notice to {token}", self.backend.name()),
            async {
                let mut seen = 0;
                loop {
                    let sent = self.pusher.wait_for(token, seen + 1).await;
                    if let Some(notice) = sent.iter().find_map(notice_of) {
                        return notice;
                    }
                    seen = sent.len();
                }
            },
        )
        .await
    }

    /// The `call_ended` notices sent to `token` so far.
    pub fn notices_to(&self, token: &str) -> Vec<(String, EndReason)> {
        self.pusher
            .sent_to(token)
            .iter()
            .filter_map(notice_of)
            .collect()
    }

    /// The call pushes sent to `token` so far.
    pub fn calls_to(&self, token: &str) -> Vec<Recorded> {
        self.pusher
            .sent_to(token)
            .into_iter()
            .filter(|p| key_of(p).is_some())
            .collect()
    }

    /// Whether a push went out for the call `unique_key` so far.
    pub fn pushed_for(&self, unique_key: &str) -> bool {
        self.pusher
            .sent()
            .iter()
            .any(|p| key_of(p) == Some(unique_key))
    }

    /// The registration the store holds for `sip_user_id`.
    pub async fn device(&self, sip_user_id: &str) -> Option<NewDevice> {
        self.stored(sip_user_id).await.map(|d| d.registration)
    }

    /// The whole row the store holds for `sip_user_id`, times included.
    pub async fn stored(&self, sip_user_id: &str) -> Option<Device> {
        let id: i64 = sip_user_id.parse().expect("a SIP account id");
        self.running
            .state
            .store
            .device(id)
            .await
            .unwrap_or_else(|e| panic!("{}: look up {sip_user_id}: {e}", self.backend.name()))
    }

    /// The tokens of every device `sip_user_id` holds (expired ones left
    /// out), oldest registration first.
    pub async fn tokens(&self, sip_user_id: &str) -> Vec<String> {
        let id: i64 = sip_user_id.parse().expect("a SIP account id");
        self.running
            .state
            .store
            .devices(id)
            .await
            .unwrap_or_else(|e| panic!("{}: devices of {sip_user_id}: {e}", self.backend.name()))
            .into_iter()
            .map(|d| d.registration.token)
            .collect()
    }

    /// Registers `token` for a fresh SIP account on `platform`, and checks
    /// it was created; returns the account.
    pub async fn registered(&self, platform: &str, token: &str) -> String {
        let user = sip_user_id();
        assert_eq!(
            self.client.register(platform, &user, token).await,
            StatusCode::CREATED,
            "{}: register {token} on {platform}",
            self.backend.name()
        );
        user
    }
}

/// The `unique_key` of a call push.
fn key_of(push: &Recorded) -> Option<&str> {
    match &push.payload {
        Payload::Call { unique_key, .. } => Some(unique_key),
        Payload::CallEnded { .. } | Payload::Message { .. } => None,
    }
}

/// The `unique_key` and reason of a `call_ended` notice.
fn notice_of(push: &Recorded) -> Option<(String, EndReason)> {
    match &push.payload {
        Payload::CallEnded {
            unique_key, reason, ..
        } => Some((unique_key.clone(), *reason)),
        _ => None,
    }
}

/// Asserts that the server holds no parked call and no wait, soon.
pub async fn assert_no_bookkeeping(server: &TestServer) {
    let state = server.running.state.clone();
    let clean = eventually(Duration::from_secs(3), || {
        let state = state.clone();
        async move { state.parking.parked() == 0 && state.broker.waiting() == 0 }
    })
    .await;
    assert!(
        clean,
        "{}: parked calls or waits left",
        server.backend.name()
    );
}

/// The keys of a JSON object, sorted.
pub fn sorted_keys(object: &serde_json::Map<String, serde_json::Value>) -> Vec<&str> {
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort();
    keys
}

/// Checks that a call push's payload carries exactly the contract's keys:
/// with the PBX's `call_id` verbatim when it gave one (issue #23: the app
/// pairs the push with the INVITE), without the key when it did not.
pub fn assert_call_push_keys(
    payload: &serde_json::Map<String, serde_json::Value>,
    call_id: Option<&str>,
    what: &str,
) {
    let mut expected = vec![
        "attempt",
        "caller_id",
        "message_start_time",
        "phonenumber",
        "response_api",
        "type",
        "unique_key",
    ];
    if call_id.is_some() {
        expected.insert(1, "call_id");
    }
    assert_eq!(
        sorted_keys(payload),
        expected,
        "{what}: the keys of a call push"
    );
    if let Some(call_id) = call_id {
        assert_eq!(payload["call_id"], call_id, "{what}: the call_id, verbatim");
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// A real HTTP/1.1 client pointed at one server.
#[derive(Clone)]
pub struct TestClient {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl TestClient {
    /// Idle connections are dropped after 30 s, well before the server's
    /// `--keep-alive-timeout-secs` (75 s) closes them: a client that reuses
    /// a connection just as the server closes it gets a reset (the chaos
    /// run met one in 32,000 calls), which no PBX should risk either.
    pub fn new(base: String) -> Self {
        TestClient {
            base,
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build_http(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request as built, and reads the whole answer within [`BOUND`].
    pub async fn request(&self, request: Request<Full<Bytes>>) -> Reply {
        let what = format!("{} {}", request.method(), request.uri());
        bounded(&what, self.try_request(request))
            .await
            .unwrap_or_else(|e| panic!("{what}: the server answers: {e}"))
    }

    /// Sends a request as built and reads the whole answer; a connection
    /// refused or closed before the answer is an error, not a panic (the
    /// chaos run stops servers under its clients).
    pub async fn try_request(&self, request: Request<Full<Bytes>>) -> Result<Reply, String> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// A form POST that may fail: see [`Self::try_request`].
    pub async fn try_post(&self, path: &str, fields: &[(&str, &str)]) -> Result<Reply, String> {
        let body = serde_urlencoded::to_string(fields).expect("form-encodable");
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .expect("a request");
        self.try_request(request).await
    }

    /// Sends a raw request: method, path, content type and body bytes.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        self.request(
            request
                .body(Full::new(Bytes::from(body)))
                .expect("a request"),
        )
        .await
    }

    pub async fn form(&self, method: Method, path: &str, fields: &[(&str, &str)]) -> Reply {
        let body = serde_urlencoded::to_string(fields).expect("form-encodable");
        self.send(
            method,
            path,
            Some("application/x-www-form-urlencoded"),
            body.into_bytes(),
        )
        .await
    }

    pub async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Reply {
        self.form(Method::POST, path, fields).await
    }

    /// POSTs `fields` as a form, with these extra headers (raw bytes, so a
    /// test can send what no well-behaved client would).
    pub async fn post_with(
        &self,
        path: &str,
        headers: &[(&str, &[u8])],
        fields: &[(&str, &str)],
    ) -> Reply {
        let body = serde_urlencoded::to_string(fields).expect("form-encodable");
        let mut request = Request::post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded");
        for (name, value) in headers {
            let value = hyper::header::HeaderValue::from_bytes(value).expect("a header value");
            request = request.header(*name, value);
        }
        self.request(
            request
                .body(Full::new(Bytes::from(body)))
                .expect("a request"),
        )
        .await
    }

    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> Reply {
        self.send(
            Method::POST,
            path,
            Some("application/json"),
            body.to_string().into_bytes(),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, None, Vec::new()).await
    }

    /// Registers `token` for `sip_user_id` on `platform`; returns the status.
    pub async fn register(&self, platform: &str, sip_user_id: &str, token: &str) -> StatusCode {
        self.post(
            &format!("/api/{platform}-device/"),
            &[("sip_user_id", sip_user_id), ("token", token), ("app", APP)],
        )
        .await
        .status
    }

    /// Deletes `token` for `sip_user_id` on `platform` (fields in the body).
    pub async fn unregister(&self, platform: &str, sip_user_id: &str, token: &str) -> Reply {
        self.form(
            Method::DELETE,
            &format!("/api/{platform}-device/"),
            &[("sip_user_id", sip_user_id), ("token", token), ("app", APP)],
        )
        .await
    }

    /// The PBX's request: parks until the call's outcome.
    pub async fn incoming_call(&self, sip_user_id: &str, call_id: &str) -> Reply {
        self.post(
            "/api/incoming-call/",
            &[
                ("sip_user_id", sip_user_id),
                ("phonenumber", "+31 50 123 4567"),
                ("caller_id", "Alice"),
                ("call_id", call_id),
            ],
        )
        .await
    }

    /// The PBX's request in its own task: the call parks while the test
    /// plays the app.
    pub fn park(&self, sip_user_id: &str, call_id: &str) -> tokio::task::JoinHandle<Reply> {
        let client = self.clone();
        let (sip_user_id, call_id) = (sip_user_id.to_owned(), call_id.to_owned());
        tokio::spawn(async move { client.incoming_call(&sip_user_id, &call_id).await })
    }

    /// The app's answer.
    pub async fn call_response(
        &self,
        unique_key: &str,
        message_start_time: f64,
        available: bool,
    ) -> Reply {
        self.post(
            "/api/call-response/",
            &[
                ("unique_key", unique_key),
                ("message_start_time", &message_start_time.to_string()),
                ("available", if available { "true" } else { "false" }),
            ],
        )
        .await
    }
}

/// Asserts a 400 that names `field` and a rule containing `rule` (any
/// non-empty rule when `rule` is empty).
pub fn assert_invalid(reply: &Reply, field: &str, rule: &str, what: &str) {
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "{what}: {}",
        reply.body
    );
    let body = reply.json();
    assert_eq!(body["field"], field, "{what}: {body}");
    assert!(
        body["rule"]
            .as_str()
            .is_some_and(|r| !r.is_empty() && r.contains(rule)),
        "{what}: {body}"
    );
}

/// Runs `scenario` once per backend, all at once.
pub async fn on_every_backend<F, Fut>(scenario: F)
where
    F: Fn(Backend) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    futures_util::future::join_all(backends().await.into_iter().map(scenario)).await;
}

/// A SIP account id no other test uses.
pub fn sip_user_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let pid = u64::from(std::process::id());
    (1_000_000 + pid * 10_000 + NEXT.fetch_add(1, Ordering::Relaxed)).to_string()
}

/// An android device of the test app for `sip_user_id`, as the store takes
/// it: `expires_at` set for one a SIP proxy registered, `None` for the app's.
pub fn android_device(sip_user_id: i64, token: &str, expires_at: Option<i64>) -> NewDevice {
    NewDevice {
        sip_user_id,
        platform: Platform::Android,
        token: token.into(),
        app_id: APP.into(),
        name: None,
        os_version: None,
        client_version: None,
        remote_logging_id: None,
        sandbox: false,
        alert_token: None,
        expires_at,
        proxy_expires_at: expires_at,
    }
}

/// A call id no other test uses.
pub fn call_id() -> String {
    format!("test-{}", call_notifier::calls::random_key())
}

/// The `message_start_time` of a recorded call push.
pub fn start_time_of(push: &call_notifier::push::recording::Recorded) -> f64 {
    match &push.payload {
        call_notifier::push::Payload::Call {
            message_start_time, ..
        } => *message_start_time,
        other => panic!("not a call push: {other:?}"),
    }
}

/// Polls `check` every 20 ms until it holds, for at most `within`.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + within;
    loop {
        if bounded("a check", check()).await {
            return true;
        }
        if tokio::time::Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A command connection to the test Redis, one server or a cluster.
pub async fn redis(url: &str) -> TestRedis {
    fn unreachable<T>(url: &str) -> impl FnOnce(redis::RedisError) -> T + '_ {
        move |e| panic!("{url} is set but Redis does not answer: {e}")
    }
    match url.strip_prefix("redis+cluster://") {
        Some(hosts) => {
            let nodes: Vec<String> = hosts
                .split(',')
                .map(|h| format!("redis://{}", h.trim_end_matches('/')))
                .collect();
            let client = redis::cluster::ClusterClient::new(nodes).expect("cluster nodes");
            TestRedis::Cluster(
                client
                    .get_async_connection()
                    .await
                    .unwrap_or_else(unreachable(url)),
            )
        }
        None => TestRedis::Single(
            redis::Client::open(url)
                .expect("a Redis URL")
                .get_multiplexed_async_connection()
                .await
                .unwrap_or_else(unreachable(url)),
        ),
    }
}

/// Either kind of Redis connection, so one test body serves both.
#[derive(Clone)]
pub enum TestRedis {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for TestRedis {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            TestRedis::Single(c) => c.req_packed_command(cmd),
            TestRedis::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            TestRedis::Single(c) => c.req_packed_commands(cmd, offset, count),
            TestRedis::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            TestRedis::Single(c) => c.get_db(),
            TestRedis::Cluster(c) => c.get_db(),
        }
    }
}

/// How many subscribers a key's answer channel has, on a server or across
/// a cluster's nodes (sharded channels).
pub async fn subscribers(url: &str, key: &str) -> i64 {
    let channel = call_notifier::broker::redis::channel(key);
    match url.strip_prefix("redis+cluster://") {
        None => {
            let (_, n): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut redis(url).await)
                .await
                .expect("NUMSUB");
            n
        }
        Some(hosts) => {
            let mut total = 0;
            for node in cluster_node_urls(hosts) {
                let mut conn = redis(&node).await;
                let (_, n): (String, i64) = redis::cmd("PUBSUB")
                    .arg("SHARDNUMSUB")
                    .arg(&channel)
                    .query_async(&mut conn)
                    .await
                    .expect("SHARDNUMSUB");
                total += n;
            }
            total
        }
    }
}

/// Every node of a cluster, as plain `redis://` URLs, found through `CLUSTER NODES`.
pub fn cluster_node_urls(hosts: &str) -> Vec<String> {
    let first = hosts
        .split(',')
        .next()
        .expect("a node")
        .trim_end_matches('/');
    let client = redis::Client::open(format!("redis://{first}")).expect("a node URL");
    let mut conn = client.get_connection().expect("the cluster answers");
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut conn)
        .expect("CLUSTER NODES");
    nodes
        .lines()
        .filter(|line| !line.contains("fail"))
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(|addr| format!("redis://{}", addr.split('@').next().unwrap_or(addr)))
        .collect()
}

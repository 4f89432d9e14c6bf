//! Operations: metrics after a scripted set of calls, health, graceful
//! shutdown of a real process, the app's side endpoints, and the OpenAPI
//! document against the routes the server has.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use call_notifier::push::{fcm, PushOutcome, Reason, Refusal};
use common::process::Process;
use common::stand_in::{Answer, StandIn};
use common::*;
use hyper::StatusCode;

/// The value of one sample line of `/metrics`, e.g.
/// `call_notifier_incoming_calls_total{outcome="ack"}`; 0 when absent.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|value| value.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_outcome() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |c| {
            c.wait_ms = 600;
            c.resend_interval_ms = 200;
        })
        .await;
        let client = &server.client;
        let (ack, busy, dead, sleepy) =
            (sip_user_id(), sip_user_id(), sip_user_id(), sip_user_id());
        for (user, platform, token) in [
            (&ack, "android", "m-ack"),
            (&busy, "apns", "b5"),
            (&dead, "gcm", "m-dead"),
            (&sleepy, "android", "m-sleepy"),
        ] {
            assert_eq!(
                client.register(platform, user, token).await,
                StatusCode::CREATED
            );
        }

        // ACK, and NAK for: not available, no device, token dead, timeout.
        for (user, token, available) in [(&ack, "m-ack", true), (&busy, "b5", false)] {
            let key = call_id();
            let pbx = server.client.park(user, &key);
            let push = server.push(token).await;
            client
                .call_response(&key, start_time_of(&push), available)
                .await;
            pbx.await.unwrap();
        }
        assert_eq!(
            client.incoming_call(&sip_user_id(), &call_id()).await.body,
            "status=NAK"
        );
        server.pusher.script([PushOutcome::TokenDead(Refusal::new(
            Reason::bounded("UNREGISTERED", fcm::REASONS),
            "UNREGISTERED",
        ))]);
        assert_eq!(
            client.incoming_call(&dead, &call_id()).await.body,
            "status=NAK"
        );
        assert_eq!(
            client.incoming_call(&sleepy, &call_id()).await.body,
            "status=NAK"
        );
        // The sleepy phone is told the call timed out: a push of its own,
        // counted once its send has returned, a moment after the stand-in
        // recorded it.
        server.notice("m-sleepy").await;
        const NOTICE: &str = "call_notifier_pushes_total{platform=\"android\",kind=\"call_ended\",outcome=\"delivered\",reason=\"none\"}";
        let metrics = bounded("the notice counted", async {
            loop {
                let metrics = client.get("/metrics").await;
                if sample(&metrics.body, NOTICE) > 0.0 {
                    break metrics;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(metrics.status, StatusCode::OK);
        assert!(metrics.headers["content-type"]
            .to_str()
            .unwrap()
            .contains("openmetrics-text"));
        let m = metrics.body.as_str();
        let calls = |outcome: &str| {
            sample(
                m,
                &format!("call_notifier_incoming_calls_total{{outcome=\"{outcome}\"}}"),
            )
        };
        assert_eq!(
            [
                calls("ack"),
                calls("not_available"),
                calls("no_device"),
                calls("token_dead"),
                calls("timeout")
            ],
            [1.0, 1.0, 1.0, 1.0, 1.0],
            "{}:\n{m}",
            backend.name()
        );
        // Call pushes by platform, outcome and the service's reason: the sleepy
        // phone got 2 (600/200 - 1).
        let pushes = |platform: &str, outcome: &str, reason: &str| {
            sample(
                m,
                &format!(
                    "call_notifier_pushes_total{{platform=\"{platform}\",kind=\"call\",outcome=\"{outcome}\",reason=\"{reason}\"}}"
                ),
            )
        };
        assert_eq!(pushes("android", "delivered", "none"), 3.0, "{m}");
        // And the notice that its call timed out.
        assert_eq!(sample(m, NOTICE), 1.0);
        assert_eq!(pushes("apns", "delivered", "none"), 1.0);
        assert_eq!(pushes("gcm", "token_dead", "UNREGISTERED"), 1.0);
        assert_eq!(
            sample(
                m,
                "call_notifier_push_duration_seconds_count{platform=\"android\",kind=\"call\"}"
            ),
            3.0
        );
        // Two answers reported their roundtrip and crossed the broker.
        let roundtrips = sample(
            m,
            "call_notifier_wakeup_roundtrip_seconds_count{platform=\"android\"}",
        ) + sample(
            m,
            "call_notifier_wakeup_roundtrip_seconds_count{platform=\"apns\"}",
        );
        assert_eq!(roundtrips, 2.0);
        assert_eq!(
            sample(m, "call_notifier_wakeup_latency_seconds_count"),
            2.0,
            "{m}"
        );
        assert_eq!(sample(m, "call_notifier_parked_calls"), 0.0);
        assert_eq!(sample(m, "call_notifier_device_registrations_total{platform=\"android\",outcome=\"created\"}"), 2.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_nak_at_once_and_counted() {
    let backend = Backend::embedded();
    let server = start(&backend, |c| c.max_pending_calls = 1).await;
    let user = server.registered("android", "tok-full").await;
    let key = call_id();
    let pbx = server.client.park(&user, &key);
    let push = server.push("tok-full").await;
    assert_eq!(
        server.client.incoming_call(&user, &call_id()).await.body,
        "status=NAK"
    );
    server
        .client
        .call_response(&key, start_time_of(&push), true)
        .await;
    assert_eq!(pbx.await.unwrap().body, "status=ACK");
    let m = server.client.get("/metrics").await.body;
    assert_eq!(
        sample(
            &m,
            "call_notifier_incoming_calls_total{outcome=\"overloaded\"}"
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_refused_outside_the_allow_list() {
    let backend = Backend::embedded();
    let server = start(&backend, |c| {
        c.metrics_allow = vec!["10.0.0.0/8".parse().unwrap()]
    })
    .await;
    assert_eq!(
        server.client.get("/metrics").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        server.client.get("/health/live").await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_in_and_hangup_reason() {
    on_every_backend(|backend| async move {
        let api = StandIn::start(|request| match request.header("authorization") {
            Some("Basic b2s6b2s=") => Answer::status(200),
            _ => Answer::status(401),
        })
        .await;
        let server = start(&backend, |c| {
            c.auth_url = Some(format!("{}/auth", api.url()))
        })
        .await;
        let user = sip_user_id();
        let as_owner = |path: &'static str,
                        fields: Vec<(&'static str, String)>,
                        authorization: Option<&'static str>| {
            let client = server.client.clone();
            async move {
                let fields: Vec<(&str, &str)> =
                    fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let headers: Vec<(&str, &[u8])> = authorization
                    .map(|a| ("authorization", a.as_bytes()))
                    .into_iter()
                    .collect();
                client.post_with(path, &headers, &fields).await
            }
        };
        let ok = Some("Basic b2s6b2s="); // ok:ok
        let check_in = vec![("sip_user_id", user.clone())];
        let hangup = vec![
            ("sip_user_id", user.clone()),
            ("unique_key", "k1".to_owned()),
            ("reason", "declined by user".to_owned()),
        ];

        assert_eq!(
            as_owner("/api/check-in/", check_in.clone(), None)
                .await
                .status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            as_owner("/api/check-in/", check_in.clone(), Some("Basic bm86bm8="))
                .await
                .status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            as_owner("/api/check-in/", check_in.clone(), ok)
                .await
                .status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            as_owner("/api/hangup-reason/", hangup.clone(), ok)
                .await
                .status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            as_owner("/api/hangup-reason/", hangup.clone(), None)
                .await
                .status,
            StatusCode::UNAUTHORIZED
        );

        let register = vec![
            ("sip_user_id", user.clone()),
            ("token", "t".to_owned()),
            ("app", APP.to_owned()),
        ];
        assert_eq!(
            as_owner("/api/android-device/", register, ok).await.status,
            StatusCode::CREATED
        );
        let before = server.stored(&user).await.expect("registered").last_seen_at;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            as_owner("/api/check-in", check_in.clone(), ok).await.status,
            StatusCode::OK
        );
        let after = server.stored(&user).await.expect("registered").last_seen_at;
        assert!(after > before, "{}: last-seen not updated", backend.name());

        let reply = as_owner("/api/hangup-reason/", hangup.clone(), ok).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.json()["reason"], "declined by user");
        let missing = vec![
            ("sip_user_id", user.clone()),
            ("unique_key", "k1".to_owned()),
        ];
        let reply = as_owner("/api/hangup-reason/", missing, ok).await;
        assert_eq!(
            (reply.status, reply.json()["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some("reason"))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_routes() {
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    let served = server.client.get("/openapi.json").await;
    assert_eq!(served.status, StatusCode::OK);
    let kept =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json")).unwrap();
    assert_eq!(
        served.body, kept,
        "the server serves the document kept in docs/"
    );
    let doc = served.json();
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));

    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((path.trim_end_matches('/').to_owned(), method.to_uppercase()));
        }
    }
    let mut routed: Vec<(String, String)> = call_notifier::http::ROUTES
        .iter()
        .flat_map(|(path, allow)| {
            allow
                .split(", ")
                .map(move |m| (path.to_string(), m.to_owned()))
        })
        .collect();
    documented.sort();
    routed.sort();
    assert_eq!(documented, routed);

    // And the server really answers every one of them.
    for (path, method) in &routed {
        let reply = server
            .client
            .send(method.parse().unwrap(), path, None, Vec::new())
            .await;
        let unrouted = reply.status == StatusCode::METHOD_NOT_ALLOWED
            || (reply.status == StatusCode::NOT_FOUND && reply.body.contains("no such endpoint"));
        assert!(
            !unrouted,
            "{method} {path}: {} {}",
            reply.status, reply.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_503_while_draining() {
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    let state = server.running.state.clone();
    assert_eq!(
        call_notifier::http::readiness(&state).await.status(),
        StatusCode::OK
    );
    server.running.drain();
    let ready = call_notifier::http::readiness(&state).await;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    // And, no call being parked, the listener no longer accepts.
    let refused = eventually(Duration::from_secs(2), || async {
        tokio::net::TcpStream::connect(server.running.addr)
            .await
            .is_err()
    })
    .await;
    assert!(refused);
}

/// Adds the test app to a database with the real CLI, as an operator would.
fn add_app(database_url: &str) {
    let status = Command::new(env!("CARGO_BIN_EXE_call-notifier"))
        .args([
            "--database-url",
            database_url,
            "app",
            "add",
            "--platform",
            "android",
            "--app-id",
            APP,
        ])
        .stdout(Stdio::null())
        .status()
        .expect("run app add");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_parked_calls_then_exits_zero() {
    on_every_backend(|backend| async move {
        let config = backend.config();
        add_app(&config.database_url);
        let mut args = vec![
            "--database-url",
            config.database_url.as_str(),
            "--wait-ms",
            "2500",
        ];
        if let Some(url) = backend.redis_url() {
            args.extend(["--redis-url", url]);
        }
        let process = Process::start(&args).await;
        let client = TestClient::new(process.url.clone());
        let users: Vec<String> = (0..3).map(|_| sip_user_id()).collect();
        for user in &users {
            assert_eq!(
                client
                    .register("android", user, &format!("tok-{user}"))
                    .await,
                StatusCode::CREATED
            );
        }
        let keys: Vec<String> = users.iter().map(|_| call_id()).collect();
        let parked: Vec<_> = users
            .iter()
            .zip(&keys)
            .map(|(user, key)| client.park(user, key))
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        process.signal("TERM");
        tokio::time::sleep(Duration::from_millis(200)).await;

        // The answer to the first call reaches it (ACK); the rest get their
        // real answer at the end of their wait: NAK.
        let mut expected = vec!["status=NAK"; keys.len()];
        expected[0] = "status=ACK";
        let now = call_notifier::calls::unix_seconds();
        let connected =
            tokio::net::TcpStream::connect(process.url.trim_start_matches("http://")).await;
        if backend.redis_url().is_some() {
            // No new connection is accepted; an answer given to another
            // instance still reaches the draining one.
            assert!(
                connected.is_err(),
                "{}: a new connection was accepted while draining",
                backend.name()
            );
            let other = start(&backend, |_| {}).await;
            assert_eq!(
                other.client.call_response(&keys[0], now, true).await.status,
                StatusCode::ACCEPTED
            );
        } else {
            // In process no other instance could take an answer: the
            // draining one still does, not ready, while its calls are
            // parked, and answers a new call NAK at once.
            assert!(connected.is_ok(), "{}", backend.name());
            let ready = client.get("/health/ready").await;
            assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                client.call_response(&keys[0], now, true).await.status,
                StatusCode::ACCEPTED
            );
            let late = sip_user_id();
            assert_eq!(
                client.register("android", &late, "tok-late").await,
                StatusCode::CREATED
            );
            let turned_away = client.incoming_call(&late, &call_id()).await;
            assert_eq!(turned_away.body, "status=NAK", "a call while draining");
        }
        for (pbx, expected) in parked.into_iter().zip(expected) {
            assert_eq!(pbx.await.unwrap().body, expected, "{}", backend.name());
        }
        assert_eq!(process.exit_code(Duration::from_secs(5)).await, Some(0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_timeout_and_a_second_signal_answer_parked_calls_nak() {
    let backend = Backend::embedded();
    let config = backend.config();
    add_app(&config.database_url);
    for second_signal in [false, true] {
        let process = Process::start(&[
            "--database-url",
            &config.database_url,
            "--wait-ms",
            "20000",
            "--shutdown-timeout-secs",
            "1",
        ])
        .await;
        let client = TestClient::new(process.url.clone());
        let user = sip_user_id();
        client.register("android", &user, "tok-slow").await;
        let pbx = client.park(&user, &call_id());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let signalled = Instant::now();
        process.signal("TERM");
        if second_signal {
            tokio::time::sleep(Duration::from_millis(100)).await;
            process.signal("INT");
        }
        let reply = pbx.await.unwrap();
        assert_eq!(reply.body, "status=NAK");
        let took = signalled.elapsed();
        // Long before the 20 s wait; with a second signal, before the 1 s timeout.
        assert!(took < Duration::from_secs(5), "{took:?}");
        if second_signal {
            assert!(took < Duration::from_millis(900), "{took:?}");
        }
        assert_eq!(process.exit_code(Duration::from_secs(5)).await, Some(0));
    }
}

/// Issue #23: the takeover notice is a push like any other, counted under
/// `kind="message"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_takeover_notice_is_counted_as_a_message_push() {
    let server = start(&Backend::embedded(), |_| {}).await;
    let user = server.registered("android", "tok-old").await;
    assert_eq!(
        server.client.register("android", &user, "tok-new").await,
        StatusCode::OK
    );
    server.push("tok-old").await;
    let counted = eventually(Duration::from_secs(3), || async {
        let m = server.client.get("/metrics").await.body;
        sample(
            &m,
            "call_notifier_pushes_total{platform=\"android\",kind=\"message\",outcome=\"delivered\",reason=\"none\"}",
        ) == 1.0
    })
    .await;
    assert!(counted, "{}", server.client.get("/metrics").await.body);
}

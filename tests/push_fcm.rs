//! FCM HTTP v1 end to end: the real server pushes through the real FCM
//! pusher to a local stand-in for FCM, with access tokens from a local
//! stand-in for Google's OAuth2 token endpoint, and the test plays the app.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use call_notifier::push::router::PushRouter;
use call_notifier::push::{Payload, PushOutcome, PushTarget, Pusher, Refusal};
use call_notifier::store::{App, Credentials, EndReason, Platform};
use common::fcm::{fcm_accepts, service_account, FcmServer, CLIENT_EMAIL, PROJECT};
use common::stand_in::Answer;
use common::*;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// FCM's error answers.

/// An FCM v1 error answer.
fn fcm_error(status: u16, rpc_status: &str, message: &str, details: Value) -> Answer {
    Answer::json(
        status,
        json!({"error": {"code": status, "message": message, "status": rpc_status, "details": details}}),
    )
}

/// FCM's answer for a token that is no more.
fn fcm_unregistered() -> Answer {
    fcm_error(
        404,
        "NOT_FOUND",
        "Requested entity was not found.",
        fcm_error_code("UNREGISTERED"),
    )
}

fn fcm_error_code(code: &str) -> Value {
    json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}])
}

/// Decodes base64url (with or without padding), to read a JWT.
fn base64url(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let (mut bits, mut count, mut out) = (0u32, 0u32, Vec::new());
    for c in text.bytes().filter(|&c| c != b'=') {
        let value = ALPHABET.iter().position(|&a| a == c).expect("base64url") as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_push_reaches_fcm_as_the_contract_says_and_the_app_answers_ack() {
    on_every_backend(|backend| async move {
        let server = FcmServer::start(&backend, |_| {}).await;
        let name = server.name();
        let user = server.registered("android", "fcm-token-a").await;
        let key = call_id();
        let pbx = server.ring(&user, &key);

        let push = server.pushes(1, Duration::from_secs(3)).await.remove(0);
        assert_eq!(push.method, Method::POST, "{name}");
        assert_eq!(
            push.uri,
            format!("/v1/projects/{PROJECT}/messages:send"),
            "{name}"
        );
        assert_eq!(
            push.header("authorization"),
            Some("Bearer ya29.test-token-1"),
            "{name}"
        );
        assert_eq!(
            push.header("content-type"),
            Some("application/json"),
            "{name}"
        );

        let body = push.json();
        let message = body["message"].as_object().expect("a message");
        // Data-only: no `notification` for the system to show.
        assert_eq!(
            sorted_keys(message),
            ["android", "data", "token"],
            "{name}: {body}"
        );
        assert_eq!(message["token"], "fcm-token-a");
        assert_eq!(message["android"]["priority"], "HIGH");
        let ttl = message["android"]["ttl"].as_str().expect("a ttl");
        let ttl: u64 = ttl
            .strip_suffix('s')
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("ttl {ttl:?} is not whole seconds"));
        assert!(ttl >= 1, "{name}: ttl {ttl}");
        assert!(
            Duration::from_secs(ttl) <= server.running.state.config.wait(),
            "{name}: ttl {ttl}s outlives the wait"
        );

        let data = message["data"].as_object().expect("data");
        assert_call_push_keys(data, Some(&key), name);
        assert!(data.values().all(Value::is_string), "{name}: {body}");
        assert_eq!(data["type"], "call");
        assert_eq!(data["unique_key"], key.as_str());
        assert_eq!(data["phonenumber"], "+31 50 123 4567");
        assert_eq!(data["caller_id"], "Alice");
        assert_eq!(data["attempt"], "1");
        assert_eq!(
            data["response_api"],
            format!("{}/api/call-response/", server.running.url())
        );
        let started: f64 = data["message_start_time"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .expect("message_start_time is a number as text");
        assert!((call_notifier::calls::unix_seconds() - started).abs() < 10.0);

        // The app wakes and answers with what the push told it.
        let answer = server.answer(&push, true).await;
        assert_eq!(
            answer.status,
            StatusCode::ACCEPTED,
            "{name}: {}",
            answer.body
        );
        let reply = pbx.await.expect("the PBX request");
        assert_eq!(reply.body, "status=ACK", "{name}");

        // The token came from the service account's token_uri, for FCM's scope.
        let token_requests = server.google.received();
        assert_eq!(token_requests.len(), 1, "{name}");
        let request = &token_requests[0];
        assert_eq!(request.uri, "/token");
        let form: HashMap<String, String> =
            serde_urlencoded::from_bytes(&request.body).expect("a form");
        assert_eq!(
            form["grant_type"],
            "urn:ietf:params:oauth:grant-type:jwt-bearer"
        );
        let claims = form["assertion"].split('.').nth(1).expect("a JWT");
        let claims: Value = serde_json::from_slice(&base64url(claims)).expect("JWT claims");
        assert_eq!(
            claims["scope"],
            "https://www.googleapis.com/auth/firebase.messaging"
        );
        assert_eq!(claims["iss"], CLIENT_EMAIL);
        assert_eq!(claims["aud"], format!("{}/token", server.google.url()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_token_is_fetched_once_and_reused_across_calls() {
    on_every_backend(|backend| async move {
        let server = FcmServer::start(&backend, |_| {}).await;
        let name = server.name();
        let first = sip_user_id();
        let second = sip_user_id();
        server
            .client
            .register("android", &first, "fcm-token-1")
            .await;
        // A `gcm` device goes through FCM v1 too; its app shares the
        // service account, and so the token.
        server.client.register("gcm", &second, "gcm-token-2").await;

        for (n, user) in [&first, &second].into_iter().enumerate() {
            let pbx = server.ring(user, &call_id());
            let push = server.pushes(n + 1, Duration::from_secs(3)).await.remove(n);
            assert_eq!(
                server.answer(&push, true).await.status,
                StatusCode::ACCEPTED
            );
            assert_eq!(pbx.await.expect("the PBX").body, "status=ACK", "{name}");
        }
        let pushes = server.fcm.received();
        let tokens: Vec<Option<&str>> = pushes.iter().map(|p| p.header("authorization")).collect();
        assert!(tokens.len() >= 2, "{name}");
        assert!(
            tokens
                .iter()
                .all(|t| *t == Some("Bearer ya29.test-token-1")),
            "{name}: {tokens:?}"
        );
        assert_eq!(
            server.google.received().len(),
            1,
            "{name}: one token request"
        );
        let devices: Vec<Value> = pushes
            .iter()
            .map(|p| p.json()["message"]["token"].clone())
            .collect();
        assert!(devices.contains(&json!("fcm-token-1")) && devices.contains(&json!("gcm-token-2")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_token_forgets_the_device_and_the_pbx_gets_nak_at_once() {
    on_every_backend(|backend| async move {
        let server = FcmServer::start(&backend, |_| {}).await;
        let name = server.name();
        server.fcm_answers([fcm_unregistered()]);
        let user = server.registered("android", "fcm-token-gone").await;

        let started = Instant::now();
        let reply = server.client.incoming_call(&user, &call_id()).await;
        assert_eq!(reply.body, "status=NAK", "{name}");
        assert!(
            started.elapsed() < server.running.state.config.wait() / 2,
            "{name}: NAK took {:?}",
            started.elapsed()
        );
        assert_eq!(
            server.fcm.received().len(),
            1,
            "{name}: no push after a dead token"
        );
        assert!(
            eventually(Duration::from_secs(2), || async {
                server.device(&user).await.is_none()
            })
            .await,
            "{name}: the device was not forgotten"
        );
    })
    .await;
}

/// `call_notifier_pushes_total` says why a push failed: FCM's own reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pushes_metric_counts_the_reason_fcm_gave() {
    on_every_backend(|backend| async move {
        let server = FcmServer::start(&backend, |_| {}).await;
        let name = server.name();
        server.fcm_answers([fcm_unregistered()]);
        let user = server.registered("android", "fcm-token-reason").await;
        let reply = server.client.incoming_call(&user, &call_id()).await;
        assert_eq!(reply.body, "status=NAK", "{name}");

        let metrics = server.client.get("/metrics").await;
        assert_eq!(metrics.status, StatusCode::OK, "{name}");
        let pushes: Vec<&str> = metrics
            .body
            .lines()
            .filter(|line| line.starts_with("call_notifier_pushes_total{"))
            // Label sets a fresh server starts at zero.
            .filter(|line| !line.ends_with(" 0"))
            .collect();
        assert_eq!(
            pushes,
            [r#"call_notifier_pushes_total{platform="android",kind="call",outcome="token_dead",reason="UNREGISTERED"} 1"#],
            "{name}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_after_its_retry_after_under_the_same_attempt_and_delivered() {
    on_every_backend(|backend| async move {
        let server = FcmServer::start(&backend, |_| {}).await;
        let name = server.name();
        server.fcm_answers([fcm_error(
            503,
            "UNAVAILABLE",
            "The service is currently unavailable.",
            fcm_error_code("UNAVAILABLE"),
        )
        .header("retry-after", "1")]);
        let user = server.registered("android", "fcm-token-retry").await;
        let pbx = server.ring(&user, &call_id());

        let pushes = server.pushes(2, Duration::from_secs(3)).await;
        let arrivals = server.arrivals.lock().expect("lock").clone();
        let attempts: Vec<Value> = pushes[..2]
            .iter()
            .map(|p| p.json()["message"]["data"]["attempt"].clone())
            .collect();
        assert_eq!(attempts, [json!("1"), json!("1")], "{name}");
        let gap = arrivals[1] - arrivals[0];
        assert!(
            gap >= Duration::from_millis(900),
            "{name}: retried after {gap:?}, before Retry-After"
        );
        // The retry was accepted: the app it woke answers.
        let answer = server.answer(&pushes[1], true).await;
        assert_eq!(
            answer.status,
            StatusCode::ACCEPTED,
            "{name}: {}",
            answer.body
        );
        assert_eq!(pbx.await.expect("the PBX").body, "status=ACK", "{name}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_fails_the_push_and_the_call_times_out_with_nak() {
    on_every_backend(|backend| async move {
        let server = FcmServer::start(&backend, |c| {
            c.wait_ms = 1500;
            c.resend_interval_ms = 500;
        })
        .await;
        let name = server.name();
        server.fcm_answers([fcm_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
            json!([]),
        )]);
        let user = server.registered("android", "fcm-token-401").await;

        let started = Instant::now();
        let reply = server.client.incoming_call(&user, &call_id()).await;
        assert_eq!(reply.body, "status=NAK", "{name}");
        assert!(
            started.elapsed() >= Duration::from_millis(1400),
            "{name}: NAK before the wait ended ({:?})",
            started.elapsed()
        );
        // Refused for good: neither retried nor resent, and the device stays.
        assert_eq!(server.fcm.received().len(), 1, "{name}");
        assert!(server.device(&user).await.is_some(), "{name}");
    })
    .await;
}

/// A `call_ended` notice reaches FCM, for `android` and `gcm` devices alike,
/// as a data message with exactly `type`, `unique_key` and `reason`, high
/// priority, collapsed under the call's key and living a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_ended_notice_reaches_fcm_as_a_collapsible_data_message() {
    on_every_backend(|backend| async move {
        let server = FcmServer::start(&backend, |_| {}).await;
        let name = server.name();
        let pusher = server.running.state.pusher.clone();
        for (platform, reason) in [
            (Platform::Android, EndReason::AnsweredElsewhere),
            (Platform::Gcm, EndReason::TimedOut),
        ] {
            let token = format!("fcm-token-ended-{platform}");
            let target = PushTarget {
                platform,
                token: token.clone(),
                app_id: APP.into(),
                sandbox: false,
                sip_user_id: 1,
                alert_token: None,
            };
            assert!(target.can_be_told(), "{name}: {platform}");
            let notice = Payload::CallEnded {
                unique_key: format!("call-1-{platform}"),
                reason,
                caller: "Alice".into(),
            };
            assert_eq!(
                pusher.send(&target, &notice).await,
                PushOutcome::Delivered,
                "{name}: {platform}"
            );
            let push = server.fcm.received().pop().expect("a push");
            assert_eq!(
                push.uri,
                format!("/v1/projects/{PROJECT}/messages:send"),
                "{name}"
            );
            assert_eq!(
                push.json(),
                json!({"message": {
                    "token": token,
                    "data": {
                        "type": "call_ended",
                        "unique_key": format!("call-1-{platform}"),
                        "reason": reason.as_str(),
                    },
                    "android": {
                        "priority": "HIGH",
                        "collapse_key": format!("call-1-{platform}"),
                        "ttl": "60s",
                    },
                }}),
                "{name}: {platform}"
            );
        }
        assert_eq!(server.fcm.received().len(), 2, "{name}");
    })
    .await;
}

/// The router's answers, asked directly: what the call path acts on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_says_what_happened_for_every_kind_of_app() {
    on_every_backend(|backend| async move {
        let server = FcmServer::start(&backend, |c| c.push_timeout_ms = 300).await;
        let name = server.name();
        let store = server.running.state.store.clone();
        let router = PushRouter::new(store.clone(), &server.running.state.config)
            .with_cache_ttl(Duration::ZERO);
        let target = |platform, app_id: &str| PushTarget {
            platform,
            token: "fcm-token-router".into(),
            app_id: app_id.into(),
            sandbox: false,
            sip_user_id: 1,
            alert_token: None,
        };
        let payload = Payload::Message {
            message: "hello".into(),
        };
        let put = |platform, app_id: &'static str, credentials| {
            let store = store.clone();
            async move {
                store
                    .put_app(&App {
                        platform,
                        app_id: app_id.into(),
                        credentials,
                    })
                    .await
                    .expect("put an app")
            }
        };

        // No such app.
        let outcome = router.send(&target(Platform::Android, "com.example.none"), &payload).await;
        assert_eq!(
            outcome,
            PushOutcome::Failed(Refusal::unanswered("unknown app")),
            "{name}"
        );

        // An app without credentials is only logged.
        put(Platform::Android, "com.example.logonly", None).await;
        let outcome = router.send(&target(Platform::Android, "com.example.logonly"), &payload).await;
        assert_eq!(outcome, PushOutcome::Delivered, "{name}");

        // Credentials that cannot be read: a clear failure, no panic.
        let missing = server.dir.path().join("missing.json");
        put(
            Platform::Android,
            "com.example.broken",
            Some(Credentials::Fcm {
                service_account_path: missing.clone(),
            }),
        )
        .await;
        let outcome = router.send(&target(Platform::Android, "com.example.broken"), &payload).await;
        assert!(
            matches!(&outcome, PushOutcome::Failed(refusal) if refusal.detail.contains(&missing.display().to_string())),
            "{name}: {outcome:?}"
        );
        // A file that is no service account.
        let garbage = server.dir.path().join("garbage.json");
        std::fs::write(&garbage, "{\"type\": \"nonsense\"}").expect("write");
        put(
            Platform::Gcm,
            "com.example.garbage",
            Some(Credentials::Fcm {
                service_account_path: garbage,
            }),
        )
        .await;
        let outcome = router.send(&target(Platform::Gcm, "com.example.garbage"), &payload).await;
        assert!(
            matches!(&outcome, PushOutcome::Failed(refusal) if refusal.detail.contains("service-account")),
            "{name}: {outcome:?}"
        );
        assert!(server.fcm.received().is_empty(), "{name}");

        let real = target(Platform::Android, APP);
        // Quota: retry when FCM says.
        server.fcm_answers([fcm_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded.",
            fcm_error_code("QUOTA_EXCEEDED"),
        )
        .header("retry-after", "7")]);
        let outcome = router.send(&real, &payload).await;
        assert!(
            matches!(outcome, PushOutcome::Retry { after: Some(after), .. } if after == Duration::from_secs(7)),
            "{name}: {outcome:?}"
        );
        // A token FCM calls invalid is dead.
        server.fcm_answers([fcm_error(
            400,
            "INVALID_ARGUMENT",
            "The registration token is not a valid FCM registration token",
            json!([{"@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": "message.token", "description": "Invalid registration token"}]}]),
        )]);
        let outcome = router.send(&real, &payload).await;
        assert!(matches!(outcome, PushOutcome::TokenDead(_)), "{name}: {outcome:?}");
        // No answer within --push-timeout-ms: try again.
        server.fcm_answers([fcm_accepts().after(Duration::from_secs(2))]);
        let started = Instant::now();
        let outcome = router.send(&real, &payload).await;
        assert!(
            matches!(&outcome, PushOutcome::Retry { after: None, refusal } if refusal.detail.contains("300 ms")),
            "{name}: {outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1), "{name}");

        // New credentials (another project) are picked up once the cache
        // expires (at once here).
        let other = service_account(
            server.dir.path(),
            "other.json",
            "other-project",
            &format!("{}/token", server.google.url()),
        );
        put(
            Platform::Android,
            APP,
            Some(Credentials::Fcm {
                service_account_path: other,
            }),
        )
        .await;
        let outcome = router.send(&real, &payload).await;
        assert_eq!(outcome, PushOutcome::Delivered, "{name}");
        let last = server.fcm.received().pop().expect("a push");
        assert_eq!(last.uri, "/v1/projects/other-project/messages:send", "{name}");
    })
    .await;
}

//! The whole life of a call (issue #12): every device of the account rings,
//! the first answer wins (across instances too), every phone still ringing
//! is told why the call is over, and a late answer learns why (410).

mod common;

use call_notifier::store::EndReason;
use common::*;
use hyper::StatusCode;

/// Two Android phones and an iPhone with an alert token, in that order.
const TOKENS: [&str; 3] = ["tok-a", "tok-b", "cd34"];
const ALERT_TOKEN: &str = "ab12";

/// A server that keeps up to three devices per account.
async fn three_device_server(backend: &Backend) -> TestServer {
    start(backend, |c| {
        c.max_devices_per_account = 3;
        c.wait_ms = 8000;
    })
    .await
}

/// Registers the three devices of [`TOKENS`] for a fresh account.
async fn three_devices(server: &TestServer) -> String {
    let user = sip_user_id();
    for token in &TOKENS[..2] {
        assert_eq!(
            server.client.register("android", &user, token).await,
            StatusCode::CREATED
        );
    }
    let ios = server
        .client
        .post(
            "/api/apns-device/",
            &[
                ("sip_user_id", &user),
                ("token", TOKENS[2]),
                ("app", APP),
                ("alert_token", ALERT_TOKEN),
            ],
        )
        .await;
    assert_eq!(ios.status, StatusCode::CREATED, "{}", ios.body);
    user
}

/// The call push each device got, in [`TOKENS`] order: each carries its
/// own key, `<call key>.<n>`, so the service knows which device answered.
async fn rung(server: &TestServer, key: &str) -> Vec<(String, f64)> {
    let mut pushes = Vec::new();
    for (n, token) in TOKENS.iter().enumerate() {
        let unique_key = format!("{key}.{}", n + 1);
        let push = server.call_push(token, &unique_key).await;
        pushes.push((unique_key, start_time_of(&push)));
    }
    pushes
}

/// Parks a call for `user` and waits until each of its devices is pushed:
/// the call's key, the PBX's parked request, and [`rung`]'s pushes.
async fn ring_three(
    server: &TestServer,
    user: &str,
) -> (String, tokio::task::JoinHandle<Reply>, Vec<(String, f64)>) {
    let key = call_id();
    let pbx = server.client.park(user, &key);
    let pushes = rung(server, &key).await;
    (key, pbx, pushes)
}

/// With Redis, a second instance on the same backend (what a request
/// reaching another instance than the call's goes to); in process, none.
async fn other_instance(backend: &Backend) -> Option<TestServer> {
    match backend.redis_url() {
        Some(_) => Some(three_device_server(backend).await),
        None => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_answer_wins_and_the_others_are_told_answered_elsewhere() {
    on_every_backend(|backend| async move {
        let server = three_device_server(&backend).await;
        let user = three_devices(&server).await;
        let (key, pbx, pushes) = ring_three(&server, &user).await;
        let (taken, at) = &pushes[1];
        let answer = server.client.call_response(taken, *at, true).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", backend.name());
        assert_eq!(pbx.await.unwrap().body, "status=ACK", "{}", backend.name());

        // The two others are told; the one that answered is not.
        assert_eq!(
            server.notice("tok-a").await,
            (pushes[0].0.clone(), EndReason::AnsweredElsewhere)
        );
        assert_eq!(
            server.notice("cd34").await,
            (pushes[2].0.clone(), EndReason::AnsweredElsewhere)
        );
        let ios = server.pusher.sent_to("cd34");
        let notice = ios.last().unwrap();
        assert_eq!(notice.target.alert_token.as_deref(), Some(ALERT_TOKEN));
        assert_eq!(server.calls_to("cd34").len(), 1, "one VoIP push, no second");
        assert!(server.notices_to("tok-b").is_empty());

        // Late answers learn why; the winner's repeat is still its own.
        let late = server
            .client
            .call_response(&pushes[0].0, pushes[0].1, true)
            .await;
        assert_eq!(late.status, StatusCode::GONE, "{}", backend.name());
        assert_eq!(
            late.json(),
            serde_json::json!({"unique_key": pushes[0].0, "reason": "answered_elsewhere"})
        );
        let repeat = server.client.call_response(taken, *at, true).await;
        assert_eq!(repeat.status, StatusCode::ACCEPTED);
        // The call's own key is no device's: unknown.
        let bare = server.client.call_response(&key, *at, true).await;
        assert_eq!(bare.status, StatusCode::NOT_FOUND, "{}", backend.name());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_decline_and_one_answer_is_ack() {
    on_every_backend(|backend| async move {
        let server = three_device_server(&backend).await;
        let user = three_devices(&server).await;
        let (_, pbx, pushes) = ring_three(&server, &user).await;
        let decline = server
            .client
            .call_response(&pushes[0].0, pushes[0].1, false)
            .await;
        assert_eq!(decline.status, StatusCode::ACCEPTED);
        let answer = server
            .client
            .call_response(&pushes[2].0, pushes[2].1, true)
            .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED);
        assert_eq!(pbx.await.unwrap().body, "status=ACK", "{}", backend.name());
        assert_eq!(
            server.notice("tok-b").await,
            (pushes[1].0.clone(), EndReason::AnsweredElsewhere)
        );
        assert!(server.notices_to("tok-a").is_empty(), "it declined");
        assert!(server.notices_to("cd34").is_empty(), "it answered");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_declining_is_nak_not_available() {
    on_every_backend(|backend| async move {
        let server = three_device_server(&backend).await;
        let user = three_devices(&server).await;
        let (_, pbx, pushes) = ring_three(&server, &user).await;
        for (unique_key, at) in &pushes {
            let decline = server.client.call_response(unique_key, *at, false).await;
            assert_eq!(decline.status, StatusCode::ACCEPTED, "{}", backend.name());
        }
        assert_eq!(pbx.await.unwrap().body, "status=NAK", "{}", backend.name());
        // Issue #23: once the call is over, a device that declined and
        // answers again hears the call's reason, not a 202 that would tell
        // its app the call is still on.
        let repeat = server
            .client
            .call_response(&pushes[0].0, pushes[0].1, true)
            .await;
        assert_eq!(repeat.status, StatusCode::GONE, "{}", backend.name());
        assert_eq!(
            repeat.json(),
            serde_json::json!({"unique_key": pushes[0].0, "reason": "not_available"})
        );
        for token in TOKENS {
            assert!(server.notices_to(token).is_empty(), "{token} answered");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pbx_closing_mid_wait_sends_cancelled_notices() {
    on_every_backend(|backend| async move {
        let server = three_device_server(&backend).await;
        let user = three_devices(&server).await;
        let (_, pbx, pushes) = ring_three(&server, &user).await;
        pbx.abort();
        let _ = pbx.await;
        for (token, (unique_key, _)) in TOKENS.iter().zip(&pushes) {
            assert_eq!(
                server.notice(token).await,
                (unique_key.clone(), EndReason::Cancelled),
                "{}",
                backend.name()
            );
        }
        assert_no_bookkeeping(&server).await;
        let late = server
            .client
            .call_response(&pushes[1].0, pushes[1].1, true)
            .await;
        assert_eq!(late.status, StatusCode::GONE);
        assert_eq!(late.json()["reason"], "cancelled");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cancel_endpoint_naks_the_parked_request_from_any_instance() {
    on_every_backend(|backend| async move {
        let server = three_device_server(&backend).await;
        // With Redis the cancel reaches the call through another instance.
        let other = other_instance(&backend).await;
        let canceller = other.as_ref().unwrap_or(&server);
        let user = three_devices(&server).await;
        let (key, pbx, pushes) = ring_three(&server, &user).await;
        canceller.cancel_ringing(&key).await;
        assert_eq!(pbx.await.unwrap().body, "status=NAK", "{}", backend.name());
        assert_eq!(
            server.notice("tok-b").await,
            (pushes[1].0.clone(), EndReason::Cancelled)
        );
        // Nothing rings under the key any more; by a device's key neither.
        for again in [&key, &pushes[0].0] {
            let field = if again == &key {
                "call_id"
            } else {
                "unique_key"
            };
            let reply = canceller
                .client
                .post("/api/incoming-call/cancel/", &[(field, again)])
                .await;
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", backend.name());
        }
        let late = canceller
            .client
            .call_response(&pushes[0].0, pushes[0].1, true)
            .await;
        assert_eq!(late.status, StatusCode::GONE);
        assert_eq!(late.json()["reason"], "cancelled");
        let missing = server.client.post("/api/incoming-call/cancel/", &[]).await;
        assert_invalid(&missing, "call_id", "required", "a cancel without a key");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_at_two_instances_at_once_make_exactly_one_ack() {
    on_every_backend(|backend| async move {
        let Some(_) = backend.redis_url() else {
            return; // One process: nothing crosses instances.
        };
        let server = three_device_server(&backend).await;
        let other = three_device_server(&backend).await;
        let user = three_devices(&server).await;
        for _ in 0..5 {
            let (_, pbx, pushes) = ring_three(&server, &user).await;
            let (here, there) = tokio::join!(
                server.client.call_response(&pushes[0].0, pushes[0].1, true),
                other.client.call_response(&pushes[1].0, pushes[1].1, true),
            );
            let mut statuses = [here.status, there.status];
            statuses.sort();
            assert_eq!(
                statuses,
                [StatusCode::ACCEPTED, StatusCode::GONE],
                "{}: {} / {}",
                backend.name(),
                here.body,
                there.body
            );
            let lost = if here.status == StatusCode::GONE {
                &here
            } else {
                &there
            };
            assert_eq!(lost.json()["reason"], "answered_elsewhere");
            assert_eq!(pbx.await.unwrap().body, "status=ACK", "{}", backend.name());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_from_a_proxy_registered_device_answers_its_call() {
    on_every_backend(|backend| async move {
        let server = three_device_server(&backend).await;
        // With Redis the REGISTER reaches another instance than the call.
        let other = other_instance(&backend).await;
        let registrar = other.as_ref().unwrap_or(&server);
        let user = sip_user_id();
        let id: i64 = user.parse().expect("an id");
        let device = android_device(
            id,
            "tok-sip",
            Some(call_notifier::store::now_millis() + 3_600_000),
        );
        server
            .running
            .state
            .store
            .register_device(device, 3)
            .await
            .expect("a proxy-registered device");
        let state = &registrar.running.state;
        // Nothing rings for it yet.
        let idle = call_notifier::calls::registered(state, id, "tok-sip").await;
        assert_eq!(idle.expect("the broker answers"), None);

        let key = call_id();
        let pbx = server.client.park(&user, &key);
        let push = server.call_push("tok-sip", &key).await;
        let answered = call_notifier::calls::registered(state, id, "tok-sip").await;
        assert_eq!(
            answered.expect("the broker answers"),
            Some(call_notifier::calls::Verdict::Taken {
                platform: call_notifier::store::Platform::Android
            }),
            "{}",
            backend.name()
        );
        assert_eq!(pbx.await.unwrap().body, "status=ACK", "{}", backend.name());
        // The app's own answer that follows is a repeat of it.
        let repeat = server
            .client
            .call_response(&key, start_time_of(&push), true)
            .await;
        assert_eq!(repeat.status, StatusCode::ACCEPTED, "{}", backend.name());
    })
    .await;
}

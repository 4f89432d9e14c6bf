//! Device registration: one device per SIP account, updates, platform moves,
//! deletes, and the notice to a phone that lost its account. APNs tokens
//! are hex, so the iOS ones here are `a1`, `a2`, `a3`.

mod common;

use call_notifier::push::Payload;
use call_notifier::store::{NewDevice, Platform, Registration};
use common::*;
use futures_util::future::join_all;
use hyper::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_update_move_and_delete() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let client = &server.client;
        let user = sip_user_id();

        // Register: 201, and the reply echoes the device.
        let reply = client
            .post(
                "/api/apns-device/",
                &[
                    ("sip_user_id", &user),
                    ("token", "a1"),
                    ("app", APP),
                    ("sandbox", "True"),
                    ("name", "Alice's phone"),
                ],
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "{}: {}",
            backend.name(),
            reply.body
        );
        assert_eq!(reply.json()["token"], "a1");
        let device = server.device(&user).await.expect("registered");
        assert_eq!(
            (device.platform, device.sandbox, device.name.as_deref()),
            (Platform::Apns, true, Some("Alice's phone"))
        );

        // The same again: an update, 200, nobody told anything.
        assert_eq!(client.register("apns", &user, "a1").await, StatusCode::OK);
        assert!(server.pusher.sent_to("a1").is_empty());

        // Another token: 200. An iPhone is not told it was replaced (that
        // would be a VoIP push that rings no call).
        assert_eq!(client.register("apns", &user, "a2").await, StatusCode::OK);

        // Moving the account to Android and back keeps one device, and the
        // Android phone hears it was replaced. (Its token is this run's own:
        // a token is told at most once a minute.)
        let fcm = format!("fcm-{user}");
        assert_eq!(
            client.register("android", &user, &fcm).await,
            StatusCode::OK
        );
        let device = server.device(&user).await.expect("still one device");
        assert_eq!(
            (device.platform, device.token.as_str()),
            (Platform::Android, fcm.as_str())
        );
        assert_eq!(client.register("apns", &user, "a3").await, StatusCode::OK);
        let notice = server.push(&fcm).await;
        assert!(
            matches!(notice.payload, Payload::Message { .. }),
            "{:?}",
            notice.payload
        );
        assert_eq!(notice.payload.to_json()["type"], "message");
        assert!(server.pusher.sent_to("a1").is_empty());
        assert!(server.pusher.sent_to("a2").is_empty());
        let device = server.device(&user).await.expect("still one device");
        assert_eq!(
            (device.platform, device.token.as_str(), device.sandbox),
            (Platform::Apns, "a3", false)
        );

        // Delete with the wrong token or platform: 404, nothing changes.
        let wrong = client.unregister("apns", &user, "a2").await;
        assert_eq!(wrong.status, StatusCode::NOT_FOUND);
        let wrong = client.unregister("android", &user, "a3").await;
        assert_eq!(wrong.status, StatusCode::NOT_FOUND);
        assert!(server.device(&user).await.is_some());

        // Delete (fields in the query string, no trailing slash), then again.
        let path = format!("/api/apns-device?sip_user_id={user}&token=a3&app={APP}");
        assert_eq!(
            client
                .send(Method::DELETE, &path, None, Vec::new())
                .await
                .status,
            StatusCode::OK
        );
        assert!(server.device(&user).await.is_none());
        assert_eq!(
            client
                .send(Method::DELETE, &path, None, Vec::new())
                .await
                .status,
            StatusCode::NOT_FOUND
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_and_unknown_apps() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let user = sip_user_id();
        let id: i64 = user.parse().unwrap();
        let reply = server
            .client
            .post_json("/api/gcm-device", json!({"sip_user_id": id, "token": "gcm-1", "app": APP, "sandbox": false, "os_version": "14"}))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        assert_eq!(reply.json()["sip_user_id"], user.as_str());

        // An app registered for Android is unknown to APNs.
        let reply = server
            .client
            .post(
                "/api/apns-device/",
                &[
                    ("sip_user_id", &user),
                    ("token", "abc"),
                    ("app", "com.example.other"),
                ],
            )
            .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", backend.name());
        assert!(reply.json()["error"].as_str().unwrap().contains("app"));
        let device = server.device(&user).await.expect("unchanged");
        assert_eq!(
            (device.platform, device.token.as_str()),
            (Platform::Gcm, "gcm-1")
        );

        let body = r#"{"sip_user_id": "1", "token": "t", "app": "a"}"#;
        let reply = server
            .client
            .send(
                Method::DELETE,
                "/api/gcm-device/",
                Some("application/json"),
                body.into(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
    })
    .await;
}

/// 200 concurrent registrations, re-registrations and deletions for one SIP
/// account: never two devices, never a 5xx, and the row left is coherent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_to_one_account_leave_one_coherent_row() {
    on_every_backend(|backend| async move {
        // The 200 writes to one row take turns on its lock, each holding one
        // of the pool's connections meanwhile; on a busy CI machine the
        // queue for a connection can pass the default 2 s and answer 503,
        // which is right under overload but not what this test is about.
        let server = start(&backend, |config| config.database_timeout_ms = 30_000).await;
        let user = sip_user_id();
        let platforms = ["apns", "android", "gcm"];
        let replies = join_all((0..200).map(|i| {
            let client = server.client.clone();
            let user = user.clone();
            async move {
                let platform = platforms[i % 3];
                // Hex, as APNs tokens must be; the last digit names the platform.
                let token = format!("{i:04x}{}", i % 3);
                if i % 4 == 3 {
                    let previous = format!("{:04x}{}", i - 1, (i - 1) % 3);
                    client
                        .unregister(platforms[(i - 1) % 3], &user, &previous)
                        .await
                        .status
                } else {
                    client.register(platform, &user, &token).await
                }
            }
        }))
        .await;
        for status in &replies {
            assert!(
                [StatusCode::OK, StatusCode::CREATED, StatusCode::NOT_FOUND].contains(status),
                "{}: {status}",
                backend.name()
            );
        }
        assert!(
            replies
                .iter()
                .filter(|s| **s == StatusCode::CREATED)
                .count()
                >= 1
        );
        if let Some(device) = server.device(&user).await {
            // The token names the platform it was registered on.
            let last = device.token.chars().last().expect("a test token");
            let platform = platforms[last.to_digit(10).expect("a test token") as usize];
            assert_eq!(
                platform,
                device.platform.as_str(),
                "{}: incoherent row {device:?}",
                backend.name()
            );
        }
        // A request after the storm is the last write, and wins.
        assert_eq!(
            server
                .client
                .register("android", &user, "final")
                .await
                .as_u16()
                / 100,
            2
        );
        assert_eq!(
            server.device(&user).await.expect("registered").token,
            "final"
        );
    })
    .await;
}

/// Registers `token` for `sip_user_id` on `platform` with these extra
/// fields; returns the reply.
async fn register_with(
    server: &TestServer,
    platform: &str,
    sip_user_id: &str,
    token: &str,
    extra: &[(&str, &str)],
) -> Reply {
    let mut fields = vec![("sip_user_id", sip_user_id), ("token", token), ("app", APP)];
    fields.extend_from_slice(extra);
    server
        .client
        .post(&format!("/api/{platform}-device/"), &fields)
        .await
}

/// Lets the millisecond clock tick, so the next registration is strictly
/// newer than the last (the order devices are displaced in).
async fn tick() {
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
}

/// Asserts `token` was told it lost the account, by a text push.
async fn assert_told(server: &TestServer, token: &str) -> call_notifier::push::recording::Recorded {
    let notice = server.push(token).await;
    assert!(
        matches!(notice.payload, Payload::Message { .. }),
        "{}: {:?}",
        server.backend.name(),
        notice.payload
    );
    notice
}

/// Three devices per account: each new token adds one (201), a known one is
/// updated (200), and a fourth displaces the one updated longest ago, which
/// is told. Unregistering and a dead token remove only the one they name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_devices_per_account_up_to_the_limit() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |config| config.max_devices_per_account = 3).await;
        let client = &server.client;
        let user = sip_user_id();
        let token = |n: u32| format!("fcm-{user}-{n}");
        for n in 1..=3 {
            assert_eq!(
                client.register("android", &user, &token(n)).await,
                StatusCode::CREATED,
                "{}: device {n}",
                backend.name()
            );
            tick().await;
        }
        // The first again: an update, its fields replaced; nobody is told.
        let reply = register_with(&server, "android", &user, &token(1), &[("name", "Pixel")]).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{}: {}",
            backend.name(),
            reply.body
        );
        assert_eq!(server.tokens(&user).await, [token(1), token(2), token(3)]);
        let newest = server.device(&user).await.expect("devices");
        assert_eq!(
            (newest.token.as_str(), newest.name.as_deref()),
            (token(1).as_str(), Some("Pixel")),
            "{}: the device updated last",
            backend.name()
        );
        tick().await;

        // A fourth: added, and the one updated longest ago (2) goes.
        assert_eq!(
            client.register("android", &user, &token(4)).await,
            StatusCode::CREATED
        );
        assert_eq!(
            server.tokens(&user).await,
            [token(1), token(3), token(4)],
            "{}",
            backend.name()
        );
        assert_told(&server, &token(2)).await;
        for n in [1, 3, 4] {
            assert!(server.pusher.sent_to(&token(n)).is_empty(), "{n} told");
        }

        // Unregistering removes only the device it names.
        let reply = client.unregister("android", &user, &token(3)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(server.tokens(&user).await, [token(1), token(4)]);

        // So does a dead token.
        let id: i64 = user.parse().expect("an id");
        let store = &server.running.state.store;
        assert!(store.forget_token(id, &token(4)).await.expect("forget"));
        assert_eq!(server.tokens(&user).await, [token(1)]);

        // A check-in marks every device seen.
        tick().await;
        assert_eq!(
            client.register("gcm", &user, &token(5)).await,
            StatusCode::CREATED
        );
        let before = store.devices(id).await.expect("devices");
        tick().await;
        let reply = client
            .post("/api/check-in/", &[("sip_user_id", &user)])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let after = store.devices(id).await.expect("devices");
        assert_eq!(after.len(), 2);
        for (before, after) in before.iter().zip(&after) {
            assert!(after.last_seen_at > before.last_seen_at, "{after:?}");
        }
    })
    .await;
}

/// A displaced iPhone is told through its `alert_token` (the pusher makes
/// that an alert push, never a VoIP one); without one it is not told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_displaced_iphone_is_told_only_through_its_alert_token() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |config| config.max_devices_per_account = 2).await;
        let user = sip_user_id();
        // Hex, as APNs tokens must be, and this run's own: a token is told
        // at most once a minute.
        let (with, without) = (format!("a{user}"), format!("b{user}"));
        let alert = format!("c{user}");

        let reply = register_with(&server, "apns", &user, &with, &[("alert_token", "0ld")]).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
        let reply = register_with(&server, "apns", &user, &with, &[("alert_token", "0bad")]).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        // Updated with the app's current alert token: stored and echoed.
        let reply = register_with(&server, "apns", &user, &with, &[("alert_token", &alert)]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.json()["alert_token"], alert.as_str());
        assert_eq!(
            server.device(&user).await.expect("registered").alert_token,
            Some(alert.clone()),
            "{}",
            backend.name()
        );
        tick().await;
        let reply = register_with(&server, "apns", &user, &without, &[]).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        assert_eq!(reply.json()["alert_token"], serde_json::Value::Null);
        tick().await;

        // A third device displaces the one with an alert token: told there.
        let fcm = |n: u32| format!("fcm-{user}-{n}");
        assert_eq!(
            server.client.register("android", &user, &fcm(1)).await,
            StatusCode::CREATED
        );
        let notice = assert_told(&server, &with).await;
        assert_eq!(notice.target.alert_token.as_deref(), Some(alert.as_str()));
        assert_eq!(notice.target.platform, Platform::Apns);
        tick().await;

        // A fourth displaces the one without: not told. (The decision is
        // made before the reply; the next notice shows the pushes went.)
        assert_eq!(
            server.client.register("android", &user, &fcm(2)).await,
            StatusCode::CREATED
        );
        assert_eq!(server.tokens(&user).await, [fcm(1), fcm(2)]);
        tick().await;
        assert_eq!(
            server.client.register("android", &user, &fcm(3)).await,
            StatusCode::CREATED
        );
        assert_told(&server, &fcm(1)).await;
        assert!(
            server.pusher.sent_to(&without).is_empty(),
            "{}: an iPhone without an alert token was pushed",
            backend.name()
        );
    })
    .await;
}

/// 200 registrations of distinct tokens for one account at once never
/// leave more devices than the limit, and each is answered 201.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_never_exceed_the_limit() {
    on_every_backend(|backend| async move {
        // 200 writes to one account take turns, each holding a pooled
        // connection meanwhile: a long pool wait, so queueing is no 503.
        let server = start(&backend, |config| {
            config.max_devices_per_account = 3;
            config.database_timeout_ms = 30_000;
        })
        .await;
        let user = sip_user_id();
        let replies = join_all((0..200).map(|i| {
            let client = server.client.clone();
            let user = user.clone();
            async move {
                client
                    .register("android", &user, &format!("race-{user}-{i}"))
                    .await
            }
        }))
        .await;
        for status in &replies {
            assert_eq!(*status, StatusCode::CREATED, "{}", backend.name());
        }
        assert_eq!(server.tokens(&user).await.len(), 3, "{}", backend.name());
    })
    .await;
}

/// A limit lowered since an account filled up: the next registration
/// brings it down to the new limit, and at one device per account replaces
/// the newest, as one device per account always did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_limit_is_applied_at_the_next_registration() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let store = &server.running.state.store;
        let user = sip_user_id();
        let id: i64 = user.parse().expect("an id");
        let device = |token: &str| android_device(id, token, None);
        for token in ["t1", "t2", "t3"] {
            let done = store
                .register_device(device(token), 3)
                .await
                .expect("register");
            assert!(
                matches!(done, Registration::Created { ref displaced } if displaced.is_empty())
            );
            tick().await;
        }
        let done = store
            .register_device(device("t4"), 1)
            .await
            .expect("register");
        let Registration::Updated {
            previous,
            displaced,
        } = done
        else {
            panic!(
                "{}: one device per account is an update: {done:?}",
                backend.name()
            );
        };
        assert_eq!(previous.registration.token, "t3");
        let gone: Vec<&str> = displaced
            .iter()
            .map(|d| d.registration.token.as_str())
            .collect();
        assert_eq!(gone, ["t1", "t2", "t3"], "{}", backend.name());
        assert_eq!(server.tokens(&user).await, ["t4"]);
        // The same token again, on another platform: replaced, nobody displaced.
        let moved = call_notifier::store::NewDevice {
            platform: Platform::Gcm,
            ..device("t4")
        };
        let done = store.register_device(moved, 1).await.expect("register");
        assert!(
            matches!(done, Registration::Updated { ref displaced, .. } if displaced.is_empty()),
            "{done:?}"
        );
    })
    .await;
}

/// `--max-devices-per-account` takes 1 to 20, 1 by default; anything else
/// stops the start with an error naming the flag.
#[test]
fn the_device_limit_is_checked_at_start_up() {
    use call_notifier::config::Cli;
    use clap::Parser;
    let parse = |value: &str| {
        Cli::try_parse_from([
            "call-notifier".to_owned(),
            format!("--max-devices-per-account={value}"),
        ])
    };
    assert_eq!(
        Cli::try_parse_from(["call-notifier"])
            .expect("no flags")
            .config
            .max_devices_per_account,
        1
    );
    assert_eq!(parse("20").expect("20").config.max_devices_per_account, 20);
    for bad in ["0", "21", "-1", "many"] {
        let error = parse(bad).expect_err(bad).to_string();
        assert!(
            error.contains("--max-devices-per-account"),
            "{bad}: {error}"
        );
    }
}

/// APNs tokens are hex, and apps post them in either case: `EFEF…` and
/// `efef…` are one device (one row, one VoIP push per call), stored in
/// lower case, deleted by either. A row stored in upper case before tokens
/// were normalised is found by both too, and the registration that finds
/// it leaves one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_tokens_differing_only_in_case_are_one_device() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |c| c.max_devices_per_account = 3).await;
        let name = backend.name();
        let user = sip_user_id();
        let upper = format!("{user}EFEF");
        let lower = upper.to_ascii_lowercase();
        assert_eq!(
            register_with(&server, "apns", &user, &upper, &[])
                .await
                .status,
            StatusCode::CREATED,
            "{name}"
        );
        assert_eq!(server.tokens(&user).await, [lower.as_str()], "{name}");
        let again = register_with(&server, "apns", &user, &lower, &[]).await;
        assert_eq!(again.status, StatusCode::OK, "{name}: {}", again.body);
        let mixed = format!("{user}EfEf");
        assert_eq!(
            register_with(&server, "apns", &user, &mixed, &[])
                .await
                .status,
            StatusCode::OK,
            "{name}"
        );
        assert_eq!(server.tokens(&user).await, [lower.as_str()], "{name}");
        assert_eq!(
            server.client.unregister("apns", &user, &mixed).await.status,
            StatusCode::OK,
            "{name}"
        );
        assert!(server.tokens(&user).await.is_empty(), "{name}");

        // A row of an older server, in upper case: the lower-case
        // registration updates it (200, one row), and a delete in lower
        // case finds it.
        let store = &server.running.state.store;
        let id: i64 = user.parse().expect("a number");
        let old = || NewDevice {
            platform: Platform::Apns,
            ..android_device(id, &upper, None)
        };
        store.register_device(old(), 3).await.expect("stored");
        assert_eq!(server.tokens(&user).await, [upper.as_str()], "{name}");
        assert_eq!(
            register_with(&server, "apns", &user, &lower, &[])
                .await
                .status,
            StatusCode::OK,
            "{name}"
        );
        assert_eq!(server.tokens(&user).await, [lower.as_str()], "{name}");
        store.register_device(old(), 1).await.expect("stored");
        assert_eq!(server.tokens(&user).await, [upper.as_str()], "{name}");
        assert_eq!(
            server.client.unregister("apns", &user, &lower).await.status,
            StatusCode::OK,
            "{name}"
        );
        assert!(server.tokens(&user).await.is_empty(), "{name}");
        assert!(
            server.pusher.sent().is_empty(),
            "{name}: no notice to itself"
        );
    })
    .await;
}

/// `android` and `gcm` both push through FCM HTTP v1 (`gcm` is the legacy
/// name): an app that moves from one endpoint to the other with its token
/// is one phone, updated in place, rung on by the call ringing as it moves,
/// once a resend, never told that another device took the call it took,
/// and deleted through either endpoint. Before, it was a second device:
/// every push went to the phone twice, and it heard `answered_elsewhere`
/// for the key it had not answered under.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fcm_token_under_android_and_gcm_is_one_device() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |c| c.max_devices_per_account = 3).await;
        let name = backend.name();
        let user = sip_user_id();
        let token = format!("fcm-{user}");
        let first = server.client.register("gcm", &user, &token).await;
        assert_eq!(first, StatusCode::CREATED, "{name}");
        let key = call_id();
        let pbx = server.client.park(&user, &key);
        server.call_push(&token, &key).await;

        // The app moves as its call rings.
        let moved = server.client.register("android", &user, &token).await;
        assert_eq!(moved, StatusCode::OK, "{name}: an update, not a new device");
        assert_eq!(server.tokens(&user).await, [token.as_str()], "{name}");
        let stored = server.device(&user).await.expect("the device");
        assert_eq!(stored.platform, Platform::Android, "{name}");
        let resent = eventually(PUSH_BOUND, || async { server.calls_to(&token).len() == 2 }).await;
        assert!(resent, "{name}: the resend after the move");
        let push = server.calls_to(&token).pop().expect("a push");
        assert_eq!(push.payload.attempt(), Some(2), "{name}");
        let answer = server
            .client
            .call_response(&key, start_time_of(&push), true)
            .await;
        assert_eq!(
            answer.status,
            StatusCode::ACCEPTED,
            "{name}: {}",
            answer.body
        );
        assert_eq!(
            pbx.await.expect("the PBX task").body,
            "status=ACK",
            "{name}"
        );
        assert_eq!(
            server.calls_to(&token).len(),
            2,
            "{name}: rung once a resend"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(server.notices_to(&token).is_empty(), "{name}: told nothing");

        let deleted = server.client.unregister("gcm", &user, &token).await;
        assert_eq!(deleted.status, StatusCode::OK, "{name}: {}", deleted.body);
        assert!(server.tokens(&user).await.is_empty(), "{name}");
    })
    .await;
}

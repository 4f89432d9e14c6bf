//! Device registration: one device per SIP account, updates, platform moves,
//! deletes, and the notice to a phone that lost its account. APNs tokens
//! are hex, so the iOS ones here are `a1`, `a2`, `a3`.

mod common;

use call_notifier::push::Payload;
use call_notifier::store::Platform;
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

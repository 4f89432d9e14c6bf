//! Hardening of the push side: push tokens are checked before
//! they reach the store, the logs or a push service, and the notice to a
//! replaced phone is neither repeatable at will nor a VoIP push to an
//! iPhone. (Reason labels on the pushes metric: tests/push_fcm.rs, beside
//! the FCM stand-in.)

mod common;

use call_notifier::store::Platform;
use common::*;
use hyper::{Method, StatusCode};

const PLATFORMS: [&str; 3] = ["apns", "android", "gcm"];

/// Checks a 400 that names `token` and says `rule`.
fn assert_invalid_token(reply: &Reply, rule: &str, what: &str) {
    assert_invalid(reply, "token", rule, what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apns_token_that_is_not_hex_is_refused_and_changes_nothing() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let name = backend.name();
        let user = sip_user_id();
        // Hex in either case is a token.
        assert_eq!(
            server.client.register("apns", &user, "0a1B2c3D").await,
            StatusCode::CREATED,
            "{name}"
        );
        let before = server.stored(&user).await;

        for token in ["ios-1", "0x1f", "ab:cd", "zz", "a1b2g3", "ａ1"] {
            let reply = server
                .client
                .post(
                    "/api/apns-device/",
                    &[("sip_user_id", &user), ("token", token), ("app", APP)],
                )
                .await;
            assert_invalid_token(
                &reply,
                "hexadecimal",
                &format!("{name}: register {token:?}"),
            );
            let reply = server.client.unregister("apns", &user, token).await;
            assert_invalid_token(&reply, "hexadecimal", &format!("{name}: delete {token:?}"));
        }
        assert_eq!(server.stored(&user).await, before, "{name}");

        // Android tokens are not hex, and need not be.
        assert_eq!(
            server
                .client
                .register("android", &user, "fcm:APA91b-x_y")
                .await,
            StatusCode::OK,
            "{name}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_control_or_bidi_characters_is_refused_on_every_platform() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let name = backend.name();
        let user = sip_user_id();
        let id: i64 = user.parse().expect("a number");
        // As JSON escapes, the way the probe sent them: U+202E (right-to-left
        // override), the other overrides, isolates and marks, and controls.
        let invisible = [
            r"\u202e", r"\u202a", r"\u2066", r"\u2069", r"\u200e", r"\u200f", r"\u061c", r"\u200b",
            r"\ufeff",
        ];
        let controls = [r"\u0007", r"\u001b", r"\u0000", r"\u007f", r"\u0085"];
        for platform in PLATFORMS {
            let path = format!("/api/{platform}-device/");
            for (escape, rule) in invisible
                .iter()
                .map(|e| (e, "invisible formatting"))
                .chain(controls.iter().map(|e| (e, "control")))
            {
                let body =
                    format!(r#"{{"sip_user_id": {id}, "token": "ab{escape}cd", "app": "{APP}"}}"#);
                for method in [Method::POST, Method::DELETE] {
                    let reply = server
                        .client
                        .send(
                            method.clone(),
                            &path,
                            Some("application/json"),
                            body.clone().into_bytes(),
                        )
                        .await;
                    assert_invalid_token(
                        &reply,
                        rule,
                        &format!("{name}: {method} {platform} {escape}"),
                    );
                }
            }
            // The same character form-encoded.
            let reply = server
                .client
                .send(
                    Method::POST,
                    &path,
                    Some("application/x-www-form-urlencoded"),
                    format!("sip_user_id={id}&token=ab%E2%80%AEcd&app={APP}").into_bytes(),
                )
                .await;
            assert_invalid_token(
                &reply,
                "invisible formatting",
                &format!("{name}: form {platform}"),
            );
        }
        assert_eq!(
            server.device(&user).await,
            None,
            "{name}: nothing was registered"
        );
    })
    .await;
}

/// Re-registering an account to and fro within a minute tells each replaced
/// Android token once, however often it is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_takeover_notice_goes_to_a_token_once_a_minute() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let name = backend.name();
        let user = sip_user_id();
        // Tokens of this run only: a token is told at most once a minute
        // by the whole process.
        let [first, second, third, fourth] = ["1", "2", "3", "4"].map(|n| format!("{user}-t{n}"));
        let register = |token: String| {
            let (client, user) = (server.client.clone(), user.clone());
            async move { client.register("android", &user, &token).await }
        };
        assert_eq!(register(first.clone()).await, StatusCode::CREATED, "{name}");
        // `first` replaced: told.
        assert_eq!(register(second.clone()).await, StatusCode::OK, "{name}");
        server.pushes(&first, 1).await;
        // `second` replaced by `first` again: told.
        assert_eq!(register(first.clone()).await, StatusCode::OK, "{name}");
        server.pushes(&second, 1).await;
        // `first` replaced a second time within the minute: not told again.
        assert_eq!(register(third.clone()).await, StatusCode::OK, "{name}");
        // A notice handed over after the one `first` would have had.
        assert_eq!(register(fourth).await, StatusCode::OK, "{name}");
        server.pushes(&third, 1).await;

        assert_eq!(server.pusher.sent_to(&first).len(), 1, "{name}");
        assert_eq!(server.pusher.sent_to(&second).len(), 1, "{name}");
    })
    .await;
}

/// iOS makes the app report every VoIP push to CallKit as a call, so an
/// `apns` device is told only through an alert token: a takeover notice is
/// never handed over for an `apns` device without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_takeover_notice_is_handed_over_for_an_apns_token() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let name = backend.name();
        let user = sip_user_id();
        // Hex tokens of this run only (the SIP account id is all digits).
        let (ios_1, ios_2, ios_3) = (
            format!("{user}a1"),
            format!("{user}a2"),
            format!("{user}a3"),
        );
        let android = format!("{user}-android");
        for (platform, token, status) in [
            ("apns", &ios_1, StatusCode::CREATED),
            // An iPhone replaced by an iPhone...
            ("apns", &ios_2, StatusCode::OK),
            // ...and by an Android phone.
            ("android", &android, StatusCode::OK),
            // The Android phone replaced: told, after the others would have been.
            ("apns", &ios_3, StatusCode::OK),
        ] {
            assert_eq!(
                server.client.register(platform, &user, token).await,
                status,
                "{name}: {platform} {token}"
            );
        }
        server.pushes(&android, 1).await;
        assert!(server.pusher.sent_to(&ios_1).is_empty(), "{name}");
        assert!(server.pusher.sent_to(&ios_2).is_empty(), "{name}");
        assert_eq!(
            server.pusher.sent().len(),
            1,
            "{name}: only the Android notice"
        );
        let device = server.device(&user).await;
        assert_eq!(
            device.map(|d| (d.platform, d.token)),
            Some((Platform::Apns, ios_3.clone())),
            "{name}"
        );
    })
    .await;
}

/// An account registering fresh tokens in a loop (each one replacing the
/// last) sends a few takeover notices a minute, not one per token; and
/// however many it tried, another account's notice still goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_fresh_tokens_on_one_account_send_a_handful_of_notices() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let name = backend.name();
        let flooder = sip_user_id();
        for n in 0..1_000 {
            let token = format!("{flooder}-fresh-{n}");
            let status = server.client.register("android", &flooder, &token).await;
            assert!(status.is_success(), "{name}: {n}: {status}");
        }
        // The notices are handed over off the reply's path: give the last
        // ones a moment to be sent.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let told = server.pusher.sent().len();
        assert!((1..=5).contains(&told), "{name}: {told} takeover notices");

        let other = sip_user_id();
        let first = format!("{other}-first");
        let created = server.client.register("android", &other, &first).await;
        assert_eq!(created, StatusCode::CREATED, "{name}");
        let replaced = server
            .client
            .register("android", &other, &format!("{other}-second"))
            .await;
        assert_eq!(replaced, StatusCode::OK, "{name}");
        server.pushes(&first, 1).await;
    })
    .await;
}

/// Line and paragraph separators break a line in many log viewers, and tag
/// characters hide text: refused in tokens like the other invisible ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_separators_or_tag_characters_is_refused() {
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    let user = sip_user_id();
    let id: i64 = user.parse().expect("a number");
    for platform in PLATFORMS {
        let path = format!("/api/{platform}-device/");
        // The separators are whitespace to Rust, and refused as such.
        let refused = [
            (r"\u2028", "whitespace"),
            (r"\u2029", "whitespace"),
            (r"\udb40\udc00", "invisible formatting"),
            (r"\udb40\udc41", "invisible formatting"),
            (r"\udb40\udc7f", "invisible formatting"),
        ];
        for (escape, rule) in refused {
            let body =
                format!(r#"{{"sip_user_id": {id}, "token": "ab{escape}cd", "app": "{APP}"}}"#);
            for method in [Method::POST, Method::DELETE] {
                let reply = server
                    .client
                    .send(
                        method.clone(),
                        &path,
                        Some("application/json"),
                        body.clone().into_bytes(),
                    )
                    .await;
                assert_invalid_token(&reply, rule, &format!("{method} {platform} {escape}"));
            }
        }
    }
    assert_eq!(server.device(&user).await, None, "nothing was registered");
}

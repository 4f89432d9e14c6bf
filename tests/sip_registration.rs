//! `/api/sip-registration/`: a SIP proxy registers the push parameters of a
//! REGISTER (RFC 8599), on every backend.

mod common;

use std::time::Duration;

use call_notifier::store::{now_millis, App, Credentials, NewDevice, Platform, Registration};
use common::*;
use hyper::{Method, StatusCode};
use serde_json::json;

const PATH: &str = "/api/sip-registration/";
/// The test app's APNs `pn-param`: a team id, the bundle id, VoIP pushes.
const APNS_PARAM: &str = "ABCDE12345.com.example.softphone.voip";
const VOIP: &str = "a1b2c3d4";
const REMOTE: &str = "e5f6a7b8";
/// What a device outlives its registration by (see `src/http/sip.rs`).
const GRACE_MS: i64 = 30_000;

/// A REGISTER's fields for `user`, with `expires`.
fn apns<'a>(user: &'a str, provider: &'a str, expires: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("sip_user_id", user),
        ("pn_provider", provider),
        ("pn_prid", VOIP),
        ("pn_param", APNS_PARAM),
        ("expires", expires),
    ]
}

/// Replaces (or adds) one field.
fn with<'a>(
    mut fields: Vec<(&'a str, &'a str)>,
    name: &'a str,
    value: &'a str,
) -> Vec<(&'a str, &'a str)> {
    fields.retain(|(n, _)| *n != name);
    fields.push((name, value));
    fields
}

/// The proxy's `DELETE` of `user`'s APNs registration (fields in the
/// query string).
async fn proxy_deletes(server: &TestServer, user: &str) -> Reply {
    let query = serde_urlencoded::to_string([
        ("sip_user_id", user),
        ("pn_provider", "apns"),
        ("pn_prid", VOIP),
        ("pn_param", APNS_PARAM),
    ])
    .expect("a query");
    server
        .client
        .send(Method::DELETE, &format!("{PATH}?{query}"), None, Vec::new())
        .await
}

/// Asserts the device JSON a registration answered, and that the store
/// holds it expiring `expires` seconds (plus the grace) from about now.
async fn assert_stored(server: &TestServer, reply: &Reply, user: &str, expires: i64) -> NewDevice {
    let what = server.backend.name();
    let body = reply.json();
    assert_eq!(body["sip_user_id"], user, "{what}: {body}");
    let device = server.device(user).await.expect("the device is stored");
    let at = device.expires_at.expect("a proxy's device expires");
    let expected = now_millis() + expires * 1000 + GRACE_MS;
    assert!(
        (expected - 5_000..=expected).contains(&at),
        "{what}: expires_at {at}, about {expected}"
    );
    assert_eq!(body["expires_at"], at, "{what}: {body}");
    device
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_and_its_sandbox_register_the_voip_token() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        for (provider, sandbox) in [("apns", false), ("apns.dev", true)] {
            let user = sip_user_id();
            let mut fields = apns(&user, provider, "600");
            fields.push(("user_agent", "Linphone/5.2.0 (iPhone)"));
            let reply = server.client.post(PATH, &fields).await;
            assert_eq!(
                reply.status,
                StatusCode::CREATED,
                "{provider}: {}",
                reply.body
            );
            let device = assert_stored(&server, &reply, &user, 600).await;
            assert_eq!(device.platform, Platform::Apns);
            assert_eq!(device.token, VOIP);
            assert_eq!(device.app_id, APP);
            assert_eq!(device.sandbox, sandbox, "{provider}");
            assert_eq!(device.alert_token, None);
            assert_eq!(
                device.client_version.as_deref(),
                Some("Linphone/5.2.0 (iPhone)")
            );
            assert_eq!(reply.json()["sandbox"], sandbox);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dual_token_form_stores_the_alert_token() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let user = sip_user_id();
        let prid = format!("{REMOTE}:remote&{VOIP}:voip");
        let fields = with(
            with(apns(&user, "apns", "3600"), "pn_prid", &prid),
            "pn_param",
            "ABCDE12345.com.example.softphone.remote&voip",
        );
        let reply = server.client.post(PATH, &fields).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        let device = assert_stored(&server, &reply, &user, 3600).await;
        assert_eq!(device.token, VOIP);
        assert_eq!(device.alert_token.as_deref(), Some(REMOTE));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_finds_the_android_app_of_the_project() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let dir = tempfile::tempdir().expect("a temp dir");
        // Two apps of one project, one of another: the first by app id wins.
        for (app_id, project) in [
            ("com.example.b", "shared-project"),
            ("com.example.a", "shared-project"),
            ("com.example.c", "other-project"),
        ] {
            let path = fcm::service_account(
                dir.path(),
                &format!("{app_id}.json"),
                project,
                "http://127.0.0.1:9/token",
            );
            let app = App {
                platform: Platform::Android,
                app_id: app_id.into(),
                credentials: Some(Credentials::Fcm {
                    service_account_path: path,
                }),
            };
            server
                .running
                .state
                .store
                .put_app(&app)
                .await
                .expect("an app");
        }
        for (project, app_id) in [
            ("shared-project", "com.example.a"),
            ("other-project", "com.example.c"),
        ] {
            let user = sip_user_id();
            let token = "fcm-token:APA91b-x_y";
            let reply = server
                .client
                .post_json(
                    PATH,
                    json!({"sip_user_id": user, "pn_provider": "fcm", "pn_prid": token,
                           "pn_param": project, "expires": 120}),
                )
                .await;
            assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
            let device = assert_stored(&server, &reply, &user, 120).await;
            assert_eq!(device.platform, Platform::Android);
            assert_eq!(device.app_id, app_id, "{project}");
            assert_eq!(
                device.token, token,
                "an FCM token is taken whole, : and all"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_is_200_and_moves_the_expiry() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let user = sip_user_id();
        let first = server.client.post(PATH, &apns(&user, "apns", "60")).await;
        assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
        let refresh = server.client.post(PATH, &apns(&user, "apns", "3600")).await;
        assert_eq!(refresh.status, StatusCode::OK, "{}", refresh.body);
        assert_stored(&server, &refresh, &user, 3600).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_0_and_delete_remove_the_device() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let what = backend.name();
        let user = sip_user_id();
        let fields = apns(&user, "apns", "600");
        let register = || server.client.post(PATH, &fields);
        assert_eq!(register().await.status, StatusCode::CREATED);
        let removed = server.client.post(PATH, &apns(&user, "apns", "0")).await;
        assert_eq!(removed.status, StatusCode::OK, "{what}: {}", removed.body);
        assert_eq!(removed.json(), json!({"removed": true}));
        assert_eq!(server.device(&user).await, None, "{what}");
        let again = server.client.post(PATH, &apns(&user, "apns", "0")).await;
        assert_eq!(
            again.status,
            StatusCode::NOT_FOUND,
            "{what}: {}",
            again.body
        );

        assert_eq!(register().await.status, StatusCode::CREATED);
        let deleted = proxy_deletes(&server, &user).await;
        assert_eq!(deleted.status, StatusCode::OK, "{what}: {}", deleted.body);
        assert_eq!(deleted.json(), json!({"removed": true}));
        assert_eq!(server.device(&user).await, None, "{what}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_device_is_not_pushed_and_is_removed() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |c| c.wait_ms = 500).await;
        let what = backend.name();
        let user = sip_user_id();
        let id: i64 = user.parse().expect("an id");
        let device = |token: &str, expires_at| android_device(id, token, expires_at);
        let store = &server.running.state.store;
        store
            .register_device(device("lapsed", Some(now_millis() - 1)), 1)
            .await
            .expect("an expired device");
        let reply = server.client.incoming_call(&user, &call_id()).await;
        assert_eq!(reply.body, "status=NAK", "{what}");
        assert!(server.pusher.sent_to("lapsed").is_empty(), "{what}");
        // Gone from the store, not merely skipped: an app device registered
        // beside it is all the account has.
        store
            .register_device(device("app", None), 2)
            .await
            .expect("an app device");
        assert_eq!(server.tokens(&user).await, ["app"], "{what}");
    })
    .await;
}

/// A lapsed device does not count toward the limit: a new device takes its
/// place, quietly, and the live device beside it stays (it is not the one
/// displaced, although it was registered longer ago).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_device_holds_no_place_at_the_limit() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let what = backend.name();
        let user = sip_user_id();
        let id: i64 = user.parse().expect("an id");
        let device = |token: &str, expires_at| android_device(id, token, expires_at);
        let store = &server.running.state.store;
        store
            .register_device(device("app", None), 2)
            .await
            .expect("an app device");
        store
            .register_device(device("lapsed", Some(now_millis() - 1)), 2)
            .await
            .expect("a lapsed device");
        let added = store
            .register_device(device("new", None), 2)
            .await
            .expect("a new device");
        assert!(
            matches!(&added, Registration::Created { displaced } if displaced.is_empty()),
            "{what}: {added:?}"
        );
        assert_eq!(server.tokens(&user).await, ["app", "new"], "{what}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_expires_with_its_registration() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let user = sip_user_id();
        let id: i64 = user.parse().expect("an id");
        let reply = server.client.post(PATH, &apns(&user, "apns", "1")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        // Push its expiry (1 s + the grace) into the past, as time would.
        let mut stored = server.device(&user).await.expect("stored");
        stored.expires_at = stored.expires_at.map(|at| at - GRACE_MS - 1_000);
        let store = &server.running.state.store;
        store.register_device(stored, 1).await.expect("updated");
        let gone = eventually(Duration::from_secs(3), || async {
            store.device(id).await.expect("the store answers").is_none()
        })
        .await;
        assert!(gone, "{}", backend.name());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_provider_or_app_is_404_naming_the_field() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let user = sip_user_id();
        for (fields, field) in [
            (
                with(apns(&user, "apns", "60"), "pn_provider", "webpush"),
                "pn_provider",
            ),
            (
                with(
                    apns(&user, "apns", "60"),
                    "pn_param",
                    "ABCDE12345.org.unknown.voip",
                ),
                "pn_param",
            ),
            (
                with(
                    with(apns(&user, "apns", "60"), "pn_provider", "fcm"),
                    "pn_param",
                    "no-such-project",
                ),
                "pn_param",
            ),
        ] {
            let reply = server.client.post(PATH, &fields).await;
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "{fields:?}: {}",
                reply.body
            );
            assert_eq!(reply.json()["field"], field, "{}", reply.body);
        }
        assert_eq!(server.device(&user).await, None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_pbx_allow_is_403_before_the_body() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |c| {
            c.pbx_allow = vec!["10.0.0.0/8".parse().unwrap()]
        })
        .await;
        let user = sip_user_id();
        for method in [Method::POST, Method::DELETE] {
            let reply = server
                .client
                .form(method.clone(), PATH, &apns(&user, "apns", "60"))
                .await;
            assert_eq!(
                reply.status,
                StatusCode::FORBIDDEN,
                "{method}: {}",
                reply.body
            );
            // Not even a malformed body is read.
            let reply = server
                .client
                .send(
                    method.clone(),
                    PATH,
                    Some("application/json"),
                    b"{".to_vec(),
                )
                .await;
            assert_eq!(
                reply.status,
                StatusCode::FORBIDDEN,
                "{method}: {}",
                reply.body
            );
        }
        assert_eq!(server.device(&user).await, None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_400_naming_the_field_and_stores_nothing() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let user = sip_user_id();
        let long = "a".repeat(300);
        let base = apns(&user, "apns", "60");
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (with(base.clone(), "sip_user_id", "0"), "sip_user_id"),
            (with(base.clone(), "sip_user_id", "x"), "sip_user_id"),
            (with(base.clone(), "pn_provider", ""), "pn_provider"),
            (with(base.clone(), "pn_prid", ""), "pn_prid"),
            (with(base.clone(), "pn_prid", "not hex"), "pn_prid"),
            (with(base.clone(), "pn_prid", "zz12"), "pn_prid"),
            (with(base.clone(), "pn_prid", &long), "pn_prid"),
            (with(base.clone(), "pn_prid", "ab:remote"), "pn_prid"),
            (with(base.clone(), "pn_prid", "ab:voip&cd:voip"), "pn_prid"),
            (with(base.clone(), "pn_prid", "ab:fax"), "pn_prid"),
            (
                with(base.clone(), "pn_param", "ABCDE12345.com.example.softphone"),
                "pn_param",
            ),
            (
                with(
                    base.clone(),
                    "pn_param",
                    "ABCDE12345.com.example.softphone.remote",
                ),
                "pn_param",
            ),
            (with(base.clone(), "pn_param", ""), "pn_param"),
            (with(base.clone(), "expires", "-1"), "expires"),
            (with(base.clone(), "expires", "1.5"), "expires"),
            (with(base.clone(), "expires", "4294967296"), "expires"),
            (with(base.clone(), "expires", ""), "expires"),
            (with(base.clone(), "user_agent", &long), "user_agent"),
            (with(base.clone(), "user_agent", "a\u{1}b"), "user_agent"),
            (
                base.iter()
                    .copied()
                    .filter(|(n, _)| *n != "expires")
                    .collect(),
                "expires",
            ),
            (
                base.iter()
                    .copied()
                    .filter(|(n, _)| *n != "pn_prid")
                    .collect(),
                "pn_prid",
            ),
        ];
        for (fields, field) in cases {
            let reply = server.client.post(PATH, &fields).await;
            assert_invalid(
                &reply,
                field,
                "",
                &format!("{}: {fields:?}", backend.name()),
            );
        }
        let fcm_with_space = with(
            with(with(base.clone(), "pn_provider", "fcm"), "pn_param", "p"),
            "pn_prid",
            "a b",
        );
        let reply = server.client.post(PATH, &fcm_with_space).await;
        assert_invalid(&reply, "pn_prid", "whitespace", "an FCM token with a space");
        assert_eq!(server.device(&user).await, None, "{}", backend.name());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_register_of_a_ringing_device_answers_its_call() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let what = backend.name();
        let user = sip_user_id();
        let reply = server.client.post(PATH, &apns(&user, "apns", "60")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{what}: {}", reply.body);
        let key = call_id();
        let pbx = server.client.park(&user, &key);
        let push = server.call_push(VOIP, &key).await;
        // The phone, woken, REGISTERs again: that is its answer.
        let refresh = server.client.post(PATH, &apns(&user, "apns", "60")).await;
        assert_eq!(refresh.status, StatusCode::OK, "{what}: {}", refresh.body);
        let answered = bounded("the PBX's answer", pbx)
            .await
            .expect("the PBX task");
        assert_eq!(answered.body, "status=ACK", "{what}");
        // Its app's call-response that follows is a repeat of it.
        server.answer_accepted(&key, &push).await;
    })
    .await;
}

/// The app registers `user`'s iPhone itself (`/api/apns-device/`): the
/// VoIP token a proxy binds in these tests, its alert token and a name.
async fn app_registers_alices_iphone(server: &TestServer, user: &str) {
    let app = server
        .client
        .post(
            "/api/apns-device/",
            &[
                ("sip_user_id", user),
                ("token", VOIP),
                ("app", APP),
                ("alert_token", REMOTE),
                ("name", "Alice's iPhone"),
            ],
        )
        .await;
    assert_eq!(
        app.status,
        StatusCode::CREATED,
        "{}: {}",
        server.backend.name(),
        app.body
    );
}

/// Issue #23: a proxy binding the token an app registered itself refreshes
/// only its binding: the app's `alert_token` and name stay, the device keeps
/// no expiry of its own (so the binding's lapse never takes it away), and
/// while bound the device's REGISTER still answers its call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_binding_an_app_registered_device_keeps_what_the_app_gave() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let user = sip_user_id();
        app_registers_alices_iphone(&server, &user).await;
        let bound = server.client.post(PATH, &apns(&user, "apns", "600")).await;
        assert_eq!(
            bound.status,
            StatusCode::OK,
            "{}: {}",
            backend.name(),
            bound.body
        );
        let device = server.device(&user).await.expect("still stored");
        assert_eq!(
            device.alert_token.as_deref(),
            Some(REMOTE),
            "{}",
            backend.name()
        );
        assert_eq!(device.name.as_deref(), Some("Alice's iPhone"));
        assert_eq!(device.expires_at, None, "the app's device never expires");
        assert!(
            device.proxy_bound(now_millis()),
            "{}: bound",
            backend.name()
        );
        assert!(
            !device.proxy_bound(now_millis() + 700_000),
            "the binding lapses with its REGISTER"
        );
        assert_eq!(server.tokens(&user).await, [VOIP]);

        // The app registering again keeps the binding; the REGISTER that
        // follows answers the call ringing for the device.
        let again = server
            .client
            .post(
                "/api/apns-device/",
                &[
                    ("sip_user_id", &user),
                    ("token", VOIP),
                    ("app", APP),
                    ("alert_token", REMOTE),
                ],
            )
            .await;
        assert_eq!(again.status, StatusCode::OK, "{}", again.body);
        let key = call_id();
        let pbx = server.client.park(&user, &key);
        server.call_push(VOIP, &key).await;
        let register = server.client.post(PATH, &apns(&user, "apns", "600")).await;
        assert_eq!(register.status, StatusCode::OK, "{}", register.body);
        assert_eq!(pbx.await.unwrap().body, "status=ACK", "{}", backend.name());
        assert_eq!(server.device(&user).await.and_then(|d| d.expires_at), None);
    })
    .await;
}

/// An explicit de-REGISTER (`expires` 0, or the proxy's `DELETE`) of a
/// device its app registered ends only the proxy's binding, as its lapse
/// would: the app's device stays with what the app gave, and its calls are
/// pushed and answered as before. The proxy's own devices go
/// (`expires_0_and_delete_remove_the_device`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_de_register_of_an_app_registered_device_ends_only_the_binding() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let what = backend.name();
        let user = sip_user_id();
        app_registers_alices_iphone(&server, &user).await;
        for unbind in ["expires 0", "DELETE"] {
            let bound = server.client.post(PATH, &apns(&user, "apns", "600")).await;
            assert_eq!(bound.status, StatusCode::OK, "{what}: {}", bound.body);
            assert!(server
                .device(&user)
                .await
                .is_some_and(|d| d.proxy_bound(now_millis())));
            let removed = match unbind {
                "DELETE" => proxy_deletes(&server, &user).await,
                _ => server.client.post(PATH, &apns(&user, "apns", "0")).await,
            };
            assert_eq!(
                removed.status,
                StatusCode::OK,
                "{what}, {unbind}: {}",
                removed.body
            );
            assert_eq!(removed.json(), json!({"removed": true}), "{what}, {unbind}");
            let device = server.device(&user).await;
            let device =
                device.unwrap_or_else(|| panic!("{what}, {unbind}: the app's device went"));
            assert!(
                !device.proxy_bound(now_millis()),
                "{what}, {unbind}: still bound"
            );
            assert_eq!(device.expires_at, None, "{what}, {unbind}");
            assert_eq!(
                device.alert_token.as_deref(),
                Some(REMOTE),
                "{what}, {unbind}"
            );
            assert_eq!(
                device.name.as_deref(),
                Some("Alice's iPhone"),
                "{what}, {unbind}"
            );
        }

        // Still the account's device: its call is pushed, and its app's
        // answer takes it.
        let key = call_id();
        let pbx = server.client.park(&user, &key);
        let push = server.call_push(VOIP, &key).await;
        server.answer_accepted(&key, &push).await;
        let answered = bounded("the PBX's answer", pbx)
            .await
            .expect("the PBX task");
        assert_eq!(answered.body, "status=ACK", "{what}");
        // The app's own DELETE takes it away.
        let deleted = server.client.unregister("apns", &user, VOIP).await;
        assert_eq!(deleted.status, StatusCode::OK, "{what}: {}", deleted.body);
        assert_eq!(server.device(&user).await, None, "{what}");
    })
    .await;
}

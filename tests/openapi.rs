//! The edges `/openapi.json` draws, held on the server side: JSON null in an
//! optional field is absent, tokens and app ids are text, the text forms of
//! `message_start_time` are the ones the document's pattern names, and
//! authentication is declared as the server asks for it. (`.ci/schemathesis`
//! checks the whole document against a running server; these pin each rule
//! that was changed to make it exact.)

mod common;

use common::*;
use hyper::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_call_id_is_absent_and_the_call_gets_a_random_key() {
    let backend = Backend::embedded();
    let server = start(&backend, |c| {
        c.wait_ms = 300;
        c.resend_interval_ms = 100;
    })
    .await;
    let user = server.registered("android", "null-call-id").await;
    let id: i64 = user.parse().unwrap();
    let reply = server
        .client
        .post_json(
            "/api/incoming-call/",
            json!({"sip_user_id": id, "phonenumber": "0612345678", "caller_id": null, "call_id": null}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body, "status=NAK");
    let push = server.push("null-call-id").await;
    let call_notifier::push::Payload::Call { unique_key, .. } = &push.payload else {
        panic!("a call push: {push:?}");
    };
    assert!(
        unique_key.len() == 32 && unique_key.chars().all(|c| c.is_ascii_hexdigit()),
        "a random key, not one made of null: {unique_key}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_optional_registration_fields_are_absent() {
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    let user = sip_user_id();
    let reply = server
        .client
        .post_json(
            "/api/android-device/",
            json!({"sip_user_id": user, "token": "t", "app": APP, "name": null,
                   "os_version": null, "client_version": null, "remote_logging_id": null,
                   "sandbox": null}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let device = reply.json();
    assert_eq!(device["name"], serde_json::Value::Null);
    assert_eq!(device["sandbox"], false);
}

/// A token or app id sent as a JSON number is refused: no token is a
/// number, and one sent as a number has lost digits already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_app_ids_must_be_text() {
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    let user = sip_user_id();
    for (platform, body, field) in [
        (
            "apns",
            json!({"sip_user_id": user, "token": 1234, "app": APP}),
            "token",
        ),
        (
            "android",
            json!({"sip_user_id": user, "token": 1.5, "app": APP}),
            "token",
        ),
        (
            "gcm",
            json!({"sip_user_id": user, "token": "t", "app": 7}),
            "app",
        ),
    ] {
        let path = format!("/api/{platform}-device/");
        let reply = server.client.post_json(&path, body.clone()).await;
        assert_invalid(
            &reply,
            field,
            "must be a string",
            &format!("POST {path} {body}"),
        );
        let reply = server
            .client
            .send(
                hyper::Method::DELETE,
                &path,
                Some("application/json"),
                body.to_string().into_bytes(),
            )
            .await;
        assert_invalid(
            &reply,
            field,
            "must be a string",
            &format!("DELETE {path} {body}"),
        );
    }
    assert_eq!(server.device(&user).await, None);
}

/// Text `message_start_time` is taken in the forms apps print a time in,
/// and only those (the document's pattern); a JSON number up to the year
/// 5000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_start_time_takes_the_documented_forms() {
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    // The key is unknown: a taken time gets 404, a refused one 400.
    let taken = [
        "1700000000.25",
        " 1700000000 ",
        "1.70000000025E9",
        "1.7e+09",
        "1700000000.25e-3",
        ".5",
    ];
    let refused = ["12345678901", "1e10", "17e8", "-0", "0x10", "1e999"];
    for time in taken.iter().chain(&refused) {
        let reply = server
            .client
            .post(
                "/api/call-response/",
                &[("unique_key", "k"), ("message_start_time", time)],
            )
            .await;
        if taken.contains(time) {
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "{time:?}: {}",
                reply.body
            );
        } else {
            assert_invalid(&reply, "message_start_time", "", time);
        }
    }
    let reply = server
        .client
        .post_json(
            "/api/call-response/",
            json!({"unique_key": "k", "message_start_time": 12345678901.5}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);
    let reply = server
        .client
        .post_json(
            "/api/call-response/",
            json!({"unique_key": "k", "message_start_time": 95617584000u64}),
        )
        .await;
    assert_invalid(&reply, "message_start_time", "", "the year 5000");
}

/// The app endpoints ask for credentials only with an account API, and the
/// document says so: Basic auth or none, never Basic auth alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_declares_auth_as_optional_where_the_server_may_not_ask() {
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    let doc = server.client.get("/openapi.json").await.json();
    let optional = json!([{"basicAuth": []}, {}]);
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let app = ["-device/", "/check-in/", "/hangup-reason/"]
                .iter()
                .any(|p| path.ends_with(p));
            let security = &operation["security"];
            if app {
                assert_eq!(security, &optional, "{method} {path}");
            } else {
                assert!(security.is_null(), "{method} {path}: {security}");
            }
        }
    }
    // And this server (loopback, no --auth-url) does not ask.
    let reply = server
        .client
        .post(
            "/api/android-device/",
            &[
                ("sip_user_id", &sip_user_id()),
                ("token", "t"),
                ("app", APP),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
}

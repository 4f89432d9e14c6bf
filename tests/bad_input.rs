//! Bad input on every endpoint: a 4xx that names the field and the rule,
//! never a 5xx or a crash, and the store exactly as it was.

mod common;

use call_notifier::store::Device;
use common::*;
use hyper::{Method, StatusCode};
use serde_json::json;

/// What a bad request must get: this status, naming this field (if any).
struct Case {
    method: Method,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: StatusCode,
    field: Option<&'static str>,
}

fn form(path: &'static str, body: &str, field: &'static str) -> Case {
    Case {
        method: Method::POST,
        path,
        content_type: Some("application/x-www-form-urlencoded"),
        body: body.as_bytes().to_vec(),
        status: StatusCode::BAD_REQUEST,
        field: Some(field),
    }
}

fn json_case(path: &'static str, body: serde_json::Value, field: &'static str) -> Case {
    Case {
        content_type: Some("application/json"),
        body: body.to_string().into_bytes(),
        ..form(path, "", field)
    }
}

fn raw(path: &'static str, content_type: Option<&'static str>, body: &[u8], status: u16) -> Case {
    Case {
        method: Method::POST,
        path,
        content_type,
        body: body.to_vec(),
        status: StatusCode::from_u16(status).unwrap(),
        field: None,
    }
}

const CALL: &str = "/api/incoming-call/";
const ANSWER: &str = "/api/call-response/";
const DEVICE: &str = "/api/android-device/";
const APNS_DEVICE: &str = "/api/apns-device/";

fn cases(user: &str) -> Vec<Case> {
    let long = |n: usize| "9".repeat(n);
    let ok_call = |extra: &str| format!("sip_user_id={user}&phonenumber=0612345678{extra}");
    let ok_device = |extra: &str| format!("sip_user_id={user}&token=tok&app={APP}{extra}");
    let ok_apns_device = |extra: &str| format!("sip_user_id={user}&token=ab12&app={APP}{extra}");
    let mut cases = vec![
        // The PBX's request.
        form(CALL, "phonenumber=1", "sip_user_id"),
        form(CALL, "sip_user_id=&phonenumber=1", "sip_user_id"),
        form(CALL, "sip_user_id=abc&phonenumber=1", "sip_user_id"),
        form(CALL, "sip_user_id=-1&phonenumber=1", "sip_user_id"),
        form(CALL, "sip_user_id=0&phonenumber=1", "sip_user_id"),
        form(CALL, "sip_user_id=1.5&phonenumber=1", "sip_user_id"),
        form(
            CALL,
            "sip_user_id=99999999999999999999&phonenumber=1",
            "sip_user_id",
        ),
        form(CALL, &format!("sip_user_id={user}"), "phonenumber"),
        form(
            CALL,
            &format!("sip_user_id={user}&phonenumber=call-me"),
            "phonenumber",
        ),
        form(
            CALL,
            &format!("sip_user_id={user}&phonenumber={}", long(33)),
            "phonenumber",
        ),
        form(
            CALL,
            &format!("sip_user_id={user}&phonenumber=%FF%FE"),
            "phonenumber",
        ),
        form(
            CALL,
            &ok_call(&format!("&caller_id={}", "a".repeat(256))),
            "caller_id",
        ),
        form(
            CALL,
            &ok_call(&format!("&call_id={}", "a".repeat(256))),
            "call_id",
        ),
        form(CALL, &ok_call("&call_id=%00"), "call_id"),
        json_case(
            CALL,
            json!({"sip_user_id": true, "phonenumber": "1"}),
            "sip_user_id",
        ),
        json_case(
            CALL,
            json!({"sip_user_id": [1], "phonenumber": "1"}),
            "sip_user_id",
        ),
        json_case(
            CALL,
            json!({"sip_user_id": -3, "phonenumber": "1"}),
            "sip_user_id",
        ),
        json_case(
            CALL,
            json!({"sip_user_id": 1e30, "phonenumber": "1"}),
            "sip_user_id",
        ),
        json_case(
            CALL,
            json!({"sip_user_id": 1, "phonenumber": {"n": 1}}),
            "phonenumber",
        ),
        json_case(
            CALL,
            json!({"sip_user_id": 1, "phonenumber": true}),
            "phonenumber",
        ),
        raw(CALL, Some("application/json"), b"{\"sip_user_id\": 1,", 400),
        raw(CALL, Some("application/json"), b"[1, 2]", 400),
        raw(
            CALL,
            Some("application/json"),
            b"sip_user_id=1&phonenumber=1",
            400,
        ),
        raw(
            CALL,
            Some("application/x-www-form-urlencoded"),
            b"{\"sip_user_id\": 1, \"phonenumber\": \"1\"}",
            400,
        ),
        // A `%` that begins no escape is text, as Django read it.
        form(CALL, "sip_user_id=%zz&phonenumber=1", "sip_user_id"),
        form(CALL, "sip_user_id=1&phonenumber=1%", "phonenumber"),
        raw(CALL, Some("multipart/form-data; boundary=x"), b"--x--", 415),
        raw(CALL, None, b"", 400),
        raw(
            CALL,
            Some("application/x-www-form-urlencoded"),
            &vec![b'a'; 17 * 1024],
            413,
        ),
        // The app's answer.
        form(ANSWER, "message_start_time=1", "unique_key"),
        form(ANSWER, "unique_key=&message_start_time=1", "unique_key"),
        form(
            ANSWER,
            "unique_key=%20%20&message_start_time=1",
            "unique_key",
        ),
        form(
            ANSWER,
            &format!(
                "unique_key={}&message_start_time=1",
                "k".repeat(call_notifier::broker::PUSH_KEY_MAX + 1)
            ),
            "unique_key",
        ),
        form(ANSWER, "unique_key=k", "message_start_time"),
        form(
            ANSWER,
            "unique_key=k&message_start_time=",
            "message_start_time",
        ),
        form(
            ANSWER,
            "unique_key=k&message_start_time=NaN",
            "message_start_time",
        ),
        form(
            ANSWER,
            "unique_key=k&message_start_time=inf",
            "message_start_time",
        ),
        form(
            ANSWER,
            "unique_key=k&message_start_time=-inf",
            "message_start_time",
        ),
        form(
            ANSWER,
            "unique_key=k&message_start_time=1e300",
            "message_start_time",
        ),
        form(
            ANSWER,
            "unique_key=k&message_start_time=-5",
            "message_start_time",
        ),
        form(
            ANSWER,
            "unique_key=k&message_start_time=yesterday",
            "message_start_time",
        ),
        form(
            ANSWER,
            "unique_key=k&message_start_time=1&available=maybe",
            "available",
        ),
        form(
            ANSWER,
            "unique_key=k&message_start_time=1&available=",
            "available",
        ),
        json_case(
            ANSWER,
            json!({"unique_key": "k", "message_start_time": 1, "available": 2}),
            "available",
        ),
        json_case(
            ANSWER,
            json!({"unique_key": 5, "message_start_time": "x"}),
            "message_start_time",
        ),
        json_case(
            ANSWER,
            json!({"unique_key": null, "message_start_time": 1}),
            "unique_key",
        ),
        raw(ANSWER, Some("application/json"), b"\"just a string\"", 400),
        raw(ANSWER, Some("application/json"), &[0xff, 0xfe, 0x00], 400),
        // The app's registration.
        form(DEVICE, &format!("token=tok&app={APP}"), "sip_user_id"),
        form(
            DEVICE,
            &format!("sip_user_id={}&token=tok&app={APP}", long(20)),
            "sip_user_id",
        ),
        form(DEVICE, &format!("sip_user_id={user}&app={APP}"), "token"),
        form(
            DEVICE,
            &format!("sip_user_id={user}&token=&app={APP}"),
            "token",
        ),
        form(
            DEVICE,
            &format!("sip_user_id={user}&token=a+b&app={APP}"),
            "token",
        ),
        form(
            DEVICE,
            &format!("sip_user_id={user}&token=a%09b&app={APP}"),
            "token",
        ),
        form(
            DEVICE,
            &format!("sip_user_id={user}&token={}&app={APP}", "t".repeat(251)),
            "token",
        ),
        form(DEVICE, &format!("sip_user_id={user}&token=tok"), "app"),
        form(DEVICE, &format!("sip_user_id={user}&token=tok&app="), "app"),
        form(DEVICE, &ok_device("&sandbox=maybe"), "sandbox"),
        form(
            DEVICE,
            &ok_device(&format!("&name={}", "n".repeat(256))),
            "name",
        ),
        form(
            DEVICE,
            &ok_device(&format!("&os_version={}", "n".repeat(256))),
            "os_version",
        ),
        form(
            DEVICE,
            &ok_device(&format!("&client_version={}", "n".repeat(256))),
            "client_version",
        ),
        form(
            DEVICE,
            &ok_device(&format!("&remote_logging_id={}", "n".repeat(256))),
            "remote_logging_id",
        ),
        form(DEVICE, &ok_device("&token=%C3%28"), "token"),
        json_case(
            DEVICE,
            json!({"sip_user_id": user, "token": ["t"], "app": APP}),
            "token",
        ),
        json_case(
            DEVICE,
            json!({"sip_user_id": user, "token": "t", "app": APP, "sandbox": "sometimes"}),
            "sandbox",
        ),
        // `alert_token`: an iPhone's regular APNs token, 1 to 250 hex digits.
        form(
            APNS_DEVICE,
            &ok_apns_device("&alert_token=ab%20cd"),
            "alert_token",
        ),
        form(
            APNS_DEVICE,
            &ok_apns_device("&alert_token=%20abcd"),
            "alert_token",
        ),
        form(
            APNS_DEVICE,
            &ok_apns_device("&alert_token=xyz"),
            "alert_token",
        ),
        form(APNS_DEVICE, &ok_apns_device("&alert_token="), "alert_token"),
        form(
            APNS_DEVICE,
            &ok_apns_device(&format!("&alert_token={}", "a".repeat(251))),
            "alert_token",
        ),
        form(DEVICE, &ok_device("&alert_token=abcd"), "alert_token"),
        json_case(
            APNS_DEVICE,
            json!({"sip_user_id": user, "token": "ab12", "app": APP, "alert_token": 1234}),
            "alert_token",
        ),
        raw(DEVICE, Some("application/json"), b"{", 400),
        raw(
            DEVICE,
            Some("application/json"),
            &vec![b' '; 20 * 1024],
            413,
        ),
    ];
    cases.push(Case {
        method: Method::DELETE,
        ..form(DEVICE, &format!("sip_user_id={user}&app={APP}"), "token")
    });
    cases.push(Case {
        method: Method::DELETE,
        ..form(DEVICE, &format!("token=tok&app={APP}"), "sip_user_id")
    });
    cases
}

/// Every device the store holds for `sip_user_id`: a refused registration
/// must neither change the account's device nor add one.
async fn every_device(server: &TestServer, sip_user_id: &str) -> Vec<Device> {
    let id: i64 = sip_user_id.parse().expect("a SIP account id");
    server
        .running
        .state
        .store
        .devices(id)
        .await
        .expect("the devices")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_4xx_naming_the_field_and_changes_nothing() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let user = server.registered("android", "tok").await;
        let before = every_device(&server, &user).await;

        for case in cases(&user) {
            let reply = server
                .client
                .send(
                    case.method.clone(),
                    case.path,
                    case.content_type,
                    case.body.clone(),
                )
                .await;
            let shown = String::from_utf8_lossy(&case.body)
                .chars()
                .take(80)
                .collect::<String>();
            assert_eq!(
                reply.status,
                case.status,
                "{} {} {shown:?}: {}",
                backend.name(),
                case.path,
                reply.body
            );
            let body = reply.json();
            assert!(
                body["error"].as_str().is_some_and(|e| !e.is_empty()),
                "no message: {}",
                reply.body
            );
            if let Some(field) = case.field {
                assert_eq!(
                    body["field"], field,
                    "{} {shown:?}: {}",
                    case.path, reply.body
                );
                assert!(body["rule"].as_str().is_some_and(|r| !r.is_empty()));
            }
        }

        // Still serving, and nothing changed.
        assert_eq!(
            server.client.get("/health/live").await.status,
            StatusCode::OK
        );
        assert_eq!(
            every_device(&server, &user).await,
            before,
            "{}",
            backend.name()
        );
        assert_eq!(server.running.state.parking.parked(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_and_paths_are_told_apart() {
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    let reply = server.client.get("/api/incoming-call/").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.headers["allow"], "POST, OPTIONS");
    let reply = server
        .client
        .send(Method::PUT, "/api/apns-device", None, Vec::new())
        .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        server.client.get("/api/windows-device/").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        server.client.get("/nope").await.status,
        StatusCode::NOT_FOUND
    );
}

/// Fields beyond the contract are ignored, as the service this replaces did,
/// so newer apps keep working against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_extra_fields_are_ignored() {
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    let user = sip_user_id();
    let reply = server
        .client
        .post(
            "/api/android-device/",
            &[
                ("sip_user_id", &user),
                ("token", "t"),
                ("app", APP),
                ("colour", "blue"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
}

/// A body in a content coding (`gzip`, `br`...) is refused with 415 naming
/// the coding, and `Accept-Encoding: identity`, before it is parsed: read
/// as it came, a compressed form would be refused for a field it seemed to
/// lack, and a plain one declared compressed taken for what it is not.
/// `identity` is no coding at all, and is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_in_a_content_coding_is_refused_naming_the_coding() {
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    let user = sip_user_id();
    let device = [("sip_user_id", user.as_str()), ("token", "t"), ("app", APP)];
    for (coding, named) in [
        (&b"gzip"[..], "gzip"),
        (b"identity, br", "br"),
        (b"x-\xff", "(not text)"),
    ] {
        let reply = server
            .client
            .post_with(
                "/api/android-device/",
                &[("content-encoding", coding)],
                &device,
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{named}: {}",
            reply.body
        );
        assert_eq!(reply.headers["accept-encoding"], "identity", "{named}");
        let error = reply.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            error.contains("content encoding") && error.contains(named),
            "{named}: {error}"
        );
    }
    assert!(every_device(&server, &user).await.is_empty());

    let reply = server
        .client
        .post_with(
            "/api/android-device/",
            &[("content-encoding", b"Identity")],
            &device,
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(every_device(&server, &user).await.len(), 1);
}

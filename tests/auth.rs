//! Who may do what: device owners through the account API, PBX networks,
//! start-up refusal without auth, and the probe limit on call-response.

mod common;

use std::time::Duration;

use common::stand_in::{Answer, StandIn};
use common::*;
use hyper::StatusCode;

const ALICE: &str = "Basic YWxpY2U6c2VjcmV0"; // alice:secret
const ALICE_WRONG: &str = "Basic YWxpY2U6d3Jvbmc="; // alice:wrong

/// Registers `token` for `user` with an Authorization header.
async fn register_as(
    client: &TestClient,
    authorization: Option<&str>,
    user: &str,
    token: &str,
) -> Reply {
    let headers: Vec<(&str, &[u8])> = authorization
        .map(|a| ("authorization", a.as_bytes()))
        .into_iter()
        .collect();
    client
        .post_with(
            "/api/android-device/",
            &headers,
            &[("sip_user_id", user), ("token", token), ("app", APP)],
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_api_decides_and_its_answers_map_to_statuses() {
    let backend = Backend::embedded();
    let api = StandIn::start(|_| Answer::status(200)).await;
    let server = start(&backend, |c| {
        c.auth_url = Some(format!("{}/api/phoneaccount/{{sip_user_id}}/", api.url()));
        c.auth_timeout_ms = 300;
        c.auth_cache_secs = 0;
    })
    .await;
    let user = sip_user_id();

    // No header, or an empty one: 401 with a Basic challenge, and the
    // account API is not asked.
    for authorization in [None, Some(""), Some("  ")] {
        let reply = register_as(&server.client, authorization, &user, "t").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{authorization:?}");
        assert!(reply.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic"));
        assert_eq!(api.hits(), 0, "{authorization:?}");
    }

    for (answer, expected) in [
        (Answer::status(200), StatusCode::CREATED),
        (Answer::status(401), StatusCode::UNAUTHORIZED),
        (Answer::status(403), StatusCode::FORBIDDEN),
        (Answer::status(500), StatusCode::SERVICE_UNAVAILABLE),
        (Answer::status(404), StatusCode::SERVICE_UNAVAILABLE),
        (
            Answer::status(200).after(Duration::from_secs(2)),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    ] {
        let user = sip_user_id();
        api.answer_with(move |_| answer.clone());
        let reply = register_as(&server.client, Some(ALICE), &user, "t").await;
        assert_eq!(reply.status, expected, "{}", reply.body);
        // The caller's header and the SIP account reached the account API.
        let asked = api.received().pop().expect("the account API was asked");
        assert_eq!(asked.header("authorization"), Some(ALICE));
        assert_eq!(asked.uri, format!("/api/phoneaccount/{user}/"));
    }

    // Deleting is guarded the same way.
    api.answer_with(|_| Answer::status(403));
    let reply = server.client.unregister("android", &user, "t").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_credentials_are_cached_per_password_and_account() {
    let backend = Backend::embedded();
    let api = StandIn::start(|request| {
        if request.header("authorization") == Some(ALICE) {
            Answer::status(200)
        } else {
            Answer::status(401)
        }
    })
    .await;
    let server = start(&backend, |c| {
        c.auth_url = Some(format!("{}/check", api.url()))
    })
    .await;
    let user = sip_user_id();

    assert_eq!(
        register_as(&server.client, Some(ALICE), &user, "a")
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(api.hits(), 1);
    assert_eq!(api.received()[0].uri, format!("/check?sip_user_id={user}"));
    // Within the TTL: no second question.
    assert_eq!(
        register_as(&server.client, Some(ALICE), &user, "b")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(api.hits(), 1);
    // Another password does not ride on the cached pass.
    assert_eq!(
        register_as(&server.client, Some(ALICE_WRONG), &user, "c")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(api.hits(), 2);
    // Nor does another account.
    let other = sip_user_id();
    assert_eq!(
        register_as(&server.client, Some(ALICE), &other, "d")
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(api.hits(), 3);
    // The rejected attempt changed nothing.
    assert_eq!(server.device(&user).await.expect("registered").token, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_pbx_networks_may_post_incoming_calls() {
    let backend = Backend::embedded();
    let call = [("sip_user_id", "1"), ("phonenumber", "0612345678")];

    // Loopback is not on this list.
    let strict = start(&backend, |c| {
        c.pbx_allow = vec!["10.0.0.0/8".parse().unwrap()]
    })
    .await;
    let reply = strict.client.post("/api/incoming-call/", &call).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    // X-Forwarded-For from a proxy nobody trusts is ignored.
    let reply = post_forwarded(&strict.client, "10.1.2.3", &call).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);

    // Behind a trusted proxy, the forwarded address decides.
    let proxied = start(&backend, |c| {
        c.pbx_allow = vec!["10.0.0.0/8".parse().unwrap()];
        c.trusted_proxy = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let reply = post_forwarded(&proxied.client, "10.1.2.3", &call).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "status=NAK")
    );
    let reply = post_forwarded(&proxied.client, "192.0.2.1", &call).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);

    // The default list is loopback.
    let default = start(&backend, |_| {}).await;
    assert_eq!(
        default.client.post("/api/incoming-call/", &call).await.body,
        "status=NAK"
    );
}

async fn post_forwarded(
    client: &TestClient,
    forwarded_for: &str,
    fields: &[(&str, &str)],
) -> Reply {
    client
        .post_with(
            "/api/incoming-call/",
            &[("x-forwarded-for", forwarded_for.as_bytes())],
            fields,
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_auth_on_a_public_address_refuses_to_start() {
    let backend = Backend::embedded();
    let public = |c: &mut call_notifier::config::Config| c.listen = "0.0.0.0:0".parse().unwrap();
    let error = try_start(&backend, public).await.err().expect("refused");
    let message = format!("{error:#}");
    assert!(
        message.contains("--auth-url") && message.contains("--insecure-no-auth"),
        "{message}"
    );

    let server = try_start(&backend, |c| {
        public(c);
        c.insecure_no_auth = true;
    })
    .await
    .expect("starts when told to accept the risk");
    bounded("the server stopping", server.running.stop()).await;
}

/// A call-response from `source` (loopback is a trusted proxy here, so the
/// test plays any client through `X-Forwarded-For`).
async fn answer_from(
    client: &TestClient,
    source: &str,
    key: &str,
    start: f64,
    available: bool,
) -> Reply {
    client
        .post_with(
            "/api/call-response/",
            &[("x-forwarded-for", source.as_bytes())],
            &[
                ("unique_key", key),
                ("message_start_time", &start.to_string()),
                ("available", if available { "true" } else { "false" }),
            ],
        )
        .await
}

/// A source over the unknown-key limit is refused every call-response,
/// for a key that hits too, and the call that key names is left alone: a
/// guesser that hit learns nothing and answers nothing. The phone, from its
/// own network, still answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_probing_unknown_keys_is_refused_hit_or_miss() {
    let backend = Backend::embedded();
    let server = start(&backend, |c| {
        c.trusted_proxy = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    let client = &server.client;
    let (prober, phone) = ("203.0.113.50", "198.51.100.7");
    let now = call_notifier::calls::unix_seconds();
    let user = server.registered("android", "tok-probe").await;
    let key = call_id();
    let pbx = client.park(&user, &key);
    let push = server.push("tok-probe").await;

    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(
            answer_from(client, prober, &call_id(), now, true)
                .await
                .status,
        );
    }
    assert!(
        statuses.iter().all(|s| *s == StatusCode::NOT_FOUND),
        "{statuses:?}"
    );
    for (what, key) in [("a miss", call_id()), ("the live key", key.clone())] {
        let refused = answer_from(client, prober, &key, start_time_of(&push), false).await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{what}");
        let retry_after: u64 = refused.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .expect("Retry-After in seconds");
        assert!((1..=10).contains(&retry_after), "{what}: {retry_after}");
    }
    // The decline was not taken: the call still rings, and the phone's own
    // answer from its network is the first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pbx.is_finished(), "the PBX request still waits");
    let answer = answer_from(client, phone, &key, start_time_of(&push), true).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert_eq!(pbx.await.unwrap().body, "status=ACK");
}

/// A source's answers to live keys give back only their own place in its
/// window: they do not wipe out the misses it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_do_not_reset_a_sources_misses() {
    let backend = Backend::embedded();
    let server = start(&backend, |c| {
        c.trusted_proxy = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    let client = &server.client;
    let source = "203.0.113.51";
    let now = call_notifier::calls::unix_seconds();
    for _ in 0..19 {
        let miss = answer_from(client, source, &call_id(), now, true).await;
        assert_eq!(miss.status, StatusCode::NOT_FOUND);
    }
    let user = server.registered("android", "tok-hits").await;
    let key = call_id();
    let pbx = client.park(&user, &key);
    let push = server.push("tok-hits").await;
    let start = start_time_of(&push);
    let hit = answer_from(client, source, &key, start, true).await;
    assert_eq!(hit.status, StatusCode::ACCEPTED, "{}", hit.body);
    assert_eq!(pbx.await.unwrap().body, "status=ACK");
    let twentieth = answer_from(client, source, &call_id(), now, true).await;
    assert_eq!(twentieth.status, StatusCode::NOT_FOUND, "the 20th miss");
    let refused = answer_from(client, source, &key, start, true).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
}

/// Phones behind one address (a carrier NAT) answer as many calls at once
/// as they have: live keys count nothing against the limit, in flight
/// together or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_answers_at_once_from_one_address_are_not_held_back() {
    let backend = Backend::embedded();
    let server = start(&backend, |c| {
        c.trusted_proxy = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    let client = &server.client;
    let mut calls = Vec::new();
    for n in 0..40 {
        let token = format!("tok-nat-{n}");
        let user = server.registered("android", &token).await;
        let key = call_id();
        let pbx = client.park(&user, &key);
        calls.push((token, key, pbx));
    }
    let mut answers = Vec::new();
    for (token, key, _) in &calls {
        let start = start_time_of(&server.push(token).await);
        let (client, key) = (client.clone(), key.clone());
        answers.push(tokio::spawn(async move {
            answer_from(&client, "198.51.100.99", &key, start, true)
                .await
                .status
        }));
    }
    for answer in answers {
        assert_eq!(answer.await.unwrap(), StatusCode::ACCEPTED);
    }
    for (_, _, pbx) in calls {
        assert_eq!(pbx.await.unwrap().body, "status=ACK");
    }
}

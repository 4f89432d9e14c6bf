//! Source addresses and logins from the outside: `X-Forwarded-For` tricks do
//! not get past the allow-lists, and failed logins are throttled before the
//! account API sees them.
//!
//! The servers here trust loopback as a proxy, so a test plays any client
//! address by sending `X-Forwarded-For` itself.

mod common;

use std::time::Duration;

use call_notifier::config::Config;
use common::stand_in::{Answer, StandIn};
use common::*;
use hyper::header::HeaderValue;
use hyper::StatusCode;

const ALICE: &str = "Basic YWxpY2U6c2VjcmV0"; // alice:secret
const ALICE_WRONG: &str = "Basic YWxpY2U6d3Jvbmc="; // alice:wrong

/// Failed logins a source, and an account, may have per minute (README).
const PER_SOURCE: usize = 10;
const PER_ACCOUNT: usize = 20;

/// POSTs `fields` to `path` with these raw `X-Forwarded-For` lines.
async fn post_via_proxy(
    client: &TestClient,
    path: &str,
    forwarded_for: &[&[u8]],
    authorization: Option<&str>,
    fields: &[(&str, &str)],
) -> Reply {
    let mut headers: Vec<(&str, &[u8])> = forwarded_for
        .iter()
        .map(|line| ("x-forwarded-for", *line))
        .collect();
    if let Some(authorization) = authorization {
        headers.push(("authorization", authorization.as_bytes()));
    }
    client.post_with(path, &headers, fields).await
}

/// Registers a device for `user` as the client `source`.
async fn register_from(
    client: &TestClient,
    source: &str,
    authorization: &str,
    user: &str,
) -> Reply {
    post_via_proxy(
        client,
        "/api/android-device/",
        &[source.as_bytes()],
        Some(authorization),
        &[("sip_user_id", user), ("token", "tok"), ("app", APP)],
    )
    .await
}

/// An account API that knows alice's password, asked on every request.
async fn account_api() -> StandIn {
    StandIn::start(|request| {
        if request.header("authorization") == Some(ALICE) {
            Answer::status(200)
        } else {
            Answer::status(401)
        }
    })
    .await
}

/// The config of a server that asks `api` about every login (nothing
/// cached), behind loopback as a trusted proxy.
fn asking(api: &StandIn) -> impl FnOnce(&mut Config) + '_ {
    move |c| {
        c.auth_url = Some(format!("{}/auth", api.url()));
        c.auth_cache_secs = 0;
        c.trusted_proxy = vec!["127.0.0.0/8".parse().unwrap()];
    }
}

fn assert_throttled(reply: &Reply, rule_mentions: &str) {
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        reply.body
    );
    let retry_after: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let rule = reply.json()["rule"].as_str().expect("a rule").to_owned();
    assert!(rule.contains(rule_mentions), "{rule}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_tricks_do_not_get_past_the_allow_lists() {
    on_every_backend(|backend| async move {
        // The proxy (loopback) is itself an allowed PBX here, as when a PBX
        // shares the proxy's host: a header that is ignored lets anyone in.
        let server = start(&backend, |c| {
            c.trusted_proxy = vec!["127.0.0.0/8".parse().unwrap()];
            c.pbx_allow = vec![
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8:a::/48".parse().unwrap(),
                "127.0.0.1/32".parse().unwrap(),
            ];
        })
        .await;
        let call = [("sip_user_id", "1"), ("phonenumber", "0612345678")];
        // A client-written allowed address left of what the proxy wrote.
        let refused: [&[&[u8]]; 9] = [
            &[b"10.1.2.3, 203.0.113.9:5555"],
            &[b"10.1.2.3, [2001:db8::1]"],
            &[b"10.1.2.3, [2001:db8::1]:5555"],
            &[b"10.1.2.3, unknown"],
            &[b"10.1.2.3", b"unknown"],
            &[b"10.1.2.3, 203.0.113.9\xe9"],
            &[b"10.1.2.3\xe9"],
            &[b"\xff"],
            &[b""],
        ];
        for lines in refused {
            let reply =
                post_via_proxy(&server.client, "/api/incoming-call/", lines, None, &call).await;
            assert_eq!(
                reply.status,
                StatusCode::FORBIDDEN,
                "{} on {}: {}",
                String::from_utf8_lossy(&lines.concat()),
                backend.name(),
                reply.body
            );
        }
        // An allowed client in each form the proxy may write gets through.
        let allowed: [&[&[u8]]; 5] = [
            &[b"192.0.2.99, 10.1.2.3:5555"],
            &[b"192.0.2.99, [2001:db8:a::1]"],
            &[b"192.0.2.99, [2001:db8:a::1]:5555"],
            &[b"\xe9 unreadable client claim, 10.1.2.3"],
            &[b"192.0.2.99", b"10.1.2.3"],
        ];
        for lines in allowed {
            let reply =
                post_via_proxy(&server.client, "/api/incoming-call/", lines, None, &call).await;
            assert_eq!(
                (reply.status, reply.body.as_str()),
                (StatusCode::OK, "status=NAK"),
                "{} on {}",
                String::from_utf8_lossy(&lines.concat()),
                backend.name()
            );
        }
        // No header: the proxy itself.
        let reply = post_via_proxy(&server.client, "/api/incoming-call/", &[], None, &call).await;
        assert_eq!(reply.body, "status=NAK");

        // `/metrics` is loopback-only by default: the same tricks fail there.
        let tricks: [&[&[u8]]; 2] = [&[b"10.1.2.3\xe9"], &[b"127.0.0.1, unknown"]];
        for lines in tricks {
            let mut request = hyper::Request::get(format!("{}/metrics", server.client.base()));
            for line in lines {
                request = request.header("x-forwarded-for", HeaderValue::from_bytes(line).unwrap());
            }
            let reply = server
                .client
                .request(request.body(Default::default()).unwrap())
                .await;
            assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", backend.name());
        }
        assert_eq!(server.client.get("/metrics").await.status, StatusCode::OK);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_client_is_one_source_for_the_probe_limit() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |c| {
            c.trusted_proxy = vec!["127.0.0.0/8".parse().unwrap()];
        })
        .await;
        let now = call_notifier::calls::unix_seconds().to_string();
        let probe = |forwarded_for: Vec<u8>| {
            let client = server.client.clone();
            let now = now.clone();
            async move {
                let key = call_id();
                let fields = [("unique_key", key.as_str()), ("message_start_time", &now)];
                let lines: &[&[u8]] = if forwarded_for == b"-" {
                    &[]
                } else {
                    &[&forwarded_for]
                };
                post_via_proxy(&client, "/api/call-response/", lines, None, &fields)
                    .await
                    .status
            }
        };
        // Twenty unreadable headers of four kinds are one source...
        let unreadable: [&[u8]; 4] = [b"unknown", b"203.0.113.9\xe9", b"", b"_proxy"];
        for n in 0..20 {
            assert_eq!(
                probe(unreadable[n % 4].to_vec()).await,
                StatusCode::NOT_FOUND
            );
        }
        assert_eq!(
            probe(b"unknown".to_vec()).await,
            StatusCode::TOO_MANY_REQUESTS
        );
        // ... and not the proxy's own address ("-": no header at all).
        assert_eq!(probe(b"-".to_vec()).await, StatusCode::NOT_FOUND);
        // One IPv6 /64 is one source.
        for n in 0..20 {
            let address = format!("2001:db8:5:5::{n:x}");
            assert_eq!(probe(address.into_bytes()).await, StatusCode::NOT_FOUND);
        }
        assert_eq!(
            probe(b"[2001:db8:5:5:ffff::1]:443".to_vec()).await,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            probe(b"2001:db8:5:6::1".to_vec()).await,
            StatusCode::NOT_FOUND
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_from_one_source_are_refused_before_the_account_api_is_asked() {
    on_every_backend(|backend| async move {
        let api = account_api().await;
        let server = start(&backend, asking(&api)).await;
        let (user, other_user) = (sip_user_id(), sip_user_id());
        let guesser = "198.51.100.7";

        for _ in 0..PER_SOURCE {
            let reply = register_from(&server.client, guesser, ALICE_WRONG, &user).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", backend.name());
        }
        assert_eq!(api.hits(), PER_SOURCE);
        // The account API was told who was asking.
        assert!(api
            .received()
            .iter()
            .all(|r| r.header("x-forwarded-for") == Some(guesser)));

        // Refused without asking: wrong or right password, any account.
        let reply = register_from(&server.client, guesser, ALICE_WRONG, &user).await;
        assert_throttled(&reply, "per source");
        let reply = register_from(&server.client, guesser, ALICE, &user).await;
        assert_throttled(&reply, "per source");
        let reply = register_from(&server.client, guesser, ALICE, &other_user).await;
        assert_throttled(&reply, "per source");
        // The app's other authenticated endpoints are held back the same way.
        let reply = post_via_proxy(
            &server.client,
            "/api/check-in/",
            &[guesser.as_bytes()],
            Some(ALICE_WRONG),
            &[("sip_user_id", &user)],
        )
        .await;
        assert_throttled(&reply, "per source");
        assert_eq!(api.hits(), PER_SOURCE, "the account API saw none of these");

        // Another source is not affected, on the same account.
        let reply = register_from(&server.client, "198.51.100.8", ALICE, &user).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        assert_eq!(api.hits(), PER_SOURCE + 1);

        // The refusals are counted.
        let metrics = server.client.get("/metrics").await.body;
        assert!(
            metrics.contains("call_notifier_auth_checks_total{result=\"throttled\"} 4"),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_wrong_passwords_in_flight_together_is_held_to_the_limit() {
    on_every_backend(|backend| async move {
        // A slow account API: the whole burst is in flight before it answers.
        let api = StandIn::start(|_| Answer::status(401).after(Duration::from_millis(300))).await;
        let server = start(&backend, asking(&api)).await;
        let user = sip_user_id();
        let burst = (0..3 * PER_SOURCE).map(|_| {
            let client = server.client.clone();
            let user = user.clone();
            async move {
                register_from(&client, "198.51.100.9", ALICE_WRONG, &user)
                    .await
                    .status
            }
        });
        let statuses = futures_util::future::join_all(burst).await;
        let count = |status| statuses.iter().filter(|s| **s == status).count();
        assert_eq!(count(StatusCode::UNAUTHORIZED), PER_SOURCE, "{statuses:?}");
        assert_eq!(count(StatusCode::TOO_MANY_REQUESTS), 2 * PER_SOURCE);
        assert_eq!(api.hits(), PER_SOURCE, "{}", backend.name());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ipv6_64_is_one_source_for_failed_logins() {
    on_every_backend(|backend| async move {
        let api = account_api().await;
        let server = start(&backend, asking(&api)).await;
        for n in 0..PER_SOURCE {
            let source = format!("2001:db8:7:7::{:x}", n + 1);
            let reply = register_from(&server.client, &source, ALICE_WRONG, &sip_user_id()).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        }
        let reply = register_from(
            &server.client,
            "[2001:db8:7:7:ffff::1]:5555",
            ALICE_WRONG,
            &sip_user_id(),
        )
        .await;
        assert_throttled(&reply, "per source");
        assert_eq!(api.hits(), PER_SOURCE, "{}", backend.name());
        // The next /64 is another source; the account API sees it bare.
        let reply = register_from(&server.client, "[2001:db8:7:8::1]", ALICE, &sip_user_id()).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        let asked = api.received().pop().expect("asked");
        assert_eq!(asked.header("x-forwarded-for"), Some("2001:db8:7:8::1"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_for_one_account_are_refused_except_from_where_its_owner_logged_in() {
    on_every_backend(|backend| async move {
        let api = account_api().await;
        let server = start(&backend, asking(&api)).await;
        let user = sip_user_id();
        let owner = "198.51.100.50";
        let reply = register_from(&server.client, owner, ALICE, &user).await;
        assert_eq!(reply.status, StatusCode::CREATED);

        // Two failures from each of ten sources: none over its own limit.
        for n in 0..PER_ACCOUNT {
            let source = format!("203.0.113.{}", n / 2);
            let reply = register_from(&server.client, &source, ALICE_WRONG, &user).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", backend.name());
        }
        assert_eq!(api.hits(), 1 + PER_ACCOUNT);

        // A new source is refused without asking, right password or not.
        for authorization in [ALICE_WRONG, ALICE] {
            let reply = register_from(&server.client, "192.0.2.1", authorization, &user).await;
            assert_throttled(&reply, "per SIP account");
        }
        assert_eq!(api.hits(), 1 + PER_ACCOUNT);

        // The owner, from where it logged in before, is still asked.
        let reply = register_from(&server.client, owner, ALICE, &user).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(api.hits(), 2 + PER_ACCOUNT);

        // Another account is not affected.
        let reply = register_from(&server.client, "192.0.2.1", ALICE, &sip_user_id()).await;
        assert_eq!(reply.status, StatusCode::CREATED);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_api_learns_the_client_address_and_never_a_claimed_one() {
    on_every_backend(|backend| async move {
        let api = account_api().await;
        // No trusted proxy: the header a client sends is not believed.
        let direct = start(&backend, |c| {
            asking(&api)(c);
            c.trusted_proxy = Vec::new();
        })
        .await;
        let reply = register_from(&direct.client, "10.9.9.9", ALICE, &sip_user_id()).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", backend.name());
        let asked = api.received().pop().expect("asked");
        assert_eq!(asked.header("x-forwarded-for"), Some("127.0.0.1"));

        // An unknown client: no address is made up.
        let proxied = start(&backend, asking(&api)).await;
        let reply =
            register_from(&proxied.client, "10.9.9.9, unknown", ALICE, &sip_user_id()).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        let asked = api.received().pop().expect("asked");
        assert_eq!(asked.header("x-forwarded-for"), None);
    })
    .await;
}

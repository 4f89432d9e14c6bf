//! Issue 10, items 2 and 3, from the outside: `X-Forwarded-For` tricks do
//! not get past the allow-lists, and limits count the right sources.
//!
//! The servers here trust loopback as a proxy, so a test plays any client
//! address by sending `X-Forwarded-For` itself.

mod common;

use common::*;
use hyper::header::HeaderValue;
use hyper::StatusCode;

/// POSTs `fields` to `path` with these raw `X-Forwarded-For` lines.
async fn post_via_proxy(
    client: &TestClient,
    path: &str,
    forwarded_for: &[&[u8]],
    authorization: Option<&str>,
    fields: &[(&str, &str)],
) -> Reply {
    let body = serde_urlencoded::to_string(fields).unwrap();
    let mut request = hyper::Request::post(format!("{}{path}", client.base()))
        .header("content-type", "application/x-www-form-urlencoded");
    for line in forwarded_for {
        request = request.header("x-forwarded-for", HeaderValue::from_bytes(line).unwrap());
    }
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    client.request(request.body(body.into()).unwrap()).await
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

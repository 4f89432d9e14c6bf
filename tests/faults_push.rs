//! Outages: a push service that hangs (an FCM stand-in).
//!
//! The services broken here are the test's own: a redis-server child, a
//! Redis Cluster on ports of its own, a TCP proxy in front of PostgreSQL, an
//! FCM stand-in. The shared PostgreSQL, Redis and Redis Cluster are only
//! used, never stopped or flushed. Each outage ends with the service healthy
//! again (readiness 200) and serving a fresh call (ACK).
//!
//! Tests that need a redis-server binary or a shared service are
//! `#[ignore]`d, so a plain `cargo test` on a bare machine reports them as
//! ignored (never as passed); `.ci/run` runs them with `--include-ignored`.

mod common;

use std::time::{Duration, Instant};

use common::fault::MARGIN;
use common::fcm::{fcm_accepts, FcmServer};
use common::stand_in::{Answer, Received};
use common::*;
use hyper::StatusCode;

// ---------------------------------------------------------------------------
// 5. FCM hanging.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_fcm_is_bounded_by_the_push_timeout_and_the_call_ends_on_time() {
    let server = FcmServer::start(&Backend::embedded(), |c| {
        c.push_timeout_ms = 300;
        c.wait_ms = 2000;
        c.resend_interval_ms = 500;
    })
    .await;
    server
        .fcm
        .answer_with(|_| fcm_accepts().after(Duration::from_secs(30)));
    let user = server.registered("android", "fcm-token-hang").await;

    let started = Instant::now();
    let reply = server.client.incoming_call(&user, &call_id()).await;
    let took = started.elapsed();
    assert_eq!(reply.body, "status=NAK");
    let wait = Duration::from_millis(2000);
    assert!(
        took >= wait && took <= wait + MARGIN,
        "the call took {took:?}"
    );
    // Every push gave up at the push timeout and was retried: a push that
    // waited for the hanging answer would have been the only one.
    let sent = server.fcm.received();
    assert!(sent.len() >= 3, "{} pushes in {took:?}", sent.len());

    // FCM answers again: the next call is pushed and answered.
    server.fcm.answer_with(|_| fcm_accepts());
    let ready = server.client.get("/health/ready").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
    let key = call_id();
    let pbx = server.ring(&user, &key);
    let push = server.push_for(&key, Duration::from_secs(10)).await;
    let answer = server.answer(&push, true).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert_eq!(pbx.await.expect("the PBX").body, "status=ACK");
}

// ---------------------------------------------------------------------------
// FCM slow for a while (the chaos run found this).

/// The connections of this process to `port` that are open (ESTABLISHED),
/// from `/proc/net/tcp`: the stand-in lives in this process too, so only
/// the side whose remote port is `port` counts.
fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields
                .get(2)
                .and_then(|remote| remote.rsplit(':').next())
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            remote_port == Some(port) && fields.get(3) == Some(&"01")
        })
        .count()
}

/// Over HTTP/1.1 each push in flight has a connection of its own: FCM slow
/// for a while makes one per push waiting. Once it is fast again, no more
/// than `outbound::IDLE_PER_HOST` of them stay open (before, every one
/// stayed, idle, for the pool's 90 s: descriptors and memory the chaos run
/// saw still held after the load stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_a_slow_fcm_made_are_closed_once_it_is_fast_again() {
    let server = FcmServer::start(&Backend::embedded(), |c| {
        c.wait_ms = 1500;
        c.resend_interval_ms = 1000;
    })
    .await;
    server
        .fcm
        .answer_with(|_| fcm_accepts().after(Duration::from_millis(700)));
    let mut users = Vec::new();
    for n in 0..30 {
        users.push(server.registered("android", &format!("fcm-slow-{n}")).await);
    }
    let calls: Vec<_> = users
        .iter()
        .map(|user| server.ring(user, &call_id()))
        .collect();
    let port = server.fcm.addr.port();
    // Every first push is waiting for FCM now.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let busiest = connections_to(port);
    for call in calls {
        let reply = bounded("a call while FCM is slow", call)
            .await
            .expect("the PBX request");
        assert_eq!(reply.body, "status=NAK");
    }
    assert!(busiest > 10, "FCM slow made only {busiest} connections");
    server.fcm.answer_with(|_| fcm_accepts());
    // The call_ended notices and the last pushes come back.
    let settled = eventually(Duration::from_secs(5), || async {
        connections_to(port) <= call_notifier::outbound::IDLE_PER_HOST
    })
    .await;
    assert!(
        settled,
        "{} connections to FCM still open, {} while it was slow",
        connections_to(port),
        busiest
    );
}

// ---------------------------------------------------------------------------
// A call push that got no answer.

/// A call push that FCM took but did not answer within the push timeout
/// may have reached the phone: when the call is over, the phone is told,
/// as one whose push FCM answered would be. One that FCM refused outright
/// (503, on every try) rang nothing, and hears nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_whose_push_got_no_answer_is_told_the_call_is_over() {
    let server = FcmServer::start(&Backend::embedded(), |c| {
        c.push_timeout_ms = 300;
        c.wait_ms = 6000;
        c.resend_interval_ms = 5000;
    })
    .await;
    let kind = |request: &Received| {
        request.json()["message"]["data"]["type"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let notices_for = |key: &str| {
        server
            .fcm
            .received()
            .into_iter()
            .filter(|p| p.json()["message"]["data"]["unique_key"] == key && kind(p) == "call_ended")
            .map(|p| p.json()["message"]["data"]["reason"].clone())
            .collect::<Vec<_>>()
    };
    let user = server.registered("android", "fcm-token-no-answer").await;
    let state = server.running.state.clone();
    for (fcm, told) in [
        (fcm_accepts().after(Duration::from_secs(2)), true),
        (Answer::status(503), false),
    ] {
        // Call pushes get `fcm`; the notice, an answer at once.
        server.fcm.answer_with(move |request| {
            if kind(request) == "call" {
                fcm.clone()
            } else {
                fcm_accepts()
            }
        });
        let key = call_id();
        let pbx = server.ring(&user, &key);
        // The first try and the retry after it: the first came to nothing.
        let tried = eventually(Duration::from_secs(5), || async {
            server
                .fcm
                .received()
                .iter()
                .filter(|p| p.json()["message"]["data"]["unique_key"] == key.as_str())
                .count()
                >= 2
        })
        .await;
        assert!(tried, "told {told}: no retry of the first push");
        server.cancel_ringing(&key).await;
        let reply = bounded("the PBX's answer", pbx)
            .await
            .expect("the PBX task");
        assert_eq!(reply.body, "status=NAK");
        // The schedule is over once its notice, if any, has had its answer.
        let over = eventually(Duration::from_secs(5), || async {
            state.parking.schedules() == 0
        })
        .await;
        assert!(over, "told {told}: the schedule did not end");
        let expected = if told {
            vec![serde_json::json!("cancelled")]
        } else {
            vec![]
        };
        assert_eq!(notices_for(&key), expected, "told {told}");
    }
}

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

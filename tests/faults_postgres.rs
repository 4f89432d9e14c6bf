//! Outages: PostgreSQL stopped or hanging, behind a TCP proxy of the test's
//! own in front of a fresh schema.
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

use std::time::Instant;

use common::fault::*;
use common::*;
use hyper::StatusCode;

// ---------------------------------------------------------------------------
// 4. PostgreSQL stopped and started.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs TEST_DATABASE_URL: run with --include-ignored, as .ci/run does"]
async fn postgres_stopped_is_503_and_nak_at_once_then_recovers() {
    let (proxy, proxied) = proxied_database().await;
    let backend = Backend::embedded();
    let server = start(&backend, |c| c.database_url = proxied.clone()).await;
    let user = sip_user_id();
    let token = "tok-pg";
    assert_eq!(
        server.client.register("android", &user, token).await,
        StatusCode::CREATED
    );
    assert_fresh_call_is_ack(&server, &user, token).await;

    proxy.cut();
    // Registration: 503 that names the database, soon.
    for n in 0..3 {
        let started = Instant::now();
        let reply = server
            .client
            .post(
                "/api/android-device/",
                &[("sip_user_id", &user), ("token", "tok-pg-2"), ("app", APP)],
            )
            .await;
        let took = started.elapsed();
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "registration {n}: {}",
            reply.body
        );
        let error = reply.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        assert!(
            error.contains("database"),
            "registration {n}: the 503 does not name the database: {}",
            reply.body
        );
        assert!(took < AT_ONCE, "registration {n}: 503 took {took:?}");
    }
    for n in 0..3 {
        assert_nak_at_once_without_push(&server, &user, &format!("call {n} with PostgreSQL down"))
            .await;
    }
    let (status, body, took) = readiness(&server).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_ne!(body["store"], "ok", "{body}");
    assert!(took < AT_ONCE, "readiness took {took:?} to say 503");

    proxy.restore().await;
    ready_again(&server).await;
    assert_eq!(
        server.client.register("android", &user, "tok-pg-3").await,
        StatusCode::OK
    );
    assert_fresh_call_is_ack(&server, &user, "tok-pg-3").await;
    assert_no_bookkeeping(&server).await;
}

/// A database that hangs rather than refusing: a call ends NAK by its wait
/// and is never pushed; readiness says 503 within its check timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs TEST_DATABASE_URL: run with --include-ignored, as .ci/run does"]
async fn postgres_hanging_ends_calls_by_their_wait() {
    let (proxy, proxied) = proxied_database().await;
    let server = start(&Backend::embedded(), |c| {
        c.database_url = proxied.clone();
        c.wait_ms = 1000;
        c.resend_interval_ms = 250;
    })
    .await;
    let wait = server.running.state.config.wait();
    let token = "tok-pg-hang";
    let user = server.registered("android", token).await;
    assert_fresh_call_is_ack(&server, &user, token).await;

    proxy.stall();
    let key = call_id();
    let started = Instant::now();
    let reply = server.client.incoming_call(&user, &key).await;
    let took = started.elapsed();
    assert_eq!(reply.body, "status=NAK");
    assert!(
        took <= wait + MARGIN,
        "the call took {took:?} with PostgreSQL hanging"
    );
    assert!(!server.pushed_for(&key));
    let (status, body, _) = readiness(&server).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    // It comes back (by way of a restart: the stalled connections are cut).
    proxy.cut();
    proxy.restore().await;
    assert_recovered(&server, &user, token).await;
}

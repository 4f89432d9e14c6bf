//! Outages: a redis-server of the test's own lost, unreachable, hanging or
//! dropping its subscriber while calls arrive and wait.
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

use call_notifier::broker::redis::state_key;
use call_notifier::broker::Record;
use call_notifier::config::Config;
use common::fault::*;
use common::*;
use hyper::StatusCode;

/// An embedded server whose broker is `redis`, with `tweak` applied, ready,
/// and the SIP account registered on it with `token`.
async fn ready_on(
    redis: &RedisServer,
    token: &str,
    tweak: impl FnOnce(&mut Config),
) -> (TestServer, String) {
    let server = start(&Backend::embedded(), |c| {
        c.redis_url = Some(redis.url());
        tweak(c);
    })
    .await;
    let user = server.registered("android", token).await;
    ready_again(&server).await;
    (server, user)
}

// ---------------------------------------------------------------------------
// 0. A message lost while the subscriber reconnects.

/// An answer stored while the subscriber connection was gone (so published
/// to nobody) still ends its wait: the fallback check runs while the
/// subscription is not known good, and a while after it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own redis-server: run with --include-ignored, as .ci/run does"]
async fn a_message_lost_while_the_subscriber_reconnects_is_caught_by_the_fallback_check() {
    let redis = RedisServer::start().await;
    let token = "tok-lost";
    let (server, user) = ready_on(&redis, token, |_| {}).await;
    let key = call_id();
    let pbx = server.client.park(&user, &key);
    server.push(token).await;

    let mut conn = common::redis(&redis.url()).await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .expect("CLIENT KILL");
    assert_eq!(killed, 1, "the server's one subscriber connection");
    // The answer lands in Redis, its message reaches nobody.
    let record: String = redis::cmd("GET")
        .arg(state_key(&key))
        .query_async(&mut conn)
        .await
        .expect("GET");
    let mut record = Record::decode(&record).expect("a call's record");
    assert!(record.take(0, true, 0, false));
    let _: () = redis::cmd("SET")
        .arg(state_key(&key))
        .arg(record.encode())
        .arg("KEEPTTL")
        .query_async(&mut conn)
        .await
        .expect("SET");
    let started = Instant::now();
    assert_eq!(pbx.await.expect("the PBX request").body, "status=ACK");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    ready_again(&server).await;
    assert_fresh_call_is_ack(&server, &user, token).await;
}

// ---------------------------------------------------------------------------
// 1. Redis unreachable when a call arrives.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own redis-server: run with --include-ignored, as .ci/run does"]
async fn redis_unreachable_when_a_call_arrives_is_nak_at_once_and_no_push() {
    let mut redis = RedisServer::start().await;
    let token = "tok-r1";
    let (server, user) = ready_on(&redis, token, |_| {}).await;
    assert_fresh_call_is_ack(&server, &user, token).await;

    redis.kill().await;
    // The first call may be the one that finds out; every one is NAK at once.
    for n in 0..5 {
        assert_nak_at_once_without_push(&server, &user, &format!("call {n} with Redis down")).await;
    }
    let (status, body, took) = readiness(&server).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_ne!(body["broker"], "ok", "{body}");
    assert!(took < AT_ONCE, "readiness took {took:?} to say 503");
    // The app's answer cannot be stored: the outage is the server's, 503.
    let answer = server
        .client
        .call_response(&call_id(), call_notifier::calls::unix_seconds(), true)
        .await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.body
    );

    redis.restart().await;
    assert_recovered(&server, &user, token).await;
    assert_redis_clean(&redis.url()).await;
}

/// A Redis that is down when the server starts: the server starts anyway
/// (unready), answers calls NAK at once, and serves once Redis comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own redis-server: run with --include-ignored, as .ci/run does"]
async fn redis_down_at_start_up_is_unready_then_serves() {
    let mut redis = RedisServer::start().await;
    redis.kill().await;
    let server = start(&Backend::embedded(), |c| c.redis_url = Some(redis.url())).await;
    let token = "tok-r1b";
    let user = server.registered("android", token).await;
    let (status, body, took) = readiness(&server).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(took < AT_ONCE, "readiness took {took:?} to say 503");
    assert_nak_at_once_without_push(&server, &user, "call before Redis ever answered").await;

    redis.restart().await;
    assert_recovered(&server, &user, token).await;
}

/// A Redis that hangs (stopped, its connections open) rather than refusing:
/// a call waits no longer than `--redis-timeout-ms` for it, then NAK, and
/// is never pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own redis-server: run with --include-ignored, as .ci/run does"]
async fn redis_hanging_costs_a_call_at_most_the_redis_timeout() {
    let redis = RedisServer::start().await;
    let token = "tok-r1c";
    let (server, user) = ready_on(&redis, token, |c| c.redis_timeout_ms = 300).await;
    assert_fresh_call_is_ack(&server, &user, token).await;

    redis.pause();
    for n in 0..3 {
        let key = call_id();
        let started = Instant::now();
        let reply = server.client.incoming_call(&user, &key).await;
        let took = started.elapsed();
        assert_eq!(reply.body, "status=NAK", "call {n}");
        assert!(
            took < Duration::from_millis(300) + MARGIN,
            "call {n} took {took:?} with Redis hanging"
        );
        assert!(!server.pushed_for(&key));
    }
    let (status, body, took) = readiness(&server).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        took < Duration::from_millis(300) + MARGIN,
        "readiness took {took:?}"
    );

    redis.resume();
    assert_recovered(&server, &user, token).await;
    assert_redis_clean(&redis.url()).await;
}

/// The subscriber pings Redis every 5 s to notice a dead peer. A subscribed
/// connection answers that ping differently (`["pong", ""]`); taking that
/// for a failure dropped and rebuilt the connection every 5 s under load,
/// and calls arriving meanwhile were answered NAK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own redis-server: run with --include-ignored, as .ci/run does"]
async fn the_subscriber_survives_its_keepalive_pings_while_calls_wait() {
    let redis = RedisServer::start().await;
    let token = "tok-ping";
    let (server, user) = ready_on(&redis, token, |c| c.wait_ms = 10_000).await;
    let key = call_id();
    let pbx = ring(&server, &user, &key);
    let push = server.call_push(token, &key).await;
    // Past the first keepalive ping, with a channel subscribed.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(6500) {
        let (status, body, _) = readiness(&server).await;
        assert_eq!(status, StatusCode::OK, "at {:?}: {body}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut conn = common::redis(&redis.url()).await;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .expect("CLIENT LIST");
    let ages: Vec<u64> = clients
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("age=")))
        .filter_map(|a| a.parse().ok())
        .collect();
    assert!(
        ages.len() == 1 && ages[0] >= 6,
        "the subscriber connection was replaced: {clients}"
    );
    let reply = server
        .client
        .call_response(&key, start_time_of(&push), true)
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(pbx.await.expect("the PBX").0.body, "status=ACK");
}

// ---------------------------------------------------------------------------
// 2. Redis lost while calls wait.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own redis-server: run with --include-ignored, as .ci/run does"]
async fn redis_lost_while_calls_wait_reconnects_and_ends_every_call_by_its_wait() {
    let mut redis = RedisServer::start().await;
    let token = "tok-r2";
    let (server, user) = ready_on(&redis, token, |_| {}).await;
    let wait = server.running.state.config.wait();

    let keys: Vec<String> = (0..6).map(|_| call_id()).collect();
    let calls: Vec<_> = keys.iter().map(|key| ring(&server, &user, key)).collect();
    let mut pushes = Vec::new();
    for key in &keys {
        pushes.push(server.call_push(token, key).await);
    }

    redis.kill().await;
    // An answer while Redis is gone cannot be stored: 503, and that call
    // ends NAK at its wait (the app could retry; this one does not).
    let during = server
        .client
        .call_response(&keys[0], start_time_of(&pushes[0]), true)
        .await;
    assert_eq!(
        during.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        during.body
    );
    let (status, body, _) = readiness(&server).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart().await;
    ready_again(&server).await;

    // Redis came back empty; the waits it lost were stored again on
    // resubscribe, so answers that come now still reach their calls.
    for (n, available) in [(1, true), (2, true), (3, false)] {
        let reply = server
            .client
            .call_response(&keys[n], start_time_of(&pushes[n]), available)
            .await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "answer {n}: {}",
            reply.body
        );
    }
    let expected = [
        "status=NAK", // answered during the outage: lost
        "status=ACK",
        "status=ACK",
        "status=NAK", // not available
        "status=NAK", // never answered
        "status=NAK",
    ];
    for (n, call) in calls.into_iter().enumerate() {
        let (reply, took) = call.await.expect("the PBX request");
        assert_eq!(reply.body, expected[n], "call {n}");
        assert!(
            took <= wait + MARGIN,
            "call {n} took {took:?}, past its wait"
        );
    }

    assert_no_bookkeeping(&server).await;
    assert_redis_clean(&redis.url()).await;
    assert_fresh_call_is_ack(&server, &user, token).await;
}

/// Issue #23: Redis restarted without persistence while a fork call (two
/// devices, one proxy-registered) waits. The instance that holds the call
/// stores back every key it needs (its record and meta, both device
/// pointers, the proxy device's alias), so an answer through another
/// instance to a device's key still counts, and so would that device's
/// REGISTER.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own redis-server: run with --include-ignored, as .ci/run does"]
async fn redis_restarted_mid_fork_keeps_every_key_the_call_needs() {
    let mut redis = RedisServer::start().await;
    let two = |c: &mut Config| c.max_devices_per_account = 2;
    let (holder, user) = ready_on(&redis, "fork-a", two).await;
    let id: i64 = user.parse().expect("an id");
    let proxy_device = android_device(
        id,
        "fork-b",
        Some(call_notifier::store::now_millis() + 600_000),
    );
    holder
        .running
        .state
        .store
        .register_device(proxy_device, 2)
        .await
        .expect("the proxy's device");
    let other = start(&Backend::embedded(), |c| c.redis_url = Some(redis.url())).await;
    ready_again(&other).await;

    let key = call_id();
    let pbx = holder.client.park(&user, &key);
    holder.call_push("fork-a", &format!("{key}.1")).await;
    let push_b = holder.call_push("fork-b", &format!("{key}.2")).await;

    redis.restart().await;
    ready_again(&holder).await;
    ready_again(&other).await;
    let mut conn = common::redis(&redis.url()).await;
    for name in [
        state_key(&key),
        call_notifier::broker::redis::meta_key(&key),
        state_key(&format!("{key}.1")),
        state_key(&format!("{key}.2")),
        format!("cn:alias:{{{id} fork-b}}"),
    ] {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .expect("EXISTS");
        assert!(exists, "{name} stored back after the restart");
    }

    let answer = other
        .client
        .call_response(&format!("{key}.2"), start_time_of(&push_b), true)
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert_eq!(pbx.await.expect("the PBX request").body, "status=ACK");
    assert_eq!(
        holder.notice("fork-a").await.1,
        call_notifier::store::EndReason::AnsweredElsewhere
    );
    assert_no_bookkeeping(&holder).await;
}

/// A call rings while Redis refuses its proxy-registered device's alias
/// (an ACL that makes alias keys read-only stands in for a failover or a
/// cut connection): the call rings anyway, the note is tried again off the
/// call's path, and once Redis takes it, the device's REGISTER answers the
/// call. A SIP client woken by RFC 8599 push has no other way to answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts its own redis-server: run with --include-ignored, as .ci/run does"]
async fn an_alias_redis_refused_as_the_call_rang_is_noted_again_for_the_register() {
    const VOIP: &str = "a11a5a9a1e";
    let redis = RedisServer::start().await;
    let server = start(&Backend::embedded(), |c| c.redis_url = Some(redis.url())).await;
    ready_again(&server).await;
    let user = sip_user_id();
    let register = apns_register(&user, VOIP);
    let created = server.client.post(SIP_REGISTRATION, &register).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);

    let mut conn = common::redis(&redis.url()).await;
    let acl = |rules: &[&str]| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg("default").arg(rules);
        cmd
    };
    let _: () = acl(&[
        "resetkeys",
        "~cn:{*",
        "~cn:legs:*",
        "~cn:cancels:*",
        "%R~cn:alias:*",
    ])
    .query_async(&mut conn)
    .await
    .expect("alias keys made read-only");
    let key = call_id();
    let pbx = server.client.park(&user, &key);
    server.call_push(VOIP, &key).await;
    let alias = format!("cn:alias:{{{user} {VOIP}}}");
    let noted: Option<String> = redis::cmd("GET")
        .arg(&alias)
        .query_async(&mut conn)
        .await
        .expect("GET the alias");
    assert_eq!(noted, None, "Redis refused the alias as the call rang");

    let _: () = acl(&["allkeys"])
        .query_async(&mut conn)
        .await
        .expect("every key writable again");
    let noted: String = bounded("the alias noted again", async {
        loop {
            let noted: Option<String> = redis::cmd("GET")
                .arg(&alias)
                .query_async(&mut conn)
                .await
                .expect("GET the alias");
            if let Some(noted) = noted {
                return noted;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(noted, key, "the alias names the call's push key");

    // The phone, woken, REGISTERs: that is its answer.
    register_answers(&server, &register, pbx).await;
    assert_fresh_call_is_ack(&server, &user, VOIP).await;
}

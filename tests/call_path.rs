//! The call path end to end: a PBX parks on `/api/incoming-call/`, the
//! recording pusher plays APNs/FCM, the test plays the app.

mod common;

use call_notifier::broker::redis::state_key;
use call_notifier::store::EndReason;
use std::time::{Duration, Instant};

use a2::ErrorReason::ServiceUnavailable;
use call_notifier::push::{apns, fcm, Payload, PushOutcome, Reason, Refusal};
use common::*;
use hyper::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_account_gets_nak_at_once_and_no_push() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let started = Instant::now();
        let reply = server
            .client
            .incoming_call(&sip_user_id(), &call_id())
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, "status=NAK");
        assert!(reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        // "At once": long before the first resend would have been due.
        assert!(
            started.elapsed() < server.running.state.config.wait() / 2,
            "{}",
            backend.name()
        );
        assert!(server.pusher.sent().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_available_after_one_and_a_half_seconds_is_ack_after_two_pushes() {
    on_every_backend(|backend| async move {
        // The defaults: wait 4 s, a push every second.
        let server = start(&backend, |_| {}).await;
        let user = server.registered("android", "tok-a").await;
        let key = call_id();
        let pbx = server.client.park(&user, &key);
        let first = server.push("tok-a").await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.answer_accepted(&key, &first).await;
        let reply = pbx.await.expect("the PBX request");
        assert_eq!(reply.body, "status=ACK", "{}", backend.name());

        let pushes = server.pusher.sent_to("tok-a");
        let attempts: Vec<_> = pushes.iter().map(|p| p.payload.attempt()).collect();
        assert_eq!(attempts, [Some(1), Some(2)], "{}", backend.name());
        // The payload carries exactly the contract's keys.
        let json = first.payload.to_json();
        assert_call_push_keys(&json, Some(&key), backend.name());
        assert_eq!(json["type"], "call");
        assert_eq!(json["unique_key"], key.as_str());
        assert_eq!(json["phonenumber"], "+31 50 123 4567");
        assert_eq!(json["caller_id"], "Alice");
        assert_eq!(
            json["response_api"],
            format!("{}/api/call-response/", server.running.url())
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_not_available_is_nak() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let user = server.registered("android", "tok-busy").await;
        let key = call_id();
        let pbx = server.client.park(&user, &key);
        let push = server.push("tok-busy").await;
        let answer = server
            .client
            .call_response(&key, start_time_of(&push), false)
            .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED);
        assert_eq!(pbx.await.unwrap().body, "status=NAK", "{}", backend.name());
        assert_eq!(server.pusher.sent_to("tok-busy").len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_is_nak_after_the_wait_with_three_pushes() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |c| {
            c.wait_ms = 2000;
            c.resend_interval_ms = 500;
        })
        .await;
        let user = server.registered("gcm", "tok-sleepy").await;
        let started = Instant::now();
        let reply = server.client.incoming_call(&user, &call_id()).await;
        assert_eq!(reply.body, "status=NAK");
        assert!(
            started.elapsed() >= Duration::from_millis(2000),
            "{}",
            backend.name()
        );
        let attempts: Vec<_> = server
            .calls_to("tok-sleepy")
            .iter()
            .map(|p| p.payload.attempt())
            .collect();
        assert_eq!(attempts, [Some(1), Some(2), Some(3)], "{}", backend.name());
        // The phone is told to stop ringing, once, after its call pushes.
        let (key, reason) = server.notice("tok-sleepy").await;
        assert_eq!(reason, EndReason::TimedOut, "{}", backend.name());
        let sent = server.pusher.sent_to("tok-sleepy");
        assert_eq!(sent.len(), 4, "{}", backend.name());
        assert!(
            matches!(&sent[3].payload, Payload::CallEnded { unique_key, .. } if *unique_key == key)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_after_the_wait_is_410_timed_out_and_the_pbx_got_nak() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |c| {
            c.wait_ms = 800;
            c.resend_interval_ms = 200;
        })
        .await;
        let user = server.registered("android", "tok-late").await;
        let key = call_id();
        let reply = server.client.incoming_call(&user, &key).await;
        assert_eq!(reply.body, "status=NAK");
        let push = server.pusher.sent_to("tok-late").remove(0);
        let late = server
            .client
            .call_response(&key, start_time_of(&push), true)
            .await;
        assert_eq!(late.status, StatusCode::GONE, "{}", backend.name());
        assert_eq!(
            late.json(),
            serde_json::json!({"unique_key": key, "reason": "timed_out"})
        );
        // Also when the app lies about when the push left.
        let lying = server
            .client
            .call_response(&key, call_notifier::calls::unix_seconds(), true)
            .await;
        assert_eq!(lying.status, StatusCode::GONE, "{}", backend.name());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_for_a_key_never_issued_is_404() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let reply = server
            .client
            .call_response(&call_id(), call_notifier::calls::unix_seconds(), true)
            .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", backend.name());
        assert_eq!(reply.json()["error"], "not found");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_key_is_128_random_bits_in_hex() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let user = server.registered("android", "tok-gen").await;
        let pbx = tokio::spawn({
            let client = server.client.clone();
            let user = user.clone();
            async move {
                client
                    .post(
                        "/api/incoming-call/",
                        &[("sip_user_id", &user), ("phonenumber", "anonymous")],
                    )
                    .await
            }
        });
        let push = server.push("tok-gen").await;
        let Payload::Call {
            unique_key,
            phonenumber,
            ..
        } = &push.payload
        else {
            panic!("a call push")
        };
        assert_eq!(unique_key.len(), 32);
        assert!(unique_key
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(phonenumber, "anonymous");
        let answer = server
            .client
            .call_response(unique_key, start_time_of(&push), true)
            .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED);
        assert_eq!(pbx.await.unwrap().body, "status=ACK", "{}", backend.name());
    })
    .await;
}

/// An answer waits for the call it won to write the ACK only where the
/// call's wait is: the broker says where (`CallBroker::holds`), and a wrong
/// "here" would hold the app's 202 for the hand-over's backstop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_knows_which_calls_it_holds() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let user = server.registered("android", "tok-held").await;
        let key = call_id();
        let pbx = server.client.park(&user, &key);
        let push = server.push("tok-held").await;
        let broker = server.running.state.broker.clone();
        assert!(broker.holds(&key), "{}: the parked call", backend.name());
        let answer = server
            .client
            .call_response(&key, start_time_of(&push), true)
            .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED);
        assert_eq!(pbx.await.unwrap().body, "status=ACK", "{}", backend.name());
        if backend.redis_url().is_some() {
            // Only the in-process broker holds every call there is.
            assert!(
                !broker.holds(&call_id()),
                "{}: a key never opened",
                backend.name()
            );
            let released = eventually(Duration::from_secs(2), || {
                let broker = broker.clone();
                let key = key.clone();
                async move { !broker.holds(&key) }
            })
            .await;
            assert!(released, "{}: the answered call, released", backend.name());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pbx_hanging_up_leaves_nothing_behind() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let user = server.registered("android", "tok-hangup").await;
        let key = call_id();
        let pbx = server.client.park(&user, &key);
        server.push("tok-hangup").await;
        let state = server.running.state.clone();
        assert_eq!(state.parking.parked(), 1);
        assert_eq!(state.broker.waiting(), 1);
        // The PBX hangs up: its connection closes mid-wait.
        pbx.abort();
        let _ = pbx.await;
        assert_no_bookkeeping(&server).await;
        // The phone is told the caller hung up, and pushed no more.
        assert_eq!(
            server.notice("tok-hangup").await,
            (key.clone(), EndReason::Cancelled)
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(
            server.pusher.sent_to("tok-hangup").len(),
            2,
            "{}",
            backend.name()
        );
        if let Some(url) = backend.redis_url() {
            let redis = redis(url).await;
            let gone = eventually(Duration::from_secs(2), || {
                let mut redis = redis.clone();
                let key = key.clone();
                async move {
                    let record: Option<String> = redis::cmd("GET")
                        .arg(state_key(&key))
                        .query_async(&mut redis)
                        .await
                        .unwrap();
                    record.as_deref() == Some("ended cancelled android")
                        && subscribers(url, &key).await == 0
                }
            })
            .await;
            assert!(gone, "no tombstone, or a subscription left in Redis");
        }
        // The answer that comes now learns that the caller hung up.
        let late = server
            .client
            .call_response(&key, call_notifier::calls::unix_seconds(), true)
            .await;
        assert_eq!(late.status, StatusCode::GONE);
        assert_eq!(late.json()["reason"], "cancelled");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_apns_push_is_never_resent() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |c| {
            c.wait_ms = 2000;
            c.resend_interval_ms = 500;
        })
        .await;
        let user = server.registered("apns", "ab01").await;
        let reply = server.client.incoming_call(&user, &call_id()).await;
        assert_eq!(reply.body, "status=NAK");
        assert_eq!(server.pusher.sent_to("ab01").len(), 1, "{}", backend.name());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_push_is_retried_under_the_same_attempt_number() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |c| {
            c.wait_ms = 2000;
            c.resend_interval_ms = 500;
        })
        .await;
        server.pusher.script([PushOutcome::Retry {
            after: None,
            refusal: Refusal::new(apns::reason_label(&ServiceUnavailable), "503"),
        }]);
        let user = server.registered("apns", "ab02").await;
        let key = call_id();
        let pbx = server.client.park(&user, &key);
        let pushes = server.pushes("ab02", 2).await;
        let attempts: Vec<_> = pushes.iter().map(|p| p.payload.attempt()).collect();
        assert_eq!(attempts, [Some(1), Some(1)], "{}", backend.name());
        // The retry comes sooner than the next resend would.
        assert!(pushes[1].at - pushes[0].at < Duration::from_millis(500));
        let answer = server
            .client
            .call_response(&key, start_time_of(&pushes[1]), true)
            .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED);
        assert_eq!(pbx.await.unwrap().body, "status=ACK");
        // Accepted on the retry, so iOS got no resend.
        assert_eq!(server.pusher.sent_to("ab02").len(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_token_ends_the_call_at_once_and_forgets_the_device() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        server.pusher.script([PushOutcome::TokenDead(Refusal::new(
            Reason::bounded("UNREGISTERED", fcm::REASONS),
            "UNREGISTERED",
        ))]);
        let user = server.registered("android", "tok-dead").await;
        let started = Instant::now();
        let reply = server.client.incoming_call(&user, &call_id()).await;
        assert_eq!(reply.body, "status=NAK");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{}: NAK came at the timeout",
            backend.name()
        );
        let forgotten = eventually(Duration::from_secs(2), || async {
            server.device(&user).await.is_none()
        })
        .await;
        assert!(
            forgotten,
            "{}: the dead device is still registered",
            backend.name()
        );
        // The next call finds no device.
        assert_eq!(
            server.client.incoming_call(&user, &call_id()).await.body,
            "status=NAK"
        );
        assert_eq!(server.pusher.sent_to("tok-dead").len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_answer_does_not_change_the_first() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |_| {}).await;
        let user = server.registered("android", "tok-twice").await;
        let key = call_id();
        let pbx = server.client.park(&user, &key);
        let push = server.push("tok-twice").await;
        // One after the other: sent together, the second could overtake
        // the first on a busy machine and win.
        let first = server
            .client
            .call_response(&key, start_time_of(&push), false)
            .await;
        let second = server
            .client
            .call_response(&key, start_time_of(&push), true)
            .await;
        assert_eq!(first.status, StatusCode::ACCEPTED);
        // Accepted while the call still rings; once the decline has ended
        // it, the call's reason (issue #23: never a 202 after the end).
        assert!(
            second.status == StatusCode::ACCEPTED
                || (second.status == StatusCode::GONE
                    && second.json()["reason"] == "not_available"),
            "{} {}",
            second.status,
            second.body
        );
        assert_eq!(pbx.await.unwrap().body, "status=NAK", "{}", backend.name());
    })
    .await;
}

/// Behind a load balancer the PBX's request and the app's answer reach
/// different instances; Redis carries the answer across.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_call_through_redis() {
    on_every_backend(|backend| async move {
        if backend.redis_url().is_none() {
            return; // The in-process broker is one instance by definition.
        }
        let a = start(&backend, |_| {}).await;
        let b = start(&backend, |_| {}).await;
        let user = sip_user_id();
        // Registered through B, rung through A.
        assert_eq!(
            b.client.register("android", &user, "tok-lb").await,
            StatusCode::CREATED
        );
        let key = call_id();
        let pbx = a.client.park(&user, &key);
        let push = a.push("tok-lb").await;
        let answer = b
            .client
            .call_response(&key, start_time_of(&push), true)
            .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED);
        assert_eq!(pbx.await.unwrap().body, "status=ACK");
        assert_eq!(a.pusher.sent_to("tok-lb").len(), 1);
    })
    .await;
}

/// Every first answer lands in the response log (platform, roundtrip,
/// available), written in batches off the request path and flushed when the
/// server stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_written_to_the_response_log() {
    use diesel::prelude::*;
    let backend = Backend::embedded();
    let Backend::Embedded { dir } = &backend else {
        unreachable!("an embedded backend")
    };
    let server = start(&backend, |_| {}).await;
    let user = server.registered("apns", "ab03").await;
    for available in [true, false] {
        let key = call_id();
        let pbx = server.client.park(&user, &key);
        let push = server
            .pushes("ab03", if available { 1 } else { 2 })
            .await
            .pop()
            .unwrap();
        server
            .client
            .call_response(&key, start_time_of(&push), available)
            .await;
        pbx.await.unwrap();
    }
    let TestServer { running, .. } = server;
    bounded("the server stopping", running.stop()).await;

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        platform: String,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        available: bool,
        #[diesel(sql_type = diesel::sql_types::Double)]
        roundtrip: f64,
    }
    let path = dir.path().join("test.sqlite3");
    let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    let rows: Vec<Row> =
        diesel::sql_query("SELECT platform, available, roundtrip FROM response_log ORDER BY id")
            .load(&mut conn)
            .unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| (r.platform.as_str(), r.available))
            .collect::<Vec<_>>(),
        [("apns", true), ("apns", false)]
    );
    assert!(
        rows.iter().all(|r| (0.0..5.0).contains(&r.roundtrip)),
        "{rows:?}"
    );
}

//! The call history (issue #14): every incoming call leaves one row, on
//! every way out, written in batches off the call path; the purge keeps
//! `--call-history-days`, of it and of what the apps reported.

mod common;

use std::time::Duration;

use call_notifier::push::{PushOutcome, Reason, Refusal};
use call_notifier::store::{
    history_cutoff, now_millis, CallHistoryEntry, CalledDevice, HangupReason, Platform,
    ResponseLogEntry,
};
use common::*;

/// Long enough to be shortened as `device list` shortens it.
const TOKEN: &str = "history-token-0123456789";
const SHORT: &str = "history-…6789";

/// Waits (bounded) until the call history of `user` holds a row, and
/// returns the rows; the writer works in batches, so rows come a moment
/// after the call.
async fn rows(server: &TestServer, user: &str) -> Vec<CallHistoryEntry> {
    let store = server.running.state.store.clone();
    let id: i64 = user.parse().expect("a SIP account id");
    let written = eventually(Duration::from_secs(5), || {
        let store = store.clone();
        async move { store.calls(id, None, 20).await.is_ok_and(|r| !r.is_empty()) }
    })
    .await;
    assert!(written, "{}: no call history row", server.backend.name());
    store.calls(id, None, 20).await.expect("read the history")
}

fn device(attempts: u32, verdict: &str) -> CalledDevice {
    CalledDevice {
        platform: Platform::Android,
        token: SHORT.into(),
        attempts,
        verdict: Some(verdict.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_call_leaves_one_row_with_its_device_and_roundtrip() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let server = start(&backend, |_| {}).await;
        let user = server.registered("android", TOKEN).await;
        let key = call_id();
        let before = now_millis();
        let pbx = server.client.park(&user, &key);
        let push = server.push(TOKEN).await;
        let answer = server
            .client
            .call_response(&key, start_time_of(&push), true)
            .await;
        assert_eq!(answer.status, hyper::StatusCode::ACCEPTED, "{name}");
        let reply = bounded("the PBX's answer", pbx)
            .await
            .expect("the PBX task");
        assert_eq!(reply.body, "status=ACK", "{name}");

        let rows = rows(&server, &user).await;
        assert_eq!(rows.len(), 1, "{name}: {rows:?}");
        let row = &rows[0];
        assert_eq!(row.sip_user_id.to_string(), user, "{name}");
        assert_eq!(row.unique_key, key, "{name}");
        assert_eq!(row.outcome, "ack", "{name}");
        assert_eq!(row.devices, [device(1, "delivered")], "{name}");
        assert_eq!(row.answered_by, Some(0), "{name}");
        let roundtrip = row.roundtrip_ms.expect("the answer's roundtrip");
        assert!(
            (0..=row.waited_ms + 50).contains(&roundtrip),
            "{name}: roundtrip {roundtrip} ms, waited {} ms",
            row.waited_ms
        );
        assert!(
            (before..=now_millis()).contains(&row.created_at),
            "{name}: started at the call"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_nobody_answers_leaves_timeout_with_its_attempts() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let server = start(&backend, |c| {
            c.wait_ms = 800;
            c.resend_interval_ms = 200;
        })
        .await;
        let user = server.registered("android", TOKEN).await;
        let key = call_id();
        let reply = server.client.incoming_call(&user, &key).await;
        assert_eq!(reply.body, "status=NAK", "{name}");
        let row = rows(&server, &user).await.remove(0);
        assert_eq!(row.outcome, "timeout", "{name}");
        assert_eq!(row.unique_key, key, "{name}");
        // wait / resend_interval - 1 pushes.
        assert_eq!(row.devices, [device(3, "delivered")], "{name}");
        assert_eq!((row.answered_by, row.roundtrip_ms), (None, None), "{name}");
        assert!(row.waited_ms >= 800, "{name}: waited {} ms", row.waited_ms);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_token_leaves_the_push_services_verdict() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let server = start(&backend, |_| {}).await;
        let user = server.registered("android", TOKEN).await;
        server.pusher.script([PushOutcome::TokenDead(Refusal::new(
            Reason::bounded("UNREGISTERED", &["UNREGISTERED"]),
            "FCM 404 UNREGISTERED",
        ))]);
        let reply = server.client.incoming_call(&user, &call_id()).await;
        assert_eq!(reply.body, "status=NAK", "{name}");
        let row = rows(&server, &user).await.remove(0);
        assert_eq!(row.outcome, "token_dead", "{name}");
        assert_eq!(
            row.devices,
            [device(0, "token_dead UNREGISTERED")],
            "{name}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pbx_hanging_up_leaves_hung_up() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let server = start(&backend, |c| c.wait_ms = 8000).await;
        let user = server.registered("android", TOKEN).await;
        let key = call_id();
        let pbx = server.client.park(&user, &key);
        server.push(TOKEN).await;
        pbx.abort();
        let _ = pbx.await;
        let row = rows(&server, &user).await.remove(0);
        assert_eq!(row.outcome, "hung_up", "{name}");
        assert_eq!(row.unique_key, key, "{name}");
        assert_eq!(row.devices.len(), 1, "{name}: {row:?}");
        assert_eq!(row.devices[0].token, SHORT, "{name}");
        assert!(row.waited_ms < 8000, "{name}: ended before the wait");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_for_an_account_without_device_leaves_no_device() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let server = start(&backend, |_| {}).await;
        let user = sip_user_id();
        let reply = server.client.incoming_call(&user, &call_id()).await;
        assert_eq!(reply.body, "status=NAK", "{name}");
        let row = rows(&server, &user).await.remove(0);
        assert_eq!(row.outcome, "no_device", "{name}");
        assert_eq!(row.unique_key, "", "{name}: it never got a key");
        assert!(row.devices.is_empty(), "{name}");
    })
    .await;
}

/// `--call-history-days 0` keeps nothing: the call is not recorded (the
/// writer is flushed by the stop, so no row can still be on its way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_days_records_no_call() {
    let backend = Backend::embedded();
    let server = start(&backend, |c| c.call_history_days = 0).await;
    let user = sip_user_id();
    let reply = server.client.incoming_call(&user, &call_id()).await;
    assert_eq!(reply.body, "status=NAK");
    let store = server.running.state.store.clone();
    bounded("the server stopping", server.running.stop()).await;
    let id: i64 = user.parse().expect("a SIP account id");
    assert_eq!(store.calls(id, None, 20).await.expect("read"), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_deletes_calls_past_the_retention_and_keeps_the_rest() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        // Its own purge, at start-up, keeps ten years back from the real
        // now: it leaves the test's calls of 2023 alone.
        let server = start(&backend, |c| c.call_history_days = 3650).await;
        let store = server.running.state.store.clone();
        const NOW: i64 = 1_700_000_000_000;
        const DAY: i64 = 86_400_000;
        let user: i64 = sip_user_id().parse().expect("an id");
        let call = |created_at: i64| CallHistoryEntry {
            created_at,
            sip_user_id: user,
            unique_key: format!("k{created_at}"),
            devices: vec![device(1, "delivered")],
            outcome: "timeout".into(),
            waited_ms: 4000,
            answered_by: None,
            roundtrip_ms: None,
        };
        let cutoff = history_cutoff(NOW, 14);
        let calls = [NOW - 15 * DAY, cutoff - 1, cutoff, NOW - DAY, NOW].map(call);
        store.log_calls(&calls).await.expect("write the calls");

        assert_eq!(store.purge_calls(cutoff).await.expect("purge"), 2, "{name}");
        let kept: Vec<i64> = store
            .calls(user, None, 20)
            .await
            .expect("read")
            .iter()
            .map(|c| c.created_at)
            .collect();
        assert_eq!(kept, [NOW, NOW - DAY, cutoff], "{name}: newest first");
        assert_eq!(store.purge_calls(cutoff).await.expect("purge"), 0, "{name}");

        // What the apps reported about the calls goes with them: a hangup
        // reason and a response-log row each side of the cutoff.
        for at in [cutoff - 1, cutoff] {
            store
                .record_hangup(HangupReason {
                    sip_user_id: user,
                    unique_key: format!("k{at}"),
                    reason: "declined".into(),
                    created_at: at,
                })
                .await
                .expect("a hangup reason");
        }
        let response = |created_at| ResponseLogEntry {
            platform: Platform::Android,
            roundtrip: 0.5,
            available: true,
            created_at,
        };
        store
            .log_responses(&[response(cutoff - 1), response(cutoff)])
            .await
            .expect("the response log");
        assert_eq!(
            store.purge_reports(cutoff).await.expect("purge"),
            2,
            "{name}: the older hangup reason and response"
        );
        assert_eq!(
            store.purge_reports(cutoff).await.expect("purge"),
            0,
            "{name}"
        );
        assert_eq!(
            store
                .purge_reports(history_cutoff(NOW + 1, 0))
                .await
                .expect("purge"),
            2,
            "{name}: 0 days keeps none"
        );

        // 0 days keeps nothing.
        store
            .purge_calls(history_cutoff(NOW + 1, 0))
            .await
            .expect("purge");
        assert_eq!(
            store.calls(user, None, 20).await.expect("read"),
            [],
            "{name}"
        );
    })
    .await;
}

/// The app can answer before the push service has replied to the push that
/// woke it: the row still says what the service said, once it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_push_services_reply_leaves_its_verdict() {
    on_every_backend(|backend| async move {
        let server = common::fcm::FcmServer::start(&backend, |_| {}).await;
        let name = server.name();
        server.fcm_answers([common::fcm::fcm_accepts().after(Duration::from_millis(300))]);
        let user = server.registered("android", TOKEN).await;
        let key = call_id();
        let pbx = server.ring(&user, &key);
        let push = server.push_for(&key, Duration::from_secs(5)).await;
        let answer = server.answer(&push, true).await;
        assert_eq!(answer.status, hyper::StatusCode::ACCEPTED, "{name}");
        let reply = bounded("the PBX's answer", pbx)
            .await
            .expect("the PBX task");
        assert_eq!(reply.body, "status=ACK", "{name}");

        let rows = rows(&server, &user).await;
        assert_eq!(rows.len(), 1, "{name}: {rows:?}");
        assert_eq!(rows[0].devices, [device(1, "delivered")], "{name}");
        assert_eq!(rows[0].answered_by, Some(0), "{name}");
    })
    .await;
}

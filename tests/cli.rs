//! The operator's commands, run as the real binary against a real database
//! and, for `push test`, the real FCM pusher pointed at local stand-ins for
//! FCM and Google's token endpoint: `push test`, `device list`,
//! `device remove`, `calls`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use call_notifier::store::{
    CallHistoryEntry, CalledDevice, Device, NewDevice, Platform, PoolOptions, Store,
};
use serde_json::json;

use common::fcm::{fcm_accepts, StandIns, PROJECT};
use common::stand_in::Answer;
use common::{bounded, on_every_backend, sip_user_id, sorted_keys, Backend, APP};

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `call-notifier --database-url <the backend's> args...` to its
/// end, within [`common::BOUND`] (killed if it takes longer).
async fn call_notifier(backend: &Backend, args: &[&str]) -> Run {
    let database_url = backend.config().database_url;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_call-notifier"));
    command
        .args(["--database-url", &database_url])
        .args(args)
        .env("CALL_NOTIFIER_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let what = format!("call-notifier {}", args.join(" "));
    let out = bounded(&what, command.output())
        .await
        .expect("the binary runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The backend's store, opened by the test as the server would.
async fn store(backend: &Backend) -> Arc<dyn Store> {
    call_notifier::store::open(
        &backend.config().database_url,
        PoolOptions {
            max_size: 2,
            acquire_timeout: Duration::from_secs(5),
        },
    )
    .await
    .expect("open the store")
}

/// FCM and Google's token endpoint, stood in for, and an Android app whose
/// service account points at them, added with the real `app add`.
struct Fcm {
    stand_ins: StandIns,
    backend: Backend,
}

impl std::ops::Deref for Fcm {
    type Target = StandIns;

    fn deref(&self) -> &StandIns {
        &self.stand_ins
    }
}

impl Fcm {
    /// FCM answers every push with `answer`.
    async fn start(backend: &Backend, answer: Answer) -> Fcm {
        let fcm = Fcm {
            stand_ins: StandIns::start(move |_| answer.clone()).await,
            backend: backend.clone(),
        };
        fcm.add_app(&fcm.account).await;
        fcm
    }

    async fn add_app(&self, account: &Path) {
        let account = account.display().to_string();
        let run = call_notifier(
            &self.backend,
            &[
                "app",
                "add",
                "--platform",
                "android",
                "--app-id",
                APP,
                "--fcm-service-account",
                &account,
            ],
        )
        .await;
        assert_eq!(run.code, Some(0), "app add: {run:?}");
    }

    /// `push test` to `token` through the stand-ins, with `extra` flags.
    async fn push_test(&self, token: &str, extra: &[&str]) -> Run {
        let fcm_url = self.fcm.url();
        let mut args = vec![
            "push",
            "test",
            "--platform",
            "android",
            "--app-id",
            APP,
            "--token",
            token,
            "--fcm-base-url",
            &fcm_url,
        ];
        args.extend_from_slice(extra);
        call_notifier(&self.backend, &args).await
    }
}

fn fcm_error(status: u16, rpc: &str, code: &str, message: &str) -> Answer {
    Answer::json(
        status,
        json!({"error": {"code": status, "message": message, "status": rpc, "details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
        ]}}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_test_delivers_one_call_push_with_the_contract_keys_and_exits_zero() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let fcm = Fcm::start(&backend, fcm_accepts()).await;
        let token = "fcm-token-0123456789-delivered";
        let run = fcm
            .push_test(token, &["--response-url", "https://notify.example.com/"])
            .await;
        assert_eq!(run.code, Some(0), "{name}: {run:?}");
        assert!(
            run.stdout.contains("delivered: FCM accepted the push"),
            "{name}: {run:?}"
        );
        assert!(
            run.stdout.contains("fcm-toke…ered") && !run.stdout.contains(token),
            "{name}: the token shortened: {run:?}"
        );

        let received = fcm.fcm.received();
        assert_eq!(received.len(), 1, "{name}: exactly one push");
        let push = &received[0];
        assert_eq!(
            push.uri,
            format!("/v1/projects/{PROJECT}/messages:send"),
            "{name}"
        );
        assert!(
            push.header("authorization")
                .is_some_and(|a| a.starts_with("Bearer ya29.test-token-")),
            "{name}: the access token from the token endpoint"
        );
        assert_eq!(fcm.google.hits(), 1, "{name}: one token request");
        let message = &push.json()["message"];
        assert_eq!(message["token"], token, "{name}");
        assert_eq!(message["android"]["priority"], "HIGH", "{name}");
        let data = message["data"].as_object().expect("data");
        common::assert_call_push_keys(data, None, name);
        let key = data["unique_key"].as_str().expect("a key");
        assert!(key.starts_with("push-test-"), "{name}: {key}");
        assert!(run.stdout.contains(key), "{name}: the key is printed");
        assert_eq!(data["type"], "call", "{name}");
        assert_eq!(data["attempt"], "1", "{name}");
        assert_eq!(data["caller_id"], "call-notifier push test", "{name}");
        assert_eq!(
            data["response_api"], "https://notify.example.com/api/call-response/",
            "{name}: --response-url is honoured"
        );

        // A message push carries the text and nothing else.
        let run = fcm.push_test(token, &["--kind", "message"]).await;
        assert_eq!(run.code, Some(0), "{name}: {run:?}");
        let received = fcm.fcm.received();
        assert_eq!(received.len(), 2, "{name}");
        let data = received[1].json()["message"]["data"].clone();
        let data = data.as_object().expect("data");
        assert_eq!(sorted_keys(data), ["message", "type"], "{name}");
        assert_eq!(data["type"], "message", "{name}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_test_reports_a_dead_token_with_its_reason_and_keeps_the_device() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let unregistered = fcm_error(
            404,
            "NOT_FOUND",
            "UNREGISTERED",
            "Requested entity was not found.",
        );
        let fcm = Fcm::start(&backend, unregistered).await;
        // A device with that token: a test push reports, it forgets nothing.
        let user = sip_user_id();
        let id: i64 = user.parse().expect("an id");
        let store = store(&backend).await;
        store
            .register_device(device(id, Platform::Android, "fcm-dead-token-1234"), 1)
            .await
            .expect("register");

        let run = fcm.push_test("fcm-dead-token-1234", &[]).await;
        assert_eq!(run.code, Some(3), "{name}: {run:?}");
        assert!(
            run.stdout.contains("token dead: FCM 404 UNREGISTERED"),
            "{name}: {run:?}"
        );
        assert_eq!(fcm.fcm.hits(), 1, "{name}: not retried");
        assert!(
            store.device(id).await.expect("look up").is_some(),
            "{name}: the device stays"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_test_reports_a_refusal_with_its_status_and_honours_the_push_timeout() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let internal = fcm_error(500, "INTERNAL", "INTERNAL", "Internal error.");
        let fcm = Fcm::start(&backend, internal).await;
        let run = fcm.push_test("fcm-token-refused", &[]).await;
        assert_eq!(run.code, Some(4), "{name}: {run:?}");
        assert!(
            run.stdout
                .contains("refused for now: FCM 500 INTERNAL: Internal error."),
            "{name}: {run:?}"
        );
        assert_eq!(fcm.fcm.hits(), 1, "{name}: sent once, not retried");

        // Refused for good: a 403 that blames the service account.
        fcm.fcm.answer_with(|_| {
            fcm_error(
                403,
                "PERMISSION_DENIED",
                "SENDER_ID_MISMATCH",
                "SenderId mismatch",
            )
        });
        let run = fcm.push_test("fcm-token-refused", &[]).await;
        assert_eq!(run.code, Some(5), "{name}: {run:?}");
        assert!(
            run.stdout.contains("refused: FCM 403 SENDER_ID_MISMATCH"),
            "{name}: {run:?}"
        );

        // An FCM that does not answer in time: --push-timeout-ms bounds it.
        fcm.fcm
            .answer_with(|_| fcm_accepts().after(Duration::from_secs(20)));
        let started = std::time::Instant::now();
        let run = fcm
            .push_test("fcm-token-refused", &["--push-timeout-ms", "300"])
            .await;
        assert_eq!(run.code, Some(4), "{name}: {run:?}");
        assert!(
            run.stdout.contains("no answer within 300 ms"),
            "{name}: {run:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{name}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_test_says_when_the_credentials_cannot_be_read() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let fcm = Fcm::start(&backend, fcm_accepts()).await;
        let broken = fcm.dir.path().join("broken.json");
        std::fs::write(&broken, "{ not a service account").expect("write");
        fcm.add_app(&broken).await;
        let run = fcm.push_test("fcm-token-1", &[]).await;
        assert_eq!(run.code, Some(6), "{name}: {run:?}");
        assert!(
            run.stdout
                .contains("credentials cannot be used: the android app com.example.softphone"),
            "{name}: {run:?}"
        );
        assert!(run.stdout.contains("broken.json"), "{name}: {run:?}");

        let missing = fcm.dir.path().join("missing.json");
        fcm.add_app(&missing).await;
        let run = fcm.push_test("fcm-token-1", &[]).await;
        assert_eq!(run.code, Some(6), "{name}: {run:?}");
        assert!(
            run.stdout.contains("cannot read") && run.stdout.contains("missing.json"),
            "{name}: {run:?}"
        );
        assert_eq!(fcm.fcm.hits(), 0, "{name}: nothing sent");
        assert_eq!(fcm.google.hits(), 0, "{name}: no token asked for");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_test_names_an_unknown_app_and_a_log_only_one() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let fcm = Fcm::start(&backend, fcm_accepts()).await;
        let run = call_notifier(
            &backend,
            &[
                "push",
                "test",
                "--platform",
                "gcm",
                "--app-id",
                "com.example.other",
                "--token",
                "t",
            ],
        )
        .await;
        assert_eq!(run.code, Some(7), "{name}: {run:?}");
        assert!(
            run.stdout.contains("no gcm app com.example.other"),
            "{name}: {run:?}"
        );

        // APNs: an app with a key that is not there; then one without
        // credentials. (a2 cannot be pointed at a stand-in, so no test
        // sends an APNs push; what it is handed, a VoIP push for a call
        // and the takeover alert to `--token` for `--kind message`, is a
        // unit test of `commands::push_test`.)
        let missing_key = fcm.dir.path().join("AuthKey_ABC123DEFG.p8");
        let missing_key = missing_key.display().to_string();
        let add = [
            "app",
            "add",
            "--platform",
            "apns",
            "--app-id",
            APP,
            "--apns-key",
            &missing_key,
            "--apns-key-id",
            "ABC123DEFG",
            "--apns-team-id",
            "DEF456GHIJ",
        ];
        assert_eq!(call_notifier(&backend, &add).await.code, Some(0), "{name}");
        let apns_test = [
            "push",
            "test",
            "--platform",
            "apns",
            "--app-id",
            APP,
            "--token",
            "a1b2c3d4e5f6",
            "--sandbox",
        ];
        let run = call_notifier(&backend, &apns_test).await;
        assert_eq!(run.code, Some(6), "{name}: {run:?}");
        assert!(
            run.stdout
                .contains("credentials cannot be used: the apns app")
                && run.stdout.contains("AuthKey_ABC123DEFG.p8"),
            "{name}: {run:?}"
        );

        let add = ["app", "add", "--platform", "apns", "--app-id", APP];
        assert_eq!(call_notifier(&backend, &add).await.code, Some(0), "{name}");
        let run = call_notifier(&backend, &apns_test).await;
        assert_eq!(run.code, Some(6), "{name}: {run:?}");
        assert!(run.stdout.contains("log-only"), "{name}: {run:?}");
        // `--kind message` takes the same path for apns (the app is looked
        // up, then the alert goes to `--token`); a log-only app stops it
        // before anything is sent.
        let message = [&apns_test[..], &["--kind", "message"]].concat();
        let run = call_notifier(&backend, &message).await;
        assert_eq!(run.code, Some(6), "{name}: {run:?}");
        assert!(run.stdout.contains("log-only"), "{name}: {run:?}");
        assert_eq!(fcm.fcm.hits(), 0, "{name}");
    })
    .await;
}

/// `device remove --sip-user-id user [--token token]`.
async fn remove(backend: &Backend, user: &str, token: Option<&str>) -> Run {
    let mut args = vec!["device", "remove", "--sip-user-id", user];
    if let Some(token) = token {
        args.extend(["--token", token]);
    }
    call_notifier(backend, &args).await
}

fn device(sip_user_id: i64, platform: Platform, token: &str) -> NewDevice {
    NewDevice {
        sip_user_id,
        platform,
        token: token.into(),
        app_id: APP.into(),
        name: Some("Pixel \u{1b}[2J 8".into()),
        os_version: Some("14".into()),
        client_version: None,
        remote_logging_id: None,
        sandbox: false,
        alert_token: None,
        expires_at: None,
        proxy_expires_at: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_list_shows_an_accounts_devices_as_a_table_and_as_json() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let store = store(&backend).await;
        let (user, other) = (sip_user_id(), sip_user_id());
        let id: i64 = user.parse().expect("an id");
        let token = "fcm-AbCdEfGh-0123456789-the-middle-WxYz";
        store
            .register_device(device(id, Platform::Android, token), 1)
            .await
            .expect("register");
        store
            .register_device(
                device(
                    other.parse().expect("an id"),
                    Platform::Gcm,
                    "someone-elses-token-1234",
                ),
                1,
            )
            .await
            .expect("register");
        let stored: Device = store.device(id).await.expect("look up").expect("a device");

        let run = call_notifier(&backend, &["device", "list", "--sip-user-id", &user]).await;
        assert_eq!(run.code, Some(0), "{name}: {run:?}");
        let lines: Vec<&str> = run.stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{name}: a header and one device: {run:?}");
        assert!(
            lines[0].starts_with("PLATFORM  APP")
                && lines[0].contains("TOKEN")
                && lines[0].contains("LAST SEEN"),
            "{name}: {run:?}"
        );
        let row = lines[1];
        assert!(
            row.starts_with("android   com.example.softphone  fcm-AbCd…WxYz  no"),
            "{name}: {row}"
        );
        assert!(!run.stdout.contains(token), "{name}: the token shortened");
        assert!(!run.stdout.contains("someone-else"), "{name}: one account");
        assert!(row.contains(" UTC"), "{name}: {row}");
        assert!(
            row.contains("Pixel \\u{1b}[2J 8"),
            "{name}: a device's name escaped: {row}"
        );

        let run = call_notifier(
            &backend,
            &["device", "list", "--sip-user-id", &user, "--json"],
        )
        .await;
        assert_eq!(run.code, Some(0), "{name}: {run:?}");
        let lines: Vec<&str> = run.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "{name}: one line per device: {run:?}");
        let listed: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
        assert_eq!(listed["sip_user_id"], user, "{name}");
        assert_eq!(listed["platform"], "android", "{name}");
        assert_eq!(listed["app"], APP, "{name}");
        assert_eq!(listed["token"], token, "{name}: the full token");
        assert_eq!(listed["sandbox"], false, "{name}");
        assert_eq!(listed["name"], "Pixel \u{1b}[2J 8", "{name}");
        assert_eq!(listed["client_version"], serde_json::Value::Null, "{name}");
        // Times as RFC 3339 UTC, to the millisecond stored.
        let seen = listed["last_seen_at"].as_str().expect("a time");
        assert!(seen.ends_with('Z') && seen.len() == 24, "{name}: {seen}");
        let millis = format!(".{:03}Z", stored.last_seen_at % 1000);
        assert!(seen.ends_with(&millis), "{name}: {seen} for {stored:?}");

        // An account without devices lists nothing, and says so on stderr.
        let empty = sip_user_id();
        let run = call_notifier(&backend, &["device", "list", "--sip-user-id", &empty]).await;
        assert_eq!(run.code, Some(0), "{name}: {run:?}");
        assert_eq!(run.stdout, "", "{name}");
        assert!(
            run.stderr
                .contains(&format!("no device for SIP account {empty}")),
            "{name}: {run:?}"
        );

        // Not an account id.
        let run = call_notifier(&backend, &["device", "list", "--sip-user-id", "0"]).await;
        assert_eq!(run.code, Some(2), "{name}: {run:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_remove_removes_what_matches_and_fails_when_nothing_does() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let store = store(&backend).await;
        let (user, other) = (sip_user_id(), sip_user_id());
        let (id, other_id): (i64, i64) = (user.parse().expect("id"), other.parse().expect("id"));
        let token = "apns-token-0123456789abcdef";
        store
            .register_device(device(id, Platform::Apns, token), 1)
            .await
            .expect("register");
        store
            .register_device(
                device(other_id, Platform::Android, "other-token-0123456789"),
                1,
            )
            .await
            .expect("register");

        // A token the account does not have: nothing goes, and it says so.
        let run = remove(&backend, &user, Some("not-it")).await;
        assert_ne!(run.code, Some(0), "{name}: {run:?}");
        assert!(
            run.stderr
                .contains(&format!("no device with that token for SIP account {user}")),
            "{name}: {run:?}"
        );
        assert!(store.device(id).await.expect("look up").is_some(), "{name}");

        // The other account's token does not reach across accounts.
        let run = remove(&backend, &user, Some("other-token-0123456789")).await;
        assert_ne!(run.code, Some(0), "{name}: {run:?}");
        assert!(
            store.device(other_id).await.expect("look up").is_some(),
            "{name}"
        );

        let run = remove(&backend, &user, Some(token)).await;
        assert_eq!(run.code, Some(0), "{name}: {run:?}");
        assert_eq!(
            run.stdout,
            format!("removed apns device apns-tok…cdef of app {APP} from SIP account {user}\n"),
            "{name}"
        );
        assert!(store.device(id).await.expect("look up").is_none(), "{name}");

        // Without --token: every device of the account; then none are left.
        let run = remove(&backend, &other, None).await;
        assert_eq!(run.code, Some(0), "{name}: {run:?}");
        assert!(
            run.stdout
                .starts_with("removed android device other-to…6789"),
            "{name}: {run:?}"
        );
        assert!(
            store.device(other_id).await.expect("look up").is_none(),
            "{name}"
        );
        let run = remove(&backend, &other, None).await;
        assert_ne!(run.code, Some(0), "{name}: {run:?}");
        assert!(
            run.stderr
                .contains(&format!("no device for SIP account {other}")),
            "{name}: {run:?}"
        );
    })
    .await;
}

/// Three calls of one account, an hour apart from 2023-11-14T22:13:20Z:
/// answered, timed out, and one the PBX hung up on; and a call of another
/// account.
async fn three_calls(store: &dyn Store) -> String {
    const START: i64 = 1_700_000_000_000;
    const HOUR: i64 = 3_600_000;
    let user = sip_user_id();
    let id: i64 = user.parse().expect("an id");
    let device = |attempts, verdict: &str| CalledDevice {
        platform: Platform::Android,
        token: "eJx9k3Qw…C0hQ".into(),
        attempts,
        verdict: Some(verdict.into()),
    };
    let call = |hours: i64, key: &str, outcome: &str| CallHistoryEntry {
        created_at: START + hours * HOUR,
        sip_user_id: id,
        unique_key: key.into(),
        devices: vec![device(1, "delivered")],
        outcome: outcome.into(),
        waited_ms: 4000,
        answered_by: None,
        roundtrip_ms: None,
    };
    let answered = CallHistoryEntry {
        waited_ms: 1830,
        answered_by: Some(0),
        roundtrip_ms: Some(1712),
        ..call(0, "c-answered", "ack")
    };
    let timed_out = CallHistoryEntry {
        devices: vec![device(3, "delivered")],
        ..call(1, "c-timeout", "timeout")
    };
    let other = CallHistoryEntry {
        sip_user_id: sip_user_id().parse().expect("an id"),
        ..call(3, "c-other", "ack")
    };
    store
        .log_calls(&[answered, timed_out, call(2, "c-hung-up", "hung_up"), other])
        .await
        .expect("write the calls");
    user
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_prints_the_history_newest_first_as_a_table_and_json_lines() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let store = store(&backend).await;
        let user = three_calls(store.as_ref()).await;

        let run = call_notifier(&backend, &["calls", "--sip-user-id", &user]).await;
        assert_eq!(run.code, Some(0), "{name}: {run:?}");
        let lines: Vec<&str> = run.stdout.lines().collect();
        assert_eq!(
            lines,
            [
                "TIME                     KEY         OUTCOME  WAITED   DEVICES                             ANSWERED",
                "2023-11-15 00:13:20 UTC  c-hung-up   hung_up  4000 ms  android:eJx9k3Qw…C0hQ x1 delivered  -",
                "2023-11-14 23:13:20 UTC  c-timeout   timeout  4000 ms  android:eJx9k3Qw…C0hQ x3 delivered  -",
                "2023-11-14 22:13:20 UTC  c-answered  ack      1830 ms  android:eJx9k3Qw…C0hQ x1 delivered  #0 1712 ms",
            ],
            "{name}: {run:?}"
        );

        let run = call_notifier(&backend, &["calls", "--sip-user-id", &user, "--json"]).await;
        assert_eq!(run.code, Some(0), "{name}: {run:?}");
        let calls: Vec<serde_json::Value> = run
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(calls.len(), 3, "{name}: {run:?}");
        assert_eq!(
            calls[2],
            json!({
                "time": "2023-11-14T22:13:20.000Z",
                "created_at": 1_700_000_000_000_i64,
                "sip_user_id": user,
                "unique_key": "c-answered",
                "outcome": "ack",
                "waited_ms": 1830,
                "devices": [{"platform": "android", "token": "eJx9k3Qw…C0hQ", "attempts": 1, "verdict": "delivered"}],
                "answered_by": 0,
                "roundtrip_ms": 1712,
            }),
            "{name}"
        );

        let empty = sip_user_id();
        let run = call_notifier(&backend, &["calls", "--sip-user-id", &empty]).await;
        assert_eq!(run.code, Some(0), "{name}: {run:?}");
        assert_eq!(run.stdout, "", "{name}");
        assert!(run.stderr.contains("no call for SIP account"), "{name}: {run:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_last_and_since_filter_and_a_bad_since_exits_2_naming_the_flag() {
    on_every_backend(|backend| async move {
        let name = backend.name();
        let store = store(&backend).await;
        let user = three_calls(store.as_ref()).await;
        let keys = |run: &Run| -> Vec<String> {
            run.stdout
                .lines()
                .map(|l| {
                    let call: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
                    call["unique_key"].as_str().expect("a key").to_owned()
                })
                .collect()
        };
        let calls = |extra: &'static [&'static str]| {
            let backend = backend.clone();
            let user = user.clone();
            async move {
                let mut args = vec!["calls", "--json", "--sip-user-id", &user];
                args.extend_from_slice(extra);
                call_notifier(&backend, &args).await
            }
        };

        let run = calls(&["--last", "1"]).await;
        assert_eq!(keys(&run), ["c-hung-up"], "{name}: {run:?}");
        // From the second call on, as RFC 3339 with an offset and as Unix
        // seconds.
        let run = calls(&["--since", "2023-11-15T00:13:20+01:00"]).await;
        assert_eq!(keys(&run), ["c-hung-up", "c-timeout"], "{name}: {run:?}");
        let run = calls(&["--since", "1700003600", "--last", "1"]).await;
        assert_eq!(keys(&run), ["c-hung-up"], "{name}: {run:?}");

        for bad in ["yesterday", "2023-11-14", "2023-11-14T25:00:00Z"] {
            let run =
                call_notifier(&backend, &["calls", "--sip-user-id", &user, "--since", bad]).await;
            assert_eq!(run.code, Some(2), "{name}: {bad}: {run:?}");
            assert!(
                run.stderr.contains("--since") && run.stderr.contains("RFC 3339"),
                "{name}: {bad}: {run:?}"
            );
            assert_eq!(run.stdout, "", "{name}");
        }
        let run = call_notifier(&backend, &["calls", "--sip-user-id", &user, "--last", "0"]).await;
        assert_eq!(run.code, Some(2), "{name}: {run:?}");
        assert!(run.stderr.contains("--last"), "{name}: {run:?}");
    })
    .await;
}

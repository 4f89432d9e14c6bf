//! End to end with real SIP software: Kamailio running
//! `examples/kamailio/kamailio.cfg`, SIPp as the phone and as the caller,
//! call-notifier pushing to an FCM stand-in. Everything on loopback.
//!
//! Ignored by a plain `cargo test`, so a fresh machine needs no SIP
//! software; run with `--include-ignored` and `TEST_KAMAILIO=1` (`.ci/run`
//! installs the Debian packages and does both). Included without
//! `TEST_KAMAILIO=1` it fails, naming what it needs: it never passes
//! without having run. Missing or broken software fails it too.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::fcm::{FcmServer, PROJECT};
use common::*;
use hyper::StatusCode;
use tokio::process::{Child, Command};

const SCENARIOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kamailio");
const CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/kamailio/kamailio.cfg"
);
/// The phone's FCM token, as its REGISTER's `pn-prid` carries it.
const TOKEN: &str = "phone-fcm-token";

/// A free loopback UDP port (free when asked; nothing else here binds).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

/// SIPp running `scenario` once against Kamailio at `proxy`, from `port`,
/// for the account `user`, with `keys` for the scenario's keywords.
fn sipp(
    dir: &Path,
    scenario: &str,
    proxy: u16,
    port: u16,
    user: &str,
    keys: &[(&str, &str)],
) -> Child {
    let mut command = Command::new("sipp");
    command
        .arg(format!("127.0.0.1:{proxy}"))
        .args(["-sf", &format!("{SCENARIOS}/{scenario}")])
        .args(["-i", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-s",
            user,
            "-m",
            "1",
            "-nostdin",
            "-timeout",
            "20s",
            "-timeout_error",
        ])
        .args(["-trace_err", "-trace_msg"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in keys {
        command.args(["-key", key, value]);
    }
    command
        .spawn()
        .expect("TEST_KAMAILIO=1 but sipp does not run (apt-get install sip-tester)")
}

/// Waits for SIPp to finish its one call, and fails the test (with its
/// traces) unless the call succeeded.
async fn succeeds(dir: &Path, what: &str, child: Child) {
    let out = bounded(what, child.wait_with_output())
        .await
        .expect("sipp ran");
    if !out.status.success() {
        let mut traces = String::new();
        for entry in std::fs::read_dir(dir).expect("the trace dir").flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            traces.push_str(&format!("--- {}\n{text}\n", entry.path().display()));
        }
        panic!(
            "{what}: sipp {}: {}\n{traces}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Kamailio on `port` with the example configuration, posting to `server`;
/// registrations of 1 s are taken, so a test can let one lapse.
async fn kamailio(dir: &Path, port: u16, server: &str) -> Child {
    let log = std::fs::File::create(dir.join("kamailio.log")).expect("a log file");
    let mut child = Command::new("kamailio")
        .args(["-f", CONFIG, "-DD", "-E", "-Y"])
        .arg(dir)
        .args(["-A", &format!("LISTEN=udp:127.0.0.1:{port}")])
        .args(["-A", &format!("CALL_NOTIFIER=\"{server}\"")])
        .args(["-A", "MIN_EXPIRES=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("TEST_KAMAILIO=1 but kamailio does not run (apt-get install kamailio kamailio-utils-modules)");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if let Ok(Some(status)) = child.try_wait() {
        let log = std::fs::read_to_string(dir.join("kamailio.log")).unwrap_or_default();
        panic!("kamailio exited {status}:\n{log}");
    }
    child
}

fn kamailio_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("kamailio.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_wakes_the_phone_and_relays_the_call() {
    assert_eq!(
        std::env::var("TEST_KAMAILIO").as_deref(),
        Ok("1"),
        "this test runs Kamailio and SIPp: set TEST_KAMAILIO=1 (apt-get install kamailio kamailio-utils-modules sip-tester)"
    );
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 8_000).await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let dir: PathBuf = dir.keep();
    let proxy = free_udp_port();
    let phone_port = free_udp_port();
    let _kamailio = kamailio(&dir, proxy, server.client.base()).await;
    let user = sip_user_id();
    let register = |expires: &'static str| {
        sipp(
            &dir,
            "register.xml",
            proxy,
            free_udp_port(),
            &user,
            &[
                ("contact_port", &phone_port.to_string()),
                ("token", TOKEN),
                ("project", PROJECT),
                ("expires", expires),
            ],
        )
    };

    // The phone registers with RFC 8599 parameters: the device is stored.
    succeeds(&dir, "the first REGISTER", register("1")).await;
    let device = server.device(&user).await;
    let device = device.unwrap_or_else(|| panic!("no device stored:\n{}", kamailio_log(&dir)));
    assert_eq!(device.token, TOKEN);
    assert_eq!(device.app_id, APP);
    assert_eq!(device.client_version.as_deref(), Some("SIPp-phone/3.6"));
    // It goes quiet: its 1 s contact lapses (the device lives on its grace).
    tokio::time::sleep(Duration::from_millis(2_000)).await;

    // The caller INVITEs; the FCM stand-in receives the push.
    let caller = sipp(&dir, "caller.xml", proxy, free_udp_port(), &user, &[]);
    let pushes = server.pushes(1, Duration::from_secs(10)).await;
    let push = pushes.last().expect("a push");
    assert_eq!(push.json()["message"]["token"], TOKEN, "{:?}", push.json());

    // The phone wakes: listens, REGISTERs again (that answers the call), and
    // its app posts call-response (a repeat by then).
    let phone = sipp(&dir, "phone.xml", proxy, phone_port, &user, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    succeeds(&dir, "the REGISTER of the woken phone", register("60")).await;
    let answer = server.answer(push, true).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    succeeds(&dir, "the phone answering the INVITE", phone).await;
    succeeds(&dir, "the caller's call answered 200", caller).await;

    // An account with no device: 480 at once.
    let nobody = sip_user_id();
    let refused = sipp(&dir, "caller-480.xml", proxy, free_udp_port(), &nobody, &[]);
    succeeds(
        &dir,
        "a call to an account with no device gets 480",
        refused,
    )
    .await;

    // Push parameters naming no app: 555, and the binding just saved is
    // removed again, so a call to the account is not relayed to it but
    // asks call-notifier, which has no device for it: 480.
    let unsupported = sip_user_id();
    let refused = sipp(
        &dir,
        "register-unsupported.xml",
        proxy,
        free_udp_port(),
        &unsupported,
        &[
            ("contact_port", &free_udp_port().to_string()),
            ("token", TOKEN),
            ("project", "no-such-project"),
        ],
    );
    succeeds(&dir, "a REGISTER naming no app gets 555", refused).await;
    assert_eq!(server.device(&unsupported).await, None);
    let refused = sipp(
        &dir,
        "caller-480.xml",
        proxy,
        free_udp_port(),
        &unsupported,
        &[],
    );
    succeeds(
        &dir,
        "a call after a 555 is not relayed to its binding: 480",
        refused,
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

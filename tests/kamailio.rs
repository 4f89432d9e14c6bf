//! End to end with real SIP software: Kamailio running
//! `examples/kamailio/kamailio.cfg`, SIPp as the phone and as the caller,
//! call-notifier pushing to an FCM stand-in; once, linphone-daemon
//! (`linphone-cli`) as a real phone. Everything on loopback: the phones on
//! 127.0.0.1, signing with the digest credentials the test writes into
//! Kamailio's db_text store; the PBX on 127.0.0.2, recognised by its
//! address.
//!
//! Ignored by a plain `cargo test`, so a fresh machine needs no SIP
//! software; run with `--include-ignored` and `TEST_KAMAILIO=1` (`.ci/run`
//! installs the Debian packages and does both). Included without
//! `TEST_KAMAILIO=1` it fails, naming what it needs: it never passes
//! without having run. Missing or broken software fails it too.

mod common;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::digest::{credentials, md5_hex, password, Challenge};
use common::fcm::{FcmServer, PROJECT};
use common::*;
use hyper::StatusCode;
use tokio::process::{Child, Command};

const SCENARIOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kamailio");
const CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/kamailio/kamailio.cfg"
);
/// The secret of the call_id hash.
const SECRET: &str = "0f3c5e1d8a7b4c2e9f6a1b3c5d7e9f20";
/// Where the PBX sends from: PBX_NETWORK, never challenged.
const PBX_IP: &str = "127.0.0.2";
/// The phone's FCM token, as its REGISTER's `pn-prid` carries it.
const TOKEN: &str = "phone-fcm-token";

/// The digest the SIP bench's phone signs with (tests/common/digest.rs) is
/// RFC 2617's: its section 3.5 example, signed.
#[test]
fn digest_signs_as_rfc_2617_says() {
    let challenge = Challenge::parse(
        r#"Digest realm="testrealm@host.com", qop="auth,auth-int", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41""#,
    )
    .expect("a challenge");
    let signed = challenge.authorization(
        ("Mufasa", "Circle Of Life"),
        ("GET", "/dir/index.html"),
        1,
        "0a4f113b",
    );
    assert!(
        signed.contains(r#"response="6629fae49393a05397450978507c4ef1""#),
        "{signed}"
    );
    assert_eq!(md5_hex(""), "d41d8cd98f00b204e9800998ecf8427e");
}

fn requires_kamailio() {
    assert_eq!(
        std::env::var("TEST_KAMAILIO").as_deref(),
        Ok("1"),
        "this test runs Kamailio and SIPp: set TEST_KAMAILIO=1 (apt-get install kamailio kamailio-utils-modules sip-tester linphone-cli)"
    );
}

/// A free loopback UDP port (free when asked; nothing else here binds).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

/// Who sends a scenario.
enum Side<'a> {
    /// The PBX: from [`PBX_IP`], unsigned.
    Pbx,
    /// A phone listening on this port for what Kamailio relays to its
    /// contact; it sends nothing that is challenged.
    Listening(u16),
    /// A phone signing with these credentials when challenged.
    Signed { user: &'a str, password: &'a str },
}

/// Kamailio with the example configuration, in front of a call-notifier.
struct Proxy {
    dir: PathBuf,
    port: u16,
    /// Its main process. SIGKILL (what `kill_on_drop` sends) would leave
    /// its children behind, so [`Proxy`]'s drop sends SIGTERM, which the
    /// main process passes on to them.
    kamailio: Child,
}

impl Proxy {
    /// Kamailio on a free port, posting to `server`, with credentials for
    /// `accounts` (each with [`password`]); registrations of 1 s are taken,
    /// so a test can let one lapse.
    async fn start(server: &str, accounts: &[&str]) -> Proxy {
        Proxy::start_with(server, accounts, "1").await
    }

    /// [`Proxy::start`] taking registrations of `min_expires` seconds and
    /// longer.
    async fn start_with(server: &str, accounts: &[&str], min_expires: &str) -> Proxy {
        requires_kamailio();
        let dir = tempfile::tempdir().expect("a temp dir").keep();
        let db = credentials(&dir, accounts);
        let port = free_udp_port();
        let log = std::fs::File::create(dir.join("kamailio.log")).expect("a log file");
        let mut child = Command::new("kamailio")
            .args(["-f", CONFIG, "-DD", "-E", "-Y"])
            .arg(&dir)
            .args(["-A", &format!("LISTEN=udp:127.0.0.1:{port}")])
            .args(["-A", &format!("CALL_NOTIFIER=\"{server}\"")])
            .args(["-A", &format!("DBURL=\"text://{}\"", db.display())])
            .args(["-A", &format!("PBX_NETWORK=\"{PBX_IP}/32\"")])
            .args(["-A", &format!("CALL_KEY_SECRET=\"{SECRET}\"")])
            .args(["-A", "HTTP_TIMEOUT=10"])
            .args(["-A", &format!("MIN_EXPIRES={min_expires}")])
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
        Proxy {
            dir,
            port,
            kamailio: child,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kamailio.log")).unwrap_or_default()
    }

    /// SIPp running `scenario` once for the account `service`, from
    /// `side`, with `extra` arguments (`-key`s and the like).
    fn sipp(&self, scenario: &str, side: Side<'_>, service: &str, extra: &[&str]) -> Child {
        let (ip, port) = match side {
            Side::Pbx => (PBX_IP, free_udp_port()),
            Side::Listening(port) => ("127.0.0.1", port),
            Side::Signed { .. } => ("127.0.0.1", free_udp_port()),
        };
        let mut command = Command::new("sipp");
        command
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["-sf", &format!("{SCENARIOS}/{scenario}")])
            .args(["-i", ip, "-p", &port.to_string()])
            .args(["-s", service, "-m", "1", "-nostdin"])
            .args(["-timeout", "20s", "-timeout_error"])
            .args(["-trace_err", "-trace_msg"])
            .args(extra)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Side::Signed { user, password } = side {
            command.args(["-au", user, "-ap", password]);
        }
        command
            .spawn()
            .expect("TEST_KAMAILIO=1 but sipp does not run (apt-get install sip-tester)")
    }

    /// A REGISTER of `user`'s phone with push parameters for `project`,
    /// its contact on `contact_port`, signed as `signer` with `password`.
    fn register(
        &self,
        scenario: &str,
        user: &str,
        signer: (&str, &str),
        project: &str,
        contact: (u16, &str),
    ) -> Child {
        self.register_token(scenario, user, signer, (project, TOKEN), contact)
    }

    /// The phone `user` REGISTERs (`register.xml`, the test project's push
    /// parameters) with its own credentials from `contact` (port, expires),
    /// and is answered 200.
    async fn phone_registers(&self, what: &str, user: &str, contact: (u16, &str)) {
        self.phone_registers_token(what, user, TOKEN, contact).await;
    }

    /// A REGISTER of `user`'s phone (`scenario`, as register-any.xml),
    /// signed with its own credentials, with this `Contact` value, this
    /// expiry header line (`Expires: 60`, or a second `Contact:` line) and
    /// `User-Agent`.
    fn register_any(
        &self,
        scenario: &str,
        user: &str,
        contact: &str,
        expires_header: &str,
        user_agent: &str,
    ) -> Child {
        let secret = password(user);
        let signer = Side::Signed {
            user,
            password: &secret,
        };
        let keys = [
            "-key",
            "contact",
            contact,
            "-key",
            "expires_header",
            expires_header,
            "-key",
            "user_agent",
            user_agent,
        ];
        self.sipp(scenario, signer, user, &keys)
    }

    /// [`Proxy::phone_registers`] with the push token `token`.
    async fn phone_registers_token(
        &self,
        what: &str,
        user: &str,
        token: &str,
        contact: (u16, &str),
    ) {
        let secret = password(user);
        let signer = (user, secret.as_str());
        let registered =
            self.register_token("register.xml", user, signer, (PROJECT, token), contact);
        self.succeeds(what, registered).await;
    }

    /// [`Proxy::register`] with the push token `token`.
    fn register_token(
        &self,
        scenario: &str,
        user: &str,
        (signer, password): (&str, &str),
        (project, token): (&str, &str),
        (contact_port, expires): (u16, &str),
    ) -> Child {
        let contact_port = contact_port.to_string();
        self.sipp(
            scenario,
            Side::Signed {
                user: signer,
                password,
            },
            user,
            &[
                "-key",
                "contact_port",
                &contact_port,
                "-key",
                "token",
                token,
                "-key",
                "project",
                project,
                "-key",
                "expires",
                expires,
            ],
        )
    }

    /// Waits for SIPp to finish its one call, and fails the test (with its
    /// traces and Kamailio's log) unless the call went as scripted.
    async fn succeeds(&self, what: &str, child: Child) {
        let out = bounded(what, child.wait_with_output())
            .await
            .expect("sipp ran");
        if !out.status.success() {
            let mut traces = String::new();
            for entry in std::fs::read_dir(&self.dir)
                .expect("the trace dir")
                .flatten()
            {
                if entry.path().is_file() {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    let _ = writeln!(traces, "--- {}\n{text}", entry.path().display());
                }
            }
            panic!(
                "{what}: sipp {}: {}\n{traces}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(pid) = self.kamailio.id() {
            // SAFETY: a plain kill(2) of our own child's pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
            // Its children stop within a moment; kill_on_drop then makes
            // sure of the main process.
            std::thread::sleep(Duration::from_millis(500));
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_wakes_the_phone_and_relays_the_call() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 8_000).await;
    let (user, caller, unsupported) = (sip_user_id(), sip_user_id(), sip_user_id());
    let proxy = Proxy::start(server.client.base(), &[&user, &caller, &unsupported]).await;
    let phone_port = free_udp_port();
    let secret = password(&user);
    let register = |expires| {
        proxy.register(
            "register.xml",
            &user,
            (&user, &secret),
            PROJECT,
            (phone_port, expires),
        )
    };

    // The phone registers with RFC 8599 parameters: the device is stored.
    proxy.succeeds("the first REGISTER", register("1")).await;
    let device = server.device(&user).await;
    let device = device.unwrap_or_else(|| panic!("no device stored:\n{}", proxy.log()));
    assert_eq!(device.token, TOKEN);
    assert_eq!(device.app_id, APP);
    assert_eq!(device.client_version.as_deref(), Some("SIPp-phone/3.6"));
    // It goes quiet: its 1 s contact lapses (the device lives on its grace).
    tokio::time::sleep(Duration::from_millis(2_000)).await;

    // The PBX INVITEs; the FCM stand-in receives the push.
    let call = proxy.sipp("caller.xml", Side::Pbx, &user, &[]);
    let pushes = server.pushes(1, Duration::from_secs(10)).await;
    let push = pushes.last().expect("a push");
    assert_eq!(push.json()["message"]["token"], TOKEN, "{:?}", push.json());
    // The display name without SIP's quotes. (The caller's own
    // X-Push-Call-Id is removed: phone.xml checks the one it gets.)
    let data = &push.json()["message"]["data"];
    assert_eq!(data["caller_id"], "Alice", "{data}");
    assert_eq!(data["phonenumber"], "0612345678", "{data}");

    // The phone wakes: listens, REGISTERs again (that answers the call), and
    // its app posts call-response (a repeat by then).
    let phone = proxy.sipp("phone.xml", Side::Listening(phone_port), &user, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy
        .succeeds("the REGISTER of the woken phone", register("60"))
        .await;
    let answer = server.answer(push, true).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    proxy
        .succeeds("the phone answering the INVITE", phone)
        .await;
    proxy.succeeds("the caller's call answered 200", call).await;

    // An account with no device: 480 at once, for the PBX's call and for a
    // local user's, which is challenged first.
    let nobody = sip_user_id();
    let refused = proxy.sipp("caller-480.xml", Side::Pbx, &nobody, &[]);
    proxy
        .succeeds("a call to an account with no device gets 480", refused)
        .await;
    let caller_secret = password(&caller);
    let signed = Side::Signed {
        user: &caller,
        password: &caller_secret,
    };
    let refused = proxy.sipp(
        "caller-signed-480.xml",
        signed,
        &nobody,
        &["-key", "caller", &caller],
    );
    proxy
        .succeeds("a local user's call is challenged, then gets 480", refused)
        .await;

    // Push parameters naming no app: 555, and the binding just saved is
    // removed again, so a call to the account is not relayed to it but
    // asks call-notifier, which has no device for it: 480.
    let unsupported_secret = password(&unsupported);
    let refused = proxy.register(
        "register-unsupported.xml",
        &unsupported,
        (&unsupported, &unsupported_secret),
        "no-such-project",
        (free_udp_port(), "60"),
    );
    proxy
        .succeeds("a REGISTER naming no app gets 555", refused)
        .await;
    assert_eq!(server.device(&unsupported).await, None);
    let refused = proxy.sipp("caller-480.xml", Side::Pbx, &unsupported, &[]);
    proxy
        .succeeds(
            "a call after a 555 is not relayed to its binding: 480",
            refused,
        )
        .await;
}

/// The account's devices as `call-notifier device list` prints them (one
/// line each; nothing when it has none).
async fn device_list(backend: &Backend, user: &str) -> String {
    let out = bounded(
        "call-notifier device list",
        Command::new(env!("CARGO_BIN_EXE_call-notifier"))
            .args(["--database-url", &backend.config().database_url])
            .args(["device", "list", "--sip-user-id", user])
            .env("CALL_NOTIFIER_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the binary runs");
    assert!(out.status.success(), "device list: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Only a REGISTER signed with its own account's credentials reaches
/// call-notifier: none is challenged, a wrong password and another
/// account's credentials are refused, and none of them stores a device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_takes_push_parameters_only_from_the_accounts_own_credentials() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |_| {}).await;
    let (victim, attacker) = (sip_user_id(), sip_user_id());
    let proxy = Proxy::start(server.client.base(), &[&victim, &attacker]).await;
    let contact = (free_udp_port(), "60");
    let attacker_secret = password(&attacker);

    let unsigned = proxy.sipp(
        "register-unsigned.xml",
        Side::Listening(free_udp_port()),
        &victim,
        &[
            "-key",
            "contact_port",
            &contact.0.to_string(),
            "-key",
            "token",
            TOKEN,
            "-key",
            "project",
            PROJECT,
            "-key",
            "expires",
            "60",
        ],
    );
    proxy
        .succeeds("a REGISTER without credentials is challenged", unsigned)
        .await;
    for (what, signer, secret) in [
        ("a wrong password", victim.as_str(), "not-the-password"),
        (
            "another account's credentials",
            attacker.as_str(),
            attacker_secret.as_str(),
        ),
    ] {
        let refused = proxy.register(
            "register-refused.xml",
            &victim,
            (signer, secret),
            PROJECT,
            contact,
        );
        proxy
            .succeeds(&format!("a REGISTER with {what} is refused"), refused)
            .await;
    }
    assert_eq!(device_list(&backend, &victim).await, "", "nothing stored");
    assert_eq!(server.device(&victim).await, None);

    let victim_secret = password(&victim);
    let registered = proxy.register(
        "register.xml",
        &victim,
        (&victim, &victim_secret),
        PROJECT,
        contact,
    );
    proxy
        .succeeds("a REGISTER with its own credentials", registered)
        .await;
    let listed = device_list(&backend, &victim).await;
    assert_eq!(
        listed.lines().count(),
        2,
        "a header and the device: {listed}"
    );
    assert!(listed.contains("android"), "{listed}");
}

/// The push keys are not derived from the SIP Call-ID the caller chose,
/// and the caller giving up stops the phone at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_hides_the_call_id_and_passes_a_cancel_on() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 8_000).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    proxy
        .phone_registers("the REGISTER", &user, (free_udp_port(), "1"))
        .await;
    tokio::time::sleep(Duration::from_millis(2_000)).await;

    let sip_call_id = format!("cancel-{}@caller.invalid", call_id());
    let call = proxy.sipp(
        "caller-cancel.xml",
        Side::Pbx,
        &user,
        &["-cid_str", &sip_call_id],
    );
    let push = server.pushes(1, Duration::from_secs(10)).await[0].clone();
    let data = &push.json()["message"]["data"];
    let key = data["unique_key"]
        .as_str()
        .expect("a unique_key")
        .to_owned();
    let bare = sip_call_id.split('@').next().expect("a Call-ID");
    assert!(
        !key.contains(bare) && !data.to_string().contains(bare),
        "the push names the SIP Call-ID: {data}"
    );
    // What the caller could make of the Call-ID it chose: unknown keys.
    let now = call_notifier::calls::unix_seconds();
    for guess in [
        sip_call_id.clone(),
        format!("{sip_call_id}.1"),
        format!("{sip_call_id}.0"),
    ] {
        let reply = server.client.call_response(&guess, now, true).await;
        assert_eq!(
            reply.status,
            StatusCode::NOT_FOUND,
            "{guess}: {}",
            reply.body
        );
    }

    // The caller CANCELs 0.5 s into the wake-up: 487 for it, NAK for the
    // PBX request, and the phone is told the call was cancelled.
    proxy
        .succeeds("the caller's CANCEL answered 487", call)
        .await;
    let ended = |p: &common::stand_in::Received| {
        let data = &p.json()["message"]["data"];
        data["type"] == "call_ended" && data["reason"] == "cancelled"
    };
    let told = eventually(Duration::from_secs(2), || async {
        server.fcm.received().iter().any(ended)
    })
    .await;
    assert!(
        told,
        "no call_ended cancelled: {:?}\n{}",
        server.fcm.received(),
        proxy.log()
    );
    // Within 1 s of the CANCEL, which left 0.5 s after the INVITE (whose
    // push arrived first).
    let index = server.fcm.received().iter().position(ended).expect("told");
    let arrivals = server.arrivals.lock().expect("arrivals").clone();
    let after = arrivals[index].duration_since(arrivals[0]);
    assert!(
        after < Duration::from_millis(1_500),
        "told {after:?} after the push"
    );
    let nak = format!("incoming-call for {user}: 200 status=NAK");
    assert!(
        eventually(Duration::from_secs(2), || async {
            proxy.log().contains(&nak)
        })
        .await,
        "the PBX request NAKed:\n{}",
        proxy.log()
    );
}

/// A REGISTER call-notifier did not take (here: it is down) is not
/// answered 200, and leaves no binding a call could be relayed to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_refuses_a_register_call_notifier_did_not_take() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    let base = server.client.base().to_owned();
    let user = sip_user_id();
    let proxy = Proxy::start(&base, &[&user]).await;
    bounded("call-notifier stopping", server.running.stop()).await;

    let secret = password(&user);
    let failed = proxy.register(
        "register-failed.xml",
        &user,
        (&user, &secret),
        PROJECT,
        (free_udp_port(), "60"),
    );
    proxy
        .succeeds("a REGISTER call-notifier did not take gets 503", failed)
        .await;
    assert!(
        proxy
            .log()
            .contains(&format!("sip-registration of {user} failed")),
        "the log says why:\n{}",
        proxy.log()
    );
    let refused = proxy.sipp("caller-480.xml", Side::Pbx, &user, &[]);
    proxy
        .succeeds("a call to it gets 480, not a relay to its contact", refused)
        .await;
}

/// linphone-daemon (Debian's `linphone-cli`) as `user`'s phone: a real SIP
/// user agent registering through the proxy with digest credentials and
/// RFC 8599 parameters (liblinphone's `contact_uri_parameters`), listening
/// on `port`, answering calls itself when `answers`, registering for
/// `expires` seconds. Its files live in the proxy's directory.
async fn linphone(proxy: &Proxy, user: &str, port: u16, answers: bool, expires: u32) -> Child {
    let home = proxy.dir.join("linphone");
    // Where liblinphone keeps its database: without it, the core never
    // gets to its "on" state, and answers every INVITE 503.
    std::fs::create_dir_all(home.join(".local/share/linphone")).expect("linphone's home");
    let rc = home.join("linphonerc");
    std::fs::write(
        &rc,
        format!(
            "[sip]\nsip_port={port}\nsip_tcp_port=-1\nsip_tls_port=-1\ndefault_proxy=0\n\
             register_only_when_network_is_up=0\n\
             [proxy_0]\nreg_proxy=<sip:127.0.0.1:{proxy_port};transport=udp>\n\
             reg_identity=sip:{user}@sip.example.com\nreg_expires={expires}\nreg_sendregister=1\n\
             contact_uri_parameters=pn-provider=fcm;pn-prid={TOKEN};pn-param={PROJECT}\n\
             [auth_info_0]\nusername={user}\nuserid={user}\npasswd={password}\n\
             realm=sip.example.com\n",
            proxy_port = proxy.port,
            password = password(user),
        ),
    )
    .expect("linphonerc");
    let mut command = Command::new("linphone-daemon");
    command
        .arg("--config")
        .arg(&rc)
        .arg("--log")
        .arg(home.join(if answers { "woken.log" } else { "first.log" }))
        .env("HOME", &home)
        // Kept open by the Child: the daemon reads commands from it.
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if answers {
        command.arg("--auto-answer");
    }
    let mut child = command
        .spawn()
        .expect("TEST_KAMAILIO=1 but linphone-daemon does not run (apt-get install linphone-cli)");
    // The port of the configuration file is not bound; told on the command
    // line, the daemon binds it and registers.
    let mut stdin = child.stdin.take().expect("the daemon's stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, format!("port sip {port} udp\n").as_bytes())
        .await
        .expect("a command to linphone-daemon");
    // Kept open: the daemon quits at the end of its input.
    child.stdin = Some(stdin);
    child
}

/// The stretch: a real SIP user agent instead of SIPp as the phone. It
/// registers with its credentials and RFC 8599 parameters (a device is
/// stored), goes to sleep (killed, its 2 s registration lapses), is woken
/// by the push of a call from the PBX, and its REGISTER releases the call,
/// which it answers itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp + linphonec: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_wakes_a_real_linphone() {
    linphone_woken(2).await;
}

/// The same with a registration that has not lapsed when the call comes
/// (60 s): the proxy holds a binding with push parameters, and still pushes
/// before it relays (RFC 8599), rather than relaying to a phone asleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp + linphonec: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_wakes_a_real_linphone_whose_binding_has_not_lapsed() {
    linphone_woken(60).await;
}

/// linphone registers for `expires` seconds, is killed (asleep: its binding
/// lapses after 2 s, or stays), is pushed for a call, wakes and answers it.
async fn linphone_woken(expires: u32) {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 8_000).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let port = free_udp_port();
    let linphone_log = |name: &str| {
        std::fs::read_to_string(proxy.dir.join("linphone").join(name)).unwrap_or_default()
    };

    let mut first = linphone(&proxy, &user, port, false, expires).await;
    let stored = eventually(Duration::from_secs(10), || async {
        server.device(&user).await.is_some()
    })
    .await;
    assert!(
        stored,
        "linphone's REGISTER stored no device:\n{}\n{}",
        proxy.log(),
        linphone_log("first.log")
    );
    let device = server.device(&user).await.expect("a device");
    assert_eq!(device.token, TOKEN);
    // Its User-Agent (liblinphone's daemon says "Unknown").
    assert!(device.client_version.is_some(), "{device:?}");
    // Asleep: gone without a word; a 2 s registration lapses.
    first.start_kill().expect("linphonec killed");
    let _ = first.wait().await;
    if expires < 3 {
        tokio::time::sleep(Duration::from_millis(3_000)).await;
    }

    let call = proxy.sipp("caller.xml", Side::Pbx, &user, &[]);
    server.pushes(1, Duration::from_secs(10)).await;
    let _woken = linphone(&proxy, &user, port, true, expires).await;
    let answered = call.wait_with_output();
    let out = bounded("the caller's call answered by linphone", answered)
        .await
        .expect("sipp ran");
    assert!(
        out.status.success(),
        "the call was not answered by linphone: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        proxy.log(),
        linphone_log("woken.log")
    );
}

/// RFC 8599: a binding with push parameters that has not lapsed is no
/// sign of an awake phone. The call pushes it first, and is relayed once
/// its REGISTER refreshed the binding; an account whose only contact has
/// no push parameters (a desk phone) is rung at once, with no push, and
/// its hang-up (a BYE from the callee's side) goes back through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_pushes_a_phone_whose_binding_has_not_lapsed() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 8_000).await;
    let (user, desk) = (sip_user_id(), sip_user_id());
    let proxy = Proxy::start(server.client.base(), &[&user, &desk]).await;

    // The desk phone: registered without push parameters, rung directly.
    let desk_port = free_udp_port();
    let desk_secret = password(&desk);
    let registered = proxy.register(
        "register-plain.xml",
        &desk,
        (&desk, &desk_secret),
        PROJECT,
        (desk_port, "60"),
    );
    proxy
        .succeeds("the desk phone's REGISTER", registered)
        .await;
    assert_eq!(server.device(&desk).await, None);
    let rung = proxy.sipp("desk-bye.xml", Side::Listening(desk_port), &desk, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let call = proxy.sipp("caller-hungup.xml", Side::Pbx, &desk, &[]);
    proxy
        .succeeds("the desk phone answering, then hanging up", rung)
        .await;
    proxy
        .succeeds("the caller's call to the desk phone, ended by it", call)
        .await;
    assert_eq!(server.fcm.hits(), 0, "a desk phone is not pushed");

    // The mobile phone registers for 60 s and falls asleep at once.
    let phone_port = free_udp_port();
    let secret = password(&user);
    let register = || {
        proxy.register(
            "register.xml",
            &user,
            (&user, &secret),
            PROJECT,
            (phone_port, "60"),
        )
    };
    proxy.succeeds("the phone's REGISTER", register()).await;
    assert!(server.device(&user).await.is_some(), "{}", proxy.log());

    // A call: pushed, although its binding is alive (nobody listens there).
    let call = proxy.sipp("caller.xml", Side::Pbx, &user, &[]);
    let pushes = server.pushes(1, Duration::from_secs(10)).await;
    assert_eq!(pushes[0].json()["message"]["token"], TOKEN);
    // Woken, it listens and REGISTERs: that releases the call to it.
    let phone = proxy.sipp("phone.xml", Side::Listening(phone_port), &user, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy
        .succeeds("the REGISTER of the woken phone", register())
        .await;
    proxy
        .succeeds("the phone answering the INVITE", phone)
        .await;
    proxy.succeeds("the caller's call answered 200", call).await;
    assert_eq!(
        server.fcm.hits(),
        1,
        "one push: {:?}",
        server.fcm.received()
    );
}

/// call-notifier down when a call comes: nobody can be pushed, and the
/// phone may be awake, so the INVITE goes to its binding unpushed (as a
/// proxy without push would), not to a 480.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_rings_the_binding_when_call_notifier_is_down() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |_| {}).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let port = free_udp_port();
    proxy
        .phone_registers("the phone's REGISTER", &user, (port, "60"))
        .await;
    let FcmServer { server, .. } = server;
    bounded("call-notifier stopping", server.running.stop()).await;

    let rung = proxy.sipp("desk-bye.xml", Side::Listening(port), &user, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let call = proxy.sipp("caller-hungup.xml", Side::Pbx, &user, &[]);
    proxy.succeeds("the awake phone answering", rung).await;
    proxy.succeeds("the caller's call answered", call).await;
    assert!(
        proxy
            .log()
            .contains(&format!("incoming-call for {user} failed")),
        "the log says why:\n{}",
        proxy.log()
    );
}

/// An outsider with a forged To-tag and a Route (or an ACK naming another
/// host) does not get the proxy to relay anything: only the in-dialog
/// requests of dialogs it set up are relayed (the other tests' ACKs and
/// BYEs, both ways).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_relays_no_request_outside_its_dialogs() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |_| {}).await;
    let proxy = Proxy::start(server.client.base(), &[]).await;
    // The host the outsider aims at: it must hear nothing.
    let target = std::net::UdpSocket::bind("127.0.0.1:0").expect("a target socket");
    target.set_nonblocking(true).expect("non-blocking");
    let target_addr = target.local_addr().expect("its address").to_string();

    let outsider = proxy.sipp(
        "outsider-relay.xml",
        Side::Listening(free_udp_port()),
        "victim",
        &["-key", "target", &target_addr],
    );
    proxy
        .succeeds("the outsider's forged in-dialog requests get 404", outsider)
        .await;
    // The last 404 came after the ACKs were read; a relayed ACK would be on
    // its way by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut buffer = [0u8; 65_535];
    if let Ok((n, from)) = target.recv_from(&mut buffer) {
        panic!(
            "relayed to the target from {from}:\n{}\n{}",
            String::from_utf8_lossy(&buffer[..n]),
            proxy.log()
        );
    }
}

/// The phone (account, push token, contact port) wakes: it REGISTERs, and
/// answers the INVITE relayed to it, so that its leg's caller, `leg`,
/// hears 200 (`what`).
async fn wakes_and_takes(
    proxy: &Proxy,
    (user, token, port): (&str, &str, u16),
    leg: Child,
    what: &str,
) {
    let phone = proxy.sipp("phone.xml", Side::Listening(port), user, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy
        .phone_registers_token("the woken phone's REGISTER", user, token, (port, "60"))
        .await;
    proxy.succeeds("the woken phone answering", phone).await;
    proxy.succeeds(what, leg).await;
}

/// Each phone of `phones` (account, push token, contact port) REGISTERs
/// with push parameters for a second, then sleeps: its binding lapses.
async fn asleep<const N: usize>(proxy: &Proxy, phones: [(&str, &str, u16); N]) {
    for (user, token, port) in phones {
        proxy
            .phone_registers_token(&format!("{user}'s REGISTER"), user, token, (port, "1"))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(2_000)).await;
}

/// A ring group: one Call-ID forked to two accounts. The caller cancelling
/// one leg ends that account's call only (the cancel names the account);
/// the other's phone, woken, takes its call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_cancels_only_the_cancelled_accounts_leg() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 8_000).await;
    let (first, second) = (sip_user_id(), sip_user_id());
    let proxy = Proxy::start(server.client.base(), &[&first, &second]).await;
    let (first_token, second_token) = ("first-fcm-token", "second-fcm-token");
    let second_port = free_udp_port();
    asleep(
        &proxy,
        [
            (&first, first_token, free_udp_port()),
            (&second, second_token, second_port),
        ],
    )
    .await;

    let sip_call_id = format!("group-{}@caller.invalid", call_id());
    let cid = ["-cid_str", sip_call_id.as_str()];
    let cancelled = proxy.sipp("caller-cancel.xml", Side::Pbx, &first, &cid);
    let taken = proxy.sipp("caller.xml", Side::Pbx, &second, &cid);
    server.pushes(2, Duration::from_secs(10)).await;
    proxy
        .succeeds("the first leg's CANCEL answered 487", cancelled)
        .await;

    // The second phone wakes: its call still rings, and it takes it.
    let phone = (&second as &str, second_token, second_port);
    wakes_and_takes(
        &proxy,
        phone,
        taken,
        "the second leg answered 200, not cancelled",
    )
    .await;
    let cancelled_to = |token: &str| {
        server.fcm.received().iter().any(|p| {
            let json = p.json();
            json["message"]["token"] == token
                && json["message"]["data"]["type"] == "call_ended"
                && json["message"]["data"]["reason"] == "cancelled"
        })
    };
    assert!(
        eventually(Duration::from_secs(2), || async {
            cancelled_to(first_token)
        })
        .await,
        "the first phone is told its call was cancelled: {:?}",
        server.fcm.received()
    );
    assert!(!cancelled_to(second_token), "{:?}", server.fcm.received());
}

/// Two INVITEs of one Call-ID for one account (an upstream fork, a retry
/// with a new branch), which call-notifier joins into one call: the
/// caller cancelling one leg ends that leg only (487), the phone is not
/// told the call was cancelled, and the other leg, woken, is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_cancels_only_the_cancelled_leg_of_one_account() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 8_000).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let port = free_udp_port();
    proxy
        .phone_registers("the phone's REGISTER", &user, (port, "1"))
        .await;
    // Asleep: its binding lapses.
    tokio::time::sleep(Duration::from_millis(2_000)).await;

    let sip_call_id = format!("fork-{}@caller.invalid", call_id());
    let cid = ["-cid_str", sip_call_id.as_str()];
    let taken = proxy.sipp("caller.xml", Side::Pbx, &user, &cid);
    let cancelled = proxy.sipp("caller-cancel.xml", Side::Pbx, &user, &cid);
    server.pushes(1, Duration::from_secs(10)).await;
    // The CANCEL reached the proxy (0.5 s after the 100).
    let cancel = format!("incoming-call cancel for {user}: ");
    assert!(
        eventually(Duration::from_secs(3), || async {
            proxy.log().contains(&cancel)
        })
        .await,
        "no CANCEL:\n{}",
        proxy.log()
    );

    let phone = proxy.sipp("phone.xml", Side::Listening(port), &user, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy
        .phone_registers("the woken phone's REGISTER", &user, (port, "60"))
        .await;
    proxy.succeeds("the phone answering", phone).await;
    proxy
        .succeeds("the other leg answered 200, not cancelled", taken)
        .await;
    proxy
        .succeeds("the cancelled leg answered 487", cancelled)
        .await;
    let told = server.fcm.received().iter().any(|p| {
        let data = &p.json()["message"]["data"];
        data["type"] == "call_ended" && data["reason"] == "cancelled"
    });
    assert!(!told, "the phone was told the call was cancelled");
    let not_posted = format!("incoming-call cancel for {user}: another leg waits");
    assert!(proxy.log().contains(&not_posted), "{}", proxy.log());
}

/// The value of the last `header` line SIPp sent, as its message logs
/// (`-trace_msg`) in `dir` for scenarios named `scenario` recorded it.
fn last_sent_header(dir: &std::path::Path, scenario: &str, header: &str) -> String {
    let mut found = None;
    for entry in std::fs::read_dir(dir).expect("the trace dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(&format!("{scenario}_")) && name.ends_with("_messages.log")) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            if let Some(value) = line.strip_prefix(&format!("{header}:")) {
                found = Some(value.trim().to_owned());
            }
        }
    }
    found.unwrap_or_else(|| panic!("no {header} in {scenario}'s message log"))
}

/// The phone `user` REGISTERs through `proxy`, signed: the `Authorization`
/// header line it sent and its Call-ID, as an eavesdropper would keep them.
async fn signed_register(proxy: &Proxy, user: &str) -> (String, String) {
    proxy
        .phone_registers("the phone's REGISTER", user, (free_udp_port(), "60"))
        .await;
    let authorization = format!(
        "Authorization: {}",
        last_sent_header(&proxy.dir, "register", "Authorization")
    );
    (
        authorization,
        last_sent_header(&proxy.dir, "register", "Call-ID"),
    )
}

/// A captured REGISTER digest replayed, with a new Call-ID and the
/// eavesdropper's push token, or with the phone's own Call-ID: challenged
/// afresh (nonce counts), and the device stays the phone's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_refuses_a_replayed_register_digest() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |_| {}).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let (authorization, phone_call_id) = signed_register(&proxy, &user).await;
    assert!(authorization.contains("nc="), "qop=auth: {authorization}");

    for call_id in [format!("replay-{}", call_id()), phone_call_id] {
        let replayed = proxy.sipp(
            "register-replay.xml",
            Side::Listening(free_udp_port()),
            &user,
            &[
                "-key",
                "auth",
                &authorization,
                "-key",
                "project",
                PROJECT,
                "-cid_str",
                &call_id,
            ],
        );
        proxy
            .succeeds(
                &format!("the digest replayed with Call-ID {call_id} is challenged"),
                replayed,
            )
            .await;
    }
    let device = server.device(&user).await.expect("the phone's device");
    assert_eq!(device.token, TOKEN);
}

/// Values beyond the API's limits do not fail the call or the
/// registration: a User-Agent over 255 characters is cut to 255, a display
/// name too (without its quotes), and a From number of 40 digits, no phone
/// number the API takes, is posted as a withheld caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_trims_what_the_api_would_refuse() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 1_000).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let user_agent = format!("Phone/{}", "9".repeat(300));
    let contact = format!(
        "<sip:{user}@127.0.0.1:{};pn-provider=fcm;pn-prid={TOKEN};pn-param={PROJECT}>",
        free_udp_port()
    );
    let registered = proxy.register_any(
        "register-any.xml",
        &user,
        &contact,
        "Expires: 60",
        &user_agent,
    );
    proxy
        .succeeds("a REGISTER with a long User-Agent gets 200", registered)
        .await;
    let device = server.device(&user).await.expect("a device");
    assert_eq!(
        device.client_version.as_deref(),
        Some(&user_agent[..255]),
        "cut to 255"
    );

    let name = "N".repeat(300);
    let number = "1".repeat(40);
    let from = format!("\"{name}\" <sip:{number}@127.0.0.2>");
    let call = proxy.sipp(
        "caller-from-480.xml",
        Side::Pbx,
        &user,
        &["-key", "from", &from],
    );
    let push = server.pushes(1, Duration::from_secs(10)).await[0].clone();
    let data = &push.json()["message"]["data"];
    assert_eq!(data["caller_id"], name[..255], "{data}");
    assert_eq!(data["phonenumber"], "anonymous", "{data}");
    // Not answered within the wait: 480.
    proxy.succeeds("the unanswered call gets 480", call).await;
}

/// `Contact: *` removes the devices of the account's bindings with push
/// parameters; so does a Contact whose `EXPIRES=0` is upper case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_removes_the_device_of_a_deregistration() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |_| {}).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let port = free_udp_port();
    let contact =
        format!("<sip:{user}@127.0.0.1:{port};pn-provider=fcm;pn-prid={TOKEN};pn-param={PROJECT}>");
    let upper = format!("{contact};EXPIRES=0");
    for (what, contact, expires) in [
        ("Contact: * with Expires: 0", "*", "Expires: 0"),
        (
            "a Contact with ;EXPIRES=0",
            upper.as_str(),
            "X-No-Expires: 1",
        ),
    ] {
        proxy
            .phone_registers("the REGISTER", &user, (port, "60"))
            .await;
        assert!(server.device(&user).await.is_some(), "{}", proxy.log());
        let removed = proxy.register_any(
            "register-any.xml",
            &user,
            contact,
            expires,
            "SIPp-phone/3.6",
        );
        proxy.succeeds(what, removed).await;
        assert_eq!(
            server.device(&user).await,
            None,
            "{what} leaves the device:\n{}",
            proxy.log()
        );
    }
}

/// A phone moving its binding as pjsip's contact rewrite does (the old
/// Contact unregistered, a new one registered with the same push token)
/// keeps its device while the other binding lives; removing the last
/// binding with the token removes the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_keeps_the_device_another_binding_still_uses() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |_| {}).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let (old, new) = (free_udp_port(), free_udp_port());
    proxy
        .phone_registers("the binding at the old address", &user, (old, "60"))
        .await;
    proxy
        .phone_registers("the binding at the new address", &user, (new, "600"))
        .await;
    proxy
        .phone_registers("the old binding unregistered", &user, (old, "0"))
        .await;
    assert!(
        server.device(&user).await.is_some(),
        "the device went with the old binding, the new one lives:\n{}",
        proxy.log()
    );
    proxy
        .phone_registers("the last binding unregistered", &user, (new, "0"))
        .await;
    assert_eq!(server.device(&user).await, None, "{}", proxy.log());
}

/// A REGISTER asking for less than the registrar's `min_expires` is
/// granted `min_expires`: call-notifier gets the expiry granted, so the
/// device does not lapse before its binding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_posts_the_expiry_the_registrar_granted() {
    requires_kamailio();
    let registrations = common::stand_in::StandIn::start(|_| {
        common::stand_in::Answer::json(200, serde_json::json!({}))
    })
    .await;
    let user = sip_user_id();
    let proxy = Proxy::start_with(&registrations.url(), &[&user], "60").await;
    proxy
        .phone_registers("a REGISTER for 10 s", &user, (free_udp_port(), "10"))
        .await;
    let posted: Vec<String> = registrations
        .received()
        .iter()
        .filter(|r| r.uri.starts_with("/api/sip-registration"))
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(posted.len(), 1, "{posted:?}");
    // 60 s from the save, read back within the second or the next.
    assert!(
        posted[0].contains("&expires=60&") || posted[0].contains("&expires=59&"),
        "not the 60 s granted: {posted:?}\n{}",
        proxy.log()
    );
}

/// A slow call-notifier: the phone retransmits its REGISTER while the
/// proxy waits for the post, and the retransmissions are absorbed (one
/// post), not posted again, each holding a SIP worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_posts_a_retransmitted_register_once() {
    requires_kamailio();
    // call-notifier, answering a registration after 1.5 s: the phone
    // (retransmitting after 0.5 s, then 1 s) sends it three times.
    let slow = common::stand_in::StandIn::start(|_| {
        common::stand_in::Answer::json(200, serde_json::json!({}))
            .after(Duration::from_millis(1_500))
    })
    .await;
    let user = sip_user_id();
    let proxy = Proxy::start(&slow.url(), &[&user]).await;
    let secret = password(&user);
    let registered = proxy.register(
        "register.xml",
        &user,
        (&user, &secret),
        PROJECT,
        (free_udp_port(), "60"),
    );
    proxy
        .succeeds("the REGISTER, answered after the slow post", registered)
        .await;
    let posts = slow
        .received()
        .iter()
        .filter(|r| r.uri.starts_with("/api/sip-registration"))
        .count();
    assert_eq!(posts, 1, "{}", proxy.log());
}

/// A contact that sleeps: a loopback UDP port that never answers, and
/// tells whether anything reached it.
struct Asleep {
    socket: std::net::UdpSocket,
    port: u16,
}

impl Asleep {
    fn new() -> Asleep {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a sleeping contact");
        socket.set_nonblocking(true).expect("non-blocking");
        let port = socket.local_addr().expect("its address").port();
        Asleep { socket, port }
    }

    /// The first message that reached it, if any.
    fn heard(&self) -> Option<String> {
        let mut buffer = [0u8; 65_535];
        self.socket
            .recv_from(&mut buffer)
            .ok()
            .map(|(n, _)| String::from_utf8_lossy(&buffer[..n]).into_owned())
    }
}

/// `user`'s phone registered with push parameters from the sleeping
/// contact `asleep` (60 s, so the binding lives on), and a call from the
/// PBX to it that has been pushed: the call, and the push.
async fn pushed_call_to_sleeping_binding(
    proxy: &Proxy,
    server: &FcmServer,
    user: &str,
    asleep: &Asleep,
    scenario: &str,
) -> (Child, common::stand_in::Received) {
    let secret = password(user);
    let registered = proxy.register(
        "register.xml",
        user,
        (user, &secret),
        PROJECT,
        (asleep.port, "60"),
    );
    proxy
        .succeeds("the phone's REGISTER before it slept", registered)
        .await;
    let call = proxy.sipp(scenario, Side::Pbx, user, &[]);
    let push = server.pushes(1, Duration::from_secs(10)).await[0].clone();
    (call, push)
}

/// The woken phone REGISTERs from a new address (a new Contact, no
/// +sip.instance): the INVITE reaches that contact, and the account's desk
/// phone beside it, not the binding it
/// left asleep, which lives on for its 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_rings_only_the_contact_the_wake_refreshed() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 8_000).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let desk_port = free_udp_port();
    let desk_secret = password(&user);
    let registered = proxy.register(
        "register-plain.xml",
        &user,
        (&user, &desk_secret),
        PROJECT,
        (desk_port, "60"),
    );
    proxy
        .succeeds("the desk phone's REGISTER", registered)
        .await;
    let desk = proxy.sipp("desk-rung.xml", Side::Listening(desk_port), &user, &[]);
    let asleep = Asleep::new();
    let (call, _) =
        pushed_call_to_sleeping_binding(&proxy, &server, &user, &asleep, "caller.xml").await;

    let woken_port = free_udp_port();
    let phone = proxy.sipp("phone.xml", Side::Listening(woken_port), &user, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let secret = password(&user);
    let registered = proxy.register(
        "register.xml",
        &user,
        (&user, &secret),
        PROJECT,
        (woken_port, "60"),
    );
    proxy
        .succeeds(
            "the woken phone's REGISTER from its new address",
            registered,
        )
        .await;
    proxy
        .succeeds("the phone answering at its new address", phone)
        .await;
    proxy.succeeds("the caller's call answered 200", call).await;
    proxy.succeeds("the desk phone rung beside it", desk).await;
    if let Some(message) = asleep.heard() {
        panic!(
            "the sleeping binding got the call:\n{message}\n{}",
            proxy.log()
        );
    }
}

/// The woken phone answers 486: the caller gets it at once, not after
/// tm's fr_timer (30 s) of a branch to a sleeping contact that never
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_passes_the_woken_phones_busy_on_at_once() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 8_000).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let asleep = Asleep::new();
    let (call, _) =
        pushed_call_to_sleeping_binding(&proxy, &server, &user, &asleep, "caller-486.xml").await;

    let woken_port = free_udp_port();
    let phone = proxy.sipp("phone-486.xml", Side::Listening(woken_port), &user, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let secret = password(&user);
    let registered = proxy.register(
        "register.xml",
        &user,
        (&user, &secret),
        PROJECT,
        (woken_port, "60"),
    );
    proxy
        .succeeds("the woken phone's REGISTER", registered)
        .await;
    proxy.succeeds("the woken phone answering 486", phone).await;
    let busy = tokio::time::timeout(
        Duration::from_secs(10),
        proxy.succeeds("the caller gets 486", call),
    )
    .await;
    assert!(
        busy.is_ok(),
        "the 486 was held back (an unanswered branch):\n{}",
        proxy.log()
    );
    assert_eq!(asleep.heard(), None, "the sleeping binding got the call");
}

/// The app answers (call-response) before its phone's REGISTER reaches
/// the proxy, which comes 1 s after: the call waits for it and goes to
/// the fresh contact, not to the binding the phone left asleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_waits_for_the_register_of_a_phone_its_app_answered() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 8_000).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let asleep = Asleep::new();
    let (call, push) =
        pushed_call_to_sleeping_binding(&proxy, &server, &user, &asleep, "caller.xml").await;

    let answer = server.answer(&push, true).await;
    assert!(answer.status.is_success(), "{}", answer.body);
    let ack = format!("incoming-call for {user}: 200 status=ACK");
    assert!(
        eventually(Duration::from_secs(2), || async {
            proxy.log().contains(&ack)
        })
        .await,
        "the app's answer ACKed the call:\n{}",
        proxy.log()
    );
    let woken_port = free_udp_port();
    let phone = proxy.sipp("phone.xml", Side::Listening(woken_port), &user, &[]);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let secret = password(&user);
    let registered = proxy.register(
        "register.xml",
        &user,
        (&user, &secret),
        PROJECT,
        (woken_port, "60"),
    );
    proxy
        .succeeds("the woken phone's REGISTER, after the ACK", registered)
        .await;
    proxy
        .succeeds("the phone answering at its fresh contact", phone)
        .await;
    proxy.succeeds("the caller's call answered 200", call).await;
    assert_eq!(asleep.heard(), None, "the sleeping binding got the call");
}

/// An app that registered its device through the HTTP API, its phone with
/// no binding: woken, the phone REGISTERs without push parameters, then its
/// app answers. That new binding is the woken phone's: the INVITE reaches
/// it at once, not after REGISTER_WAIT_MS of waiting for a binding with
/// push parameters that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_rings_the_plain_register_of_a_phone_its_app_registered() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 8_000).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    assert!(server
        .client
        .register("android", &user, TOKEN)
        .await
        .is_success());

    let call = proxy.sipp("caller.xml", Side::Pbx, &user, &[]);
    let push = server.pushes(1, Duration::from_secs(10)).await[0].clone();
    let woken_port = free_udp_port();
    let phone = proxy.sipp("phone.xml", Side::Listening(woken_port), &user, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let secret = password(&user);
    let registered = proxy.register(
        "register-plain.xml",
        &user,
        (&user, &secret),
        PROJECT,
        (woken_port, "60"),
    );
    proxy
        .succeeds("the woken phone's plain REGISTER", registered)
        .await;
    let answer = server.answer(&push, true).await;
    assert!(answer.status.is_success(), "{}", answer.body);
    proxy
        .succeeds("the phone answering the INVITE", phone)
        .await;
    proxy.succeeds("the caller's call answered 200", call).await;
    let log = proxy.log();
    assert!(
        log.contains(&format!("incoming-call for {user}: 200 status=ACK")),
        "{log}"
    );
    assert!(
        !log.contains("no REGISTER of its phone came"),
        "the call waited for a REGISTER with push parameters:\n{log}"
    );
}

/// The phone is not woken (NAK): the account's desk phone rings, and the
/// phone's binding with push parameters, asleep, gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_rings_only_the_desk_phone_of_a_phone_not_woken() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 1_000).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let secret = password(&user);
    let desk_port = free_udp_port();
    let registered = proxy.register(
        "register-plain.xml",
        &user,
        (&user, &secret),
        PROJECT,
        (desk_port, "60"),
    );
    proxy
        .succeeds("the desk phone's REGISTER", registered)
        .await;
    let rung = proxy.sipp("desk-bye.xml", Side::Listening(desk_port), &user, &[]);
    let asleep = Asleep::new();
    let (call, _) =
        pushed_call_to_sleeping_binding(&proxy, &server, &user, &asleep, "caller-hungup.xml").await;
    proxy
        .succeeds("the desk phone answering after the NAK", rung)
        .await;
    proxy
        .succeeds("the caller's call, ended by the desk", call)
        .await;
    assert!(
        proxy
            .log()
            .contains(&format!("incoming-call for {user}: 200 status=NAK")),
        "{}",
        proxy.log()
    );
    assert_eq!(asleep.heard(), None, "the sleeping binding got the call");
}

/// A REGISTER signed with a nonce already used up is challenged with
/// stale=true: the password was right, and a client without qop signs
/// again rather than taking it for a wrong one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_challenges_a_used_nonce_as_stale() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |_| {}).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let (authorization, phone_call_id) = signed_register(&proxy, &user).await;
    let again = proxy.sipp(
        "register-stale.xml",
        Side::Listening(free_udp_port()),
        &user,
        &[
            "-key",
            "auth",
            &authorization,
            "-key",
            "project",
            PROJECT,
            "-cid_str",
            &phone_call_id,
        ],
    );
    proxy
        .succeeds("the used nonce is challenged with stale=true", again)
        .await;
}

/// A ring group: one Call-ID forked to two accounts. Each leg's push
/// carries its own call_id (the hash takes the account in), so the second
/// account's phone, which sees its push's call_id, cannot answer or
/// decline the first account's call with it: declining with it ends the
/// second leg only, and the first phone, woken, takes its call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_gives_each_ring_group_leg_its_own_call_id() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 8_000).await;
    let (first, second) = (sip_user_id(), sip_user_id());
    let proxy = Proxy::start(server.client.base(), &[&first, &second]).await;
    let (first_token, second_token) = ("first-fcm-token", "second-fcm-token");
    let first_port = free_udp_port();
    asleep(
        &proxy,
        [
            (&first, first_token, first_port),
            (&second, second_token, free_udp_port()),
        ],
    )
    .await;

    // The first leg opens first, so a call_id shared by both legs would be
    // the first leg's push key.
    let sip_call_id = format!("group-{}@caller.invalid", call_id());
    let cid = ["-cid_str", sip_call_id.as_str()];
    let taken = proxy.sipp("caller.xml", Side::Pbx, &first, &cid);
    server.pushes(1, Duration::from_secs(10)).await;
    let declined = proxy.sipp("caller-480.xml", Side::Pbx, &second, &cid);
    let pushes = server.pushes(2, Duration::from_secs(10)).await;
    let push_to = |token: &str| {
        pushes
            .iter()
            .find(|p| p.json()["message"]["token"] == token)
            .unwrap_or_else(|| panic!("no push to {token}: {pushes:?}"))
            .json()["message"]["data"]
            .clone()
    };
    let (first_data, second_data) = (push_to(first_token), push_to(second_token));
    let call_id_of = |data: &serde_json::Value| {
        data["call_id"]
            .as_str()
            .unwrap_or_else(|| panic!("a call_id: {data}"))
            .to_owned()
    };
    let (first_call_id, second_call_id) = (call_id_of(&first_data), call_id_of(&second_data));
    assert_ne!(
        first_call_id, second_call_id,
        "both legs' pushes carry one call_id:\n{first_data}\n{second_data}"
    );
    assert_ne!(second_call_id, first_data["unique_key"], "{first_data}");

    // The second phone declines with the call_id its push carried: its
    // own leg ends (480 to its caller), not the first account's.
    let start = second_data["message_start_time"]
        .as_str()
        .unwrap_or_else(|| panic!("a message_start_time: {second_data}"));
    let reply = server
        .client
        .post(
            "/api/call-response/",
            &[
                ("unique_key", second_call_id.as_str()),
                ("message_start_time", start),
                ("available", "false"),
            ],
        )
        .await;
    assert!(reply.status.is_success(), "{}", reply.body);
    proxy
        .succeeds("the second leg, declined, gets 480", declined)
        .await;

    // The first phone wakes: its call still rings, and it takes it.
    let phone = (&first as &str, first_token, first_port);
    wakes_and_takes(
        &proxy,
        phone,
        taken,
        "the first leg answered 200, not declined",
    )
    .await;
}

/// A Request-URI user with a leading zero (`0042`) is no account
/// call-notifier knows by that name (it would read 42, while the location
/// lookup is for AOR 0042): 404, and nobody is pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_pushes_no_account_for_a_leading_zero() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |c| c.wait_ms = 1_000).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    proxy
        .phone_registers("the phone's REGISTER", &user, (free_udp_port(), "60"))
        .await;
    let padded = format!("0{user}");
    let refused = proxy.sipp("caller-404.xml", Side::Pbx, &padded, &[]);
    proxy
        .succeeds("a call to the zero-padded account gets 404", refused)
        .await;
    assert_eq!(
        server.fcm.hits(),
        0,
        "pushed: {:?}\n{}",
        server.fcm.received(),
        proxy.log()
    );
}

/// Push parameters outside <> in a Contact (header parameters, which the
/// registrar does not store with the URI), in the only Contact header or
/// in a second one: the REGISTER is refused 400 and no device is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_refuses_push_parameters_outside_angle_brackets() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |_| {}).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let port = free_udp_port();
    let params = format!("pn-provider=fcm;pn-prid={TOKEN};pn-param={PROJECT}");
    let bare = format!("sip:{user}@127.0.0.1:{port};{params}");
    let after = format!("<sip:{user}@127.0.0.1:{port}>;{params}");
    let plain = format!("<sip:{user}@127.0.0.1:{port}>");
    let second = format!("Contact: sip:{user}@127.0.0.1:{};{params}", free_udp_port());
    for (what, contact, more) in [
        ("a bare URI", bare.as_str(), "Expires: 60"),
        ("after the <>", after.as_str(), "Expires: 60"),
        ("a second Contact header", plain.as_str(), second.as_str()),
    ] {
        let refused =
            proxy.register_any("register-bare.xml", &user, contact, more, "SIPp-phone/3.6");
        proxy
            .succeeds(&format!("push parameters in {what} get 400"), refused)
            .await;
        assert_eq!(
            server.device(&user).await,
            None,
            "{what} stored a device:\n{}",
            proxy.log()
        );
    }
}

/// Push parameters %-escaped in the Contact URI (`pn-param=test%2Dproject`)
/// reach call-notifier unescaped: the device is stored with the project's
/// app and the token the phone meant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Kamailio + SIPp: TEST_KAMAILIO=1 and --include-ignored, as .ci/run does"]
async fn kamailio_unescapes_push_parameters() {
    requires_kamailio();
    let backend = Backend::embedded();
    let server = FcmServer::start(&backend, |_| {}).await;
    let user = sip_user_id();
    let proxy = Proxy::start(server.client.base(), &[&user]).await;
    let escape = |text: &str| text.replace('-', "%2D");
    let contact = format!(
        "<sip:{user}@127.0.0.1:{};pn-provider=fcm;pn-prid={};pn-param={}>",
        free_udp_port(),
        escape(TOKEN),
        escape(PROJECT)
    );
    let registered = proxy.register_any(
        "register-any.xml",
        &user,
        &contact,
        "Expires: 60",
        "SIPp-phone/3.6",
    );
    proxy
        .succeeds(
            "a REGISTER with escaped push parameters gets 200",
            registered,
        )
        .await;
    let device = server.device(&user).await;
    let device = device.unwrap_or_else(|| panic!("no device stored:\n{}", proxy.log()));
    assert_eq!(device.token, TOKEN);
    assert_eq!(device.app_id, APP);
}

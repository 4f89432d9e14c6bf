//! Rolling upgrades: the previous release and this build, side by side.
//!
//! An operator upgrades a cluster one instance at a time behind the load
//! balancer while calls ring (README.md, "Upgrading"), so for a while the
//! previous release and this one share one PostgreSQL schema and one Redis.
//! Here both run as real processes: the previous release, named by its
//! commit in `.ci/previous-release`, built from a scratch `git worktree`
//! under `target/previous-release/` (kept, so a rerun only checks it is
//! current), and this build. Once with the previous release migrating the
//! schema first, once with this build migrating it first:
//!
//! - devices register on each instance and ring from the other, and a
//!   device moved through one instance replaces the one registered through
//!   the other (the upsert each release writes, on the other's schema);
//! - calls are parked on each and answered through the other (the Redis
//!   record each release writes, read by the other);
//! - the old instance is drained (SIGTERM) and replaced by a new one while
//!   calls ring on it, and those calls are answered through the new ones.
//!
//! Nothing may answer 5xx, every call ends `status=ACK`, and the drained
//! instance exits 0.
//!
//! Ignored by a plain `cargo test` (it builds another commit, minutes the
//! first time); `.ci/run` runs it with `--include-ignored`. It needs
//! `TEST_DATABASE_URL` and `TEST_REDIS_URL`, the previous release's commit
//! in the repository's history (CI clones it whole) and cargo; without any
//! of them it fails, naming what is missing. It shares the test Redis with
//! the other tests as they do: every key it makes is its own (fresh SIP
//! accounts and call ids), and it flushes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::fcm::{fcm_accepts, StandIns};
use common::process::Process;
use common::stand_in::Received;
use common::*;
use hyper::StatusCode;

/// How long a PBX request is held. Far longer than a call takes here, so a
/// busy CI machine never turns an answered call into a timeout, and short
/// enough that a lost answer fails the test soon.
const WAIT_MS: &str = "15000";

/// Where the previous release is checked out and built, below the crate.
const SCRATCH: &str = "target/previous-release";

/// The repository's root: this crate's directory.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The previous release's binary, built once per test run.
fn previous_release() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(build_previous_release).clone()
}

/// Runs `command`, failing the test with its output unless it succeeds.
fn run(what: &str, command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{what}: {command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn git(args: &[&str]) -> Command {
    let mut command = Command::new("git");
    command.arg("-C").arg(root()).args(args);
    command
}

/// Checks out `.ci/previous-release` in a scratch worktree (kept between
/// runs, replaced when the file names another commit) and builds its
/// binary with a target directory of its own, so this build's artifacts
/// are never overwritten and a rerun rebuilds nothing.
fn build_previous_release() -> PathBuf {
    let named = std::fs::read_to_string(root().join(".ci/previous-release"))
        .expect(".ci/previous-release names the previous release's commit");
    let commit = named.trim().to_owned();
    assert!(
        commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        ".ci/previous-release: {commit:?} is not a full commit hash"
    );
    let scratch = root().join(SCRATCH);
    let src = scratch.join("src");
    let checked_out = Command::new("git")
        .arg("-C")
        .arg(&src)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if checked_out.as_deref() != Some(commit.as_str()) {
        let src_arg = src.to_str().expect("a UTF-8 path");
        // A checkout of another commit, or one git forgot: start afresh.
        let _ = git(&["worktree", "remove", "--force", src_arg]).output();
        if src.exists() {
            std::fs::remove_dir_all(&src).expect("remove the old scratch worktree");
        }
        run("git worktree prune", git(&["worktree", "prune"]).arg("-v"));
        run(
            &format!(
                "check out the previous release {commit} (it must be in the history: \
                 a shallow clone needs `git fetch --unshallow`)"
            ),
            &mut git(&["worktree", "add", "--detach", src_arg, &commit]),
        );
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("upgrade: building the previous release {commit} in {SCRATCH}");
    // Its build output goes to the test's stderr, so CI shows progress.
    let status = Command::new(cargo)
        .args(["build", "--locked", "--bin", "call-notifier"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", scratch.join("target"))
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "building the previous release {commit} failed ({status}); its errors are above"
    );
    let binary = scratch.join("target/debug/call-notifier");
    let version = run(
        "the previous release's --version",
        Command::new(&binary).arg("--version"),
    );
    eprintln!("upgrade: previous release: {version} ({commit})");
    binary
}

/// The services both releases share, and the stand-ins they push to.
struct Shared {
    database_url: String,
    redis_url: String,
    pushes: StandIns,
}

impl Shared {
    async fn new() -> Shared {
        let (Ok(database_url), Ok(redis_url)) = (
            std::env::var("TEST_DATABASE_URL"),
            std::env::var("TEST_REDIS_URL"),
        ) else {
            panic!("the upgrade test needs TEST_DATABASE_URL and TEST_REDIS_URL (see .ci/run)");
        };
        Shared {
            database_url: fresh_schema(&database_url).await,
            redis_url,
            pushes: StandIns::start(|_| fcm_accepts()).await,
        }
    }

    /// Adds the test app through `binary` (which migrates the schema to its
    /// release first): an Android app pushing to the FCM stand-in.
    fn add_app(&self, binary: &Path) {
        run(
            "app add",
            Command::new(binary).args([
                "app",
                "add",
                "--platform",
                "android",
                "--app-id",
                APP,
                "--fcm-service-account",
                self.pushes.account.to_str().expect("a UTF-8 path"),
                "--database-url",
                &self.database_url,
            ]),
        );
    }

    /// Starts `binary` serving on the shared database and Redis; `name`
    /// says which release it is in failures.
    async fn start(&self, name: &'static str, binary: &Path) -> Instance {
        let fcm = self.pushes.fcm.url();
        let process = Process::start_binary(
            binary,
            &[
                "serve",
                "--database-url",
                &self.database_url,
                "--redis-url",
                &self.redis_url,
                "--fcm-base-url",
                &fcm,
                "--wait-ms",
                WAIT_MS,
            ],
        )
        .await;
        let instance = Instance {
            name,
            client: TestClient::new(process.url.clone()),
            process,
        };
        // Ready once its Redis subscriber is up, a moment after it listens.
        let client = &instance.client;
        let ready = eventually(Duration::from_secs(10), || async {
            client.get("/health/ready").await.status == StatusCode::OK
        })
        .await;
        assert!(ready, "{name}: /health/ready is not 200 within 10 s");
        instance
    }

    /// Waits for the next call push to `token` after the first `seen` FCM
    /// requests.
    async fn call_push(&self, token: &str, seen: usize) -> Received {
        let find = || {
            self.pushes.fcm.received().into_iter().skip(seen).find(|p| {
                let message = &p.json()["message"];
                message["token"] == token && message["data"]["type"] == "call"
            })
        };
        let arrived = eventually(PUSH_BOUND, || async { find().is_some() }).await;
        assert!(arrived, "no call push to {token} within {PUSH_BOUND:?}");
        find().expect("arrived")
    }
}

/// One running instance, of either release.
struct Instance {
    name: &'static str,
    process: Process,
    client: TestClient,
}

impl Instance {
    /// Fails on any 5xx: during a rolling upgrade every request must be
    /// served by whichever release it reaches.
    fn check(&self, reply: &Reply, what: &str) {
        assert!(
            !reply.status.is_server_error(),
            "{}: {what} answered {}: {}",
            self.name,
            reply.status,
            reply.body
        );
    }

    /// Registers `token` for `user` through this instance; `expected` is
    /// 201 for a new device, 200 for one that replaced or updated another.
    async fn register(&self, user: &str, token: &str, expected: StatusCode) {
        let reply = self
            .client
            .post(
                "/api/android-device/",
                &[("sip_user_id", user), ("token", token), ("app", APP)],
            )
            .await;
        self.check(&reply, &format!("registering {token} for {user}"));
        assert_eq!(
            reply.status, expected,
            "{}: registering {token} for {user}: {}",
            self.name, reply.body
        );
    }

    /// The app, woken by `push`, answers through this instance.
    async fn answer(&self, push: &Received) {
        let data = &push.json()["message"]["data"];
        let text = |key: &str| data[key].as_str().expect("a string").to_owned();
        let key = text("unique_key");
        let reply = self
            .client
            .post(
                "/api/call-response/",
                &[
                    ("unique_key", &key),
                    ("message_start_time", &text("message_start_time")),
                    ("available", "true"),
                ],
            )
            .await;
        self.check(&reply, &format!("answering {key}"));
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "{}: answering {key}: {}",
            self.name,
            reply.body
        );
    }
}

/// A call to `user` (whose device is `token`) parked on `parked`: the PBX's
/// request, waiting, once the device has its push.
struct Ringing {
    pbx: tokio::task::JoinHandle<Reply>,
    push: Received,
    call: String,
    parked_on: &'static str,
}

async fn ring(shared: &Shared, parked: &Instance, user: &str, token: &str) -> Ringing {
    let seen = shared.pushes.fcm.hits();
    let call = call_id();
    let pbx = parked.client.park(user, &call);
    let push = shared.call_push(token, seen).await;
    Ringing {
        pbx,
        push,
        call,
        parked_on: parked.name,
    }
}

impl Ringing {
    /// The PBX's answer: `status=ACK`, nothing else.
    async fn acked(self) {
        let reply = bounded(format_args!("the PBX's answer for {}", self.call), self.pbx)
            .await
            .expect("the PBX's request task");
        assert!(
            !reply.status.is_server_error() && reply.body.trim() == "status=ACK",
            "{}: call {} lost: {} {}",
            self.parked_on,
            self.call,
            reply.status,
            reply.body
        );
    }
}

/// A call parked on `parked` and answered through `answering` ends ACK.
async fn call_across(
    shared: &Shared,
    parked: &Instance,
    answering: &Instance,
    user: &str,
    token: &str,
) {
    let ringing = ring(shared, parked, user, token).await;
    answering.answer(&ringing.push).await;
    ringing.acked().await;
}

/// Which release migrates the shared schema first.
#[derive(Clone, Copy, Debug)]
enum First {
    Previous,
    This,
}

async fn rolling_upgrade(first: First) {
    let previous = tokio::task::spawn_blocking(previous_release)
        .await
        .expect("the previous release builds");
    let this = PathBuf::from(env!("CARGO_BIN_EXE_call-notifier"));
    let shared = Shared::new().await;

    // Side by side, each release starting on the schema the other left.
    let (old, new) = match first {
        First::Previous => {
            shared.add_app(&previous);
            let old = shared.start("previous release", &previous).await;
            let new = shared.start("this build", &this).await;
            (old, new)
        }
        First::This => {
            shared.add_app(&this);
            let new = shared.start("this build", &this).await;
            let old = shared.start("previous release", &previous).await;
            (old, new)
        }
    };

    // Devices register on each and ring from the other; calls park on
    // each and are answered through the other.
    let (on_old, on_new) = (sip_user_id(), sip_user_id());
    old.register(&on_old, "token-old-1", StatusCode::CREATED)
        .await;
    new.register(&on_new, "token-new-1", StatusCode::CREATED)
        .await;
    call_across(&shared, &new, &old, &on_old, "token-old-1").await;
    call_across(&shared, &old, &new, &on_new, "token-new-1").await;

    // A phone moves: each release replaces the device the other stored.
    old.register(&on_new, "token-new-2", StatusCode::OK).await;
    new.register(&on_old, "token-old-2", StatusCode::OK).await;
    call_across(&shared, &old, &new, &on_old, "token-old-2").await;
    call_across(&shared, &new, &old, &on_new, "token-new-2").await;

    // The old instance is drained while calls ring on it, and replaced.
    let users: Vec<(String, String)> = (0..3)
        .map(|n| (sip_user_id(), format!("token-drain-{n}")))
        .collect();
    for (n, (user, token)) in users.iter().enumerate() {
        let through = if n % 2 == 0 { &old } else { &new };
        through.register(user, token, StatusCode::CREATED).await;
    }
    let mut parked_on_old = Vec::new();
    for (user, token) in &users {
        parked_on_old.push(ring(&shared, &old, user, token).await);
    }
    let Instance {
        process: draining, ..
    } = old;
    draining.signal("TERM");
    let replacement = shared.start("this build (replacement)", &this).await;
    // New calls keep coming meanwhile, to the instances left.
    let (user, token) = (sip_user_id(), "token-during-drain");
    replacement
        .register(&user, token, StatusCode::CREATED)
        .await;
    call_across(&shared, &new, &replacement, &user, token).await;
    for (n, ringing) in parked_on_old.into_iter().enumerate() {
        let answering = if n % 2 == 0 { &replacement } else { &new };
        answering.answer(&ringing.push).await;
        ringing.acked().await;
    }
    let code = draining.exit_code(BOUND).await;
    assert_eq!(code, Some(0), "the drained previous release's exit code");

    // And the new ones carry on together.
    call_across(&shared, &replacement, &new, &on_old, "token-old-2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "builds the previous release (.ci/previous-release); .ci/run runs it with --include-ignored"]
async fn a_rolling_upgrade_where_the_previous_release_migrates_first_loses_no_call() {
    rolling_upgrade(First::Previous).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "builds the previous release (.ci/previous-release); .ci/run runs it with --include-ignored"]
async fn a_rolling_upgrade_where_this_build_migrates_first_loses_no_call() {
    rolling_upgrade(First::This).await;
}

//! Services a fault test may break: a TCP proxy that cuts every connection
//! and refuses new ones (a database that stops), a redis-server of the
//! test's own (killed and restarted on the same port), and a Redis Cluster of
//! the test's own (a master killed, its replica promoted).
//!
//! Nothing here touches the shared services other tests use: the proxy only
//! forwards to them, and every Redis is started here, on loopback, and shut
//! down when its handle drops.
//!
//! Also what every fault test checks: readiness, a fresh call after
//! recovery, a call refused at once, and nothing left behind.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

use super::{
    assert_no_bookkeeping, bounded, call_id, eventually, redis, start_time_of, Reply, TestServer,
};

/// How late past its wait a call may end: scheduling on a busy 2-core box.
pub const MARGIN: Duration = Duration::from_millis(500);
/// "At once": no pool wait, no connect timeout, just the failure itself.
/// Generous, for a loaded CI machine; the waits it rules out are seconds.
pub const AT_ONCE: Duration = Duration::from_millis(300);
/// How long a recovered service may take to be ready again.
pub const RECOVERY: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// What every fault test checks.

/// `/health/ready`: status, verdicts, and how long it took to say so. The
/// verdicts are words, never an error's text (which names hosts, users and
/// databases to whoever asks).
pub async fn readiness(server: &TestServer) -> (StatusCode, serde_json::Value, Duration) {
    let started = Instant::now();
    let reply = server.client.get("/health/ready").await;
    let took = started.elapsed();
    let body = reply.json();
    for dependency in ["store", "broker"] {
        assert!(
            matches!(
                body[dependency].as_str(),
                Some("ok" | "unavailable" | "timed out")
            ),
            "{}: the {dependency}'s verdict is not a verdict word: {body}",
            server.backend.name()
        );
    }
    (reply.status, body, took)
}

/// Waits until readiness says 200; fails the test after [`RECOVERY`].
pub async fn ready_again(server: &TestServer) {
    let started = Instant::now();
    loop {
        let (status, body, _) = readiness(server).await;
        if status == StatusCode::OK {
            return;
        }
        assert!(
            started.elapsed() < RECOVERY,
            "{}: not ready {RECOVERY:?} after the service came back: {body}",
            server.backend.name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The PBX's request in its own task, timed.
pub fn ring(
    server: &TestServer,
    user: &str,
    key: &str,
) -> tokio::task::JoinHandle<(Reply, Duration)> {
    let client = server.client.clone();
    let (user, key) = (user.to_owned(), key.to_owned());
    tokio::spawn(async move {
        let started = Instant::now();
        let reply = client.incoming_call(&user, &key).await;
        (reply, started.elapsed())
    })
}

/// A fresh call to `user` (whose phone has `token`), answered available the
/// moment its push arrives: a healthy service answers the PBX ACK. A call
/// that ends before it is pushed ends the wait for the push too.
pub async fn fresh_call(server: &TestServer, user: &str, token: &str) -> String {
    let key = call_id();
    let mut pbx = ring(server, user, &key);
    tokio::select! {
        push = server.call_push(token, &key) => {
            server
                .client
                .call_response(&key, start_time_of(&push), true)
                .await;
            pbx.await.expect("the PBX request").0.body
        }
        ended = &mut pbx => ended.expect("the PBX request").0.body,
    }
}

pub async fn assert_fresh_call_is_ack(server: &TestServer, user: &str, token: &str) {
    assert_eq!(
        fresh_call(server, user, token).await,
        "status=ACK",
        "{}: a fresh call after recovery",
        server.backend.name()
    );
}

/// Where a SIP proxy reports a REGISTER (RFC 8599).
pub const SIP_REGISTRATION: &str = "/api/sip-registration/";

/// What a proxy posts for a REGISTER of `user`'s iOS softphone whose VoIP
/// push token is `voip`.
pub fn apns_register<'a>(user: &'a str, voip: &'a str) -> [(&'static str, &'a str); 5] {
    [
        ("sip_user_id", user),
        ("pn_provider", "apns"),
        ("pn_prid", voip),
        ("pn_param", "ABCDE12345.com.example.softphone.voip"),
        ("expires", "60"),
    ]
}

/// The phone, woken by its call's push, REGISTERs (`register`, as its
/// proxy reports it): that is its answer, and the PBX waiting in `pbx`
/// hears ACK.
pub async fn register_answers(
    server: &TestServer,
    register: &[(&str, &str)],
    pbx: tokio::task::JoinHandle<Reply>,
) {
    let refresh = server.client.post(SIP_REGISTRATION, register).await;
    assert_eq!(refresh.status, StatusCode::OK, "{}", refresh.body);
    let answered = bounded("the PBX's answer", pbx)
        .await
        .expect("the PBX task");
    assert_eq!(answered.body, "status=ACK");
}

/// After an outage: ready again, serving a fresh call, and nothing left of
/// the calls the outage ended.
pub async fn assert_recovered(server: &TestServer, user: &str, token: &str) {
    ready_again(server).await;
    assert_fresh_call_is_ack(server, user, token).await;
    assert_no_bookkeeping(server).await;
}

/// A call that cannot be answered: NAK at once, and no push went out for it.
pub async fn assert_nak_at_once_without_push(server: &TestServer, user: &str, what: &str) {
    let key = call_id();
    let started = Instant::now();
    let reply = server.client.incoming_call(user, &key).await;
    let took = started.elapsed();
    assert_eq!(reply.body, "status=NAK", "{what}");
    assert!(took < AT_ONCE, "{what}: NAK took {took:?}, not at once");
    assert!(
        !server.pushed_for(&key),
        "{what}: a push went out for a call that could not be answered"
    );
}

/// Asserts that a Redis is left with nothing that lives on: no channel,
/// and every record (tombstones of ended calls, pointers, and the record of
/// a call whose end could not be stored while Redis hung) expiring by its
/// TTL.
pub async fn assert_redis_clean(url: &str) {
    let redis = redis(url).await;
    let clean = eventually(Duration::from_secs(3), || {
        let mut redis = redis.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("cn:*")
                .query_async(&mut redis)
                .await
                .expect("KEYS");
            for key in keys {
                let ttl: i64 = redis::cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut redis)
                    .await
                    .expect("PTTL");
                if ttl == -1 {
                    return false;
                }
            }
            let channels: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg("cn:*")
                .query_async(&mut redis)
                .await
                .expect("PUBSUB CHANNELS");
            channels.is_empty()
        }
    })
    .await;
    assert!(clean, "a key without a TTL or a channel left in {url}");
}

/// A free loopback port, as the kernel hands them out.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Fails the test unless `addr` is on this machine: fault tests never send
/// traffic anywhere else.
fn assert_loopback(addr: SocketAddr) {
    assert!(
        addr.ip().is_loopback(),
        "{addr} is not a loopback address; fault tests only talk to 127.0.0.0/8"
    );
}

// ---------------------------------------------------------------------------
// The TCP proxy.

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    /// Connections stay open (new ones are accepted) but no byte moves: a
    /// server that hangs, or a network that drops packets.
    Stall,
    /// Every connection is closed and new ones are refused: a stopped server.
    Cut,
}

/// A TCP proxy on `127.0.0.1:<port>` to one upstream: [`TcpProxy::cut`]
/// stops the upstream as far as its clients can tell, [`TcpProxy::stall`]
/// makes it hang, [`TcpProxy::restore`] brings it back on the same port.
pub struct TcpProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        assert_loopback(upstream);
        let first = listen(SocketAddr::from(([127, 0, 0, 1], 0)));
        let addr = first.local_addr().expect("the proxy's address");
        let (mode, watching) = watch::channel(Mode::Forward);
        let task = tokio::spawn(run_proxy(first, addr, upstream, watching));
        TcpProxy { addr, mode, task }
    }

    /// Closes every connection and refuses new ones until [`Self::restore`].
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Moves no more bytes, on open connections and new ones alike. Bytes in
    /// flight may be lost: follow with [`Self::cut`], not [`Self::restore`].
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    /// Accepts and forwards again.
    pub async fn restore(&self) {
        self.mode.send_replace(Mode::Forward);
        // Back when a connection is accepted again.
        let until = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(self.addr).await.is_err() {
            assert!(Instant::now() < until, "the proxy did not listen again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Cut);
        self.task.abort();
    }
}

/// A listening socket on `addr`, reusable at once after it closes.
fn listen(addr: SocketAddr) -> tokio::net::TcpListener {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(addr).expect("bind the proxy");
    socket.listen(1024).expect("listen")
}

/// Resolves once the mode is one of `wanted`.
async fn until(mode: &mut watch::Receiver<Mode>, wanted: &[Mode]) -> Option<Mode> {
    mode.wait_for(|m| wanted.contains(m)).await.ok().map(|m| *m)
}

async fn run_proxy(
    first: tokio::net::TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
) {
    let mut listener = Some(first);
    loop {
        let Some(current) = listener.take() else {
            // Cut: nothing listens, so connecting is refused.
            if until(&mut mode, &[Mode::Forward, Mode::Stall])
                .await
                .is_none()
            {
                return;
            }
            listener = Some(listen(addr));
            continue;
        };
        tokio::select! {
            accepted = current.accept() => {
                listener = Some(current);
                if let Ok((client, _)) = accepted {
                    tokio::spawn(forward(client, upstream, mode.clone()));
                }
            }
            cut = until(&mut mode, &[Mode::Cut]) => {
                if cut.is_none() {
                    return;
                }
                // Dropping `current` stops listening.
            }
        }
    }
}

/// Forwards one connection while the mode says so.
async fn forward(mut client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    loop {
        let now = *mode.borrow_and_update();
        match now {
            Mode::Cut => break,
            Mode::Stall => {
                if until(&mut mode, &[Mode::Forward, Mode::Cut])
                    .await
                    .is_none()
                {
                    break;
                }
            }
            Mode::Forward => {
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => break,
                    changed = until(&mut mode, &[Mode::Stall, Mode::Cut]) => {
                        if changed.is_none() {
                            break;
                        }
                    }
                }
            }
        }
    }
    // Both sides see the connection close as the sockets drop.
    let _ = server.shutdown().await;
}

// ---------------------------------------------------------------------------
// PostgreSQL through the proxy.

/// `TEST_DATABASE_URL`, which every PostgreSQL fault test needs: there is
/// nothing to break without it, and a fault test must not pass by skipping.
pub fn database_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "TEST_DATABASE_URL is not set: the PostgreSQL fault tests proxy it \
             (e.g. postgres://postgres@127.0.0.1:5432/test; .ci/run sets it)"
        )
    })
}

/// A fresh schema of `TEST_DATABASE_URL` behind a proxy of its own: the
/// proxy, and the URL a server reaches the schema through it with.
pub async fn proxied_database() -> (TcpProxy, String) {
    proxied_database_at(&database_url()).await
}

/// [`proxied_database`] on the PostgreSQL at `url`.
pub async fn proxied_database_at(url: &str) -> (TcpProxy, String) {
    let url = super::fresh_schema(url).await;
    let (upstream, _) = through(&url, SocketAddr::from(([127, 0, 0, 1], 0)));
    let proxy = TcpProxy::start(upstream).await;
    let (_, proxied) = through(&url, proxy.addr);
    (proxy, proxied)
}

/// The `host:port` of a `postgres://` URL, and the URL rewritten to go
/// through `via` instead.
fn through(url: &str, via: SocketAddr) -> (SocketAddr, String) {
    let scheme_end = url.find("://").expect("a URL with a scheme") + 3;
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    let hostport = hostport.replace("localhost", "127.0.0.1");
    let upstream: SocketAddr = hostport
        .parse()
        .unwrap_or_else(|_| panic!("TEST_DATABASE_URL must name an IP address: {url}"));
    let rewritten = format!(
        "{}{userinfo}{via}{}",
        &url[..scheme_end],
        &rest[authority_end..]
    );
    (upstream, rewritten)
}

// ---------------------------------------------------------------------------
// A redis-server of the test's own.

fn redis_server_binary() -> &'static str {
    "redis-server"
}

/// A redis-server child process on a port of its own, without persistence:
/// a restart loses every key, as a real crash of such a Redis does.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<tokio::process::Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().expect("a temp dir"),
            child: None,
        };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn spawn(&mut self) {
        let child = tokio::process::Command::new(redis_server_binary())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (is it installed?): {e}"));
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
                    if pong.is_ok() {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < until,
                "redis-server on port {} did not answer",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills it (SIGKILL): every connection drops, every key is lost.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill redis-server");
            child.wait().await.expect("reap redis-server");
        }
    }

    /// Stops it (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .expect("redis-server is running");
        let pid = i32::try_from(pid).expect("a pid");
        // SAFETY: kill(2) on the pid of the child this handle started.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal redis-server");
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

// ---------------------------------------------------------------------------
// A Redis Cluster of the test's own.

/// The ports of the fault cluster; not the shared 7001-7006.
pub const FAULT_CLUSTER_PORTS: [u16; 6] = [7101, 7102, 7103, 7104, 7105, 7106];
const FAULT_CLUSTER_DIR: &str = "/tmp/cn-fault-cluster";

/// A 6-node Redis Cluster (3 masters, a replica each) on
/// [`FAULT_CLUSTER_PORTS`] (or ports of the caller's: [`Self::start_on`]),
/// started by `.ci/redis-cluster` and shut down (every node, without saving)
/// when dropped. Holds a file lock meanwhile, so two test processes never
/// share it.
pub struct FaultCluster {
    pub ports: [u16; 6],
    /// Where each node keeps its config and log (`<dir>/<port>/`).
    pub dir: PathBuf,
    _lock: std::fs::File,
}

impl FaultCluster {
    pub async fn start() -> FaultCluster {
        FaultCluster::start_on(FAULT_CLUSTER_PORTS, FAULT_CLUSTER_DIR).await
    }

    /// A cluster on `ports`, its nodes' files under `dir`.
    pub async fn start_on(ports: [u16; 6], dir: &str) -> FaultCluster {
        let lock_path = format!("{dir}.lock");
        let lock = tokio::task::spawn_blocking(move || {
            use std::os::fd::AsRawFd;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(lock_path)
                .expect("open the fault cluster's lock file");
            // SAFETY: flock on a descriptor we own; it is released when the file closes.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            assert_eq!(locked, 0, "lock the fault cluster");
            file
        })
        .await
        .expect("the lock task");
        let cluster = FaultCluster {
            ports,
            dir: PathBuf::from(dir),
            _lock: lock,
        };
        // A node a previous run left must not be mistaken for a healthy cluster.
        cluster.shutdown();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".ci/redis-cluster");
        let port_list: Vec<String> = ports.iter().map(u16::to_string).collect();
        let out = tokio::process::Command::new("bash")
            .arg(script)
            .env("REDIS_CLUSTER_PORTS", port_list.join(" "))
            .env("REDIS_CLUSTER_DIR", dir)
            .output()
            .await
            .expect("run .ci/redis-cluster");
        assert!(
            out.status.success(),
            "the fault cluster did not start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.synced(Duration::from_secs(30)).await;
        cluster
    }

    /// Waits until every replica has finished its sync with its master: a
    /// replica that has not cannot take over (the master delays that sync
    /// by seconds).
    pub async fn synced(&self, within: Duration) {
        let until = Instant::now() + within;
        for port in self.ports {
            loop {
                let info: String = node_command(port, redis::cmd("INFO").arg("replication"))
                    .await
                    .unwrap_or_default();
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(
                    Instant::now() < until,
                    "the replica on {port} never synced: {info}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The `redis+cluster://` URL the server is given: the first three nodes.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.ports[..3]
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Asks every node to exit at once, without saving. Quiet about nodes
    /// that are gone already.
    fn shutdown(&self) {
        for port in self.ports {
            let _ = std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "shutdown", "nosave"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for FaultCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One node of a cluster as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// The id of its master, for a replica.
    pub master_id: Option<String>,
    pub failed: bool,
    /// Slot ranges it serves, inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }
}

/// The three live masters of the fault cluster ([`FAULT_CLUSTER_PORTS`]),
/// as its first node sees them.
pub async fn masters() -> Vec<ClusterNode> {
    let masters: Vec<ClusterNode> = cluster_nodes(FAULT_CLUSTER_PORTS[0])
        .await
        .into_iter()
        .filter(|n| n.master && !n.failed && !n.slots.is_empty())
        .collect();
    assert_eq!(masters.len(), 3, "{masters:?}");
    masters
}

/// A command on one node (no cluster routing).
pub async fn node_command<T: redis::FromRedisValue>(
    port: u16,
    cmd: &redis::Cmd,
) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut conn = client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_millis(500)))
                .set_response_timeout(Some(Duration::from_millis(1000))),
        )
        .await?;
    cmd.query_async(&mut conn).await
}

/// The cluster as the node on `port` sees it.
pub async fn cluster_nodes(port: u16) -> Vec<ClusterNode> {
    let text: String = node_command(port, redis::cmd("CLUSTER").arg("NODES"))
        .await
        .unwrap_or_else(|e| panic!("CLUSTER NODES on {port}: {e}"));
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let addr = fields.get(1)?.split('@').next()?;
            let port = addr.rsplit(':').next()?.parse().ok()?;
            let flags = fields.get(2)?;
            let slots = fields
                .iter()
                .skip(8)
                .filter(|s| !s.starts_with('['))
                .filter_map(|range| {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    Some((a.parse().ok()?, b.parse().ok()?))
                })
                .collect();
            Some(ClusterNode {
                id: fields[0].to_owned(),
                port,
                master: flags.contains("master"),
                master_id: (fields.get(3) != Some(&"-")).then(|| fields[3].to_owned()),
                failed: flags.contains("fail"),
                slots,
            })
        })
        .collect()
}

/// The hash slot of a key, as the node on `port` computes it.
pub async fn key_slot(port: u16, key: &str) -> u16 {
    node_command(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
        .await
        .expect("CLUSTER KEYSLOT")
}

/// The process id of the redis-server on `port`.
pub async fn node_pid(port: u16) -> i32 {
    let info: String = node_command(port, redis::cmd("INFO").arg("server"))
        .await
        .expect("INFO server");
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .expect("a process_id in INFO server")
}

/// How often each command ran on the node at `url` (`INFO commandstats`).
pub async fn command_calls(url: &str) -> std::collections::HashMap<String, u64> {
    let client = redis::Client::open(url).expect("a node URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("the node answers");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|s| s.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

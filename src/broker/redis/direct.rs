//! The answer script's short way to Redis: [`Direct`].
//!
//! Every millisecond between the app's answer and the PBX's `status=ACK`
//! is silence for the caller, and the answer script is the one command on
//! that path. Through the redis crate's connections it crosses two tasks
//! each way: the multiplexed connection's driver (one server), and on a
//! Cluster also the cluster connection's own task, each a thread wake-up on
//! an idle machine. Here the answering handler writes the script to a
//! connection of its own, taken from a small pool, and reads the reply
//! itself: no task in between.
//!
//! It only ever takes the short way when it is sure; anything else goes the
//! usual way, through [`super::connections::Link`], which knows every
//! detour:
//!
//! - a key whose master it does not know (no slot map yet, or a `rediss://`
//!   or unix-socket URL): the usual way;
//! - an idle connection Redis closed meanwhile: once more on a new one;
//! - a connection it cannot make, or a new one that turns out dropped
//!   before the reply: the usual way (the scripts sent so are safe to run
//!   twice: an answer's first run stands, an end's second finds it ended);
//! - `NOSCRIPT` on a fresh server: the script's whole text (`EVAL`), the
//!   short way too, which also loads it;
//! - any other error reply, among them `MOVED` after a resharding or a
//!   failover and `ASK` while a slot migrates: the usual way, which follows
//!   the redirection; a `MOVED` also has the slot map read again
//!   (`CLUSTER SLOTS`);
//! - no reply within `--redis-timeout-ms`: an error, as on the usual way
//!   (the script may have run; running it again would not be wrong, but
//!   doubling the wait for a Redis that hangs would be).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::{ConnectionAddr, IntoConnectionInfo, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Idle connections kept per Redis server: as many as may be in use.
const IDLE_PER_SERVER: usize = IN_USE_MAX;
/// Connections in use at once, all servers together: beyond this, answers
/// go the usual way, pipelined on one connection. The short way wins the
/// wake-up its latency at light load; under load pipelining wins: at 128
/// calls in flight, up to 64 plain connections (a round trip and two
/// syscalls each per answer) cost 16% of the PostgreSQL + Redis set-ups per
/// second, 8 cost none measurable (`docs/performance.md`).
const IN_USE_MAX: usize = 8;
/// How these connections appear in `CLIENT LIST`.
const CLIENT_NAME: &str = "call-notifier-answers";
/// A reply larger than this is not the answer script's.
const REPLY_MAX: usize = 64 * 1024;

/// What became of a command sent the short way.
#[derive(Debug)]
pub(super) enum Sent {
    /// Redis ran it and replied.
    Reply(Value),
    /// Not sent, or sent and not known to have run: send it the usual way.
    Detour,
    /// `NOSCRIPT`: the server does not have the script `EVALSHA` named (a
    /// fresh or restarted server); it ran nothing.
    NoScript,
    /// Sent, and Redis did not answer in time.
    TimedOut,
}

/// A pool of plain connections per Redis server, and which server holds
/// which key.
pub(super) struct Direct {
    servers: Servers,
    login: Login,
    timeout: Duration,
    idle: Mutex<HashMap<Arc<str>, Vec<Connection>>>,
    /// Connections taken from `idle` or made, and not yet put back.
    in_use: AtomicUsize,
    /// Woken when the Cluster's slot map is to be read: see
    /// [`super::RedisBroker::connect`]'s map reader.
    pub(super) map_wanted: Notify,
}

/// Which server holds a key.
enum Servers {
    /// No short way (TLS, a unix socket): every command the usual way.
    None,
    /// One server holds every key.
    One(Arc<str>),
    /// A Cluster: the master of each slot, as last read; `None` until read.
    Cluster {
        masters: RwLock<Option<Arc<SlotMap>>>,
        /// Set from the moment a read of the map is asked for until it is done:
        /// one read at a time.
        asked: AtomicBool,
    },
}

/// What a new connection sends before its first command: its name, and
/// the URL's credentials and database.
#[derive(Debug, Clone, Default)]
struct Login {
    /// `AUTH` then `SELECT`, packed.
    hello: Vec<u8>,
    /// Replies `hello` brings.
    replies: usize,
}

/// Slot ranges and the address of the master serving each.
#[derive(Debug, PartialEq)]
pub(super) struct SlotMap(Vec<(u16, u16, Arc<str>)>);

impl Direct {
    /// The short way to the server `url` names (`redis://`), or to the
    /// masters of the Cluster whose nodes `cluster` lists. Its slot map is
    /// read later, by [`Direct::learn`].
    pub(super) fn new(url: &str, cluster: bool, timeout: Duration) -> Direct {
        let info = url.into_connection_info().ok();
        let address = info.as_ref().and_then(|info| match info.addr() {
            ConnectionAddr::Tcp(host, port) => Some(format!("{host}:{port}")),
            _ => None,
        });
        let servers = match (address, cluster) {
            (None, _) => Servers::None,
            (Some(_), true) => Servers::Cluster {
                masters: RwLock::new(None),
                asked: AtomicBool::new(false),
            },
            (Some(address), false) => Servers::One(Arc::from(address)),
        };
        let login = info
            .map(|info| {
                let settings = info.redis_settings();
                let mut hello = Vec::new();
                let mut replies = 0;
                if let Some(password) = settings.password() {
                    let mut auth = redis::cmd("AUTH");
                    if let Some(user) = settings.username() {
                        auth.arg(user);
                    }
                    auth.arg(password);
                    hello.extend(auth.get_packed_command());
                    replies += 1;
                }
                if settings.db() != 0 && !cluster {
                    hello.extend(redis::cmd("SELECT").arg(settings.db()).get_packed_command());
                    replies += 1;
                }
                hello.extend(
                    redis::cmd("CLIENT")
                        .arg("SETNAME")
                        .arg(CLIENT_NAME)
                        .get_packed_command(),
                );
                Login {
                    hello,
                    replies: replies + 1,
                }
            })
            .unwrap_or_default();
        Direct {
            servers,
            login,
            timeout,
            idle: Mutex::new(HashMap::new()),
            in_use: AtomicUsize::new(0),
            map_wanted: Notify::new(),
        }
    }

    /// Whether keys have a server to go to the short way at all.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.servers, Servers::Cluster { .. })
    }

    /// Takes the Cluster's slot map (a `CLUSTER SLOTS` reply); `None` when
    /// it could not be read, so the next key without a master asks again.
    pub(super) fn learn(&self, slots: Option<&Value>) {
        if let Servers::Cluster { masters, asked } = &self.servers {
            if let Ok(mut masters) = masters.write() {
                *masters = slots.and_then(SlotMap::from_reply).map(Arc::new);
            }
            asked.store(false, Ordering::Relaxed);
        }
    }

    /// The masters of the slot map as last read (none before it is read).
    pub(super) fn masters(&self) -> Vec<Arc<str>> {
        let Servers::Cluster { masters, .. } = &self.servers else {
            return Vec::new();
        };
        let known = masters.read().ok().and_then(|m| m.clone());
        known.map_or_else(Vec::new, |map| {
            map.masters()
                .into_iter()
                .map(|(master, _)| master)
                .collect()
        })
    }

    /// The server holding `key`, when known.
    fn server_of(&self, key: &str) -> Option<Arc<str>> {
        match &self.servers {
            Servers::None => None,
            Servers::One(address) => Some(address.clone()),
            Servers::Cluster { masters, asked } => {
                let known = masters.read().ok().and_then(|m| m.clone());
                let Some(masters) = known else {
                    if !asked.swap(true, Ordering::Relaxed) {
                        self.map_wanted.notify_one();
                    }
                    return None;
                };
                masters.master_of(slot(key.as_bytes())).cloned()
            }
        }
    }

    /// Forgets the slot map after a redirection or a server gone, so the
    /// next answers go the usual way until it is read again.
    fn distrust(&self) {
        if let Servers::Cluster { masters, asked } = &self.servers {
            if let Ok(mut masters) = masters.write() {
                *masters = None;
            }
            if !asked.swap(true, Ordering::Relaxed) {
                self.map_wanted.notify_one();
            }
        }
    }

    /// Sends `cmd`, which touches `key` only, the short way.
    pub(super) async fn send(&self, key: &str, cmd: &redis::Cmd) -> Sent {
        let Some(server) = self.server_of(key) else {
            return Sent::Detour;
        };
        // Counted back when done, or when the answer's task is dropped
        // (the app went away) mid-command.
        struct InUse<'a>(&'a AtomicUsize);
        impl Drop for InUse<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let _in_use = InUse(&self.in_use);
        if self.in_use.fetch_add(1, Ordering::Relaxed) >= IN_USE_MAX {
            return Sent::Detour;
        }
        self.send_to(server, cmd).await
    }

    /// Sends `cmd` to `server` the short way (also the cluster watchdog's
    /// way to a node: [`super::cluster`]).
    pub(super) async fn send_to(&self, server: Arc<str>, cmd: &redis::Cmd) -> Sent {
        let packed = cmd.get_packed_command();
        let idle = self
            .idle
            .lock()
            .ok()
            .and_then(|mut idle| idle.get_mut(&server).and_then(Vec::pop));
        if let Some(connection) = idle {
            // An idle connection Redis closed meanwhile (a restart, `CLIENT
            // KILL`, its idle timeout) fails before any reply, and Redis
            // never read the command: once more on a new connection.
            if let Ok(sent) = self.exchange(&server, connection, &packed).await {
                return sent;
            }
        }
        let connection = match tokio::time::timeout(self.timeout, self.connect(&server)).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(_)) | Err(_) => {
                self.distrust();
                return Sent::Detour;
            }
        };
        self.exchange(&server, connection, &packed)
            .await
            .unwrap_or_else(|()| {
                self.distrust();
                Sent::Detour
            })
    }

    /// One command on `connection`, put back when it stays usable; `Err`
    /// when the connection failed before a reply.
    async fn exchange(
        &self,
        server: &Arc<str>,
        mut connection: Connection,
        packed: &[u8],
    ) -> Result<Sent, ()> {
        let reply = tokio::time::timeout(self.timeout, connection.call(packed)).await;
        match reply {
            Ok(Ok(Reply::Value(value))) => {
                self.put_back(server.clone(), connection);
                Ok(Sent::Reply(value))
            }
            Ok(Ok(Reply::Error(text))) => {
                if text.starts_with("MOVED") {
                    self.distrust();
                }
                self.put_back(server.clone(), connection);
                Ok(if text.starts_with("NOSCRIPT") {
                    Sent::NoScript
                } else {
                    Sent::Detour
                })
            }
            Ok(Err(_)) => Err(()),
            Err(_) => Ok(Sent::TimedOut),
        }
    }

    fn put_back(&self, server: Arc<str>, connection: Connection) {
        if let Ok(mut idle) = self.idle.lock() {
            let pool = idle.entry(server).or_default();
            if pool.len() < IDLE_PER_SERVER {
                pool.push(connection);
            }
        }
    }

    async fn connect(&self, server: &str) -> io::Result<Connection> {
        let stream = TcpStream::connect(server).await?;
        stream.set_nodelay(true)?;
        let mut connection = Connection {
            stream,
            buffer: Vec::with_capacity(512),
        };
        if self.login.replies > 0 {
            connection.stream.write_all(&self.login.hello).await?;
            for _ in 0..self.login.replies {
                if let Reply::Error(text) = connection.read().await? {
                    return Err(io::Error::other(text));
                }
            }
        }
        Ok(connection)
    }
}

/// One plain connection, driven by whichever task sends on it.
struct Connection {
    stream: TcpStream,
    /// Bytes read and not yet parsed: empty between commands.
    buffer: Vec<u8>,
}

enum Reply {
    Value(Value),
    /// An error reply's text (`MOVED 3999 127.0.0.1:6381`).
    Error(String),
}

impl Connection {
    async fn call(&mut self, packed: &[u8]) -> io::Result<Reply> {
        self.stream.write_all(packed).await?;
        self.read().await
    }

    /// Reads one whole reply.
    async fn read(&mut self) -> io::Result<Reply> {
        let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed Redis reply");
        loop {
            if let Some(end) = frame_end(&self.buffer, 0).map_err(|()| malformed())? {
                let frame: Vec<u8> = self.buffer.drain(..end).collect();
                if let Some(text) = frame.strip_prefix(b"-") {
                    let text = String::from_utf8_lossy(text).trim_end().to_owned();
                    return Ok(Reply::Error(text));
                }
                return redis::parse_redis_value(&frame)
                    .map(Reply::Value)
                    .map_err(|_| malformed());
            }
            if self.buffer.len() > REPLY_MAX {
                return Err(malformed());
            }
            let mut chunk = [0u8; 4096];
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }
}

/// Where the RESP2 frame starting at `at` ends: `Ok(None)` while it is
/// incomplete, `Err` when it is not RESP2.
fn frame_end(buffer: &[u8], at: usize) -> Result<Option<usize>, ()> {
    let Some(kind) = buffer.get(at) else {
        return Ok(None);
    };
    let Some(line) = buffer[at..].windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let after_line = at + line + 2;
    let number = || -> Result<i64, ()> {
        std::str::from_utf8(&buffer[at + 1..at + line])
            .ok()
            .and_then(|n| n.parse().ok())
            .ok_or(())
    };
    match kind {
        b'+' | b'-' | b':' => Ok(Some(after_line)),
        b'$' => match usize::try_from(number()?) {
            Err(_) => Ok(Some(after_line)),
            Ok(length) => {
                let end = after_line + length + 2;
                Ok((buffer.len() >= end).then_some(end))
            }
        },
        b'*' => match usize::try_from(number()?) {
            Err(_) => Ok(Some(after_line)),
            Ok(count) => {
                let mut end = after_line;
                for _ in 0..count {
                    match frame_end(buffer, end)? {
                        Some(next) => end = next,
                        None => return Ok(None),
                    }
                }
                Ok(Some(end))
            }
        },
        _ => Err(()),
    }
}

/// The Cluster slot of `key` (CRC16 of its hash tag, as Redis computes it).
pub(super) fn slot(key: &[u8]) -> u16 {
    let tag = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|b| *b == b'}')
                .map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tag) % 16384
}

impl SlotMap {
    /// From a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id], replicas…], …]`.
    pub(super) fn from_reply(reply: &Value) -> Option<SlotMap> {
        let Value::Array(ranges) = reply else {
            return None;
        };
        let int = |v: &Value| match v {
            Value::Int(n) => u16::try_from(*n).ok(),
            _ => None,
        };
        let text = |v: &Value| match v {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        };
        let mut map = Vec::with_capacity(ranges.len());
        for range in ranges {
            let Value::Array(range) = range else {
                return None;
            };
            let (Some(start), Some(end), Some(Value::Array(master))) =
                (range.first(), range.get(1), range.get(2))
            else {
                return None;
            };
            let host = master.first().and_then(text)?;
            let port = master.get(1).and_then(int)?;
            map.push((int(start)?, int(end)?, Arc::from(format!("{host}:{port}"))));
        }
        (!map.is_empty()).then_some(SlotMap(map))
    }

    /// Each master once, with the first slot it serves.
    pub(super) fn masters(&self) -> Vec<(Arc<str>, u16)> {
        let mut masters: Vec<(Arc<str>, u16)> = Vec::new();
        for (start, _, master) in &self.0 {
            if !masters.iter().any(|(known, _)| known == master) {
                masters.push((master.clone(), *start));
            }
        }
        masters
    }

    fn master_of(&self, slot: u16) -> Option<&Arc<str>> {
        self.0
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, master)| master)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_whole_or_wait_for_more() {
        let reply = b"*2\r\n:1\r\n$10\r\nring 1 + -\r\n";
        assert_eq!(frame_end(reply, 0), Ok(Some(reply.len())));
        for cut in 0..reply.len() {
            assert_eq!(frame_end(&reply[..cut], 0), Ok(None), "cut at {cut}");
        }
        assert_eq!(frame_end(b"$-1\r\n", 0), Ok(Some(5)));
        assert_eq!(frame_end(b"*-1\r\n", 0), Ok(Some(5)));
        assert_eq!(
            frame_end(b"-MOVED 1 127.0.0.1:7002\r\n+OK", 0),
            Ok(Some(25))
        );
        assert_eq!(frame_end(b"?what\r\n", 0), Err(()));
        assert_eq!(frame_end(b"$x\r\n", 0), Err(()));
    }

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from Redis's CLUSTER KEYSLOT.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"cn:{abc}"), slot(b"cn:{abc}:meta"));
    }

    #[test]
    fn a_slot_map_from_cluster_slots() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node(7001),
                node(7004),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node(7002)]),
        ]);
        let map = SlotMap::from_reply(&reply).expect("a map");
        assert_eq!(map.master_of(0).map(|m| &**m), Some("127.0.0.1:7001"));
        assert_eq!(map.master_of(5461).map(|m| &**m), Some("127.0.0.1:7002"));
        let masters: Vec<(String, u16)> = map
            .masters()
            .into_iter()
            .map(|(m, slot)| (m.to_string(), slot))
            .collect();
        assert_eq!(
            masters,
            [
                ("127.0.0.1:7001".to_owned(), 0),
                ("127.0.0.1:7002".to_owned(), 5461)
            ]
        );
        assert_eq!(SlotMap::from_reply(&Value::Nil), None);
        assert_eq!(SlotMap::from_reply(&Value::Array(vec![])), None);
    }
}

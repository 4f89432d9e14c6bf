//! The machine's floor for the wake-up path: what the fork scenario's
//! wake-up costs here with no server at all, so its figures can be read
//! against what the machine and the harness themselves take.
//!
//! A plain thread stands in for the server, speaking just enough HTTP/1.1.
//! It holds the PBX's `POST /api/incoming-call/` open; when the app's
//! `POST /api/call-response/` comes, it runs one small Redis script like the
//! answer script (a `GET`, a `SET`, a publish) if the backend has Redis,
//! writes `status=ACK` to the PBX, then 202 to the app. The generator's own
//! client times it exactly as it times the server: its connections, its
//! single-threaded runtime, the phones answering at the same phases, idle
//! in between. What is left is the kernel's wake-ups, Redis's own work and
//! the harness's, which every server pays here; the wake-up less the floor
//! is call-notifier's own share.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::mpsc;

use crate::client::{self, Http1};
use crate::generator;
use crate::pushes::Push;
use crate::stats::Samples;

/// The script the stand-in runs per answer, shaped like the answer script:
/// read the record, write it, publish on the call's channel (ARGV[2]:
/// `PUBLISH`, or `SPUBLISH` on a cluster).
pub const SCRIPT: &str = "local before = redis.call('GET', KEYS[1]) \
    redis.call('SET', KEYS[1], ARGV[1], 'PX', 10000) \
    redis.call(ARGV[2], KEYS[1], ARGV[1]) return 1";

/// Where the stand-in finds Redis: the first node of `url`
/// (`redis://host:port/db` or `redis+cluster://host:port,...`).
#[derive(Clone)]
pub struct RedisNode {
    pub address: String,
    pub cluster: bool,
}

impl RedisNode {
    pub fn of(url: &str) -> Result<RedisNode> {
        let (rest, cluster) = match url.strip_prefix("redis+cluster://") {
            Some(rest) => (rest, true),
            None => (
                url.strip_prefix("redis://")
                    .with_context(|| format!("the floor needs a redis:// URL, not {url}"))?,
                false,
            ),
        };
        let hosts = rest.split('/').next().unwrap_or("");
        let first = hosts.split(',').next().unwrap_or("");
        if first.is_empty() || first.contains('@') {
            bail!("the floor needs a Redis URL with a host and no password, not {url}");
        }
        Ok(RedisNode {
            address: first.to_owned(),
            cluster,
        })
    }
}

/// The stand-in's Redis: a blocking connection (the redis crate's, with
/// `TCP_NODELAY`) to the master that owns the key, and the script.
struct Floor {
    conn: redis::Connection,
    script: redis::Script,
    key: String,
    publish: &'static str,
}

impl Floor {
    /// Connects to `node`, following one `MOVED` to the key's master, and
    /// runs the script once (which loads it there).
    fn connect(node: &RedisNode, key: String) -> Result<Floor> {
        let mut address = node.address.clone();
        for _ in 0..2 {
            let info =
                redis::IntoConnectionInfo::into_connection_info(format!("redis://{address}/"))?
                    .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
            let conn = redis::Client::open(info)?
                .get_connection()
                .with_context(|| format!("the floor cannot reach Redis at {address}"))?;
            let mut floor = Floor {
                conn,
                script: redis::Script::new(SCRIPT),
                key: key.clone(),
                publish: if node.cluster { "SPUBLISH" } else { "PUBLISH" },
            };
            match floor.run() {
                Err(e) => match e
                    .downcast_ref::<redis::RedisError>()
                    .and_then(|e| e.redirect_node())
                {
                    Some((moved, _)) => address = moved.to_owned(),
                    None => return Err(e),
                },
                Ok(()) => return Ok(floor),
            }
        }
        bail!("Redis moved the floor's key twice")
    }

    /// One answer's script.
    fn run(&mut self) -> Result<()> {
        let done: i64 = self
            .script
            .key(&self.key)
            .arg("answered")
            .arg(self.publish)
            .invoke(&mut self.conn)?;
        if done != 1 {
            bail!("the floor's script returned {done}");
        }
        Ok(())
    }

    fn clean_up(mut self) -> Result<()> {
        redis::cmd("DEL").arg(&self.key).exec(&mut self.conn)?;
        Ok(())
    }
}

/// Reads one request whole (headers, and the body its `content-length`
/// announces) into `buf`.
fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<bool> {
    buf.clear();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let headers = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
            let length: usize = headers
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(Ok(0), |n| n.trim().parse())
                .context("a bad content-length")?;
            if buf.len() >= head + 4 + length {
                return Ok(true);
            }
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(false);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

const ACK: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 10\r\n\r\nstatus=ACK";
const ACCEPTED: &[u8] = b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n";

/// The stand-in server: holds each PBX request (saying so on `parked`)
/// until the app's answer, then answers both.
fn serve(
    listener: TcpListener,
    mut redis: Option<Floor>,
    parked: mpsc::UnboundedSender<()>,
) -> Result<()> {
    let (mut pbx, _) = listener.accept()?;
    let (mut phone, _) = listener.accept()?;
    pbx.set_nodelay(true)?;
    phone.set_nodelay(true)?;
    let mut buf = Vec::new();
    while read_request(&mut pbx, &mut buf)? {
        let _ = parked.send(());
        if !read_request(&mut phone, &mut buf)? {
            break;
        }
        if let Some(floor) = redis.as_mut() {
            floor.run()?;
        }
        pbx.write_all(ACK)?;
        phone.write_all(ACCEPTED)?;
    }
    redis.map_or(Ok(()), Floor::clean_up)
}

/// Times `calls` answers through the stand-in, the `n`th after
/// [`generator::app_delay`] of idleness, on the fork scenario's timing
/// thread ([`generator::alone`]).
pub async fn measure(redis: Option<RedisNode>, calls: usize, period: Duration) -> Result<Samples> {
    generator::alone(async move { timed(redis.as_ref(), calls, period).await }).await
}

async fn timed(redis: Option<&RedisNode>, calls: usize, period: Duration) -> Result<Samples> {
    let key = format!(
        "bench-floor:{{{}}}",
        &call_notifier::calls::random_key()[..8]
    );
    let redis = redis.map(|node| Floor::connect(node, key)).transpose()?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (parked_tx, mut parked) = mpsc::unbounded_channel();
    let server = std::thread::spawn(move || serve(listener, redis, parked_tx));
    let mut pbx = Http1::connect(addr, client::source_address(0)).await?;
    let mut phone = Http1::connect(addr, client::source_address(1)).await?;
    let mut took = Vec::with_capacity(calls);
    for n in 0..calls {
        let key = format!("floor-{n}");
        let ring = pbx.post_form(
            generator::INCOMING_CALL,
            generator::incoming_call_form(&key, 1),
        );
        let answer = async {
            parked.recv().await.context("the floor's server stopped")?;
            tokio::time::sleep(generator::app_delay(n, period)).await;
            let sent = Instant::now();
            let push = Push {
                message_start_time: "0".to_owned(),
            };
            generator::answer(&mut phone, &key, &push).await?;
            Ok::<_, anyhow::Error>(sent)
        };
        let ((reply, acked), sent) = tokio::join!(
            async {
                let reply = ring.await;
                (reply, Instant::now())
            },
            answer
        );
        let sent = sent?;
        generator::expect_ack(&reply?, &key)?;
        took.push(acked - sent);
    }
    drop((pbx, phone));
    tokio::task::spawn_blocking(move || server.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the floor's server thread panicked"))??;
    Ok(Samples::new(took))
}

//! The relays on loopback: two that play the mobile link (UDP for the
//! phone's SIP, TCP for its app's HTTP), each delaying every packet or
//! chunk by the one-way delay; and a tap that delays nothing and notes when
//! each HTTP request from Kamailio went into call-notifier and when its
//! answer came out.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Waits until `due`, to within a few microseconds: tokio's timer rounds
/// up to whole milliseconds (a plain sleep lands 1-2 ms late), so it sleeps
/// to 2 ms before and yields the rest.
pub async fn until(due: Instant) {
    let early = due.checked_sub(Duration::from_millis(2)).unwrap_or(due);
    tokio::time::sleep_until(early).await;
    while Instant::now() < due {
        tokio::task::yield_now().await;
    }
}

/// The delays a relay applied, as measured: from a packet or chunk read to
/// the same bytes written on.
#[derive(Default)]
pub struct Applied {
    delays: Mutex<Vec<Duration>>,
}

impl Applied {
    fn note(&self, delay: Duration) {
        self.delays.lock().expect("lock").push(delay);
    }

    /// (count, mean, max) of the delays applied so far.
    pub fn summary(&self) -> (usize, Duration, Duration) {
        let delays = self.delays.lock().expect("lock");
        let total: Duration = delays.iter().sum();
        let mean = total
            .checked_div(u32::try_from(delays.len()).unwrap_or(u32::MAX).max(1))
            .unwrap_or_default();
        let max = delays.iter().max().copied().unwrap_or_default();
        (delays.len(), mean, max)
    }
}

/// A delaying UDP relay: the phone's side of the mobile link. The phone
/// sends to [`UdpRelay::inner`]; each datagram leaves [`UdpRelay::outer`]
/// for Kamailio `one_way` later. Each datagram reaching `outer` (Kamailio's
/// replies and requests to the phone's contact) goes to the phone
/// `one_way` later. To Kamailio the phone is at `outer`, as behind a NAT:
/// its Via and Contact name `outer`.
pub struct UdpRelay {
    pub inner: SocketAddr,
    pub outer: SocketAddr,
    pub applied: Arc<Applied>,
    /// Each datagram from Kamailio, as it reached `outer`: when, and its
    /// text.
    pub from_kamailio: Arc<Mutex<Vec<(Instant, String)>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl UdpRelay {
    pub async fn start(kamailio: SocketAddr, one_way: Duration) -> Result<UdpRelay> {
        let inner = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let outer = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let applied = Arc::new(Applied::default());
        let phone: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let mut tasks = Vec::new();

        // Phone -> Kamailio.
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        tasks.push(tokio::spawn({
            let (inner, phone) = (inner.clone(), phone.clone());
            async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok((n, from)) = inner.recv_from(&mut buf).await {
                    let at = Instant::now();
                    *phone.lock().expect("lock") = Some(from);
                    if up_tx.send((at, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }));
        tasks.push(tokio::spawn(forward_datagrams(
            up_rx,
            outer.clone(),
            Arc::new(Mutex::new(Some(kamailio))),
            one_way,
            applied.clone(),
        )));

        // Kamailio -> phone.
        let from_kamailio: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        tasks.push(tokio::spawn({
            let (outer, seen) = (outer.clone(), from_kamailio.clone());
            async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok((n, _)) = outer.recv_from(&mut buf).await {
                    let at = Instant::now();
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    seen.lock().expect("lock").push((at, text));
                    if down_tx.send((at, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }));
        tasks.push(tokio::spawn(forward_datagrams(
            down_rx,
            inner.clone(),
            phone,
            one_way,
            applied.clone(),
        )));

        Ok(UdpRelay {
            inner: inner.local_addr()?,
            outer: outer.local_addr()?,
            applied,
            from_kamailio,
            tasks,
        })
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Sends each datagram from `from` to `to` once `one_way` has passed
/// since it was read, in order.
async fn forward_datagrams(
    mut queue: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    from: Arc<UdpSocket>,
    to: Arc<Mutex<Option<SocketAddr>>>,
    one_way: Duration,
    applied: Arc<Applied>,
) {
    while let Some((read_at, datagram)) = queue.recv().await {
        until(read_at + one_way).await;
        let Some(to) = *to.lock().expect("lock") else {
            continue;
        };
        if from.send_to(&datagram, to).await.is_ok() {
            applied.note(read_at.elapsed());
        }
    }
}

/// When the first bytes of a connection through the delaying TCP relay
/// were about to go into call-notifier, and what they began with.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub at: Instant,
    pub request: String,
}

/// A delaying TCP relay: the app's HTTP over the mobile link, to
/// call-notifier at `upstream`.
///
/// A woken app has no connection, so it opens one: on a real link its SYN
/// and the SYN-ACK take one round trip before its request can leave, and
/// the request then takes one way. On loopback the app's `connect`
/// returns at once and it writes straight away, so the relay holds the
/// first bytes until one round trip plus one way (3 × `one_way`) after it
/// accepted the connection; every later chunk, either way, `one_way` after
/// it was read. (Its own connection to call-notifier is opened at the
/// accept, as a server would have finished its side of the handshake by
/// the time the request arrives.) No TLS is simulated.
pub struct TcpRelay {
    pub addr: SocketAddr,
    /// Every chunk's delay but a connection's first.
    pub applied: Arc<Applied>,
    /// A connection's first bytes: accept to delivery.
    pub first_bytes: Arc<Applied>,
    pub delivered: Arc<Mutex<Vec<Delivered>>>,
    task: JoinHandle<()>,
}

impl TcpRelay {
    pub async fn start(upstream: SocketAddr, one_way: Duration) -> Result<TcpRelay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let applied = Arc::new(Applied::default());
        let first_bytes = Arc::new(Applied::default());
        let delivered: Arc<Mutex<Vec<Delivered>>> = Arc::default();
        let task = tokio::spawn({
            let (applied, first_bytes) = (applied.clone(), first_bytes.clone());
            let delivered = delivered.clone();
            async move {
                while let Ok((app, _)) = listener.accept().await {
                    let accepted = Instant::now();
                    let (applied, delivered) = (applied.clone(), delivered.clone());
                    let first_bytes = first_bytes.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = app.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (app_read, app_write) = app.into_split();
                        let (server_read, server_write) = server.into_split();
                        let first = First {
                            accepted,
                            due: accepted + one_way * 3,
                            applied: first_bytes,
                            delivered,
                        };
                        let up = delay_stream(
                            app_read,
                            server_write,
                            one_way,
                            Some(first),
                            applied.clone(),
                        );
                        let down = delay_stream(server_read, app_write, one_way, None, applied);
                        tokio::join!(up, down);
                    });
                }
            }
        });
        Ok(TcpRelay {
            addr,
            applied,
            first_bytes,
            delivered,
            task,
        })
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a connection's first bytes from the app are held, and where their
/// delivery is noted.
struct First {
    accepted: Instant,
    due: Instant,
    applied: Arc<Applied>,
    delivered: Arc<Mutex<Vec<Delivered>>>,
}

/// Copies `from` to `to`, each chunk `one_way` after it was read (the first
/// not before `first.due`); EOF is passed on the same way.
async fn delay_stream(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    one_way: Duration,
    mut first: Option<First>,
    applied: Arc<Applied>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16_384];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            // An empty chunk is the EOF, delayed like the rest.
            if tx.send((Instant::now(), buf[..n].to_vec())).is_err() || n == 0 {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((read_at, chunk)) = rx.recv().await {
            let held = first.take();
            let due = match &held {
                Some(first) => first.due.max(read_at + one_way),
                None => read_at + one_way,
            };
            until(due).await;
            if chunk.is_empty() {
                let _ = to.shutdown().await;
                break;
            }
            // Stamped before the write: call-notifier cannot have read a
            // byte of it sooner.
            let at = Instant::now();
            if to.write_all(&chunk).await.is_err() {
                break;
            }
            match held {
                Some(first) => {
                    first.applied.note(at - first.accepted);
                    first.delivered.lock().expect("lock").push(Delivered {
                        at,
                        request: String::from_utf8_lossy(&chunk).into_owned(),
                    });
                }
                None => applied.note(at - read_at),
            }
        }
    };
    tokio::join!(reader, writer);
}

/// One HTTP exchange between Kamailio and call-notifier, as the tap saw it.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// When the request's first bytes were about to be written into
    /// call-notifier.
    pub request_at: Instant,
    pub request: String,
    /// When the answer's first bytes were read from call-notifier.
    pub response_at: Option<Instant>,
    pub response: String,
}

/// A timestamping TCP relay between Kamailio and call-notifier, delaying
/// nothing. Its stamps bound call-notifier's work from outside, as
/// closely as a process outside it can: a request is stamped just before
/// its first bytes are written into call-notifier's connection, an answer
/// as soon as its first bytes are read from it. What lies between is
/// call-notifier's, plus a loopback hop each way.
pub struct Tap {
    pub addr: SocketAddr,
    pub exchanges: Arc<Mutex<Vec<Exchange>>>,
    task: JoinHandle<()>,
}

impl Tap {
    pub async fn start(upstream: SocketAddr) -> Result<Tap> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the tap")?;
        let addr = listener.local_addr()?;
        let exchanges: Arc<Mutex<Vec<Exchange>>> = Arc::default();
        let task = tokio::spawn({
            let exchanges = exchanges.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let exchanges = exchanges.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        tap_connection(client, server, exchanges).await;
                    });
                }
            }
        });
        Ok(Tap {
            addr,
            exchanges,
            task,
        })
    }

    /// The exchanges seen so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges.lock().expect("lock").clone()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways; a chunk from the client that starts a request line
/// opens a new exchange (HTTP/1.1, one request at a time per connection).
async fn tap_connection(client: TcpStream, server: TcpStream, all: Arc<Mutex<Vec<Exchange>>>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let current: Arc<Mutex<Option<usize>>> = Arc::default();
    let up = {
        let (all, current) = (all.clone(), current.clone());
        async move {
            let mut buf = vec![0u8; 16_384];
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // Stamped before the write: call-notifier cannot have read
                // a byte of it sooner.
                let at = Instant::now();
                if server_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut all = all.lock().expect("lock");
                let mut current = current.lock().expect("lock");
                let starts = ["POST ", "GET ", "PUT ", "DELETE ", "HEAD "]
                    .iter()
                    .any(|m| text.starts_with(m));
                match *current {
                    Some(i) if !starts => all[i].request.push_str(&text),
                    _ => {
                        all.push(Exchange {
                            request_at: at,
                            request: text,
                            response_at: None,
                            response: String::new(),
                        });
                        *current = Some(all.len() - 1);
                    }
                }
            }
            let _ = server_write.shutdown().await;
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16_384];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let at = Instant::now();
            {
                let mut all = all.lock().expect("lock");
                if let Some(i) = *current.lock().expect("lock") {
                    let exchange = &mut all[i];
                    exchange.response_at.get_or_insert(at);
                    exchange
                        .response
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, down);
}

//! The load generator's HTTP: plain HTTP/1.1 keep-alive connections, what a
//! PBX's curl and a phone's HTTP stack use, and HTTP/2 over cleartext (h2c,
//! which the server accepts on the same port) for the parked-call sizes
//! where one socket per call would not fit the open-files limit; that is
//! also what a load balancer multiplexing PBX requests looks like.
//!
//! hyper's connection-level client rather than a pooled one: every
//! connection is opened before the clock starts, so no measurement includes
//! a TCP handshake, and the harness chooses each socket's source address.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// Source addresses client sockets are spread over: one address has only
/// the ~28,000 ports of the ephemeral range, and every address in
/// 127.0.0.0/8 reaches the loopback interface without set-up.
const SOURCE_ADDRESSES: usize = 8;

/// The source address for the `n`th socket: 127.0.0.1 to 127.0.0.8 in turn.
pub fn source_address(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (n % SOURCE_ADDRESSES) as u8))
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }
}

/// Aborts the task that drives a connection when the connection's owner
/// goes away, so that dropping the owner closes the socket: that is how a
/// PBX hanging up looks to the server.
struct Driver(JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens a TCP connection from `source` (any port) to `server`.
async fn tcp(server: SocketAddr, source: IpAddr) -> Result<TcpStream> {
    let socket =
        TcpSocket::new_v4().context("cannot create a socket (out of file descriptors?)")?;
    socket
        .bind(SocketAddr::new(source, 0))
        .with_context(|| format!("cannot bind a client socket to {source}"))?;
    let stream = socket
        .connect(server)
        .await
        .with_context(|| format!("cannot connect to the server at {server} from {source}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A form body and its content type.
fn form_request(uri: &str, form: String) -> Result<Request<Full<Bytes>>> {
    Ok(Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(form)))?)
}

async fn read_reply(response: hyper::Response<hyper::body::Incoming>) -> Result<Reply> {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .context("the server broke off a response body")?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        body,
    })
}

/// One HTTP/1.1 keep-alive connection: one request at a time.
pub struct Http1 {
    sender: http1::SendRequest<Full<Bytes>>,
    host: HeaderValue,
    _driver: Driver,
}

impl Http1 {
    pub async fn connect(server: SocketAddr, source: IpAddr) -> Result<Http1> {
        let stream = tcp(server, source).await?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake failed")?;
        let driver = Driver(tokio::spawn(async move {
            // Ends when either side closes; errors show up in the requests.
            let _ = connection.await;
        }));
        Ok(Http1 {
            sender,
            host: HeaderValue::from_str(&server.to_string())?,
            _driver: driver,
        })
    }

    async fn send(&mut self, mut request: Request<Full<Bytes>>) -> Result<Reply> {
        request.headers_mut().insert(HOST, self.host.clone());
        self.sender
            .ready()
            .await
            .context("the server closed a keep-alive connection")?;
        let response = self
            .sender
            .send_request(request)
            .await
            .context("the server did not answer (did it die?)")?;
        read_reply(response).await
    }

    /// POSTs a form to `path` and reads the whole reply.
    pub async fn post_form(&mut self, path: &str, form: String) -> Result<Reply> {
        self.send(form_request(path, form)?).await
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply> {
        self.send(Request::get(path).body(Full::new(Bytes::new()))?)
            .await
    }
}

/// One HTTP/2 cleartext connection carrying many requests at once (the
/// server allows 200 streams per connection). Cheap to clone; the
/// connection closes when the last clone goes.
#[derive(Clone)]
pub struct Http2 {
    sender: http2::SendRequest<Full<Bytes>>,
    base: Arc<str>,
    _driver: Arc<Driver>,
}

impl Http2 {
    pub async fn connect(server: SocketAddr, source: IpAddr) -> Result<Http2> {
        let stream = tcp(server, source).await?;
        let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .context("HTTP/2 (h2c) handshake failed")?;
        let driver = Driver(tokio::spawn(async move {
            let _ = connection.await;
        }));
        Ok(Http2 {
            sender,
            base: format!("http://{server}").into(),
            _driver: Arc::new(driver),
        })
    }

    /// POSTs a form to `path` on a new stream and reads the whole reply.
    /// Dropping the future resets the stream: the PBX hung up.
    pub async fn post_form(&self, path: &str, form: String) -> Result<Reply> {
        let mut sender = self.sender.clone();
        sender
            .ready()
            .await
            .context("the server closed an HTTP/2 connection")?;
        let response = sender
            .send_request(form_request(&format!("{}{path}", self.base), form)?)
            .await
            .context("the server did not answer (did it die?)")?;
        read_reply(response).await
    }
}

//! The one kind of outgoing HTTP client: the account API and FCM use it.
//!
//! TLS through rustls with the webpki roots (no system libraries, no
//! system certificate store needed on a fresh machine). HTTP/2 is
//! negotiated by ALPN over TLS; a plain `http://` URL (the local stand-ins
//! of the tests) speaks HTTP/1.1, never forced HTTP/2.

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// How every outgoing client connects: rustls over TCP, or plain TCP.
pub type Connector = HttpsConnector<HttpConnector>;

/// A pooled client for `http://` and `https://` URLs, sending bodies of
/// type `B` (yup-oauth2, for FCM, takes a `String`-bodied one).
pub type HttpClient<B = Full<Bytes>> = Client<Connector, B>;

/// How many idle connections a client keeps per host. Over HTTP/1.1 every
/// request in flight has a connection of its own: a push service that
/// slows down for a while makes one per push waiting, and without a bound
/// all of them would stay open, idle, until the pool's idle timeout (90 s),
/// holding descriptors and buffers long after the burst (the chaos run saw
/// an instance at 218 descriptors, from 96, once FCM was fast again).
/// HTTP/2 (negotiated over TLS with the real services) needs one.
pub const IDLE_PER_HOST: usize = 8;

/// Builds a client. Cheap to clone: clones share the connection pool, so
/// build one per purpose and keep it.
pub fn client<B>() -> HttpClient<B>
where
    B: hyper::body::Body + Send,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(IDLE_PER_HOST)
        .build(connector())
}

fn connector() -> Connector {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build()
}

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

/// A pooled client for `http://` and `https://` URLs.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds a client. Cheap to clone: clones share the connection pool, so
/// build one per purpose and keep it.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(connector())
}

/// The connector every outgoing client is built on, for a client whose body
/// type must differ (yup-oauth2 takes a `String`-bodied one for FCM's tokens).
pub fn connector() -> HttpsConnector<HttpConnector> {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build()
}

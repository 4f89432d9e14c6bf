//! The connection-level probes an attacker and a bad network tried: silent
//! connections that fill the file limit, idle ones, h2c after its preface
//! only, HEAD and OPTIONS on both protocols, and a client that never reads
//! its responses while the server shuts down.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::process::Process;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection; says whether it did
/// within [`BOUND`].
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(BOUND, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// `GET /health/live` on `stream`, which must answer 200.
async fn live_on(stream: &mut TcpStream, what: &str) {
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut answer = [0u8; 512];
    let read = bounded("the answer", stream.read(&mut answer))
        .await
        .expect("read the answer");
    assert!(
        answer[..read].starts_with(b"HTTP/1.1 200"),
        "{what}: {:?}",
        String::from_utf8_lossy(&answer[..read])
    );
}

fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_over_the_file_limit_time_out_and_a_pbx_call_gets_through() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let database = dir.path().join("db.sqlite3").display().to_string();
    // Few descriptors, so a few dozen silent clients use them all up. The
    // header timeout leaves a loaded machine time to read a real request.
    let process = Process::start_limited(
        &["--database-url", &database, "--header-timeout-ms", "2000"],
        Some(64),
    )
    .await;
    let addr = addr_of(&process.url);
    // Three times the file limit: they connect (the kernel's backlog takes
    // them), and the server accepts until it has no descriptor left.
    let mut silent = Vec::new();
    for _ in 0..192 {
        silent.push(TcpStream::connect(&addr).await.expect("connect"));
    }
    // The PBX's call queues behind them; it gets through once the silent
    // ones have been closed for saying nothing.
    let client = TestClient::new(process.url.clone());
    let call = bounded(
        "the PBX call, while silent clients held the file limit",
        client.incoming_call(&sip_user_id(), &call_id()),
    )
    .await;
    assert_eq!(call.status, StatusCode::OK);
    assert_eq!(call.body, "status=NAK", "no device: NAK at once");
    // Every silent connection was closed by the server.
    for stream in &mut silent {
        assert!(
            closed_by_server(stream).await,
            "a silent connection stayed open"
        );
    }
    // The server ran out of descriptors, and said so once, not in a loop.
    // Asked on a new connection: the call's, idle in the client's pool
    // while the silent ones were checked, may be closed by the server's
    // limits on idle connections, and a request sent just as it closes is
    // lost (hyper's IncompleteMessage; seen once in CI).
    let metrics = TestClient::new(process.url.clone()).get("/metrics").await;
    let failed: f64 = metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix("call_notifier_accept_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the accept_errors metric");
    assert!(failed >= 1.0, "the file limit was never reached: {failed}");
    let logged = process.logged("accept failed (out of file descriptors?); backing off");
    assert!(
        (1..=3).contains(&logged),
        "{logged} log lines for {failed} failed accepts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_complete_a_request_head_are_closed() {
    let backend = Backend::embedded();
    let server = start(&backend, |c| c.header_timeout_ms = 300).await;
    let addr = server.running.addr;
    // Nothing at all.
    let mut nothing = TcpStream::connect(addr).await.expect("connect");
    // The h2c preface, then silence.
    let mut preface = TcpStream::connect(addr).await.expect("connect");
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write the preface");
    // Half a request head, then silence.
    let mut partial = TcpStream::connect(addr).await.expect("connect");
    partial
        .write_all(b"POST /api/incoming-call/ HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write half a head");
    for (name, stream) in [
        ("silent", &mut nothing),
        ("h2c preface only", &mut preface),
        ("partial head", &mut partial),
    ] {
        assert!(closed_by_server(stream).await, "{name}: still open");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_keep_alive_but_a_parked_call_is_not() {
    on_every_backend(|backend| async move {
        let server = start(&backend, |c| {
            c.header_timeout_ms = 1500;
            c.keep_alive_timeout_secs = 1;
            c.wait_ms = 3500;
            c.resend_interval_ms = 1000;
        })
        .await;
        // A parked call outlives both limits on its connection: it gets its
        // real answer (nobody answers: NAK at the wait), not a closed socket.
        let user = server.registered("android", "tok-idle").await;
        let parked = server.client.park(&user, &call_id());

        // One request, answered, then nothing.
        let mut idle = TcpStream::connect(server.running.addr)
            .await
            .expect("connect");
        live_on(&mut idle, "the only request").await;
        assert!(
            closed_by_server(&mut idle).await,
            "{}: idle connection kept",
            backend.name()
        );

        let reply = parked.await.expect("the PBX request");
        assert_eq!(reply.status, StatusCode::OK, "{}", backend.name());
        assert_eq!(reply.body, "status=NAK", "{}", backend.name());
    })
    .await;
}

/// A PBX keeps its connection between calls: idle past the header timeout
/// but within the keep-alive limit, the connection still takes the next
/// request. hyper's own header timeout, set to the header timeout, closed
/// it 10 s after each response (the README promises 75 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_idle_past_the_header_timeout_takes_the_next_request() {
    let backend = Backend::embedded();
    let server = start(&backend, |c| {
        c.header_timeout_ms = 300;
        c.keep_alive_timeout_secs = 30;
    })
    .await;
    let mut kept = TcpStream::connect(server.running.addr)
        .await
        .expect("connect");
    for request in 1..=2 {
        if request == 2 {
            // Four header timeouts of silence between the two requests.
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        live_on(&mut kept, &format!("request {request}")).await;
    }
}

/// The first line of what the server writes next on `stream`.
async fn first_line_on(stream: &mut TcpStream, what: &'static str) -> String {
    let mut answer = [0u8; 512];
    let read = bounded(what, stream.read(&mut answer))
        .await
        .expect("read the answer");
    let text = String::from_utf8_lossy(&answer[..read]).into_owned();
    text.lines().next().unwrap_or_default().to_owned()
}

/// A body in a transfer coding besides `chunked` (`gzip, chunked`, which
/// hyper unchunks and passes on compressed) gets 501 naming the coding
/// (RFC 9112, 6.1), and changes nothing. Before, it was parsed as it came
/// and refused for a field it seemed to lack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_in_a_transfer_coding_besides_chunked_is_refused_naming_it() {
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    let user = sip_user_id();
    let body = format!("sip_user_id={user}&token=t&app={APP}");
    for (coding, named) in [
        ("gzip, chunked", "gzip"),
        ("x-custom;q=1, chunked", "x-custom"),
    ] {
        let mut stream = TcpStream::connect(server.running.addr)
            .await
            .expect("connect");
        let request = format!(
            "POST /api/android-device/ HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/x-www-form-urlencoded\r\n\
             Connection: close\r\nTransfer-Encoding: {coding}\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write the request");
        let mut answer = Vec::new();
        bounded("the refusal", stream.read_to_end(&mut answer))
            .await
            .expect("read the refusal");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 501"), "{coding}: {answer}");
        assert!(
            answer.contains("transfer coding") && answer.contains(named),
            "{coding}: {answer}"
        );
    }
    assert!(server.tokens(&user).await.is_empty());
}

/// A client that waits for `100 Continue` before its body hears a refusal
/// instead when the head alone settles it: 413 for a declared length over
/// the limit, 415 for a content type no endpoint reads. Before, it was
/// invited to send a megabyte that would be thrown away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_refused_by_its_head_is_refused_before_100_continue() {
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    let head = |content_type: &str, length: usize| {
        format!(
            "POST /api/call-response/ HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n\
             Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
        )
    };
    for (content_type, length, refusal) in [
        (
            "application/x-www-form-urlencoded",
            1_000_000,
            "HTTP/1.1 413",
        ),
        ("text/xml", 10, "HTTP/1.1 415"),
    ] {
        let mut stream = TcpStream::connect(server.running.addr)
            .await
            .expect("connect");
        stream
            .write_all(head(content_type, length).as_bytes())
            .await
            .expect("write the head");
        let line = first_line_on(&mut stream, "the refusal").await;
        assert!(
            line.starts_with(refusal),
            "{content_type}, {length}: {line}"
        );
    }

    // A body the head does not settle is invited, and read.
    let body = "unique_key=nobody&message_start_time=1700000000";
    let mut stream = TcpStream::connect(server.running.addr)
        .await
        .expect("connect");
    stream
        .write_all(head("application/x-www-form-urlencoded", body.len()).as_bytes())
        .await
        .expect("write the head");
    let line = first_line_on(&mut stream, "the invitation").await;
    assert_eq!(line, "HTTP/1.1 100 Continue");
    stream
        .write_all(body.as_bytes())
        .await
        .expect("write the body");
    let line = first_line_on(&mut stream, "the answer").await;
    assert!(line.starts_with("HTTP/1.1 404"), "an unknown key: {line}");
}

/// A client of either protocol, speaking h2 with prior knowledge when asked.
fn client(h2: bool) -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(h2);
    builder.build_http()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_options_answer_on_both_protocols() {
    let backend = Backend::embedded();
    let server = start(&backend, |_| {}).await;
    let base = server.running.url();
    for h2 in [false, true] {
        let protocol = if h2 { "h2" } else { "http/1.1" };
        let client = client(h2);
        let send = |method: Method, path: &str| {
            let request = Request::builder()
                .method(method)
                .uri(format!("{base}{path}"))
                .body(Full::new(Bytes::new()))
                .expect("a request");
            let client = client.clone();
            bounded(format!("{protocol} answer"), async move {
                let response = client.request(request).await.expect("an answer");
                let (parts, body) = response.into_parts();
                let body = body.collect().await.expect("a body").to_bytes();
                (parts, body)
            })
        };
        for path in ["/health", "/health/live", "/health/ready", "/openapi.json"] {
            let (get, get_body) = send(Method::GET, path).await;
            let (head, head_body) = send(Method::HEAD, path).await;
            assert_eq!(head.status, get.status, "{protocol} HEAD {path}");
            assert!(
                head_body.is_empty(),
                "{protocol} HEAD {path} carried a body"
            );
            assert_eq!(
                head.headers
                    .get("content-length")
                    .and_then(|v| v.to_str().ok()),
                Some(get_body.len().to_string().as_str()),
                "{protocol} HEAD {path}: the GET's length"
            );
            assert_eq!(
                head.headers.get("content-type"),
                get.headers.get("content-type"),
                "{protocol} HEAD {path}"
            );
        }
        for (path, allow) in [
            ("/api/incoming-call/", "POST, OPTIONS"),
            ("/api/android-device", "POST, DELETE, OPTIONS"),
            ("/health/", "GET, HEAD, OPTIONS"),
            ("/metrics", "GET, HEAD, OPTIONS"),
        ] {
            let (options, body) = send(Method::OPTIONS, path).await;
            assert_eq!(
                options.status,
                StatusCode::NO_CONTENT,
                "{protocol} OPTIONS {path}"
            );
            assert!(body.is_empty());
            assert_eq!(options.headers["allow"], allow, "{protocol} OPTIONS {path}");
            // A method the route does not answer: 405, with the same Allow.
            let (refused, _) = send(Method::PUT, path).await;
            assert_eq!(
                refused.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{protocol} PUT {path}"
            );
            assert_eq!(refused.headers["allow"], allow, "{protocol} PUT {path}");
        }
        // HEAD where only POST is answered: 405 with Allow, and still no body.
        let (head, body) = send(Method::HEAD, "/api/call-response").await;
        assert_eq!(head.status, StatusCode::METHOD_NOT_ALLOWED, "{protocol}");
        assert_eq!(head.headers["allow"], "POST, OPTIONS", "{protocol}");
        assert!(body.is_empty(), "{protocol}: a HEAD answer carried a body");
        // Unknown paths stay 404 for both.
        let (options, _) = send(Method::OPTIONS, "/nowhere").await;
        assert_eq!(options.status, StatusCode::NOT_FOUND, "{protocol}");
        let (head, body) = send(Method::HEAD, "/nowhere").await;
        assert_eq!(head.status, StatusCode::NOT_FOUND, "{protocol}");
        assert!(body.is_empty(), "{protocol}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_does_not_hold_up_shutdown() {
    let backend = Backend::embedded();
    // A shutdown timeout far past the bound: only parked calls may use it.
    let server = start(&backend, |c| c.shutdown_timeout_secs = 120).await;
    let mut stream = TcpStream::connect(server.running.addr)
        .await
        .expect("connect");
    // Pipeline requests for a large document and read none of the answers,
    // until the server stops reading because it cannot write.
    // Padded heads, so the socket buffers fill within a few thousand.
    let request = format!(
        "GET /openapi.json HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(6000)
    );
    let mut stalled = false;
    for _ in 0..20_000 {
        let write = stream.write_all(request.as_bytes());
        match tokio::time::timeout(Duration::from_millis(500), write).await {
            Ok(written) => written.expect("write"),
            Err(_) => {
                stalled = true;
                break;
            }
        }
    }
    assert!(
        stalled,
        "the server kept reading while its answers went unread"
    );
    let stopped = tokio::time::timeout(BOUND, server.running.stop()).await;
    assert!(
        stopped.is_ok(),
        "shutdown waited for a client that does not read, with nothing parked"
    );
}

//! Just enough SIP over UDP for the bench: a message parser, the caller
//! (INVITE, ACK, BYE, timed on its own socket) and the phone (REGISTER,
//! answering the INVITE and the BYE).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::common::digest::{password, Challenge};

/// A SIP message, parsed loosely: start line and headers in order (the
/// body is not needed).
#[derive(Debug, Clone)]
pub struct Message {
    pub start: String,
    pub headers: Vec<(String, String)>,
}

/// The long form of a compact header name.
fn long_name(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    match lower.as_str() {
        "v" => "via",
        "f" => "from",
        "t" => "to",
        "i" => "call-id",
        "m" => "contact",
        "l" => "content-length",
        "c" => "content-type",
        _ => return lower,
    }
    .to_owned()
}

impl Message {
    pub fn parse(bytes: &[u8]) -> Result<Message> {
        let text = std::str::from_utf8(bytes).context("SIP is text")?;
        let (head, _body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no end of headers in {text:?}"))?;
        let mut lines = head.split("\r\n");
        let start = lines.next().unwrap_or_default().to_owned();
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in lines {
            if line.starts_with([' ', '\t']) {
                if let Some(last) = headers.last_mut() {
                    last.1.push(' ');
                    last.1.push_str(line.trim());
                }
                continue;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| anyhow!("a header without a colon: {line:?}"))?;
            headers.push((long_name(name.trim()), value.trim().to_owned()));
        }
        Ok(Message { start, headers })
    }

    /// The first value of the header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = long_name(name);
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every header line named `name`, as `Name: value`, in order.
    pub fn lines(&self, name: &str, display: &str) -> String {
        let name = long_name(name);
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| format!("{display}: {v}\r\n"))
            .collect()
    }

    /// The status code of a response.
    pub fn status(&self) -> Option<u16> {
        let rest = self.start.strip_prefix("SIP/2.0 ")?;
        rest.get(..3)?.parse().ok()
    }

    /// The method of a request.
    pub fn method(&self) -> Option<&str> {
        if self.start.starts_with("SIP/2.0 ") {
            return None;
        }
        self.start.split(' ').next()
    }

    /// The method named in CSeq.
    pub fn cseq_method(&self) -> &str {
        self.header("cseq")
            .and_then(|c| c.split_whitespace().nth(1))
            .unwrap_or_default()
    }

    pub fn call_id(&self) -> &str {
        self.header("call-id").unwrap_or_default()
    }
}

/// The URI inside `<...>` of a name-addr header value.
fn uri_of(value: &str) -> Option<&str> {
    let start = value.find('<')? + 1;
    let end = value[start..].find('>')? + start;
    Some(&value[start..end])
}

fn random_hex() -> String {
    call_notifier::calls::random_key()[..16].to_owned()
}

fn sdp(who: &str, port: u16) -> String {
    format!(
        "v=0\r\no={who} 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
}

/// Waits on `socket` for a message that `wanted` accepts (or fails on),
/// for at most `within`; the others are dropped.
async fn receive(
    socket: &UdpSocket,
    within: Duration,
    what: &str,
    mut wanted: impl FnMut(&Message) -> Result<bool>,
) -> Result<(Instant, Message)> {
    let until = Instant::now() + within;
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, _) = tokio::time::timeout_at(until, socket.recv_from(&mut buf))
            .await
            .map_err(|_| anyhow!("{what}: nothing within {within:?}"))??;
        let at = Instant::now();
        let message = Message::parse(&buf[..n])?;
        if wanted(&message)? {
            return Ok((at, message));
        }
    }
}

/// What the caller saw of one call.
#[derive(Debug)]
pub struct Answered {
    pub invite_sent: Instant,
    pub ok_received: Instant,
}

/// The caller: a fixed-line side with no delay, straight to Kamailio.
pub struct Caller {
    socket: UdpSocket,
    me: SocketAddr,
    proxy: SocketAddr,
}

impl Caller {
    pub async fn bind(proxy: SocketAddr) -> Result<Caller> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        let me = socket.local_addr()?;
        Ok(Caller { socket, me, proxy })
    }

    /// INVITEs `user` with `call_id` and waits for the 200 (a provisional
    /// answer is passed over; a final other than 200 fails the call), then
    /// ACKs it and hangs up with a BYE that must be answered 200.
    pub async fn call(&self, user: &str, call_id: &str, within: Duration) -> Result<Answered> {
        let (me, proxy) = (self.me, self.proxy);
        let tag = random_hex();
        let from = format!("\"Alice\" <sip:0612345678@{me}>;tag={tag}");
        let to = format!("<sip:{user}@{proxy}>");
        let body = sdp("caller", 40_000);
        let invite = format!(
            "INVITE sip:{user}@{proxy} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bK-{branch}\r\n\
             From: {from}\r\n\
             To: {to}\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:0612345678@{me}>\r\n\
             Max-Forwards: 70\r\n\
             Content-Type: application/sdp\r\n\
             Content-Length: {len}\r\n\r\n{body}",
            branch = random_hex(),
            len = body.len(),
        );
        let invite_sent = Instant::now();
        self.socket.send_to(invite.as_bytes(), proxy).await?;
        let (ok_received, ok) = receive(
            &self.socket,
            within,
            "the caller waiting for 200 OK to its INVITE",
            |m| {
                if m.call_id() != call_id || m.cseq_method() != "INVITE" {
                    return Ok(false);
                }
                match m.status() {
                    Some(200) => Ok(true),
                    Some(s) if s < 200 => Ok(false),
                    Some(_) => bail!("the call was not set up: the caller got {:?}", m.start),
                    None => Ok(false),
                }
            },
        )
        .await?;

        // ACK and BYE follow the dialog: to the phone's Contact, through
        // Kamailio (it Record-Routes the INVITE).
        let target = ok
            .header("contact")
            .and_then(uri_of)
            .ok_or_else(|| anyhow!("a 200 without a Contact"))?
            .to_owned();
        let to = ok.header("to").unwrap_or_default().to_owned();
        let routes: Vec<&str> = ok
            .headers
            .iter()
            .filter(|(n, _)| n == "record-route")
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .collect();
        let route: String = routes
            .iter()
            .rev()
            .map(|r| format!("Route: {r}\r\n"))
            .collect();
        let in_dialog = |method: &str, cseq: u32| {
            format!(
                "{method} {target} SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {me};branch=z9hG4bK-{branch}\r\n\
                 From: {from}\r\n\
                 To: {to}\r\n\
                 Call-ID: {call_id}\r\n\
                 CSeq: {cseq} {method}\r\n\
                 {route}\
                 Max-Forwards: 70\r\n\
                 Content-Length: 0\r\n\r\n",
                branch = random_hex(),
            )
        };
        self.socket
            .send_to(in_dialog("ACK", 1).as_bytes(), proxy)
            .await?;
        let bye = in_dialog("BYE", 2);
        let mut answered = false;
        for _ in 0..4 {
            self.socket.send_to(bye.as_bytes(), proxy).await?;
            let got = receive(
                &self.socket,
                Duration::from_millis(1_000),
                "the caller waiting for 200 OK to its BYE",
                |m| {
                    Ok(m.call_id() == call_id
                        && m.cseq_method() == "BYE"
                        && m.status() == Some(200))
                },
            )
            .await;
            if got.is_ok() {
                answered = true;
                break;
            }
        }
        if !answered {
            bail!("the caller's BYE was not answered 200");
        }
        Ok(Answered {
            invite_sent,
            ok_received,
        })
    }
}

/// Messages that reached the phone, kept until asked for: the INVITE may
/// come before the answer to the REGISTER that released it.
struct Inbox {
    backlog: Vec<(Instant, Message)>,
}

/// The phone: it talks to the world through the delaying relay, which it
/// reaches at `relay` and which is the phone's address to Kamailio
/// (`public`: the Via and the Contact name it).
pub struct Phone {
    socket: UdpSocket,
    inbox: tokio::sync::Mutex<Inbox>,
    relay: SocketAddr,
    public: SocketAddr,
    proxy: SocketAddr,
    cseq: AtomicU32,
    /// The proxy's last digest challenge, signed with until it says stale.
    challenge: std::sync::Mutex<Option<Challenge>>,
    /// The nonce count (`nc`) of the next use of that challenge's nonce.
    nonce_uses: AtomicU32,
}

/// The RFC 8599 push parameters of a Contact.
pub struct PushParameters<'a> {
    pub token: &'a str,
    pub project: &'a str,
}

impl Phone {
    pub async fn bind(relay: SocketAddr, public: SocketAddr, proxy: SocketAddr) -> Result<Phone> {
        Ok(Phone {
            socket: UdpSocket::bind("127.0.0.1:0").await?,
            inbox: tokio::sync::Mutex::new(Inbox {
                backlog: Vec::new(),
            }),
            relay,
            public,
            proxy,
            cseq: 1.into(),
            challenge: std::sync::Mutex::new(None),
            nonce_uses: 1.into(),
        })
    }

    /// Drops what was kept of earlier calls.
    pub async fn forget(&self) {
        self.inbox.lock().await.backlog.clear();
    }

    /// The first message kept or arriving within `within` that `wanted`
    /// accepts; the others are kept.
    async fn take(
        &self,
        within: Duration,
        what: &str,
        wanted: impl Fn(&Message) -> bool,
    ) -> Result<(Instant, Message)> {
        let mut inbox = self.inbox.lock().await;
        if let Some(i) = inbox.backlog.iter().position(|(_, m)| wanted(m)) {
            return Ok(inbox.backlog.remove(i));
        }
        let until = Instant::now() + within;
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, _) = tokio::time::timeout_at(until, self.socket.recv_from(&mut buf))
                .await
                .map_err(|_| anyhow!("{what}: nothing within {within:?}"))??;
            let at = Instant::now();
            let message = Message::parse(&buf[..n])?;
            if wanted(&message) {
                return Ok((at, message));
            }
            inbox.backlog.push((at, message));
        }
    }

    /// REGISTERs `user`'s contact at the relay's address for `expires`
    /// seconds, with push parameters or without, and waits for the answer:
    /// its status. `None` as `push` and 0 as `expires` remove every
    /// binding of the account (`Contact: *`).
    ///
    /// Signed with the account's digest credentials, as a SIP client does:
    /// with the last nonce the proxy gave (no extra round trip while it is
    /// good), and again with a fresh one when challenged (401).
    pub async fn register(
        &self,
        user: &str,
        push: Option<PushParameters<'_>>,
        expires: u32,
    ) -> Result<u16> {
        let (public, proxy) = (self.public, self.proxy);
        let contact = match (&push, expires) {
            (None, 0) => "*".to_owned(),
            (None, _) => format!("<sip:{user}@{public}>"),
            (Some(p), _) => format!(
                "<sip:{user}@{public};pn-provider=fcm;pn-prid={};pn-param={}>",
                p.token, p.project
            ),
        };
        let call_id = format!("reg-{user}-{}", random_hex());
        let tag = random_hex();
        let uri = format!("sip:{proxy}");
        let password = password(user);
        for _ in 0..2 {
            let challenge = self.challenge.lock().expect("challenge lock").clone();
            let authorization = challenge.map(|c| {
                let nc = self.nonce_uses.fetch_add(1, Ordering::Relaxed);
                let signed =
                    c.authorization((user, &password), ("REGISTER", &uri), nc, &random_hex());
                format!("Authorization: {signed}\r\n")
            });
            let cseq = self.cseq.fetch_add(1, Ordering::Relaxed);
            let register = format!(
                "REGISTER {uri} SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {public};branch=z9hG4bK-{branch}\r\n\
                 From: <sip:{user}@{host}>;tag={tag}\r\n\
                 To: <sip:{user}@{host}>\r\n\
                 Call-ID: {call_id}\r\n\
                 CSeq: {cseq} REGISTER\r\n\
                 Contact: {contact}\r\n\
                 Expires: {expires}\r\n\
                 {authorization}\
                 Max-Forwards: 70\r\n\
                 User-Agent: call-notifier-sip-bench/1\r\n\
                 Content-Length: 0\r\n\r\n",
                host = proxy.ip(),
                branch = random_hex(),
                authorization = authorization.unwrap_or_default(),
            );
            self.socket.send_to(register.as_bytes(), self.relay).await?;
            let (_, answer) = self
                .take(
                    Duration::from_secs(5),
                    "the phone waiting for the answer to its REGISTER",
                    |m| {
                        m.call_id() == call_id
                            && m.cseq_method() == "REGISTER"
                            && m.header("cseq")
                                .is_some_and(|c| c.starts_with(&format!("{cseq} ")))
                            && m.status().is_some_and(|s| s >= 200)
                    },
                )
                .await?;
            let status = answer.status().context("a status")?;
            if status != 401 {
                return Ok(status);
            }
            let challenge = answer
                .header("www-authenticate")
                .and_then(Challenge::parse)
                .context("a 401 without a digest challenge")?;
            *self.challenge.lock().expect("challenge lock") = Some(challenge);
            self.nonce_uses.store(1, Ordering::Relaxed);
        }
        bail!("the REGISTER of {user} was challenged twice: its credentials are refused")
    }

    /// Waits for the INVITE of `call_id` and answers it 200 at once, then
    /// waits for the caller's ACK and BYE, and answers the BYE 200.
    pub async fn answer(&self, user: &str, call_id: &str, within: Duration) -> Result<()> {
        let (_, invite) = self
            .take(within, "the phone waiting for the INVITE", |m| {
                m.method() == Some("INVITE") && m.call_id() == call_id
            })
            .await?;
        let body = sdp("phone", 40_002);
        let ok = format!(
            "SIP/2.0 200 OK\r\n\
             {via}\
             {record_route}\
             From: {from}\r\n\
             To: {to};tag={tag}\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq}\r\n\
             Contact: <sip:{user}@{public}>\r\n\
             Content-Type: application/sdp\r\n\
             Content-Length: {len}\r\n\r\n{body}",
            via = invite.lines("via", "Via"),
            record_route = invite.lines("record-route", "Record-Route"),
            from = invite.header("from").unwrap_or_default(),
            to = invite.header("to").unwrap_or_default(),
            tag = random_hex(),
            cseq = invite.header("cseq").unwrap_or_default(),
            public = self.public,
            len = body.len(),
        );
        self.socket.send_to(ok.as_bytes(), self.relay).await?;
        let in_dialog = |method: &'static str| {
            move |m: &Message| m.method() == Some(method) && m.call_id() == call_id
        };
        self.take(
            Duration::from_secs(5),
            "the phone waiting for the caller's ACK to its 200",
            in_dialog("ACK"),
        )
        .await?;
        let (_, bye) = self
            .take(
                Duration::from_secs(5),
                "the phone waiting for the caller's BYE",
                in_dialog("BYE"),
            )
            .await?;
        let ok = format!(
            "SIP/2.0 200 OK\r\n\
             {via}\
             From: {from}\r\n\
             To: {to}\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq}\r\n\
             Content-Length: 0\r\n\r\n",
            via = bye.lines("via", "Via"),
            from = bye.header("from").unwrap_or_default(),
            to = bye.header("to").unwrap_or_default(),
            cseq = bye.header("cseq").unwrap_or_default(),
        );
        self.socket.send_to(ok.as_bytes(), self.relay).await?;
        Ok(())
    }
}

//! The PBX and the phones: calls at a steady rate, each with an outcome
//! chosen in advance, and a check that every call got the answer its
//! outcome calls for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};

use crate::pushes::Pushes;

/// What a call is meant to end with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The app answers available: ACK.
    Ack,
    /// The app answers not available: NAK.
    NotAvailable,
    /// The app never answers: NAK at the wait.
    Timeout,
    /// No device for the SIP account: NAK at once, no push.
    NoDevice,
    /// The PBX hangs up once the phone was pushed.
    HangUp,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Ack,
        Kind::NotAvailable,
        Kind::Timeout,
        Kind::NoDevice,
        Kind::HangUp,
    ];

    /// The mix: 60 % ACK, 10 % each of the rest, interleaved.
    pub fn of(n: u64) -> Kind {
        match n % 10 {
            0..=5 => Kind::Ack,
            6 => Kind::NotAvailable,
            7 => Kind::Timeout,
            8 => Kind::NoDevice,
            _ => Kind::HangUp,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Ack => "ACK",
            Kind::NotAvailable => "not available",
            Kind::Timeout => "timeout",
            Kind::NoDevice => "no device",
            Kind::HangUp => "PBX hang-up",
        }
    }

    fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).expect("listed")
    }
}

/// What every call shares.
pub struct Ctx {
    pub base: String,
    pub client: Client<HttpConnector, Full<Bytes>>,
    pub pushes: Arc<Pushes>,
    /// SIP accounts `first_user..first_user + devices` have a device.
    pub first_user: u64,
    pub devices: u64,
    /// Keys start with this, so leftovers of this run can be told apart.
    pub key_prefix: String,
    pub wait: Duration,
}

/// Per outcome: calls, failures and how long the PBX waited.
#[derive(Default)]
pub struct Tally {
    pub done: AtomicU64,
    per_kind: Mutex<[KindStats; 5]>,
    failures: Mutex<Vec<String>>,
}

#[derive(Default, Clone)]
pub struct KindStats {
    pub calls: u64,
    pub failed: u64,
    /// PBX request times, in microseconds.
    pub waited_us: Vec<u64>,
}

impl Tally {
    fn record(&self, kind: Kind, result: Result<Duration>) {
        self.done.fetch_add(1, Ordering::Relaxed);
        let mut stats = self.per_kind.lock().expect("tally lock");
        let stats = &mut stats[kind.index()];
        stats.calls += 1;
        match result {
            Ok(waited) => stats.waited_us.push(waited.as_micros() as u64),
            Err(e) => {
                stats.failed += 1;
                let mut failures = self.failures.lock().expect("failures lock");
                if failures.len() < 20 {
                    failures.push(format!("{}: {e:#}", kind.name()));
                }
            }
        }
    }

    pub fn per_kind(&self) -> Vec<(Kind, KindStats)> {
        let stats = self.per_kind.lock().expect("tally lock");
        Kind::ALL
            .iter()
            .map(|k| (*k, stats[k.index()].clone()))
            .collect()
    }

    pub fn failed(&self) -> u64 {
        self.per_kind
            .lock()
            .expect("tally lock")
            .iter()
            .map(|s| s.failed)
            .sum()
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().expect("failures lock").clone()
    }
}

impl Ctx {
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Result<(StatusCode, String)> {
        let body = serde_urlencoded::to_string(form)?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))?;
        let response = self.client.request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Registers the devices every call but the no-device ones rings.
    pub async fn register_devices(self: &Arc<Self>) -> Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..self.devices {
            let ctx = self.clone();
            tasks.spawn(async move {
                let user = (ctx.first_user + n).to_string();
                let token = format!("soak-token-{user}");
                let (status, body) = ctx
                    .post(
                        "/api/android-device/",
                        &[
                            ("sip_user_id", &user),
                            ("token", &token),
                            ("app", crate::server::APP_ID),
                        ],
                    )
                    .await?;
                if !status.is_success() {
                    bail!("registering {user}: {status} {body}");
                }
                Ok(())
            });
            if tasks.len() >= 32 {
                tasks.join_next().await.expect("a task")??;
            }
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(())
    }

    fn incoming_call(
        self: &Arc<Self>,
        user: u64,
        key: &str,
    ) -> tokio::task::JoinHandle<Result<String>> {
        let ctx = self.clone();
        let (user, key) = (user.to_string(), key.to_owned());
        tokio::spawn(async move {
            let (status, body) = ctx
                .post(
                    "/api/incoming-call/",
                    &[
                        ("sip_user_id", &user),
                        ("phonenumber", "+31501234567"),
                        ("caller_id", "Soak"),
                        ("call_id", &key),
                    ],
                )
                .await?;
            if status != StatusCode::OK {
                bail!("incoming-call answered {status}: {body}");
            }
            Ok(body)
        })
    }

    async fn answer(&self, key: &str, start: &str, available: bool) -> Result<()> {
        let (status, body) = self
            .post(
                "/api/call-response/",
                &[
                    ("unique_key", key),
                    ("message_start_time", start),
                    ("available", if available { "true" } else { "false" }),
                ],
            )
            .await?;
        if status != StatusCode::ACCEPTED {
            bail!("call-response answered {status}: {body}");
        }
        Ok(())
    }

    /// One call, played to its end; how long the PBX waited.
    async fn call(self: Arc<Self>, n: u64, kind: Kind) -> Result<Duration> {
        let key = format!("{}{n}", self.key_prefix);
        let started = Instant::now();
        if kind == Kind::NoDevice {
            // Accounts past the registered ones have no device.
            let user = self.first_user + self.devices + n % 1000;
            let reply = self.incoming_call(user, &key).await??;
            if reply != "status=NAK" {
                bail!("expected NAK, got {reply:?}");
            }
            return Ok(started.elapsed());
        }
        let user = self.first_user + n % self.devices;
        let pushed = self.pushes.expect(&key);
        let pbx = self.incoming_call(user, &key);
        let push = match tokio::time::timeout(self.wait * 4, pushed).await {
            Ok(Ok(push)) => push,
            _ => {
                self.pushes.forget(&key);
                let reply = pbx.await;
                bail!("no push within {:?}; the PBX got {reply:?}", self.wait * 4);
            }
        };
        let expected = match kind {
            Kind::Ack => {
                self.answer(&key, &push.message_start_time, true).await?;
                "status=ACK"
            }
            Kind::NotAvailable => {
                self.answer(&key, &push.message_start_time, false).await?;
                "status=NAK"
            }
            Kind::Timeout => "status=NAK",
            Kind::HangUp => {
                // Dropping the request closes its connection mid-wait.
                pbx.abort();
                return Ok(started.elapsed());
            }
            Kind::NoDevice => unreachable!("handled above"),
        };
        let reply = pbx.await.context("the PBX task")??;
        let waited = started.elapsed();
        if reply != expected {
            bail!("expected {expected}, got {reply:?} after {waited:?}");
        }
        if kind == Kind::Timeout && waited < self.wait {
            bail!("NAK after {waited:?}, before the wait of {:?}", self.wait);
        }
        Ok(waited)
    }
}

/// Places `calls` calls at `rate` per second (open loop: a slow server
/// does not slow the arrivals, up to `max_in_flight`), and returns how long
/// placing them took, once every call has ended. `tick` is called about
/// once a second with the calls placed so far.
pub async fn run(
    ctx: Arc<Ctx>,
    tally: Arc<Tally>,
    calls: u64,
    rate: f64,
    max_in_flight: usize,
    mut tick: impl FnMut(u64) -> Result<()>,
) -> Result<Duration> {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let started = Instant::now();
    let mut placed = 0u64;
    let mut every = tokio::time::interval(Duration::from_millis(10));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_tick = Instant::now();
    while placed < calls {
        every.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate) as u64).min(calls);
        while placed < due {
            let permit = slots.clone().acquire_owned().await?;
            let (ctx, tally) = (ctx.clone(), tally.clone());
            let n = placed;
            tokio::spawn(async move {
                let kind = Kind::of(n);
                let result = ctx.call(n, kind).await;
                tally.record(kind, result);
                drop(permit);
            });
            placed += 1;
        }
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            tick(placed)?;
        }
    }
    let placing = started.elapsed();
    // Every call still in flight ends within its wait.
    let _all = slots
        .acquire_many(u32::try_from(max_in_flight).expect("a small number"))
        .await?;
    Ok(placing)
}

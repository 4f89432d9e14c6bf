//! The traffic: accounts and their phones, calls of every kind placed at a
//! seeded pace on random instances, phones that answer as their call's kind
//! says (each answer to a random instance), and the record of what the PBX
//! and the phones saw.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};

use crate::common::{fcm::PROJECT, Reply, APP};
use crate::events::{Answer, Call, Cancel, Kind, Ms, PbxEnd, Push};
use crate::fleet::Fleet;
use crate::recorder::Recorder;

/// How long after its end an account stays with its call: late answers
/// and notices still come.
const HOLD_AFTER_END: Duration = Duration::from_secs(4);

/// One SIP account and its phones.
pub struct Account {
    pub sip_user_id: i64,
    /// FCM tokens of app-registered Android phones.
    pub android: Vec<String>,
    /// The FCM token of a phone a SIP proxy registered, if any.
    pub proxy: Option<String>,
    /// Whether it also has an iPhone on the log-only app (never answers).
    pub ios: bool,
}

impl Account {
    fn tokens(&self) -> Vec<String> {
        self.android.iter().chain(&self.proxy).cloned().collect()
    }
}

/// The accounts for a run, made from its seed.
pub fn accounts(seed: u64, count: usize) -> Vec<Account> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xacc0);
    (0..count)
        .map(|n| {
            let sip_user_id = 100_000 + n as i64;
            let proxied = n % 6 == 5;
            let apps = if proxied {
                rng.random_range(0..=1)
            } else {
                rng.random_range(1..=3)
            };
            Account {
                sip_user_id,
                android: (1..=apps)
                    .map(|d| format!("fcm-{sip_user_id}-{d}"))
                    .collect(),
                proxy: proxied.then(|| format!("fcm-{sip_user_id}-proxy")),
                ios: rng.random_bool(0.2),
            }
        })
        .collect()
}

/// One call of the schedule: when, what kind, and the seed of its details.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub at: Ms,
    pub kind: Kind,
    pub seed: u64,
}

/// The calls of a run: `rate` a second for `duration`, kinds at random.
pub fn schedule(seed: u64, rate: f64, duration: Ms) -> Vec<Plan> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xca11);
    let weights = [
        (Kind::Answer, 20),
        (Kind::AnswerTwice, 6),
        (Kind::Decline, 8),
        (Kind::DeclineThenAnswer, 6),
        (Kind::NoAnswer, 6),
        (Kind::Late, 6),
        (Kind::Stale, 6),
        (Kind::HangUp, 8),
        (Kind::Cancel, 8),
        (Kind::Fork, 4),
        (Kind::Register, 10),
    ];
    let total: u32 = weights.iter().map(|(_, w)| w).sum();
    let mut plans = Vec::new();
    let mut at = 0.0;
    loop {
        // Exponential gaps: a Poisson stream of calls.
        at += -(1.0 - rng.random::<f64>()).ln() / rate * 1000.0;
        if at >= duration as f64 {
            return plans;
        }
        let mut pick = rng.random_range(0..total);
        let kind = weights
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map(|(k, _)| *k)
            .expect("a kind");
        plans.push(Plan {
            at: at as Ms,
            kind,
            seed: rng.random(),
        });
    }
}

/// What one phone does with its call's first push.
#[derive(Debug, Clone, Copy)]
enum Role {
    Ignore,
    Answer {
        after: Ms,
        available: bool,
        twice: bool,
    },
    Stale {
        after: Ms,
    },
    /// Answers available this long after the PBX had its answer.
    Late {
        after: Ms,
    },
    Register {
        after: Ms,
    },
}

/// A call ringing: its record's index, and what each phone does.
struct Live {
    call: usize,
    roles: HashMap<String, Role>,
    woken: Mutex<HashSet<String>>,
    /// True once the PBX had its answer.
    over: watch::Receiver<bool>,
}

/// A delivered call push, and its `message_start_time` as sent.
pub struct Woken {
    pub push: Push,
    pub message_start_time: String,
}

pub struct Traffic {
    pub rec: Arc<Recorder>,
    pub fleet: Arc<Fleet>,
    pub wait_ms: Ms,
    accounts: Vec<Account>,
    plain: Mutex<Vec<usize>>,
    proxied: Mutex<Vec<usize>>,
    ringing: Mutex<HashMap<(String, i64), Arc<Live>>>,
    by_token: HashMap<String, i64>,
    /// Calls skipped for want of a free account or a live instance.
    pub skipped: Mutex<usize>,
}

impl Traffic {
    pub fn new(
        rec: Arc<Recorder>,
        fleet: Arc<Fleet>,
        wait_ms: Ms,
        accounts: Vec<Account>,
    ) -> Arc<Traffic> {
        let by_token = accounts
            .iter()
            .flat_map(|a| a.tokens().into_iter().map(|t| (t, a.sip_user_id)))
            .collect::<HashMap<_, _>>();
        rec.with(|o| o.accounts = by_token.clone().into_iter().collect());
        let (proxied, plain) = (0..accounts.len()).partition(|&i| accounts[i].proxy.is_some());
        Arc::new(Traffic {
            rec,
            fleet,
            wait_ms,
            plain: Mutex::new(plain),
            proxied: Mutex::new(proxied),
            accounts,
            ringing: Mutex::new(HashMap::new()),
            by_token,
            skipped: Mutex::new(0),
        })
    }

    /// Registers every phone: apps through the device API, proxied phones
    /// through `/api/sip-registration/`, `parallel` at a time.
    pub async fn register_all(self: &Arc<Self>, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x4e9);
        let mut requests: Vec<(String, Vec<(String, String)>)> = Vec::new();
        for account in &self.accounts {
            let user = account.sip_user_id.to_string();
            for token in &account.android {
                requests.push((
                    "/api/android-device/".into(),
                    vec![
                        ("sip_user_id".into(), user.clone()),
                        ("token".into(), token.clone()),
                        ("app".into(), APP.into()),
                    ],
                ));
            }
            if let Some(token) = &account.proxy {
                requests.push((
                    "/api/sip-registration/".into(),
                    register_fields(account.sip_user_id, token),
                ));
            }
            if account.ios {
                let token: String = (0..64)
                    .map(|_| char::from_digit(rng.random_range(0..16), 16).expect("a hex digit"))
                    .collect();
                requests.push((
                    "/api/apns-device/".into(),
                    vec![
                        ("sip_user_id".into(), user.clone()),
                        ("token".into(), token),
                        ("app".into(), APP.into()),
                    ],
                ));
            }
        }
        let requests = Arc::new(Mutex::new(requests));
        let mut workers = Vec::new();
        for _ in 0..16 {
            let (requests, traffic) = (requests.clone(), self.clone());
            workers.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(7);
                loop {
                    let Some((path, fields)) = requests.lock().expect("requests").pop() else {
                        return;
                    };
                    let (client, _) = traffic.fleet.pick(&mut rng).expect("a live instance");
                    let fields: Vec<(&str, &str)> = fields
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let reply = client.post(&path, &fields).await;
                    assert!(
                        reply.status.is_success(),
                        "registering {fields:?} at {path}: {} {}",
                        reply.status,
                        reply.body
                    );
                }
            }));
        }
        for worker in workers {
            worker.await.expect("a registration worker");
        }
    }

    /// Places the calls of `plans` at their times; returns once the last
    /// has been placed (not ended).
    pub async fn drive(self: &Arc<Self>, plans: Vec<Plan>, probes_every: Ms) {
        let mut next_probe = probes_every;
        for plan in plans {
            tokio::time::sleep_until(self.rec.instant(plan.at).into()).await;
            if plan.at >= next_probe {
                next_probe += probes_every;
                tokio::spawn(self.clone().probe(plan.seed));
            }
            tokio::spawn(self.clone().place(plan));
        }
    }

    /// Takes a free account of the pool `proxied` or not, at random.
    fn take(&self, proxied: bool, rng: &mut StdRng, at_least: usize) -> Option<usize> {
        let mut pool = if proxied { &self.proxied } else { &self.plain }
            .lock()
            .expect("pool");
        let fits: Vec<usize> = (0..pool.len())
            .filter(|&p| self.accounts[pool[p]].tokens().len() >= at_least)
            .collect();
        if fits.is_empty() {
            return None;
        }
        Some(pool.swap_remove(fits[rng.random_range(0..fits.len())]))
    }

    fn give_back(&self, account: usize) {
        let pool = if self.accounts[account].proxy.is_some() {
            &self.proxied
        } else {
            &self.plain
        };
        pool.lock().expect("pool").push(account);
    }

    fn skip(&self) {
        *self.skipped.lock().expect("skipped") += 1;
    }

    async fn place(self: Arc<Self>, plan: Plan) {
        let mut rng = StdRng::seed_from_u64(plan.seed);
        let call_id = format!("{:032x}", rng.random::<u128>());
        match plan.kind {
            Kind::Fork => {
                let legs = rng.random_range(2..=3);
                let mut accounts = Vec::new();
                for _ in 0..legs {
                    match self.take(false, &mut rng, 1) {
                        Some(a) => accounts.push(a),
                        None => break,
                    }
                }
                if accounts.len() < 2 {
                    accounts.into_iter().for_each(|a| self.give_back(a));
                    return self.skip();
                }
                self.fork(&mut rng, call_id, accounts).await;
            }
            kind => {
                let proxied = kind == Kind::Register;
                let at_least = if kind == Kind::DeclineThenAnswer {
                    2
                } else {
                    1
                };
                let Some(account) = self.take(proxied, &mut rng, at_least) else {
                    return self.skip();
                };
                let roles = roles(kind, &self.accounts[account], &mut rng);
                let hang_up = (kind == Kind::HangUp).then(|| rng.random_range(500..3_000));
                let cancel = (kind == Kind::Cancel).then(|| rng.random_range(500..3_000));
                let by_account = rng.random_bool(0.5);
                let Some((index, over)) = self.open(kind, &call_id, account, None, roles, &mut rng)
                else {
                    self.give_back(account);
                    return self.skip();
                };
                if let Some(after) = cancel {
                    let traffic = self.clone();
                    let sip = by_account.then_some(self.accounts[account].sip_user_id);
                    let call_id = call_id.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(after)).await;
                        traffic.cancel(&call_id, sip, vec![index]).await;
                    });
                }
                self.pbx(index, hang_up, over, &mut rng).await;
                self.finish(&call_id, account).await;
            }
        }
    }

    /// A ring group: one call per account with one Call-ID; the first
    /// leg's chosen phone answers, then the PBX cancels the Call-ID.
    async fn fork(self: &Arc<Self>, rng: &mut StdRng, call_id: String, accounts: Vec<usize>) {
        let mut legs = Vec::new();
        let mut group = None;
        for (n, &account) in accounts.iter().enumerate() {
            let kind = if n == 0 { Kind::Answer } else { Kind::NoAnswer };
            let roles = roles(kind, &self.accounts[account], rng);
            match self.open(Kind::Fork, &call_id, account, group, roles, rng) {
                Some((index, over)) => {
                    group.get_or_insert(index);
                    legs.push((index, over, account));
                }
                None => self.give_back(account),
            }
        }
        let indexes: Vec<usize> = legs.iter().map(|(i, _, _)| *i).collect();
        let mut pbxes = Vec::new();
        for (n, (index, over, _)) in legs.iter().enumerate() {
            let traffic = self.clone();
            let (index, over) = (*index, over.clone());
            let mut rng = StdRng::seed_from_u64(rng.random());
            let first = n == 0;
            let indexes = indexes.clone();
            let call_id = call_id.clone();
            pbxes.push(tokio::spawn(async move {
                traffic.pbx(index, None, over, &mut rng).await;
                if first {
                    // The proxy cancels the other branches.
                    traffic.cancel(&call_id, None, indexes).await;
                }
            }));
        }
        for pbx in pbxes {
            let _ = pbx.await;
        }
        for (_, _, account) in legs {
            self.finish(&call_id, account).await;
        }
    }

    /// Records a call about to be placed and makes its phones ready.
    fn open(
        &self,
        kind: Kind,
        call_id: &str,
        account: usize,
        group: Option<usize>,
        roles: HashMap<String, Role>,
        rng: &mut StdRng,
    ) -> Option<(usize, watch::Sender<bool>)> {
        let (_, lifetime) = self.fleet.pick(rng)?;
        let sip_user_id = self.accounts[account].sip_user_id;
        let index = self.rec.with(|o| {
            o.calls.push(Call {
                kind,
                sip_user_id,
                call_id: call_id.to_owned(),
                group,
                lifetime,
                sent: 0,
                end: PbxEnd::Refused,
            });
            o.calls.len() - 1
        });
        let (over, watching) = watch::channel(false);
        self.ringing.lock().expect("ringing").insert(
            (call_id.to_owned(), sip_user_id),
            Arc::new(Live {
                call: index,
                roles,
                woken: Mutex::new(HashSet::new()),
                over: watching,
            }),
        );
        Some((index, over))
    }

    /// The PBX's request for call `index`, on the instance it was recorded
    /// for; hangs up after `hang_up` ms when given.
    async fn pbx(
        &self,
        index: usize,
        hang_up: Option<Ms>,
        over: watch::Sender<bool>,
        rng: &mut StdRng,
    ) {
        let (sip_user_id, call_id, lifetime) = self.rec.with(|o| {
            (
                o.calls[index].sip_user_id,
                o.calls[index].call_id.clone(),
                o.calls[index].lifetime,
            )
        });
        // The instance the call was recorded on, if still live; else another.
        let client = (0..8)
            .find_map(|_| self.fleet.pick(rng).filter(|(_, l)| *l == lifetime))
            .or_else(|| self.fleet.pick(rng));
        let Some((client, lifetime)) = client else {
            let _ = over.send(true);
            return;
        };
        let user = sip_user_id.to_string();
        let fields = [
            ("sip_user_id", user.as_str()),
            ("phonenumber", "+31501234567"),
            ("caller_id", "Chaos"),
            ("call_id", call_id.as_str()),
        ];
        let sent = self.rec.now();
        self.rec.with(|o| {
            o.calls[index].sent = sent;
            o.calls[index].lifetime = lifetime;
        });
        let request = client.try_post("/api/incoming-call/", &fields);
        let bound = Duration::from_millis(self.wait_ms + 5_000);
        let end = match hang_up {
            Some(after) => {
                tokio::select! {
                    reply = request => self.pbx_end(reply),
                    _ = tokio::time::sleep(Duration::from_millis(after)) => PbxEnd::HungUp { at: self.rec.now() },
                }
            }
            None => match tokio::time::timeout(bound, request).await {
                Ok(reply) => self.pbx_end(reply),
                Err(_) => PbxEnd::Broken {
                    at: self.rec.now(),
                    error: format!("nothing within {bound:?}"),
                },
            },
        };
        self.rec.with(|o| o.calls[index].end = end);
        let _ = over.send(true);
    }

    fn pbx_end(&self, reply: Result<Reply, String>) -> PbxEnd {
        let at = self.rec.now();
        match reply {
            Ok(reply) => PbxEnd::Reply {
                at,
                status: reply.status.as_u16(),
                body: reply.body,
            },
            Err(e) if e.contains("ConnectError") => PbxEnd::Refused,
            Err(error) => PbxEnd::Broken { at, error },
        }
    }

    /// Holds the account while late answers and notices come, then frees it.
    async fn finish(&self, call_id: &str, account: usize) {
        tokio::time::sleep(HOLD_AFTER_END).await;
        self.ringing
            .lock()
            .expect("ringing")
            .remove(&(call_id.to_owned(), self.accounts[account].sip_user_id));
        self.give_back(account);
    }

    /// The PBX's cancel of `call_id` (only `sip_user_id`'s leg when given).
    async fn cancel(&self, call_id: &str, sip_user_id: Option<i64>, calls: Vec<usize>) {
        let mut rng = StdRng::seed_from_u64(calls[0] as u64);
        let Some((client, _)) = self.fleet.pick(&mut rng) else {
            return;
        };
        let user = sip_user_id.map(|s| s.to_string());
        let mut fields = vec![("call_id", call_id)];
        if let Some(user) = &user {
            fields.push(("sip_user_id", user));
        }
        let sent = self.rec.now();
        let reply = client.try_post("/api/incoming-call/cancel/", &fields).await;
        let replied = self.rec.now();
        self.rec.with(|o| {
            o.cancels.push(Cancel {
                calls,
                sent,
                replied,
                status: reply.map_or(0, |r| r.status.as_u16()),
            })
        });
    }

    /// An answer with a key never issued: 404.
    async fn probe(self: Arc<Self>, seed: u64) {
        let key = format!("probe{seed:016x}");
        let push = Push {
            at: 0,
            token: "probe".into(),
            kind: "call".into(),
            unique_key: key,
            call_id: None,
            reason: None,
            attempt: None,
            delivered: true,
        };
        self.answer(None, &push, "1700000000", true, false, false)
            .await;
    }

    /// Hands each delivered call push to its phone.
    pub async fn phones(self: Arc<Self>, mut woken: mpsc::UnboundedReceiver<Woken>) {
        while let Some(Woken {
            push,
            message_start_time,
        }) = woken.recv().await
        {
            let Some(call_id) = push.call_id.clone() else {
                continue;
            };
            let Some(&sip_user_id) = self.by_token.get(&push.token) else {
                continue;
            };
            let live = self
                .ringing
                .lock()
                .expect("ringing")
                .get(&(call_id, sip_user_id))
                .cloned();
            let Some(live) = live else { continue };
            if !live.woken.lock().expect("woken").insert(push.token.clone()) {
                continue;
            }
            let role = live.roles.get(&push.token).copied().unwrap_or(Role::Ignore);
            tokio::spawn(self.clone().phone(live, push, message_start_time, role));
        }
    }

    async fn phone(self: Arc<Self>, live: Arc<Live>, push: Push, mst: String, role: Role) {
        let sleep = |ms: Ms| tokio::time::sleep(Duration::from_millis(ms));
        match role {
            Role::Ignore => {}
            Role::Answer {
                after,
                available,
                twice,
            } => {
                sleep(after).await;
                let late = *live.over.borrow();
                self.answer(Some(live.call), &push, &mst, available, false, late)
                    .await;
                if twice {
                    sleep(300).await;
                    let late = *live.over.borrow();
                    self.answer(Some(live.call), &push, &mst, available, false, late)
                        .await;
                }
            }
            Role::Stale { after } => {
                sleep(after).await;
                let late = *live.over.borrow();
                self.answer(Some(live.call), &push, &mst, true, true, late)
                    .await;
            }
            Role::Late { after } => {
                let mut over = live.over.clone();
                let _ = over.wait_for(|o| *o).await;
                sleep(after).await;
                self.answer(Some(live.call), &push, &mst, true, false, true)
                    .await;
            }
            Role::Register { after } => {
                sleep(after).await;
                let late = *live.over.borrow();
                self.register(live.call, &push, late).await;
            }
        }
    }

    async fn answer(
        &self,
        call: Option<usize>,
        push: &Push,
        mst: &str,
        available: bool,
        stale: bool,
        late: bool,
    ) {
        let mut rng = StdRng::seed_from_u64(push.at ^ u64::from(available));
        let Some((client, _)) = self.fleet.pick(&mut rng) else {
            return;
        };
        let mst = if stale {
            let sent: f64 = mst.parse().unwrap_or(0.0);
            format!("{:.3}", sent - self.wait_ms as f64 / 1000.0 - 1.0)
        } else {
            mst.to_owned()
        };
        let fields = [
            ("unique_key", push.unique_key.as_str()),
            ("message_start_time", mst.as_str()),
            ("available", if available { "true" } else { "false" }),
        ];
        let sent = self.rec.now();
        let reply = self
            .bounded(client.try_post("/api/call-response/", &fields))
            .await;
        self.record(call, push, available, stale, false, late, sent, reply);
    }

    async fn register(&self, call: usize, push: &Push, late: bool) {
        let mut rng = StdRng::seed_from_u64(push.at);
        let Some((client, _)) = self.fleet.pick(&mut rng) else {
            return;
        };
        let sip_user_id = self.by_token[&push.token];
        let fields = register_fields(sip_user_id, &push.token);
        let fields: Vec<(&str, &str)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let sent = self.rec.now();
        let reply = self
            .bounded(client.try_post("/api/sip-registration/", &fields))
            .await;
        self.record(Some(call), push, true, false, true, late, sent, reply);
    }

    async fn bounded(
        &self,
        request: impl std::future::Future<Output = Result<Reply, String>>,
    ) -> Option<Reply> {
        match tokio::time::timeout(Duration::from_secs(10), request).await {
            Ok(Ok(reply)) => Some(reply),
            _ => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        call: Option<usize>,
        push: &Push,
        available: bool,
        stale: bool,
        register: bool,
        late: bool,
        sent: Ms,
        reply: Option<Reply>,
    ) {
        let replied = self.rec.now();
        let (status, reason) = match &reply {
            Some(reply) => (
                reply.status.as_u16(),
                serde_json::from_str::<serde_json::Value>(&reply.body)
                    .ok()
                    .and_then(|v| v["reason"].as_str().map(str::to_owned)),
            ),
            None => (0, None),
        };
        self.rec.with(|o| {
            o.answers.push(Answer {
                call,
                token: push.token.clone(),
                unique_key: push.unique_key.clone(),
                available,
                stale,
                register,
                late,
                sent,
                replied,
                status,
                reason,
            })
        });
    }
}

/// A REGISTER's push parameters, as the proxy posts them (RFC 8599).
fn register_fields(sip_user_id: i64, token: &str) -> Vec<(String, String)> {
    vec![
        ("sip_user_id".into(), sip_user_id.to_string()),
        ("pn_provider".into(), "fcm".into()),
        ("pn_prid".into(), token.into()),
        ("pn_param".into(), PROJECT.into()),
        ("expires".into(), "3600".into()),
    ]
}

/// What each phone of `account` does in a call of `kind`.
fn roles(kind: Kind, account: &Account, rng: &mut StdRng) -> HashMap<String, Role> {
    let tokens = account.tokens();
    let mut roles: HashMap<String, Role> =
        tokens.iter().map(|t| (t.clone(), Role::Ignore)).collect();
    let one = |rng: &mut StdRng| tokens[rng.random_range(0..tokens.len())].clone();
    match kind {
        Kind::Answer | Kind::AnswerTwice => {
            roles.insert(
                one(rng),
                Role::Answer {
                    after: rng.random_range(0..3_000),
                    available: true,
                    twice: kind == Kind::AnswerTwice,
                },
            );
        }
        Kind::Decline => {
            for token in &tokens {
                roles.insert(
                    token.clone(),
                    Role::Answer {
                        after: rng.random_range(0..3_000),
                        available: false,
                        twice: false,
                    },
                );
            }
        }
        Kind::DeclineThenAnswer => {
            let first = one(rng);
            let second = tokens
                .iter()
                .find(|t| **t != first)
                .cloned()
                .unwrap_or_else(|| first.clone());
            roles.insert(
                first,
                Role::Answer {
                    after: rng.random_range(0..1_500),
                    available: false,
                    twice: false,
                },
            );
            roles.insert(
                second,
                Role::Answer {
                    after: rng.random_range(1_500..3_000),
                    available: true,
                    twice: false,
                },
            );
        }
        Kind::Late => {
            roles.insert(
                one(rng),
                Role::Late {
                    after: rng.random_range(100..1_000),
                },
            );
        }
        Kind::Stale => {
            let stale = one(rng);
            roles.insert(
                stale.clone(),
                Role::Stale {
                    after: rng.random_range(0..2_000),
                },
            );
            if let Some(other) = tokens.iter().find(|t| **t != stale) {
                if rng.random_bool(0.5) {
                    roles.insert(
                        other.clone(),
                        Role::Answer {
                            after: rng.random_range(2_000..3_000),
                            available: true,
                            twice: false,
                        },
                    );
                }
            }
        }
        Kind::Register => {
            if let Some(proxy) = &account.proxy {
                roles.insert(
                    proxy.clone(),
                    Role::Register {
                        after: rng.random_range(0..3_000),
                    },
                );
            }
        }
        Kind::NoAnswer | Kind::HangUp | Kind::Cancel | Kind::Fork => {}
    }
    roles
}

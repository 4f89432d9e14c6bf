//! The Redis scripts held to the call's state machine (issue #23): the
//! in-process broker runs [`call_notifier::lifecycle`]'s transitions
//! directly; the Redis broker runs them as Lua. A property test applies the
//! same random sequences of events (opens and joins by two accounts sharing
//! one Call-ID, with one to three devices each, some with their deadline
//! already past; answers, declines, stale answers and answers to a push
//! sent before every call to any of the keys in play; ends by the holder
//! of any wait opened, the old calls' under a reused key among them;
//! cancels by the Call-ID, with and without an account, whose marks end
//! the legs opened after them and a call under the Call-ID, but where the
//! key held a call a cancel ended) to both, and compares every verdict and every stored
//! record, step by step, on one Redis and on the Cluster.
//!
//! Changing a transition in either copy makes it fail: with the owner check
//! taken out of the open script, the shrunk sequence is two opens, one by
//! each account, whose second joins the first account's call on Redis and
//! gets a key of its own in process.
//!
//! A second property test holds both brokers to the hang-up rule across
//! instances, which the first cannot (its model is one process): requests
//! for one call reach any of three instances and hang up in any order, and
//! the call ends, and a hang-up says so, only when none rings it any more.
//! With the end script's `leave` taking the call's holders as none, or the
//! open script's join not counting itself, it fails at once: a request on
//! one instance and its retry on another, then the first's hang-up.

mod common;

use std::sync::Arc;
use std::time::Duration;

use call_notifier::broker::memory::MemoryBroker;
use call_notifier::broker::redis::{RedisBroker, RedisOptions};
use call_notifier::broker::{leg_key, CallBroker, Named, Opening, Pushed, Wait};
use call_notifier::lifecycle::{Phase, Record, Stored};
use call_notifier::store::{EndReason, Platform};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// One event of a sequence.
#[derive(Debug, Clone)]
enum Op {
    /// Account `account` (0 or 1) opens the shared Call-ID on `devices`;
    /// `lapsed`: with its deadline already past, so that no answer counts
    /// (the window between the deadline and the holder's end).
    Open {
        account: usize,
        devices: usize,
        lapsed: bool,
    },
    /// An app answers the `key`-th of [`keys`], through instance `via`.
    /// `pushed`: what the answer says of its push (stale, sent before
    /// every call, sent after every call opened, or nothing).
    Answer {
        key: usize,
        available: bool,
        pushed: Pushed,
        via: usize,
    },
    /// The holder of the `wait`-th wait opened (of those so far, taken
    /// round) ends its call: an earlier call's holder under a key that now
    /// holds a newer call ends nothing.
    End { wait: usize, reason: EndReason },
    /// The PBX cancels the Call-ID, for one account or all, through
    /// instance `via`.
    Cancel { account: Option<usize>, via: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let reason = prop::sample::select(EndReason::ALL.to_vec());
    prop_oneof![
        3 => (0..2usize, 1..=3usize, prop::bool::weighted(0.2))
            .prop_map(|(account, devices, lapsed)| Op::Open { account, devices, lapsed }),
        4 => (0..12usize, any::<bool>(), pushed(), 0..2usize)
            .prop_map(|(key, available, pushed, via)| Op::Answer { key, available, pushed, via }),
        1 => (0..4usize, reason).prop_map(|(wait, reason)| Op::End { wait, reason }),
        1 => (prop::option::of(0..2usize), 0..2usize)
            .prop_map(|(account, via)| Op::Cancel { account, via }),
    ]
}

/// The answering instance's wait that answers carry ([`Pushed::At`]).
const WAIT_MS: i64 = 4_000;

/// What an answer says of its push: mostly a push of the call it answers
/// (sent after any call here opened), sometimes stale, one sent before
/// every call (the call before's, under a reused key), or nothing (a
/// REGISTER's answer).
fn pushed() -> impl Strategy<Value = Pushed> {
    prop_oneof![
        14 => Just(Pushed::At { at: i64::MAX / 4, wait: WAIT_MS }),
        3 => Just(Pushed::Stale),
        2 => Just(Pushed::At { at: 0, wait: WAIT_MS }),
        1 => Just(Pushed::Unsaid),
    ]
}

/// The call keys in play for the Call-ID `call_id` and the two accounts.
fn calls(call_id: &str, accounts: [i64; 2]) -> [String; 3] {
    [
        call_id.to_owned(),
        leg_key(call_id, accounts[0]),
        leg_key(call_id, accounts[1]),
    ]
}

/// Every key in play: each call key and its three device keys.
fn keys(call_id: &str, accounts: [i64; 2]) -> Vec<String> {
    calls(call_id, accounts)
        .into_iter()
        .flat_map(|call| {
            (0..4).map(move |n| {
                if n == 0 {
                    call.clone()
                } else {
                    format!("{call}.{n}")
                }
            })
        })
        .collect()
}

/// A record with its deadline taken out: each broker computes it from its
/// own clock reading.
fn comparable(stored: Option<(Stored, Option<i64>)>) -> Option<(Stored, Option<i64>)> {
    stored.map(|(stored, owner)| {
        let stored = match stored {
            Stored::Call(record) => Stored::Call(without_deadline(record)),
            pointer => pointer,
        };
        (stored, owner)
    })
}

fn without_deadline(mut record: Record) -> Record {
    record.phase = match record.phase {
        Phase::Ringing { .. } => Phase::Ringing { until: 0 },
        Phase::Won { .. } => Phase::Won { until: 0 },
        ended => ended,
    };
    record
}

/// One side under test: its instances (the model is one process; Redis is
/// two instances, each account's calls held on its own, so a key another
/// account holds is found taken by the script, not by the process's own
/// waits), and the waits opened, each with the instance that holds it
/// (kept open until the sequence ends, so no hang-up cleans up behind the
/// test's back).
struct Side {
    instances: Vec<Arc<dyn CallBroker>>,
    waits: Vec<(usize, Wait)>,
}

impl Side {
    fn new(instances: Vec<Arc<dyn CallBroker>>) -> Side {
        Side {
            instances,
            waits: Vec::new(),
        }
    }

    fn instance(&self, n: usize) -> &dyn CallBroker {
        self.instances[n % self.instances.len()].as_ref()
    }

    /// Applies `op`, at a sequence that started at `start`; what it
    /// answered, as text both sides can agree on. Every call of a sequence
    /// has the same deadline (or the same lapsed one): calls under one key
    /// whose deadlines fall in the same millisecond must still get stamps
    /// of their own.
    async fn apply(
        &mut self,
        op: &Op,
        call_id: &str,
        accounts: [i64; 2],
        start: tokio::time::Instant,
    ) -> String {
        let keys = keys(call_id, accounts);
        let calls = calls(call_id, accounts);
        let until = start + Duration::from_secs(60);
        match op {
            Op::Open {
                account,
                devices,
                lapsed,
            } => {
                let platforms = vec![Platform::Android; *devices];
                let opening = Opening {
                    key: call_id,
                    account: accounts[*account],
                    devices: &platforms,
                    until: if *lapsed {
                        start - Duration::from_secs(1)
                    } else {
                        until
                    },
                };
                match self.instance(*account).open(opening).await {
                    Ok(wait) => {
                        let key = match calls.iter().position(|c| c == wait.key()) {
                            Some(n) => format!("call {n}"),
                            None => "a random key".to_owned(),
                        };
                        self.waits.push((*account, wait));
                        key
                    }
                    Err(e) => format!("error {e}"),
                }
            }
            Op::Answer {
                key,
                available,
                pushed,
                via,
            } => format!(
                "{:?}",
                self.instance(*via)
                    .answer(&keys[*key], *available, *pushed)
                    .await
                    .map_err(|e| e.to_string())
            ),
            Op::End { wait, reason } => {
                if self.waits.is_empty() {
                    return "no wait".to_owned();
                }
                let (holder, wait) = &self.waits[wait % self.waits.len()];
                format!(
                    "{:?}",
                    self.instance(*holder)
                        .end(wait, *reason)
                        .await
                        .map(|before| before.map(without_deadline))
                        .map_err(|e| e.to_string())
                )
            }
            Op::Cancel { account, via } => format!(
                "{:?}",
                self.instance(*via)
                    .cancel(call_id, account.map(|a| accounts[a]), Named::CallId)
                    .await
                    .map_err(|e| e.to_string())
            ),
        }
    }

    /// What every key in play holds.
    async fn stored(&self, call_id: &str, accounts: [i64; 2]) -> Vec<String> {
        let mut stored = Vec::new();
        for key in keys(call_id, accounts) {
            let read = self.instance(0).read(&key).await.map(comparable);
            stored.push(format!("{key}: {read:?}"));
        }
        stored
    }
}

/// Applies `ops` to the model (the in-process broker) and to `redis`,
/// comparing each answer and every stored key after each step.
async fn check(redis: Vec<Arc<dyn CallBroker>>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let call_id = format!("model-{}", call_notifier::calls::random_key());
    let base: i64 = rand_account();
    let accounts = [base, base + 1];
    let mut model = Side::new(vec![Arc::new(MemoryBroker::new())]);
    let mut lua = Side::new(redis);
    let mut seen = Vec::new();
    let start = tokio::time::Instant::now();
    for op in &ops {
        seen.push(format!("{op:?}"));
        let expected = model.apply(op, &call_id, accounts, start).await;
        let got = lua.apply(op, &call_id, accounts, start).await;
        prop_assert_eq!(&got, &expected, "the answer to {:?} after {:#?}", op, seen);
        let expected = model.stored(&call_id, accounts).await;
        let got = lua.stored(&call_id, accounts).await;
        prop_assert_eq!(got, expected, "the records after {:#?}", seen);
    }
    Ok(())
}

/// Account `account` opens the Call-ID on `devices` devices, in time.
fn open(account: usize, devices: usize) -> Op {
    Op::Open {
        account,
        devices,
        lapsed: false,
    }
}

/// The `key`-th key's phone answers `available`, in time, through `via`.
fn answer(key: usize, available: bool, via: usize) -> Op {
    Op::Answer {
        key,
        available,
        pushed: Pushed::At {
            at: i64::MAX / 4,
            wait: WAIT_MS,
        },
        via,
    }
}

fn rand_account() -> i64 {
    let key = call_notifier::calls::random_key();
    i64::from_str_radix(&key[..12], 16).expect("hex") + 1
}

/// The Redis URLs to hold to the model: one Redis and the Cluster. Set but
/// unreachable fails; neither set fails too, since the test was asked for.
fn redis_urls() -> Vec<String> {
    let urls: Vec<String> = ["TEST_REDIS_URL", "TEST_REDIS_CLUSTER_URL"]
        .iter()
        .filter_map(|name| std::env::var(name).ok())
        .collect();
    assert!(
        !urls.is_empty(),
        "set TEST_REDIS_URL (and TEST_REDIS_CLUSTER_URL) to hold the Redis scripts to the model"
    );
    urls
}

/// A Redis broker on `url`, its subscriber connection up.
async fn connect(url: &str) -> Arc<dyn CallBroker> {
    let broker = RedisBroker::connect(RedisOptions {
        url: url.to_owned(),
        acquire_timeout: Duration::from_secs(2),
        poll_interval: Duration::from_millis(100),
    })
    .await
    .unwrap_or_else(|e| panic!("{url}: {e}"));
    // The subscriber connection comes up in the background.
    common::bounded("the Redis broker ready", async {
        while broker.ping().await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    Arc::new(broker) as Arc<dyn CallBroker>
}

#[test]
#[ignore = "needs TEST_REDIS_URL and TEST_REDIS_CLUSTER_URL: run with --include-ignored, as .ci/run does"]
fn the_redis_scripts_follow_the_call_state_machine() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    for url in redis_urls() {
        let redis = runtime.block_on(async { vec![connect(&url).await, connect(&url).await] });
        // What the random search once found, checked every run: a call its
        // holder ended, then a new call under its key with more devices
        // while the old wait lived; the old call's key must not answer it.
        let found = vec![
            open(1, 1),
            Op::End {
                wait: 0,
                reason: EndReason::AnsweredElsewhere,
            },
            open(1, 2),
            answer(0, false, 1),
        ];
        // Answers to calls whose deadline has passed, which the random
        // search reaches only now and then: a lone device's call by its own
        // key and by its device's, and the devices of the second account's
        // leg.
        let lapsed = vec![
            Op::Open {
                account: 0,
                devices: 1,
                lapsed: true,
            },
            answer(0, true, 1),
            Op::Open {
                account: 1,
                devices: 2,
                lapsed: true,
            },
            answer(1, true, 0),
            answer(9, false, 0),
            answer(10, true, 1),
        ];
        // A call its device won, and the same account's next request under
        // its key the moment after: a new call (not a retry that hears the
        // won call's ACK), which the won call's end, by its holder, leaves
        // ringing; the new call's phone then answers it.
        let reused = vec![
            open(0, 1),
            answer(0, true, 1),
            open(0, 1),
            Op::End {
                wait: 0,
                reason: EndReason::AnsweredElsewhere,
            },
            answer(0, false, 0),
            Op::End {
                wait: 1,
                reason: EndReason::NotAvailable,
            },
        ];
        // A call every device declined, and the same account's next
        // request under its key: a new call too, its devices ringing anew.
        let declined = vec![
            open(1, 2),
            answer(1, false, 0),
            answer(2, false, 1),
            open(1, 2),
        ];
        for fixed in [found, lapsed, reused, declined] {
            if let Err(failure) = runtime.block_on(check(redis.clone(), fixed)) {
                panic!("{url}: the Redis scripts and the model disagree: {failure}");
            }
        }
        let mut runner = TestRunner::new(Config {
            cases: 64,
            failure_persistence: None,
            ..Config::default()
        });
        let sequences = prop::collection::vec(op(), 1..10);
        let result = runner.run(&sequences, |ops| {
            runtime.block_on(check(redis.clone(), ops))
        });
        if let Err(failure) = result {
            panic!("{url}: the Redis scripts and the model disagree: {failure}");
        }
    }
}

/// One step of a PBX that retries a call, behind a load balancer.
#[derive(Debug, Clone, Copy)]
enum Retry {
    /// A request for the call reaches instance `via`: it opens the call,
    /// or joins it while it rings (a PBX retry).
    Open { via: usize },
    /// The PBX hangs up on the `wait`-th request still open (taken round).
    HangUp { wait: usize },
}

fn retry() -> impl Strategy<Value = Retry> {
    prop_oneof![
        (0..3usize).prop_map(|via| Retry::Open { via }),
        (0..4usize).prop_map(|wait| Retry::HangUp { wait }),
    ]
}

/// Applies `steps` to the brokers `instances` (one in process; three
/// instances on one Redis), and holds them to the rule of
/// [`call_notifier::lifecycle`]: a hang-up ends the call, and says so,
/// only when no request rings it any more, on any instance; until then
/// the call rings, and a request joins it.
async fn check_retries(instances: &[Arc<dyn CallBroker>], steps: &[Retry]) -> Result<(), String> {
    let call_id = format!("retry-{}", call_notifier::calls::random_key());
    let account = rand_account();
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut waits: Vec<(usize, Wait)> = Vec::new();
    let mut opened = false;
    for (n, step) in steps.iter().enumerate() {
        let at = || format!("step {n} of {steps:?}");
        match *step {
            Retry::Open { via } => {
                let via = via % instances.len();
                let opening = Opening {
                    key: &call_id,
                    account,
                    devices: &[Platform::Android, Platform::Apns],
                    until,
                };
                let wait = instances[via]
                    .open(opening)
                    .await
                    .map_err(|e| format!("{}: {e}", at()))?;
                if wait.key() != call_id {
                    return Err(format!("{}: opened under {}", at(), wait.key()));
                }
                waits.push((via, wait));
                opened = true;
            }
            Retry::HangUp { wait } => {
                if waits.is_empty() {
                    continue;
                }
                let (via, mut wait) = waits.remove(wait % waits.len());
                let over = if wait.stop_ringing() {
                    instances[via]
                        .hang_up(&wait)
                        .await
                        .map_err(|e| format!("{}: {e}", at()))?
                } else {
                    false
                };
                drop(wait);
                if over != waits.is_empty() {
                    return Err(format!(
                        "{}: the hang-up said over: {over}, with {} requests left",
                        at(),
                        waits.len()
                    ));
                }
            }
        }
        let expected = match (waits.is_empty(), opened) {
            (false, _) => Some(Phase::Ringing { until: 0 }),
            (true, true) => Some(Phase::Ended(EndReason::Cancelled)),
            (true, false) => None,
        };
        // A Redis broker stores a hang-up's end itself, before it answers;
        // the in-process one, as the wait is dropped.
        let phase = instances[0]
            .read(&call_id)
            .await
            .map_err(|e| format!("{}: {e}", at()))?
            .and_then(|(stored, _)| match stored {
                Stored::Call(record) => Some(without_deadline(record).phase),
                Stored::Pointer { .. } => None,
            });
        if phase != expected {
            return Err(format!("{}: the call is {phase:?}, not {expected:?}", at()));
        }
    }
    Ok(())
}

/// The hang-up rule, on the in-process broker and on three instances of
/// each Redis (one, and the Cluster): random sequences of requests for one
/// call, each reaching any instance, and hang-ups of any of them. The Redis
/// scripts count the instances that hold the call; with the end script's
/// `leave` taking none off, the first hang-up on an instance ends a call
/// that a request on another still rings.
#[test]
#[ignore = "needs TEST_REDIS_URL and TEST_REDIS_CLUSTER_URL: run with --include-ignored, as .ci/run does"]
fn a_hang_up_ends_the_call_only_when_no_request_rings_it_on_any_instance() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let memory: Arc<dyn CallBroker> = Arc::new(MemoryBroker::new());
    let mut sides = vec![("in process".to_owned(), vec![memory])];
    for url in redis_urls() {
        let instances = runtime.block_on(async {
            let mut instances = Vec::new();
            for _ in 0..3 {
                instances.push(connect(&url).await);
            }
            instances
        });
        sides.push((url, instances));
    }
    for (name, instances) in &sides {
        // Two instances' requests, hung up first to last and last to first.
        for fixed in [
            [
                Retry::Open { via: 0 },
                Retry::Open { via: 1 },
                Retry::HangUp { wait: 0 },
                Retry::HangUp { wait: 0 },
            ],
            [
                Retry::Open { via: 0 },
                Retry::Open { via: 1 },
                Retry::HangUp { wait: 1 },
                Retry::HangUp { wait: 0 },
            ],
        ] {
            if let Err(failure) = runtime.block_on(check_retries(instances, &fixed)) {
                panic!("{name}: {failure}");
            }
        }
        let mut runner = TestRunner::new(Config {
            cases: 48,
            failure_persistence: None,
            ..Config::default()
        });
        let sequences = prop::collection::vec(retry(), 1..10);
        let result = runner.run(&sequences, |steps| {
            runtime
                .block_on(check_retries(instances, &steps))
                .map_err(TestCaseError::fail)
        });
        if let Err(failure) = result {
            panic!("{name}: {failure}");
        }
    }
}

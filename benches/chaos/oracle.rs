//! The oracle: judges every call of a chaos run from what the PBX side, the
//! phones' side and the push stand-in saw, by the six rules of issue 25.
//! Pure: it reads [`Observations`] and says which promise each call broke.
//!
//! Where the order of two events on the server cannot be known from
//! outside (an answer racing the call's end), the oracle allows what either
//! order gives, and nothing else.

use std::collections::{BTreeMap, HashMap};

use crate::events::{Answer, Call, FaultKind, Kind, Ms, Observations, PbxEnd, Push};

/// The rules, as the report names them.
pub const RULES: [&str; 6] = [
    "every PBX request got exactly one answer, ACK or NAK, within the wait plus 1 s",
    "ACK if and only if a phone's available answer counted before the end; a counted answer is never lost",
    "every phone pushed and not answering got exactly one call_ended with the end's reason, after its last call push; none to a phone that answered; no call push after a decline or a call_ended",
    "every answer got the status the contract gives it",
    "once healed and idle: every key has a TTL, none outlives its call's tombstone, no channel is left on a master, no parked call, RSS within 10% and descriptors within 6 of their level after warm-up, every drain clean",
    "the instances' call counts by outcome add up to what the oracle counted",
];

/// How much later than the wait the PBX may hear back (rule 1).
const ANSWER_SLACK: Ms = 1_000;
/// How close two events may be for their order on the server to be unknown.
const RACE: Ms = 250;
/// How long after a fault's heal the calls may still feel it.
const RECOVERY: Ms = 3_000;
/// How long after a master dies an answer it acknowledged may still have
/// been only on it (the named window).
const REPLICATION_LAG: Ms = 1_000;
/// How much an instance's resident memory may grow past its level after
/// warm-up.
pub const RSS_GROWTH: f64 = 0.10;
/// How many more descriptors an instance may hold at the end than after
/// warm-up: the warm-up reading falls where a fault holds some of its
/// pooled connections closed as it is taken (a paused Redis master's,
/// PostgreSQL's behind the cut proxy), which are open again by the end
/// (seed 8716556214081027383: one instance read 35 after warm-up, where
/// the others read 39, and 38 at the end). A leak of one a call, over the
/// run's hundreds of calls, is far past it.
pub const FD_SLACK: u64 = 6;

/// One broken promise.
#[derive(Debug, Clone)]
pub struct Violation {
    /// 1 to 6: [`RULES`].
    pub rule: usize,
    /// The call ([`Observations::calls`] index), when it is about one.
    pub call: Option<usize>,
    pub what: String,
}

/// A call hit by the named window: a counted answer, or the call's own
/// keys, stored on a master whose replica took over without them (a master
/// killed before its replica had them, or one paused through its failover
/// that took them as it woke, before it learnt it had been replaced).
#[derive(Debug, Clone)]
pub struct Lost {
    pub call: usize,
    /// The fault ([`Observations::faults`] index) that opened the window.
    pub fault: usize,
    /// When the lost write was acknowledged: the answer's 202, or the
    /// call's first push (its keys stored).
    pub answered: Ms,
}

#[derive(Debug, Default)]
pub struct Verdict {
    pub violations: Vec<Violation>,
    pub lost: Vec<Lost>,
}

impl Verdict {
    pub fn by_rule(&self, rule: usize) -> Vec<&Violation> {
        self.violations.iter().filter(|v| v.rule == rule).collect()
    }
}

/// What the PBX was told, as the report and rule 6 count it.
pub fn outcome(call: &Call) -> &'static str {
    match &call.end {
        _ if call.acked() => "ACK",
        _ if call.naked() => "NAK",
        PbxEnd::HungUp { .. } => "hung up",
        PbxEnd::Refused => "refused",
        PbxEnd::Reply { .. } | PbxEnd::Broken { .. } => "no answer",
    }
}

/// Judges the run.
pub fn judge(obs: &Observations) -> Verdict {
    let index = Index::new(obs);
    let mut verdict = Verdict::default();
    for (i, call) in obs.calls.iter().enumerate() {
        if call.end != PbxEnd::Refused {
            index.call(i, call, &mut verdict);
        }
    }
    for push in &index.stray_notices {
        verdict.violations.push(Violation {
            rule: 3,
            call: None,
            what: format!(
                "call_ended {:?} to {} at {} ms for a key never pushed to it",
                push.reason, push.token, push.at
            ),
        });
    }
    for answer in obs.answers.iter().filter(|a| a.call.is_none()) {
        let failing = index
            .fault(answer.sent, answer.replied, |k| {
                k.redis() || k == FaultKind::PostgresCut
            })
            .is_some();
        if answer.status != 404 && !(answer.status == 503 && failing) {
            verdict.violations.push(Violation {
                rule: 4,
                call: None,
                what: format!(
                    "an answer for {}, a key never issued, got {} (404 expected)",
                    answer.unique_key, answer.status
                ),
            });
        }
    }
    index.leftovers(&mut verdict);
    index.metrics(&mut verdict);
    verdict
}

/// The observations, indexed by call.
struct Index<'a> {
    obs: &'a Observations,
    answers: Vec<Vec<&'a Answer>>,
    pushes: Vec<Vec<&'a Push>>,
    stray_notices: Vec<&'a Push>,
}

impl<'a> Index<'a> {
    fn new(obs: &'a Observations) -> Index<'a> {
        let mut answers = vec![Vec::new(); obs.calls.len()];
        for answer in &obs.answers {
            if let Some(call) = answer.call {
                answers[call].push(answer);
            }
        }
        let by_call_id: HashMap<(&str, i64), usize> = obs
            .calls
            .iter()
            .enumerate()
            .map(|(i, c)| ((c.call_id.as_str(), c.sip_user_id), i))
            .collect();
        let mut pushes = vec![Vec::new(); obs.calls.len()];
        let mut owner: HashMap<(&str, &str), usize> = HashMap::new();
        for push in obs.pushes.iter().filter(|p| p.kind == "call") {
            let call = push.call_id.as_deref().and_then(|call_id| {
                let account = obs.accounts.get(&push.token)?;
                by_call_id.get(&(call_id, *account)).copied()
            });
            if let Some(call) = call {
                owner.insert((&push.token, &push.unique_key), call);
                pushes[call].push(push);
            }
        }
        let mut stray_notices = Vec::new();
        for push in obs.pushes.iter().filter(|p| p.kind == "call_ended") {
            match owner.get(&(push.token.as_str(), push.unique_key.as_str())) {
                Some(&call) => pushes[call].push(push),
                None if push.delivered => stray_notices.push(push),
                None => {}
            }
        }
        Index {
            obs,
            answers,
            pushes,
            stray_notices,
        }
    }

    /// The first fault of a kind `which` accepts whose window (healed plus
    /// [`RECOVERY`]) overlaps `from..=to`.
    fn fault(&self, from: Ms, to: Ms, which: impl Fn(FaultKind) -> bool) -> Option<usize> {
        self.obs
            .faults
            .iter()
            .position(|f| which(f.kind) && f.start <= to && from <= f.end + RECOVERY)
    }

    fn call(&self, i: usize, call: &Call, verdict: &mut Verdict) {
        let wait = self.obs.wait_ms;
        let mut violation = |rule: usize, what: String| {
            verdict.violations.push(Violation {
                rule,
                call: Some(i),
                what,
            })
        };
        let end = call.ended_at().unwrap_or(call.sent);
        let answers = &self.answers[i];

        // Rule 1.
        match &call.end {
            PbxEnd::Reply { at, status, body } => {
                if !(call.acked() || call.naked()) {
                    violation(1, format!("the PBX got {status} {body:?}"));
                }
                if at - call.sent > wait + ANSWER_SLACK {
                    violation(1, format!("the PBX heard back after {} ms", at - call.sent));
                }
            }
            PbxEnd::HungUp { .. } if call.kind != Kind::HangUp => {
                violation(1, "the PBX hung up on a call that was not to".into());
            }
            PbxEnd::Broken { at, error } => {
                violation(
                    1,
                    format!("no answer for the PBX ({} ms: {error})", at - call.sent),
                );
            }
            PbxEnd::HungUp { .. } | PbxEnd::Refused => {}
        }

        // What ended the call, as far as the outside can tell.
        let troubled = self
            .fault(call.sent, end, |k| {
                k.redis() || matches!(k, FaultKind::PostgresCut | FaultKind::RestartInstance)
            })
            .is_some()
            || self.obs.lifetimes[call.lifetime]
                .signalled
                .is_some_and(|at| at <= end);
        // A cancel accepted before the end ends the call `cancelled`; one
        // that came just as the wait ran out (a ring group's cancel as its
        // legs time out together) may have ended it either way. A cancel
        // that failed (5xx) or got no answer is indeterminate, as Jepsen
        // treats an operation that timed out: a group's cancel ends each
        // leg on its own shard, and answers 503 when any of them failed,
        // after ending the legs on the healthy shards.
        let at_deadline = end + RACE >= call.sent + wait;
        let cancels = |accepted: fn(u16) -> bool| {
            self.obs
                .cancels
                .iter()
                .filter(move |c| c.calls.contains(&i) && accepted(c.status) && c.sent <= end)
        };
        let racing = |c: &&crate::events::Cancel| at_deadline && c.sent + RACE > end;
        let cancelled = cancels(|s| s == 200).any(|c| !racing(&c));
        let maybe_cancelled = cancels(|s| s == 200).any(|c| racing(&c))
            || cancels(|s| s == 0 || s >= 500).next().is_some();
        let taken: Vec<&&Answer> = answers
            .iter()
            .filter(|a| a.available && !a.stale && !a.register && a.status == 202)
            .collect();
        // A REGISTER's 200 says the device is stored, not whether its
        // answer counted: with Redis or PostgreSQL failing, the call may
        // have rung on (the app's call-response would answer it then).
        // And the REGISTER finds its call by the alias noted in Redis as
        // the call rang (`src/calls/ring.rs`, best effort): a Redis fault
        // from then on may have kept it from being noted, or lost it with
        // a master, and the REGISTER found no call.
        let sure = |a: &Answer| {
            a.register
                && (200..300).contains(&a.status)
                && self
                    .fault(call.sent.min(a.sent), a.replied, |k| {
                        k.redis() || k == FaultKind::PostgresCut
                    })
                    .is_none()
        };
        let registered_surely = answers
            .iter()
            .any(|a| sure(a) && a.replied + RACE < end.min(call.sent + wait));
        // The server answers the call with a REGISTER while it stores the
        // device (`src/http/sip.rs`), so a REGISTER answered 5xx (the store
        // failed) or not at all may have answered it too.
        let may_have_answered = |a: &Answer| {
            a.register && ((200..300).contains(&a.status) || a.status == 0 || a.status >= 500)
        };
        let registered_maybe = answers
            .iter()
            .any(|a| may_have_answered(a) && a.sent <= end);
        let declined = answers
            .iter()
            .any(|a| !a.available && a.status == 202 && a.sent <= end);
        let mut reasons: Vec<&str> = if call.acked() {
            vec!["answered_elsewhere"]
        } else if cancelled || matches!(call.end, PbxEnd::HungUp { .. }) {
            vec!["cancelled"]
        } else {
            let mut reasons = vec!["timed_out"];
            if declined && end + RACE < call.sent + wait {
                reasons.push("not_available");
            }
            if maybe_cancelled {
                reasons.push("cancelled");
            }
            reasons
        };
        if troubled {
            reasons.push("failed");
        }

        // Rule 2.
        if call.acked() && !taken.iter().any(|a| a.sent <= end) && !registered_maybe {
            violation(
                2,
                "ACK, though no phone's available answer counted before the end".into(),
            );
        }
        let mut found: Vec<(usize, String)> = Vec::new();
        let mut lost_answer = None;
        if call.naked() {
            let counted = taken.iter().find(|a| a.sent <= end);
            if let Some(answer) = counted {
                match self.lost_window(answer.replied, answer.replied) {
                    Some(fault) => lost_answer = Some((fault, answer.replied)),
                    None => found.push((
                        2,
                        format!(
                            "NAK, though {}'s available answer counted (202 at {} ms)",
                            answer.token, answer.replied
                        ),
                    )),
                }
            } else if registered_surely && !troubled {
                found.push((
                    2,
                    "NAK, though a REGISTER answered the call before its end".into(),
                ));
            }
        }
        let mut violation = |rule: usize, what: String| found.push((rule, what));
        if taken
            .iter()
            .map(|a| a.token.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 1
        {
            violation(4, "two phones' available answers both counted (202)".into());
        }

        // Rule 3.
        let pushes = &self.pushes[i];
        let mut tokens: Vec<&str> = pushes
            .iter()
            .filter(|p| p.kind == "call" && p.delivered)
            .map(|p| p.token.as_str())
            .collect();
        tokens.sort_unstable();
        tokens.dedup();
        let fcm_trouble = self
            .fault(end.saturating_sub(1_000), end + 5_000, FaultKind::fcm)
            .is_some();
        for token in tokens {
            let calls: Vec<&&Push> = pushes
                .iter()
                .filter(|p| p.token == token && p.kind == "call" && p.delivered)
                .collect();
            let notices: Vec<&&Push> = pushes
                .iter()
                .filter(|p| p.token == token && p.kind == "call_ended" && p.delivered)
                .collect();
            let mine = || answers.iter().filter(|a| a.token == token);
            let answered = mine().any(|a| a.status == 202 && !a.stale && !a.register)
                || mine().any(|a| sure(a) && a.replied + RACE < end);
            let maybe_answered = mine().any(|a| may_have_answered(a) && a.sent <= end + RACE);
            if answered {
                if !notices.is_empty() {
                    violation(
                        3,
                        format!("{token} answered, yet got {} call_ended", notices.len()),
                    );
                }
            } else if call.end != PbxEnd::Refused && !matches!(call.end, PbxEnd::Broken { .. }) {
                if notices.is_empty() && !fcm_trouble && !maybe_answered {
                    violation(
                        3,
                        format!("{token} was pushed and did not answer, but got no call_ended (expected {reasons:?})"),
                    );
                }
                if notices.len() > 1 {
                    violation(3, format!("{token} got {} call_ended", notices.len()));
                }
                for notice in &notices {
                    let reason = notice.reason.as_deref().unwrap_or("");
                    if !reasons.contains(&reason) {
                        violation(
                            3,
                            format!("{token} got call_ended {reason:?} (expected {reasons:?})"),
                        );
                    }
                }
            }
            if let Some(first) = notices.first() {
                if let Some(push) = calls.iter().find(|p| p.at > first.at) {
                    violation(
                        3,
                        format!(
                            "a call push reached {token} at {} ms, after its call_ended at {} ms",
                            push.at, first.at
                        ),
                    );
                }
            }
            let declined_at = mine()
                .filter(|a| !a.available && a.status == 202)
                .map(|a| a.replied)
                .min();
            if let Some(declined_at) = declined_at {
                // A decline reaches the call's holder through Redis when it
                // came through another instance: a Redis fault between the
                // two (the holder's connections cut, its master failing
                // over) keeps it from the holder until the fault heals,
                // and the holder's resends go on meanwhile.
                let resend = calls.iter().find(|p| p.at > declined_at + RACE);
                if let Some(push) =
                    resend.filter(|p| self.fault(declined_at, p.at, FaultKind::redis).is_none())
                {
                    violation(
                        3,
                        format!(
                            "a call push reached {token} at {} ms, after it declined at {declined_at} ms",
                            push.at
                        ),
                    );
                }
            }
        }

        // Rule 4.
        let winner: Option<&str> = taken
            .iter()
            .find(|a| a.sent <= end)
            .map(|a| a.token.as_str())
            .filter(|_| call.acked());
        for answer in answers {
            let fault_near = |which: fn(FaultKind) -> bool| {
                self.fault(answer.sent, answer.replied, which).is_some()
            };
            let redis_or_store = |k: FaultKind| k.redis() || matches!(k, FaultKind::PostgresCut);
            let fine = match answer.status {
                _ if answer.register => {
                    (200..300).contains(&answer.status)
                        || (answer.status == 503 && fault_near(redis_or_store))
                        || (answer.status == 0 && fault_near(|k| k == FaultKind::RestartInstance))
                }
                202 => {
                    !answer.stale
                        && (answer.sent <= end + RACE || winner == Some(answer.token.as_str()))
                }
                410 => {
                    let reason = answer.reason.as_deref().unwrap_or("");
                    let ringing_on = answer.stale && reason == "timed_out";
                    let over = reasons.contains(&reason)
                        || (reason == "answered_elsewhere" && call.acked())
                        || (reason == "not_available" && declined);
                    winner != Some(answer.token.as_str()) && (ringing_on || over)
                }

                503 => fault_near(redis_or_store),
                0 => fault_near(|k| k == FaultKind::RestartInstance),
                _ => false,
            };
            if !fine {
                violation(
                    4,
                    format!(
                        "{} {}answer ({}{}) from {} sent at {} ms got {} {:?}; the call ended at {end} ms, expected reasons {reasons:?}",
                        if answer.register { "a REGISTER" } else { "a call-response" },
                        if answer.stale { "stale " } else if answer.late { "late " } else { "" },
                        if answer.available { "available" } else { "declined" },
                        "",
                        answer.token,
                        answer.sent,
                        answer.status,
                        answer.reason
                    ),
                );
            }
        }
        // A call whose keys Redis took in the named window (its record,
        // its pointers) may have lost them: what follows from that is
        // counted apart, next to the fault, not as a broken promise.
        let opened = pushes
            .iter()
            .filter(|p| p.kind == "call")
            .map(|p| p.at)
            .min()
            .unwrap_or(call.sent);
        let keys_lost = self.lost_window(call.sent, opened + RACE);
        let lost = match (lost_answer, keys_lost) {
            (Some((fault, answered)), _) => Some((fault, answered)),
            (None, Some(fault)) if !found.is_empty() => Some((fault, opened)),
            _ => None,
        };
        if let Some((fault, answered)) = lost {
            verdict.lost.push(Lost {
                call: i,
                fault,
                answered,
            });
            return;
        }
        verdict
            .violations
            .extend(found.into_iter().map(|(rule, what)| Violation {
                rule,
                call: Some(i),
                what,
            }));
    }

    /// The fault whose named window (a write Redis acknowledged and then
    /// lost) overlaps `from..=to`: a master killed before its replica had
    /// the write, or a master paused through its own failover, which on
    /// waking serves what its clients had queued before it learns it was
    /// replaced (Redis Cluster's documented write-loss windows).
    fn lost_window(&self, from: Ms, to: Ms) -> Option<usize> {
        self.obs.faults.iter().position(|f| {
            let (open, close) = match f.kind {
                FaultKind::KillMaster => (f.start.saturating_sub(REPLICATION_LAG), f.start),
                FaultKind::PauseMaster => (f.end.saturating_sub(RACE), f.end + REPLICATION_LAG),
                _ => return false,
            };
            open <= to && from <= close
        })
    }

    /// Rule 5.
    fn leftovers(&self, verdict: &mut Verdict) {
        let obs = self.obs;
        let mut violation = |what: String| {
            verdict.violations.push(Violation {
                rule: 5,
                call: None,
                what,
            })
        };
        // When the keys of the calls with each call_id may expire at the
        // latest: a record and its pointers live until the call's deadline
        // (its open, at its first push at the latest, plus the wait) plus
        // the tombstone; an ended record, the tombstone from its end.
        let mut expiries: HashMap<&str, Ms> = HashMap::new();
        for (i, call) in obs.calls.iter().enumerate() {
            let end = call.ended_at().unwrap_or(call.sent);
            let opened = self.pushes[i]
                .iter()
                .filter(|p| p.kind == "call")
                .map(|p| p.at)
                .min()
                .unwrap_or(call.sent);
            let expiry = end.max(opened + obs.wait_ms) + obs.tombstone_ms + ANSWER_SLACK;
            let latest = expiries.entry(call.call_id.as_str()).or_default();
            *latest = (*latest).max(expiry);
        }
        let longest = obs.wait_ms + obs.tombstone_ms + ANSWER_SLACK;
        for key in &obs.keys {
            if key.pttl_ms == -1 {
                violation(format!("{} has no TTL", key.name));
            } else if key.pttl_ms > longest as i64 {
                violation(format!(
                    "{} lives {} ms more, past any call's tombstone",
                    key.name, key.pttl_ms
                ));
            }
            if let Some(expiry) = expiries.get(call_id_of(&key.name)) {
                if key.seen_at > *expiry {
                    violation(format!(
                        "{} is still there {} ms after it should have expired",
                        key.name,
                        key.seen_at - expiry
                    ));
                }
            }
        }
        for channel in &obs.channels {
            violation(format!("the channel {channel} is left"));
        }
        for (n, life) in obs.lifetimes.iter().enumerate() {
            let name = format!("instance {} (lifetime {n})", life.instance + 1);
            if life.signalled.is_some() && life.exit != Some(Some(0)) {
                violation(format!("{name}: its drain exited {:?}", life.exit));
            }
            if let Some(parked) = life.parked.filter(|p| *p != 0) {
                violation(format!("{name}: {parked} calls still parked"));
            }
            if let (Some(warm), Some(now)) = (life.warm, life.end) {
                if now.rss() as f64 > warm.rss() as f64 * (1.0 + RSS_GROWTH) {
                    violation(format!(
                        "{name}: RSS {} KiB ({} of heap and stacks), {} KiB after warm-up ({})",
                        now.rss() / 1024,
                        now.anon_bytes / 1024,
                        warm.rss() / 1024,
                        warm.anon_bytes / 1024
                    ));
                }
                if now.fds > warm.fds + FD_SLACK {
                    violation(format!(
                        "{name}: {} open descriptors, {} after warm-up",
                        now.fds, warm.fds
                    ));
                }
            }
        }
    }

    /// Rule 6: for each instance alive at the end (a stopped one took its
    /// counters with it).
    fn metrics(&self, verdict: &mut Verdict) {
        for (n, life) in self.obs.lifetimes.iter().enumerate() {
            let Some(metrics) = &life.metrics else {
                continue;
            };
            let mine: Vec<&Call> = self
                .obs
                .calls
                .iter()
                .filter(|c| c.lifetime == n && c.end != PbxEnd::Refused)
                .collect();
            let acks = mine.iter().filter(|c| c.acked()).count() as u64;
            let total = mine.len() as u64;
            let counted_acks = metrics.get("ack").copied().unwrap_or(0);
            let counted: u64 = metrics.values().sum();
            if counted_acks != acks || counted != total {
                verdict.violations.push(Violation {
                    rule: 6,
                    call: None,
                    what: format!(
                        "instance {} (lifetime {n}) counts {counted} calls, {counted_acks} ACK; the oracle saw {total}, {acks} ACK ({metrics:?})",
                        life.instance + 1
                    ),
                });
            }
        }
    }
}

/// The PBX's call_id a Redis key belongs to: `cn:{<key>}...` or
/// `cn:legs:{<call_id>}`, less a leg's `~<sip_user_id>` and a device's
/// `.<n>`.
pub fn call_id_of(key: &str) -> &str {
    let inner = key
        .split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map_or(key, |(inner, _)| inner);
    inner.split(['~', '.']).next().unwrap_or(inner)
}

/// Counts by kind and outcome, for the report.
pub fn tally(obs: &Observations) -> BTreeMap<(Kind, &'static str), usize> {
    let mut counts = BTreeMap::new();
    for call in &obs.calls {
        *counts.entry((call.kind, outcome(call))).or_default() += 1;
    }
    counts
}

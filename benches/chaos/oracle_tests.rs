//! The oracle, tested: a copy of the server's behaviour in a few calls,
//! clean, then with one promise broken on purpose each time; the oracle
//! must name that promise, and only it. Run by `tests/chaos.rs` with a
//! plain `cargo test`.

use std::collections::BTreeMap;

use crate::events::{
    Answer, Call, Cancel, Fault, FaultKind, Key, Kind, Lifetime, Ms, Observations, PbxEnd, Push,
    Usage,
};
use crate::oracle::{judge, Verdict, FD_SLACK};

fn call(kind: Kind, sip_user_id: i64, call_id: &str, end: PbxEnd) -> Call {
    Call {
        kind,
        sip_user_id,
        call_id: call_id.into(),
        group: None,
        lifetime: 0,
        sent: 0,
        end,
    }
}

fn reply(at: Ms, body: &str) -> PbxEnd {
    PbxEnd::Reply {
        at,
        status: 200,
        body: body.into(),
    }
}

fn push(at: Ms, token: &str, kind: &str, key: &str, call_id: &str, reason: Option<&str>) -> Push {
    Push {
        at,
        token: token.into(),
        kind: kind.into(),
        unique_key: key.into(),
        call_id: (kind == "call").then(|| call_id.into()),
        reason: reason.map(Into::into),
        attempt: Some(1),
        delivered: true,
    }
}

/// A fault on `target`, from `start` until healed at `end`.
fn fault(kind: FaultKind, target: &str, start: Ms, end: Ms) -> Fault {
    Fault {
        kind,
        target: target.into(),
        start,
        end,
    }
}

#[allow(clippy::too_many_arguments)]
fn answer(
    call: usize,
    token: &str,
    key: &str,
    available: bool,
    sent: Ms,
    status: u16,
    reason: Option<&str>,
) -> Answer {
    Answer {
        call: Some(call),
        token: token.into(),
        unique_key: key.into(),
        available,
        stale: false,
        register: false,
        late: false,
        sent,
        replied: sent + 5,
        status,
        reason: reason.map(Into::into),
    }
}

/// Four calls as the server should handle them:
/// 0. account 1 (phones a, b): a answers, the PBX hears ACK, b is told
///    `answered_elsewhere`;
/// 1. account 2 (phone c): c declines, NAK, no notice;
/// 2. account 3 (phone d): nobody answers, NAK at the wait, d is told
///    `timed_out`, and d's answer after the end gets 410 `timed_out`;
/// 3. account 4 (phone e): the PBX cancels, NAK, e is told `cancelled`.
fn clean() -> Observations {
    let accounts: BTreeMap<String, i64> = [("a", 1), ("b", 1), ("c", 2), ("d", 3), ("e", 4)]
        .into_iter()
        .map(|(t, a)| (t.to_owned(), a))
        .collect();
    let metrics: BTreeMap<String, u64> = [
        ("ack", 1),
        ("not_available", 1),
        ("timeout", 1),
        ("cancelled", 1),
    ]
    .into_iter()
    .map(|(o, n)| (o.to_owned(), n))
    .collect();
    let usage = Usage {
        anon_bytes: 10 << 20,
        file_bytes: 8 << 20,
        fds: 40,
    };
    Observations {
        seed: 1,
        wait_ms: 4_000,
        tombstone_ms: 70_000,
        accounts,
        calls: vec![
            call(Kind::Answer, 1, "k0", reply(1_012, "status=ACK")),
            call(Kind::Decline, 2, "k1", reply(506, "status=NAK")),
            call(Kind::Late, 3, "k2", reply(4_005, "status=NAK")),
            call(Kind::Cancel, 4, "k3", reply(806, "status=NAK")),
        ],
        answers: vec![
            answer(0, "a", "k0.1", true, 1_000, 202, None),
            answer(1, "c", "k1", false, 500, 202, None),
            Answer {
                late: true,
                ..answer(2, "d", "k2", true, 4_500, 410, Some("timed_out"))
            },
        ],
        cancels: vec![Cancel {
            calls: vec![3],
            sent: 800,
            replied: 805,
            status: 200,
        }],
        pushes: vec![
            push(10, "a", "call", "k0.1", "k0", None),
            push(10, "b", "call", "k0.2", "k0", None),
            push(10, "c", "call", "k1", "k1", None),
            push(10, "d", "call", "k2", "k2", None),
            push(10, "e", "call", "k3", "k3", None),
            push(810, "e", "call_ended", "k3", "", Some("cancelled")),
            push(1_010, "d", "call", "k2", "k2", None),
            push(
                1_020,
                "b",
                "call_ended",
                "k0.2",
                "",
                Some("answered_elsewhere"),
            ),
            push(4_010, "d", "call_ended", "k2", "", Some("timed_out")),
        ],
        faults: Vec::new(),
        lifetimes: vec![Lifetime {
            instance: 0,
            started: 0,
            tries: 1,
            signalled: None,
            exit: None,
            warm: Some(usage),
            end: Some(usage),
            parked: Some(0),
            metrics: Some(metrics),
        }],
        keys: vec![Key {
            name: "cn:{k0}".into(),
            pttl_ms: 62_000,
            seen_at: 10_000,
        }],
        channels: Vec::new(),
        stranded: Vec::new(),
    }
}

/// [`clean`], but call 0 ends as if a's answer had never counted: NAK at
/// the wait (its instance counting a timeout), b told `timed_out`.
fn answered_yet_timed_out() -> Observations {
    let mut obs = clean();
    obs.calls[0].end = reply(4_005, "status=NAK");
    let metrics = obs.lifetimes[0].metrics.as_mut().expect("metrics");
    metrics.insert("ack".into(), 0);
    metrics.insert("timeout".into(), 2);
    obs.pushes[7] = push(4_010, "b", "call_ended", "k0.2", "", Some("timed_out"));
    obs
}

/// The rules the verdict names, each once, in order.
fn rules(verdict: &Verdict) -> Vec<usize> {
    let mut rules: Vec<usize> = verdict.violations.iter().map(|v| v.rule).collect();
    rules.dedup();
    rules
}

#[test]
fn a_run_that_keeps_every_promise_has_no_violation() {
    let verdict = judge(&clean());
    assert!(verdict.violations.is_empty(), "{:#?}", verdict.violations);
    assert!(verdict.lost.is_empty());
}

#[test]
fn a_skipped_notice_is_named() {
    let mut obs = clean();
    obs.pushes
        .retain(|p| !(p.token == "b" && p.kind == "call_ended"));
    let verdict = judge(&obs);
    assert_eq!(rules(&verdict), [3], "{:#?}", verdict.violations);
    assert_eq!(verdict.violations[0].call, Some(0));
}

#[test]
fn a_notice_twice_or_with_the_wrong_reason_is_named() {
    let mut obs = clean();
    obs.pushes.push(push(
        1_030,
        "b",
        "call_ended",
        "k0.2",
        "",
        Some("answered_elsewhere"),
    ));
    assert_eq!(rules(&judge(&obs)), [3]);
    let mut obs = clean();
    obs.pushes[7].reason = Some("timed_out".into());
    assert_eq!(rules(&judge(&obs)), [3]);
}

#[test]
fn a_notice_to_a_phone_that_declined_is_named() {
    let mut obs = clean();
    obs.pushes.push(push(
        600,
        "c",
        "call_ended",
        "k1",
        "",
        Some("not_available"),
    ));
    assert_eq!(rules(&judge(&obs)), [3]);
}

#[test]
fn a_call_push_after_a_decline_or_a_notice_is_named() {
    let mut obs = clean();
    obs.pushes.push(push(1_500, "c", "call", "k1", "k1", None));
    assert_eq!(rules(&judge(&obs)), [3]);
    let mut obs = clean();
    obs.pushes.push(push(5_000, "d", "call", "k2", "k2", None));
    assert_eq!(rules(&judge(&obs)), [3]);
}

/// A decline through another instance reaches the call's holder through
/// Redis: while a Redis fault keeps it from the holder (seed
/// 10241849973055043725: the holder's connections cut as the phone
/// declined), the holder's resends go on, and that is no broken promise.
#[test]
fn a_call_push_after_a_decline_through_a_redis_fault_is_allowed() {
    let mut obs = clean();
    obs.pushes.push(push(1_500, "c", "call", "k1", "k1", None));
    obs.faults
        .push(fault(FaultKind::CutInstanceRedis, "instance 1", 0, 1_000));
    let verdict = judge(&obs);
    assert!(verdict.violations.is_empty(), "{:#?}", verdict.violations);
    obs.faults[0].kind = FaultKind::FcmSlow;
    assert_eq!(rules(&judge(&obs)), [3]);
}

#[test]
fn an_acked_declined_call_is_named() {
    let mut obs = clean();
    obs.calls[1].end = reply(506, "status=ACK");
    // Its instance counted it so, too: only rule 2 is broken.
    let metrics = obs.lifetimes[0].metrics.as_mut().expect("metrics");
    metrics.insert("ack".into(), 2);
    metrics.insert("not_available".into(), 0);
    let verdict = judge(&obs);
    assert_eq!(rules(&verdict), [2], "{:#?}", verdict.violations);
    assert_eq!(verdict.violations[0].call, Some(1));
}

#[test]
fn a_counted_answer_the_pbx_never_heard_is_named_unless_a_master_died_with_it() {
    let mut obs = answered_yet_timed_out();
    obs.pushes[7].reason = Some("failed".into());
    obs.faults
        .push(fault(FaultKind::PostgresCut, "PostgreSQL", 3_000, 3_500));
    let verdict = judge(&obs);
    assert_eq!(rules(&verdict), [2], "{:#?}", verdict.violations);
    assert!(verdict.lost.is_empty());

    // The master holding the answer is killed 300 ms after it counted: the
    // named window, counted apart.
    obs.faults
        .push(fault(FaultKind::KillMaster, "Redis :7301", 1_305, 9_000));
    let verdict = judge(&obs);
    assert!(verdict.violations.is_empty(), "{:#?}", verdict.violations);
    assert_eq!(verdict.lost.len(), 1);
    assert_eq!(verdict.lost[0].call, 0);
}

#[test]
fn a_pbx_answered_late_or_not_at_all_is_named() {
    let mut obs = clean();
    obs.calls[2].end = reply(5_200, "status=NAK");
    assert_eq!(rules(&judge(&obs)), [1]);
    let mut obs = clean();
    obs.calls[2].end = PbxEnd::Broken {
        at: 9_000,
        error: "closed".into(),
    };
    assert!(rules(&judge(&obs)).contains(&1));
}

#[test]
fn a_wrong_answer_status_is_named() {
    // A late answer of a phone that did not win: 410, not 202.
    let mut obs = clean();
    obs.answers[2].status = 202;
    obs.answers[2].reason = None;
    assert!(rules(&judge(&obs)).contains(&4));
    // An issued key is never 404 while its tombstone stands.
    let mut obs = clean();
    obs.answers[2].status = 404;
    assert_eq!(rules(&judge(&obs)), [4]);
    // A stale answer never counts.
    let mut obs = clean();
    obs.answers.push(Answer {
        stale: true,
        ..answer(2, "d", "k2", true, 2_000, 202, None)
    });
    assert!(rules(&judge(&obs)).contains(&4));
    // ... and hears timed_out while the call rings on.
    let mut obs = clean();
    obs.answers.push(Answer {
        stale: true,
        ..answer(2, "d", "k2", true, 2_000, 410, Some("timed_out"))
    });
    assert!(judge(&obs).violations.is_empty());
}

#[test]
fn a_key_without_ttl_or_past_its_tombstone_and_a_channel_left_are_named() {
    let mut obs = clean();
    obs.keys.push(Key {
        name: "cn:{k1}:meta".into(),
        pttl_ms: -1,
        seen_at: 10_000,
    });
    assert_eq!(rules(&judge(&obs)), [5]);
    let mut obs = clean();
    obs.keys[0].seen_at = 200_000;
    assert_eq!(rules(&judge(&obs)), [5]);
    let mut obs = clean();
    obs.channels.push("cn:{k0}:answer on :7301".into());
    assert_eq!(rules(&judge(&obs)), [5]);
}

#[test]
fn an_instance_that_kept_calls_memory_or_descriptors_is_named() {
    let mut obs = clean();
    obs.lifetimes[0].parked = Some(1);
    assert_eq!(rules(&judge(&obs)), [5]);
    // 18 MiB after warm-up: 10% more is allowed, a byte past it is not.
    let grown = |anon_bytes| {
        let mut obs = clean();
        obs.lifetimes[0].end = Some(Usage {
            anon_bytes,
            file_bytes: 8 << 20,
            fds: 40,
        });
        rules(&judge(&obs))
    };
    let allowed = (18 << 20) / 10;
    assert_eq!(grown((10 << 20) + allowed), [] as [usize; 0]);
    assert_eq!(grown((10 << 20) + allowed + 1024), [5]);
    assert_eq!(grown(12 << 20), [5]);
    // 40 descriptors after warm-up: FD_SLACK more is allowed, one past it
    // is not.
    let opened = |fds| {
        let mut obs = clean();
        obs.lifetimes[0].end = Some(Usage {
            anon_bytes: 10 << 20,
            file_bytes: 8 << 20,
            fds,
        });
        rules(&judge(&obs))
    };
    assert_eq!(opened(40 + FD_SLACK), [] as [usize; 0]);
    assert_eq!(opened(40 + FD_SLACK + 1), [5]);
    let mut obs = clean();
    obs.lifetimes[0].signalled = Some(9_000);
    obs.lifetimes[0].exit = Some(Some(1));
    assert!(rules(&judge(&obs)).contains(&5));
}

#[test]
fn metrics_that_do_not_add_up_are_named() {
    let mut obs = clean();
    obs.lifetimes[0]
        .metrics
        .as_mut()
        .expect("metrics")
        .insert("timeout".into(), 2);
    assert_eq!(rules(&judge(&obs)), [6]);
}

#[test]
fn an_answer_a_master_took_as_it_woke_from_its_failover_is_counted_apart() {
    let mut obs = answered_yet_timed_out();
    // Paused from before the call; woken just as the answer was taken.
    obs.faults
        .push(fault(FaultKind::PauseMaster, "Redis :7302", 0, 1_000));
    let verdict = judge(&obs);
    assert!(verdict.violations.is_empty(), "{:#?}", verdict.violations);
    assert_eq!(verdict.lost.len(), 1);
    // Woken long after: neither the answer nor the call's keys were in
    // the window.
    obs.faults[0].end = 6_000;
    obs.faults[0].kind = FaultKind::PauseMaster;
    let verdict = judge(&obs);
    assert!(verdict.lost.is_empty());
    assert!(rules(&verdict).contains(&2));
}

#[test]
fn a_key_lost_with_a_killed_master_is_counted_apart_and_any_other_404_named() {
    let mut obs = clean();
    // d's decline, while the call rang, found no key.
    obs.answers
        .push(answer(2, "d", "k2", false, 2_000, 404, None));
    let verdict = judge(&obs);
    assert_eq!(rules(&verdict), [4], "{:#?}", verdict.violations);
    obs.faults
        .push(fault(FaultKind::KillMaster, "Redis :7301", 500, 9_000));
    let verdict = judge(&obs);
    assert!(verdict.violations.is_empty(), "{:#?}", verdict.violations);
    assert_eq!(verdict.lost.len(), 1);
}

#[test]
fn a_cancelled_call_told_timed_out_is_named_unless_the_cancel_came_as_it_timed_out() {
    // Call 3's cancel was accepted at 800 ms; its phone told `timed_out`
    // when the wait ran out: the cancel never reached the call.
    let mut obs = clean();
    obs.calls[3].end = reply(4_010, "status=NAK");
    obs.pushes[5] = push(4_011, "e", "call_ended", "k3", "", Some("timed_out"));
    assert_eq!(rules(&judge(&obs)), [3]);
    // A ring group's cancel sent as the leg timed out: either reason.
    obs.cancels[0].sent = 4_009;
    obs.cancels[0].replied = 4_012;
    assert!(judge(&obs).violations.is_empty());
}

#[test]
fn a_cancel_that_failed_may_have_ended_its_call_but_one_refused_did_not() {
    // A group's cancel answered 503 (one leg's shard was down) after it
    // had ended call 3 on a healthy shard: indeterminate, so `cancelled`
    // is as good as `timed_out`.
    let mut obs = clean();
    obs.cancels[0].status = 503;
    obs.cancels[0].replied = 1_805;
    assert!(
        judge(&obs).violations.is_empty(),
        "{:#?}",
        judge(&obs).violations
    );
    obs.cancels[0].status = 0;
    assert!(judge(&obs).violations.is_empty());
    // A 404 says no call rang under the key: its phone told `cancelled`
    // was told a reason nothing gave.
    obs.cancels[0].status = 404;
    assert_eq!(rules(&judge(&obs)), [3]);
}

#[test]
fn a_register_that_failed_may_have_answered_its_call_but_one_refused_did_not() {
    // Phone a woke and its proxy's REGISTER answered call 0 while
    // PostgreSQL was cut: the call was answered, the device not stored,
    // the proxy heard 503. ACK and no notice to a are what the server
    // should do.
    let mut obs = clean();
    obs.answers[0].register = true;
    obs.answers[0].status = 503;
    obs.faults
        .push(fault(FaultKind::PostgresCut, "PostgreSQL", 900, 1_100));
    assert!(
        judge(&obs).violations.is_empty(),
        "{:#?}",
        judge(&obs).violations
    );
    // Nor does a REGISTER whose instance went down before it replied.
    obs.faults[0].kind = FaultKind::RestartInstance;
    obs.answers[0].status = 0;
    assert!(
        judge(&obs).violations.is_empty(),
        "{:#?}",
        judge(&obs).violations
    );
    // A REGISTER refused answered nothing: the ACK had no answer, a,
    // still ringing, was owed its notice, and the chaos run's REGISTERs
    // are well-formed, so the 400 itself is the wrong status.
    obs.answers[0].status = 400;
    assert_eq!(rules(&judge(&obs)), [2, 3, 4]);
}

#[test]
fn a_register_after_its_call_rang_through_a_redis_fault_may_have_found_no_call() {
    // Call 0 rang while its instance's Redis connections were being cut,
    // so the alias that finds the call from a REGISTER may never have been
    // noted (`src/calls/ring.rs` notes it as best effort). Phone a's proxy
    // REGISTERs well after: its 200 answered nothing, and the call timed
    // out with a still ringing, owed its notice.
    let mut obs = answered_yet_timed_out();
    obs.answers[0] = Answer {
        register: true,
        replied: 3_105,
        ..answer(0, "a", "k0.1", true, 3_100, 200, None)
    };
    obs.pushes.push(push(
        4_010,
        "a",
        "call_ended",
        "k0.1",
        "",
        Some("timed_out"),
    ));
    obs.faults
        .push(fault(FaultKind::CutInstanceRedis, "instance 0", 0, 0));
    let verdict = judge(&obs);
    assert!(verdict.violations.is_empty(), "{:#?}", verdict.violations);
    assert!(verdict.lost.is_empty(), "{:#?}", verdict.lost);
    // Without a Redis fault the REGISTER surely answered the call: the NAK
    // and the notice to a are both named.
    obs.faults[0].kind = FaultKind::FcmSlow;
    assert_eq!(rules(&judge(&obs)), [2, 3], "{:#?}", judge(&obs).violations);
}

//! The run's report (Markdown, `docs/chaos.md` for the full run) and its
//! last line.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::events::{Call, FaultKind, Kind, Observations};
use crate::oracle::{outcome, tally, RULES};
use crate::run::Run;

/// How many offending calls the report shows per rule.
const SHOWN: usize = 5;
const OUTCOMES: [&str; 5] = ["ACK", "NAK", "hung up", "no answer", "refused"];

/// Calls placed (refused connections are not calls).
pub fn calls(obs: &Observations) -> usize {
    obs.calls.iter().filter(|c| outcome(c) != "refused").count()
}

/// `chaos: <calls> calls, <faults> faults, <violations> violations, <lost> answers lost in the named window`
pub fn last_line(run: &Run) -> String {
    format!(
        "chaos: {} calls, {} faults, {} violations, {} answers lost in the named window",
        calls(&run.observations),
        run.observations.faults.len(),
        run.verdict.violations.len(),
        run.verdict.lost.len()
    )
}

/// Wake-up latency outside fault windows: from the answer that won to the
/// PBX's ACK, in ms: (p50, p99, count).
pub fn wakeup(obs: &Observations) -> Option<(f64, f64, usize)> {
    let mut times: Vec<u64> = obs
        .calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.acked())
        .filter_map(|(i, c)| {
            let end = c.ended_at()?;
            let calm = !obs
                .faults
                .iter()
                .any(|f| f.start <= end && c.sent <= f.end + 3_000);
            let answer = obs
                .answers
                .iter()
                .filter(|a| {
                    a.call == Some(i) && a.available && !a.stale && !a.register && a.status == 202
                })
                .map(|a| a.sent)
                .min()?;
            calm.then(|| end.saturating_sub(answer))
        })
        .collect();
    if times.is_empty() {
        return None;
    }
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize] as f64;
    Some((at(0.5), at(0.99), times.len()))
}

/// What each kind of fault did to the calls in flight: calls whose wait
/// overlapped a fault of that kind (and no other), by outcome.
pub fn in_flight(obs: &Observations) -> BTreeMap<FaultKind, BTreeMap<&'static str, usize>> {
    let mut by_kind: BTreeMap<FaultKind, BTreeMap<&'static str, usize>> = BTreeMap::new();
    for call in &obs.calls {
        let Some(end) = call.ended_at() else { continue };
        let kinds: Vec<FaultKind> = obs
            .faults
            .iter()
            .filter(|f| f.start <= end && call.sent <= f.end)
            .map(|f| f.kind)
            .collect();
        if let [kind] = kinds[..] {
            *by_kind
                .entry(kind)
                .or_default()
                .entry(outcome(call))
                .or_default() += 1;
        }
    }
    by_kind
}

fn describe(obs: &Observations, i: usize, call: &Call) -> String {
    let mut text = format!(
        "call {i} ({}{}), call_id `{}`, sip_user_id {}, instance lifetime {}, sent at {} ms, end {:?}",
        call.kind.name(),
        call.group.map(|g| format!(", ring group of call {g}")).unwrap_or_default(),
        call.call_id,
        call.sip_user_id,
        call.lifetime,
        call.sent,
        call.end
    );
    for answer in obs.answers.iter().filter(|a| a.call == Some(i)) {
        let _ = write!(
            text,
            "; answer {} `{}` {}{}{} sent {} ms got {} {:?} at {} ms",
            answer.token,
            answer.unique_key,
            if answer.register { "REGISTER " } else { "" },
            if answer.available {
                "available"
            } else {
                "declined"
            },
            if answer.stale { " stale" } else { "" },
            answer.sent,
            answer.status,
            answer.reason,
            answer.replied
        );
    }
    for push in obs.pushes.iter().filter(|p| {
        p.call_id.as_deref() == Some(call.call_id.as_str())
            || (p.kind == "call_ended" && p.unique_key.starts_with(call.call_id.as_str()))
    }) {
        let _ = write!(
            text,
            "; push {}{} `{}` to {} at {} ms{}{}",
            push.kind,
            push.attempt.map(|a| format!(" #{a}")).unwrap_or_default(),
            push.unique_key,
            push.token,
            push.at,
            push.reason
                .as_deref()
                .map(|r| format!(" {r}"))
                .unwrap_or_default(),
            if push.delivered {
                ""
            } else {
                " (refused by FCM)"
            }
        );
    }
    for cancel in obs.cancels.iter().filter(|c| c.calls.contains(&i)) {
        let _ = write!(
            text,
            "; cancel sent {} ms got {} at {} ms",
            cancel.sent, cancel.status, cancel.replied
        );
    }
    text
}

/// The Markdown report.
pub fn markdown(run: &Run, command: &str, binary: &str) -> String {
    let obs = &run.observations;
    let verdict = &run.verdict;
    let options = &run.options;
    let mut out = String::new();
    let _ = writeln!(out, "# Chaos run\n");
    let _ = writeln!(
        out,
        "Written by `{command}` ({binary} binary). Seed **{}**: the same seed reruns the same \
         schedule of calls and faults. {} s of traffic at {} calls/s on three call-notifier \
         instances, a Redis Cluster of three masters with a replica each, PostgreSQL behind a \
         proxy the run can cut, and the FCM stand-in; wait {} ms.\n",
        obs.seed,
        options.duration / 1000,
        options.rate,
        obs.wait_ms
    );
    let _ = writeln!(out, "```\n{}\n```\n", last_line(run));
    let _ = writeln!(
        out,
        "{} calls skipped for want of a free account; {} faults skipped because their service \
         was still broken or healing from the one before.\n",
        run.skipped_calls, run.skipped_faults
    );

    let _ = writeln!(out, "## Calls by kind and outcome\n");
    let _ = writeln!(out, "| kind | {} | total |", OUTCOMES.join(" | "));
    let _ = writeln!(out, "|---|{}---:|", "---:|".repeat(OUTCOMES.len()));
    let counts = tally(obs);
    for kind in Kind::ALL {
        let row: Vec<usize> = OUTCOMES
            .iter()
            .map(|o| counts.get(&(kind, *o)).copied().unwrap_or(0))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            kind.name(),
            row.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(" | "),
            row.iter().sum::<usize>()
        );
    }
    let answers = obs.answers.len();
    let pushes = obs.pushes.len();
    let _ = writeln!(
        out,
        "\n{answers} phone answers (call-responses and REGISTERs), {} cancels, {pushes} requests to FCM.\n",
        obs.cancels.len()
    );

    let _ = writeln!(out, "## Faults\n");
    let _ = writeln!(
        out,
        "| # | fault | target | from (s) | healed (s) | held (s) |"
    );
    let _ = writeln!(out, "|---:|---|---|---:|---:|---:|");
    let mut faults: Vec<_> = obs.faults.iter().enumerate().collect();
    faults.sort_by_key(|(_, f)| f.start);
    for (n, fault) in faults {
        let _ = writeln!(
            out,
            "| {n} | {} | {} | {:.1} | {:.1} | {:.1} |",
            fault.kind.name(),
            fault.target,
            fault.start as f64 / 1000.0,
            fault.end as f64 / 1000.0,
            (fault.end - fault.start) as f64 / 1000.0
        );
    }

    let _ = writeln!(out, "\n## What each fault did to the calls in flight\n");
    let _ = writeln!(
        out,
        "Calls whose wait overlapped one fault (and no other), by what the PBX heard.\n"
    );
    let _ = writeln!(out, "| fault | {} |", OUTCOMES.join(" | "));
    let _ = writeln!(out, "|---|{}", "---:|".repeat(OUTCOMES.len()));
    for (kind, outcomes) in in_flight(obs) {
        let row: Vec<String> = OUTCOMES
            .iter()
            .map(|o| outcomes.get(o).copied().unwrap_or(0).to_string())
            .collect();
        let _ = writeln!(out, "| {} | {} |", kind.name(), row.join(" | "));
    }

    let _ = writeln!(out, "\n## Violations by rule\n");
    for (n, rule) in RULES.iter().enumerate() {
        let broken = verdict.by_rule(n + 1);
        let _ = writeln!(out, "{}. {rule}: **{}**", n + 1, broken.len());
        for violation in broken.iter().take(SHOWN) {
            let _ = writeln!(out, "   - {}", violation.what);
            if let Some(i) = violation.call {
                let _ = writeln!(
                    out,
                    "     ({}, seed {})",
                    describe(obs, i, &obs.calls[i]),
                    obs.seed
                );
            }
        }
    }

    let _ = writeln!(out, "\n## Answers lost in the named window\n");
    let _ = writeln!(
        out,
        "A counted answer (202) stored on a master that was killed before its replica had it: \
         the replica takes over without it, and the PBX hears NAK. {} such answers.\n",
        verdict.lost.len()
    );
    for lost in &verdict.lost {
        let fault = &obs.faults[lost.fault];
        let _ = writeln!(
            out,
            "- call {} (`{}`): answered at {} ms; {} {} at {} ms",
            lost.call,
            obs.calls[lost.call].call_id,
            lost.answered,
            fault.kind.name(),
            fault.target,
            fault.start
        );
    }

    if !obs.stranded.is_empty() {
        let _ = writeln!(out, "\n## Channels left on a replica\n");
        let _ = writeln!(
            out,
            "Subscriptions that reached a master as it woke from a pause, in the instant before \
             it learnt it had been replaced: the replica still hands the channel's messages on, \
             and the call's end unsubscribes on the new master. Reported, not judged (rule 5 \
             names the masters).\n"
        );
        for channel in &obs.stranded {
            let _ = writeln!(out, "- `{channel}`");
        }
    }

    let _ = writeln!(out, "\n## Wake-up latency outside fault windows\n");
    match wakeup(obs) {
        Some((p50, p99, n)) => {
            let _ = writeln!(
                out,
                "From the winning answer's request to the PBX's `status=ACK`, over {n} calls \
                 no fault touched: p50 {p50:.1} ms, p99 {p99:.1} ms."
            );
        }
        None => {
            let _ = writeln!(out, "No answered call outside fault windows.");
        }
    }
    let _ = writeln!(out, "\n## The instances at the end\n");
    let _ = writeln!(out, "| instance | lifetime | started (s) | starts tried | stopped (s) | drain exit | parked | anon RSS after warm-up (KiB) | anon RSS at the end (KiB) | file RSS after warm-up (KiB) | file RSS at the end (KiB) | fds after warm-up | fds at the end |");
    let _ = writeln!(
        out,
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (n, life) in obs.lifetimes.iter().enumerate() {
        let anon = |u: Option<crate::events::Usage>| {
            u.map_or("-".into(), |u| (u.anon_bytes / 1024).to_string())
        };
        let file = |u: Option<crate::events::Usage>| {
            u.map_or("-".into(), |u| (u.file_bytes / 1024).to_string())
        };
        let fds = |u: Option<crate::events::Usage>| u.map_or("-".into(), |u| u.fds.to_string());
        let _ = writeln!(
            out,
            "| {} | {n} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            life.instance + 1,
            life.started as f64 / 1000.0,
            life.tries,
            life.signalled
                .map_or("-".into(), |s| format!("{:.1}", s as f64 / 1000.0)),
            life.exit.map_or("-".into(), |e| format!("{e:?}")),
            life.parked.map_or("-".into(), |p| p.to_string()),
            anon(life.warm),
            anon(life.end),
            file(life.warm),
            file(life.end),
            fds(life.warm),
            fds(life.end)
        );
    }
    out
}

//! The operator's files in `contrib/`: the Grafana dashboard and the
//! Prometheus alert rules read only metrics that a freshly started server
//! exports (a series that is missing until its first event reads as "no
//! data", and a ratio alert over it never fires), the rules are complete,
//! and the systemd unit runs a command line the binary accepts.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use call_notifier::calls::{NakReason, Outcome};
use call_notifier::config::{Cli, Command, Config};
use clap::{CommandFactory, Parser};
use common::*;
use serde_json::Value;

const DASHBOARD: &str = "contrib/grafana/call-notifier.json";
const ALERTS: &str = "contrib/prometheus/alerts.yml";
const UNIT: &str = "contrib/systemd/call-notifier.service";
/// The package's settings file, installed as /etc/call-notifier/call-notifier.env.
const SETTINGS: &str = "contrib/debian/call-notifier.env";
/// Where the unit reads it from.
const SETTINGS_INSTALLED: &str = "/etc/call-notifier/call-notifier.env";
/// The system user the package creates and the unit runs as.
const USER: &str = "call-notifier";

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

fn alerts() -> Value {
    serde_norway::from_str(&read(ALERTS)).unwrap_or_else(|e| panic!("{ALERTS}: {e}"))
}

/// The `/metrics` of a server that has served nothing yet.
async fn fresh_exposition() -> Exposition {
    let server = start(&Backend::embedded(), |_| {}).await;
    let reply = server.client.get("/metrics").await;
    assert_eq!(reply.status, hyper::StatusCode::OK, "{}", reply.body);
    Exposition::parse(&reply.body)
}

/// What an exposition shows: the names that have a sample, and the
/// families a `# TYPE` line declares (an encoder may declare a family that
/// has no sample yet; prometheus-client leaves such a family out).
struct Exposition {
    samples: BTreeSet<String>,
    families: BTreeSet<String>,
    text: String,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut samples = BTreeSet::new();
        let mut families = BTreeSet::new();
        for line in text.lines() {
            if let Some(declared) = line.strip_prefix("# TYPE ") {
                families.extend(declared.split(' ').next().map(str::to_owned));
            } else if !line.starts_with('#') && !line.is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                samples.insert(line[..end].to_owned());
            }
        }
        Exposition {
            samples,
            families,
            text: text.to_owned(),
        }
    }

    /// Why `name`, read by `user`, has no sample; `None` when it has one.
    fn missing(&self, name: &str, user: &str) -> Option<String> {
        if self.samples.contains(name) {
            return None;
        }
        let family = ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        let found = if self.families.contains(family) {
            format!("its family {family} is declared (# TYPE) but has no sample")
        } else {
            "no such sample".to_owned()
        };
        Some(format!(
            "{name} ({user}): {found}: a misspelt name, or a labelled family none of whose \
             label sets Metrics::start_at_zero creates"
        ))
    }

    /// Every `(name, user)` that has no sample, explained.
    fn unexported(&self, used: &[(String, String)]) -> Vec<String> {
        used.iter()
            .filter_map(|(name, user)| self.missing(name, user))
            .collect()
    }
}

/// Every `call_notifier_*` identifier in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    const PREFIX: &str = "call_notifier_";
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find(PREFIX) {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every panel of the dashboard, those inside collapsed rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn text<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| panic!("{what}: missing or empty ({value})"))
}

fn rules(alerts: &Value) -> Vec<&Value> {
    let groups = alerts["groups"]
        .as_array()
        .expect("a rules file has groups");
    let group = groups
        .iter()
        .find(|g| g["name"] == "call-notifier")
        .expect("a group named call-notifier");
    group["rules"]
        .as_array()
        .expect("the group's rules")
        .iter()
        .collect()
}

/// Each metric a panel's query or a rule's `expr` reads, with who reads it.
fn metrics_used(dashboard: &Value, alerts: &Value) -> Vec<(String, String)> {
    let mut used = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let user = format!("panel {}", panel["title"]);
            used.extend(
                metric_names(target["expr"].as_str().unwrap_or(""))
                    .into_iter()
                    .map(|name| (name, user.clone())),
            );
        }
    }
    for rule in rules(alerts) {
        let user = format!("alert {}", rule["alert"]);
        used.extend(
            metric_names(rule["expr"].as_str().unwrap_or(""))
                .into_iter()
                .map(|name| (name, user.clone())),
        );
    }
    used.sort();
    used.dedup();
    used
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_read_only_metrics_a_fresh_server_exports() {
    let (dashboard, alerts) = (dashboard(), alerts());
    let used = metrics_used(&dashboard, &alerts);
    let exposition = fresh_exposition().await;

    // The check itself can fail: a name the server does not export.
    let made_up = [("call_notifier_calls_dropped_total".into(), "a check".into())];
    let refused = exposition.unexported(&made_up);
    assert!(
        refused.len() == 1 && refused[0].contains("call_notifier_calls_dropped_total"),
        "a made-up metric passed: {refused:?}"
    );

    for (what, needle) in [("the dashboard", "panel "), ("the alert rules", "alert ")] {
        assert!(
            used.iter().any(|(_, user)| user.starts_with(needle)),
            "{what} read no call_notifier_* metric: {used:?}"
        );
    }
    let missing = exposition.unexported(&used);
    assert!(
        missing.is_empty(),
        "read by {DASHBOARD} or {ALERTS} but without a sample in a fresh server's /metrics:\n  {}\n\n{}",
        missing.join("\n  "),
        exposition.text
    );
}

/// Every way a call can end, as the `outcome` label spells it. The match
/// stops compiling when `calls` gains an outcome: list it here and in
/// `metrics.rs`'s `CALL_OUTCOMES`.
fn call_outcomes() -> Vec<&'static str> {
    use NakReason::*;
    let all = [
        Outcome::Ack,
        Outcome::Nak(NoDevice),
        Outcome::Nak(NotAvailable),
        Outcome::Nak(Cancelled),
        Outcome::Nak(TokenDead),
        Outcome::Nak(Timeout),
        Outcome::Nak(Overloaded),
        Outcome::Nak(Unavailable),
        Outcome::Nak(Shutdown),
    ];
    for outcome in all {
        match outcome {
            Outcome::Ack
            | Outcome::Nak(
                NoDevice | NotAvailable | Cancelled | TokenDead | Timeout | Overloaded
                | Unavailable | Shutdown,
            ) => {}
        }
    }
    // The PBX hung up: a call that never got an outcome.
    all.map(Outcome::as_str)
        .into_iter()
        .chain(["hung_up"])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_outcome_is_exported_at_zero_from_start() {
    let exposition = fresh_exposition().await;
    let missing: Vec<&str> = call_outcomes()
        .into_iter()
        .filter(|outcome| {
            let sample = format!("call_notifier_incoming_calls_total{{outcome=\"{outcome}\"}} 0");
            !exposition.text.lines().any(|line| line == sample)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "outcomes without a zero sample in a fresh server: {missing:?}\n{}",
        exposition.text
    );
}

#[test]
fn the_dashboard_reads_every_panel_from_its_datasource_variable() {
    let dashboard = dashboard();
    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion: {}",
        dashboard["schemaVersion"]
    );
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "no `datasource` variable of type datasource over prometheus: {variables:?}"
    );
    let uses_variable = |v: &Value| v["uid"] == "${datasource}";
    let all = panels(&dashboard);
    assert!(!all.is_empty(), "the dashboard has no panels");
    for panel in all {
        let title = text(&panel["title"], "a panel's title");
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            uses_variable(&panel["datasource"]),
            "panel {title:?}: datasource {}",
            panel["datasource"]
        );
        let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            text(&target["expr"], &format!("panel {title:?}: a query's expr"));
            assert!(
                uses_variable(&target["datasource"]),
                "panel {title:?}: a query's datasource {}",
                target["datasource"]
            );
        }
    }
}

/// Every platform's pushes of every kind (`call`, `call_ended`, `message`)
/// start at zero, delivered, retried and failed alike, and so do their
/// send times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_push_kind_is_exported_at_zero_from_start() {
    let exposition = fresh_exposition().await;
    let lines: BTreeSet<&str> = exposition.text.lines().collect();
    let mut missing = Vec::new();
    for platform in ["apns", "android", "gcm"] {
        for kind in ["call", "call_ended", "message"] {
            let mut samples: Vec<String> = ["delivered", "retry", "failed"]
                .map(|outcome| {
                    format!(
                        "call_notifier_pushes_total{{platform=\"{platform}\",kind=\"{kind}\",outcome=\"{outcome}\",reason=\"none\"}} 0"
                    )
                })
                .into();
            samples.push(format!(
                "call_notifier_push_duration_seconds_count{{platform=\"{platform}\",kind=\"{kind}\"}} 0"
            ));
            missing.extend(samples.into_iter().filter(|s| !lines.contains(s.as_str())));
        }
    }
    assert!(
        missing.is_empty(),
        "push series without a zero sample in a fresh server:\n  {}\n\n{}",
        missing.join("\n  "),
        exposition.text
    );
}

/// The push alerts page on call pushes: a notice that cannot reach an
/// iPhone without an alert token must not read as phones not ringing.
#[test]
fn the_push_alerts_read_call_pushes_only() {
    let alerts = alerts();
    for rule in rules(&alerts) {
        let expr = text(&rule["expr"], "a rule's expr");
        let selectors = expr.matches("call_notifier_pushes_total").count();
        if selectors == 0 {
            continue;
        }
        assert_eq!(
            expr.matches(r#"call_notifier_pushes_total{kind="call""#)
                .count(),
            selectors,
            "alert {}: every call_notifier_pushes_total selector filters kind=\"call\": {expr}",
            rule["alert"]
        );
    }
}

#[test]
fn every_alert_rule_is_complete() {
    let alerts = alerts();
    let rules = rules(&alerts);
    assert!(!rules.is_empty(), "{ALERTS} has no rules");
    for rule in rules {
        let name = text(&rule["alert"], "a rule's alert name");
        for (field, value) in [
            ("expr", &rule["expr"]),
            ("for", &rule["for"]),
            ("labels.severity", &rule["labels"]["severity"]),
            ("annotations.summary", &rule["annotations"]["summary"]),
            (
                "annotations.description",
                &rule["annotations"]["description"],
            ),
        ] {
            text(value, &format!("alert {name}: {field}"));
        }
    }
}

#[test]
fn the_readme_links_the_contrib_files_and_names_every_alert() {
    let readme = read("README.md");
    for file in [DASHBOARD, ALERTS, UNIT] {
        assert!(
            readme.contains(&format!("({file})")),
            "README.md does not link {file}"
        );
    }
    for rule in rules(&alerts()) {
        let name = text(&rule["alert"], "a rule's alert name");
        assert!(
            readme.contains(&format!("`{name}`")),
            "README.md does not name the alert {name}"
        );
    }
}

/// `KEY=value` settings of a unit file, in order (a key may repeat).
fn unit_settings(unit: &str) -> Vec<(&str, &str)> {
    unit.lines()
        .filter(|line| !line.starts_with(['#', ';', '[']))
        .filter_map(|line| line.split_once('='))
        .collect()
}

#[test]
fn the_systemd_unit_runs_serve_with_settings_the_binary_accepts() {
    let unit = read(UNIT);
    let settings = unit_settings(&unit);
    let setting = |key: &str| {
        settings
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{UNIT}: no {key}="))
    };

    // The variables it sets, and those its comment suggests for the
    // environment file, as the flags they stand for.
    let variables: Vec<(&str, &str)> = settings
        .iter()
        .filter(|(key, _)| *key == "Environment")
        .filter_map(|(_, assignment)| assignment.split_once('='))
        .chain(unit.lines().filter_map(|line| {
            line.strip_prefix('#')?
                .trim_start()
                .strip_prefix("CALL_NOTIFIER_")?;
            line.trim_start_matches(['#', ' ']).split_once('=')
        }))
        .collect();
    let cli = Cli::command();
    let exec: Vec<&str> = setting("ExecStart").split_whitespace().collect();
    let parsed = Cli::try_parse_from(&exec)
        .unwrap_or_else(|e| panic!("{UNIT}: the binary refuses ExecStart {exec:?}:\n{e}"));
    assert!(
        matches!(parsed.command, Some(Command::Serve)),
        "{UNIT}: ExecStart does not run `serve`"
    );
    for (name, value) in &variables {
        let flag = cli
            .get_arguments()
            .find(|arg| arg.get_env().is_some_and(|env| env == *name))
            .and_then(|arg| arg.get_long())
            .unwrap_or_else(|| panic!("{UNIT}: {name} is no variable the binary reads"));
        let flag = format!("--{flag}");
        let mut args = exec.clone();
        args.extend([flag.as_str(), *value]);
        if let Err(e) = Cli::try_parse_from(&args) {
            panic!("{UNIT}: the binary refuses {name}={value}:\n{e}");
        }
    }

    // SQLite, when used, lives in the state directory: the only place the
    // sandbox lets the service write.
    let state = format!("/var/lib/{}/", setting("StateDirectory"));
    let database = variables
        .iter()
        .find(|(name, _)| *name == "CALL_NOTIFIER_DATABASE_URL")
        .map(|(_, value)| *value)
        .expect("the unit sets CALL_NOTIFIER_DATABASE_URL");
    assert!(
        database.starts_with(&state),
        "{UNIT}: the database {database} is outside {state}"
    );

    // systemd's SIGKILL must not come before the drain has ended.
    let stop: u64 = setting("TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in seconds");
    let drain = Config::defaults().shutdown_timeout_secs;
    assert!(
        stop > drain,
        "{UNIT}: TimeoutStopSec={stop} kills the process before --shutdown-timeout-secs ({drain} s) has passed"
    );
    for (key, value) in [
        ("User", USER),
        ("Group", USER),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(setting(key), value, "{UNIT}: {key}");
    }
}

/// `VARIABLE=value` of every setting line of the settings file, commented
/// out (`#CALL_NOTIFIER_...=`) or not, with its line number.
fn settings_lines(text: &str) -> Vec<(usize, &str, &str)> {
    text.lines()
        .enumerate()
        .filter_map(|(n, line)| {
            let line = line.strip_prefix('#').unwrap_or(line);
            line.starts_with("CALL_NOTIFIER_")
                .then(|| line.split_once('='))
                .flatten()
                .map(|(name, value)| (n + 1, name, value))
        })
        .collect()
}

/// The settings file holds every setting the binary reads from the
/// environment, each once, with the default it has under the unit (the
/// unit's `Environment=` where it sets one, else the flag's own), and no
/// variable the binary does not read: it must stay in step with
/// `config.rs`, since operators edit it rather than read `--help`.
#[test]
fn the_settings_file_lists_every_setting_with_its_default() {
    let text = read(SETTINGS);
    let lines = settings_lines(&text);
    let unit = read(UNIT);
    let unit_sets: Vec<(&str, &str)> = unit_settings(&unit)
        .into_iter()
        .filter(|(key, _)| *key == "Environment")
        .filter_map(|(_, assignment)| assignment.split_once('='))
        .collect();
    // Read by main.rs, not by clap: the log filter.
    let extra = ["CALL_NOTIFIER_LOG"];
    let cli = Cli::command();
    let mut problems = Vec::new();
    for arg in cli.get_arguments() {
        let Some(env) = arg.get_env().map(|e| e.to_string_lossy().into_owned()) else {
            continue;
        };
        let found: Vec<_> = lines.iter().filter(|(_, name, _)| *name == env).collect();
        if arg.is_hide_set() {
            // Deprecated and without effect: not offered to new installs.
            if !found.is_empty() {
                problems.push(format!("{env}: a deprecated setting is offered"));
            }
            continue;
        }
        let [(line, _, value)] = found[..] else {
            problems.push(format!("{env}: {} lines, not one", found.len()));
            continue;
        };
        let long = arg.get_long().expect("every setting has a long flag");
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let takes_value = arg.get_action().takes_values();
        let expected = unit_sets
            .iter()
            .find(|(name, _)| *name == env)
            .map(|(_, value)| (*value).to_owned())
            .or_else(|| (!defaults.is_empty()).then(|| defaults.join(",")));
        match expected {
            Some(expected) if *value != expected => problems.push(format!(
                "{SETTINGS}:{line}: {env}={value}, but its default is {expected}"
            )),
            // No default: the line shows an example, which must parse.
            None if takes_value => {
                let flag = format!("--{long}");
                if let Err(e) = Cli::try_parse_from(["call-notifier", flag.as_str(), value]) {
                    problems.push(format!("{SETTINGS}:{line}: {env}={value}: {e}"));
                }
            }
            _ => {}
        }
    }
    for (line, name, _) in &lines {
        let known = extra.contains(name)
            || cli
                .get_arguments()
                .any(|arg| arg.get_env().is_some_and(|env| env == *name));
        if !known {
            problems.push(format!(
                "{SETTINGS}:{line}: {name} is no variable the binary reads"
            ));
        }
    }
    for name in extra {
        if !lines.iter().any(|(_, n, _)| *n == name) {
            problems.push(format!("{name}: missing"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The unit reads the settings file where the package installs it, and
/// runs as the user the maintainer scripts create and purge.
#[test]
fn the_unit_and_the_package_agree_on_the_settings_file_and_the_user() {
    let unit = read(UNIT);
    let settings = unit_settings(&unit);
    let files: Vec<&str> = settings
        .iter()
        .filter(|(key, _)| *key == "EnvironmentFile")
        .map(|(_, value)| value.trim_start_matches('-'))
        .collect();
    assert_eq!(files, [SETTINGS_INSTALLED], "{UNIT}: EnvironmentFile");
    let manifest = read("Cargo.toml");
    assert!(
        manifest.contains(&format!(
            "[\"{SETTINGS}\", \"etc/call-notifier/\", \"640\"]"
        )),
        "Cargo.toml: [package.metadata.deb] does not install {SETTINGS} as {SETTINGS_INSTALLED}"
    );
    for script in ["contrib/debian/postinst", "contrib/debian/postrm"] {
        assert!(
            read(script).contains(&format!("USER={USER}\n")),
            "{script}: not for the user {USER}"
        );
    }
}

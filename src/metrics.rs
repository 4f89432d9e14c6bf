//! Prometheus metrics: what an operator pages on when phones stop ringing.
//!
//! One [`Metrics`] per server (not a global recorder), so several servers in
//! one test process keep their own counts. Served at `GET /metrics` in the
//! OpenMetrics text format, to `--metrics-allow` networks only.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::auth::{AuthError, Authorized};
use crate::push::{Payload, PushOutcome, Refusal};
use crate::store::Platform;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlatformLabel {
    pub platform: &'static str,
}

/// A device registration: its platform, and whether it made a device or
/// updated one (`created`, `updated`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistrationLabels {
    pub platform: &'static str,
    pub outcome: &'static str,
}

/// A push: its platform, its kind ([`Payload::kind`]: `call`,
/// `call_ended`, `message`), its outcome and the push service's reason
/// ([`crate::push::Reason`], a bounded set). The kind keeps the notices
/// apart from the calls: an iOS notice fails where its device has no
/// alert token, and that must not read as calls failing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushResultLabels {
    pub platform: &'static str,
    pub kind: &'static str,
    pub outcome: &'static str,
    pub reason: &'static str,
}

/// A push's platform and kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    pub platform: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabel {
    pub component: &'static str,
}

fn push_histogram<L: EncodeLabelSet + Clone + std::hash::Hash + Eq>() -> Family<L, Histogram> {
    // 5 ms to ~40 s: a push that wakes a phone takes 0.2 to 5 s.
    Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 14)))
}

/// Every metric the service keeps.
pub struct Metrics {
    registry: Registry,
    /// Incoming calls by how they ended (`ack`, `no_device`, `not_available`,
    /// `token_dead`, `timeout`, `overloaded`, `unavailable`, `shutdown`,
    /// `hung_up`, `cancelled`).
    pub calls: Family<OutcomeLabel, Counter>,
    /// Pushes by platform, kind (`call`, `call_ended`, `message`), outcome
    /// (`delivered`, `token_dead`, `retry`, `failed`) and the push
    /// service's reason (`BadDeviceToken`, `UNREGISTERED`, ..., `other`,
    /// `none`), so an operator sees why.
    pub pushes: Family<PushResultLabels, Counter>,
    /// How long one push send took, by platform and kind.
    pub push_duration: Family<PushLabels, Histogram>,
    /// Push to answer, as the app reports it (`message_start_time`), by platform.
    pub wakeup_roundtrip: Family<PlatformLabel, Histogram>,
    /// From the app's answer reaching a call-notifier instance to the PBX's
    /// answer leaving this one.
    pub wakeup_latency: Histogram,
    /// PBX requests parked now.
    pub parked: Gauge,
    /// Device registrations by platform and result (`created`, `updated`).
    pub registrations: Family<RegistrationLabels, Counter>,
    /// Device deletions by platform.
    pub deletions: Family<PlatformLabel, Counter>,
    /// Account API checks by result (`ok`, `cached`, `rejected`, `forbidden`, `unavailable`).
    pub auth_checks: Family<ResultLabel, Counter>,
    /// Failed store and broker operations, by component (`store`, `broker`).
    pub errors: Family<ComponentLabel, Counter>,
    /// Connections the listener failed to accept, most often for lack of
    /// file descriptors: a sign that clients hold connections open.
    pub accept_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("call_notifier");
        let metrics = Metrics {
            calls: Family::default(),
            pushes: Family::default(),
            push_duration: push_histogram(),
            wakeup_roundtrip: push_histogram(),
            // 10 µs to ~80 ms: pub/sub answers in well under a millisecond.
            wakeup_latency: Histogram::new(exponential_buckets(0.000_01, 2.0, 14)),
            parked: Gauge::default(),
            registrations: Family::default(),
            deletions: Family::default(),
            auth_checks: Family::default(),
            errors: Family::default(),
            accept_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "incoming_calls",
            "Incoming calls by outcome",
            metrics.calls.clone(),
        );
        registry.register(
            "pushes",
            "Pushes by platform, kind, outcome and the push service's reason",
            metrics.pushes.clone(),
        );
        registry.register(
            "push_duration_seconds",
            "Time one push send took",
            metrics.push_duration.clone(),
        );
        registry.register(
            "wakeup_roundtrip_seconds",
            "Push to app answer, as the app reports it",
            metrics.wakeup_roundtrip.clone(),
        );
        registry.register(
            "wakeup_latency_seconds",
            "App answer received to PBX answer sent",
            metrics.wakeup_latency.clone(),
        );
        registry.register(
            "parked_calls",
            "PBX requests parked now",
            metrics.parked.clone(),
        );
        registry.register(
            "device_registrations",
            "Device registrations by platform and result",
            metrics.registrations.clone(),
        );
        registry.register(
            "device_deletions",
            "Device deletions by platform",
            metrics.deletions.clone(),
        );
        registry.register(
            "auth_checks",
            "Account API checks by result",
            metrics.auth_checks.clone(),
        );
        registry.register(
            "errors",
            "Failed store and broker operations",
            metrics.errors.clone(),
        );
        registry.register(
            "accept_errors",
            "Connections the listener failed to accept (e.g. out of file descriptors)",
            metrics.accept_errors.clone(),
        );
        let metrics = Metrics {
            registry,
            ..metrics
        };
        metrics.start_at_zero();
        metrics
    }
}

/// The `outcome`s of `incoming_calls` ([`crate::calls::Outcome`] and
/// `hung_up`), spelled here because `calls` sits above this
/// module; `tests/contrib.rs` checks that every outcome a call can end with
/// is one.
const CALL_OUTCOMES: [&str; 10] = [
    "ack",
    "no_device",
    "not_available",
    "cancelled",
    "token_dead",
    "timeout",
    "overloaded",
    "unavailable",
    "shutdown",
    "hung_up",
];

/// The components `errors` counts, as the call path names them.
const COMPONENTS: [&str; 2] = ["store", "broker"];

/// The results `device_registrations` counts, as the device endpoints
/// name them.
const REGISTRATION_RESULTS: [&str; 2] = ["created", "updated"];

impl Metrics {
    /// Creates, at zero, the label sets of every labelled family that occur
    /// in normal service, so a fresh server exports each family the
    /// dashboard and the alert rules in `contrib/` read.
    ///
    /// A labelled family shows no sample until a label set is first used,
    /// and Prometheus reads a missing series as no data, not 0: a ratio
    /// alert over it cannot fire, a panel says "No data", and `rate()`
    /// misses the first event of a series that appears at 1. Label sets
    /// that carry a push service's own reason (`token_dead`, and `retry` or
    /// `failed` with a code) still appear on first use: a series at zero
    /// for each of the dozens of codes would be noise.
    fn start_at_zero(&self) {
        // `get_or_create` creates the series; its read guard is not needed.
        for outcome in CALL_OUTCOMES {
            let _ = self.calls.get_or_create(&OutcomeLabel { outcome });
        }
        let unanswered = || Refusal::unanswered("");
        let pushes = [
            PushOutcome::Delivered,
            PushOutcome::Retry {
                after: None,
                refusal: unanswered(),
            },
            PushOutcome::Failed(unanswered()),
        ];
        for platform in Platform::ALL.map(Platform::as_str) {
            for kind in Payload::KINDS {
                for outcome in &pushes {
                    let _ = self.pushes.get_or_create(&PushResultLabels {
                        platform,
                        kind,
                        outcome: outcome.as_str(),
                        reason: outcome.reason().as_str(),
                    });
                }
                let _ = self
                    .push_duration
                    .get_or_create(&PushLabels { platform, kind });
            }
            for outcome in REGISTRATION_RESULTS {
                let _ = self
                    .registrations
                    .get_or_create(&RegistrationLabels { platform, outcome });
            }
            let label = PlatformLabel { platform };
            let _ = self.deletions.get_or_create(&label);
            let _ = self.wakeup_roundtrip.get_or_create(&label);
        }
        let auth_results = [Authorized::Confirmed.as_str(), Authorized::Cached.as_str()]
            .into_iter()
            .chain(
                [
                    AuthError::Missing,
                    AuthError::Rejected,
                    AuthError::Forbidden,
                    AuthError::Unavailable(String::new()),
                    AuthError::Throttled {
                        rule: "",
                        retry_after: Duration::ZERO,
                    },
                ]
                .map(|refused| refused.as_str()),
            );
        for result in auth_results {
            let _ = self.auth_checks.get_or_create(&ResultLabel { result });
        }
        for component in COMPONENTS {
            let _ = self.errors.get_or_create(&ComponentLabel { component });
        }
    }

    pub fn call(&self, outcome: &'static str) {
        self.calls.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// One push sent: `kind` is the payload's ([`Payload::kind`]).
    pub fn push(
        &self,
        platform: Platform,
        kind: &'static str,
        outcome: &PushOutcome,
        seconds: f64,
    ) {
        let platform = platform.as_str();
        self.pushes
            .get_or_create(&PushResultLabels {
                platform,
                kind,
                outcome: outcome.as_str(),
                reason: outcome.reason().as_str(),
            })
            .inc();
        self.push_duration
            .get_or_create(&PushLabels { platform, kind })
            .observe(seconds);
    }

    /// A device registration: `created` or `updated`.
    pub fn registration(&self, platform: Platform, outcome: &'static str) {
        self.registrations
            .get_or_create(&RegistrationLabels {
                platform: platform.as_str(),
                outcome,
            })
            .inc();
    }

    pub fn deletion(&self, platform: Platform) {
        self.deletions
            .get_or_create(&PlatformLabel {
                platform: platform.as_str(),
            })
            .inc();
    }

    /// An account-API verdict, or the throttle's refusal.
    pub fn auth_check(&self, result: &'static str) {
        self.auth_checks
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// A first answer's roundtrip, push to answer, as the app reports it.
    pub fn wakeup_roundtrip(&self, platform: Platform, seconds: f64) {
        self.wakeup_roundtrip
            .get_or_create(&PlatformLabel {
                platform: platform.as_str(),
            })
            .observe(seconds);
    }

    pub fn error(&self, component: &'static str) {
        self.errors
            .get_or_create(&ComponentLabel { component })
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

//! Failed logins on the device endpoints, counted per source and per SIP
//! account, so that a password guesser is refused here with 429 before the
//! account API is asked: the account API cannot tell our clients apart and
//! would otherwise take the whole flood.

use std::time::Duration;

use super::network::ClientAddr;
use super::windows::Windows;
use super::AuthError;

/// Failed logins a source (IPv4 address or IPv6 /64) may have per window.
/// A phone with a stale password retries a few times, and a few phones share
/// an office NAT; 10 a minute lets them all through while a guesser gets no
/// more than 14,400 tries a day from one source.
const PER_SOURCE: u32 = 10;
/// Failed logins one SIP account may have per window, from all sources
/// together: a guesser with many addresses (one IPv6 /48 holds 65,536
/// /64s) gets no more than 20 tries a minute at one account.
const PER_ACCOUNT: u32 = 20;
/// The window of both limits: short, so an owner who mistyped or who sits
/// behind a blocked NAT waits a minute at most once the flood stops.
const WINDOW: Duration = Duration::from_secs(60);
/// How long a source that logged in to an account stays known for it.
const KNOWN_FOR: Duration = Duration::from_secs(24 * 60 * 60);
/// Most sources and accounts tracked; a full table drops its oldest
/// unblocked windows, never a block first.
const FAILURES_CAP: usize = 10_000;
/// Most (account, source) logins remembered: registrations from a day's
/// worth of phones, at about 60 bytes each.
const KNOWN_CAP: usize = 100_000;

const SOURCE_RULE: &str = "at most 10 failed logins per source per minute";
const ACCOUNT_RULE: &str = "at most 20 failed logins per SIP account per minute";

/// Counts failed logins, and remembers where each account logged in from.
#[derive(Debug)]
pub struct LoginLimiter {
    by_source: Windows<ClientAddr>,
    by_account: Windows<i64>,
    /// Sources that logged in to an account in the last day. Such a source
    /// is still asked about while the account is over its limit, so an
    /// attack on the account from elsewhere does not lock its owner out on
    /// the owner's usual network. Everyone else is refused without asking,
    /// correct password or not: it cannot be known correct without asking,
    /// and answering it differently would tell a guesser which one it was.
    known: Windows<(i64, ClientAddr)>,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter {
            by_source: Windows::new(PER_SOURCE, WINDOW, FAILURES_CAP),
            by_account: Windows::new(PER_ACCOUNT, WINDOW, FAILURES_CAP),
            known: Windows::new(u32::MAX, KNOWN_FOR, KNOWN_CAP),
        }
    }
}

impl LoginLimiter {
    /// Takes one login attempt to `account` from `client` out of both
    /// allowances, or refuses it. Until [`LoginLimiter::succeeded`] or
    /// [`LoginLimiter::undecided`] gives it back, the attempt counts as a
    /// failure: a burst of wrong passwords in flight together cannot get
    /// past the limit, and neither can one whose client hangs up first.
    pub fn attempt(&self, client: ClientAddr, account: i64) -> Result<(), AuthError> {
        let source = client.source();
        self.by_source
            .take(source)
            .map_err(|retry_after| AuthError::Throttled {
                rule: SOURCE_RULE,
                retry_after,
            })?;
        if self.known.counted((account, source)) > 0 {
            self.by_account.count(account);
            return Ok(());
        }
        if let Err(retry_after) = self.by_account.take(account) {
            // Refused without asking: it does not count for its source.
            self.by_source.give_back(source);
            return Err(AuthError::Throttled {
                rule: ACCOUNT_RULE,
                retry_after,
            });
        }
        Ok(())
    }

    /// The account API refused the attempt (401 or 403): it stays counted.
    pub fn failed(&self, client: ClientAddr, account: i64) {
        let source = client.source();
        if self.by_source.counted(source) == PER_SOURCE {
            tracing::warn!(%source, "failed logins from one source: refusing its logins for a while");
        }
        if self.by_account.counted(account) == PER_ACCOUNT {
            tracing::warn!(
                sip_user_id = account,
                "failed logins for one account: refusing its logins from unknown sources for a while"
            );
        }
    }

    /// The attempt logged in: it counts against nothing, and `client`'s
    /// source is known for `account` from now on.
    pub fn succeeded(&self, client: ClientAddr, account: i64) {
        self.undecided(client, account);
        self.known.count((account, client.source()));
    }

    /// The account API could not say (an outage): not the client's doing,
    /// so the attempt counts against nothing.
    pub fn undecided(&self, client: ClientAddr, account: i64) {
        self.by_source.give_back(client.source());
        self.by_account.give_back(account);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> ClientAddr {
        ClientAddr::Known(s.parse().unwrap())
    }

    fn rule(result: Result<(), AuthError>) -> Option<&'static str> {
        match result {
            Ok(()) => None,
            Err(AuthError::Throttled { rule, .. }) => Some(rule),
            Err(other) => panic!("{other:?}"),
        }
    }

    /// An attempt the account API refused.
    fn fail(logins: &LoginLimiter, client: ClientAddr, account: i64) {
        assert_eq!(rule(logins.attempt(client, account)), None);
        logins.failed(client, account);
    }

    #[test]
    fn a_source_is_refused_after_its_failures_on_any_account() {
        let logins = LoginLimiter::default();
        let guesser = ip("203.0.113.1");
        for n in 0..PER_SOURCE {
            fail(&logins, guesser, i64::from(n % 2) + 1);
        }
        assert_eq!(rule(logins.attempt(guesser, 1)), Some(SOURCE_RULE));
        assert_eq!(rule(logins.attempt(guesser, 3)), Some(SOURCE_RULE));
        // Also when it logged in to that account before: its own doing.
        logins.known.count((1, guesser));
        assert_eq!(rule(logins.attempt(guesser, 1)), Some(SOURCE_RULE));
        assert_eq!(rule(logins.attempt(ip("203.0.113.2"), 1)), None);
    }

    #[test]
    fn attempts_in_flight_count_until_they_succeed() {
        let logins = LoginLimiter::default();
        let phone = ip("203.0.113.1");
        for _ in 0..PER_SOURCE {
            assert_eq!(rule(logins.attempt(phone, 1)), None);
        }
        assert_eq!(rule(logins.attempt(phone, 1)), Some(SOURCE_RULE));
        // Successes and outages count against nothing.
        logins.succeeded(phone, 1);
        logins.undecided(phone, 1);
        assert_eq!(rule(logins.attempt(phone, 1)), None);
        assert_eq!(rule(logins.attempt(phone, 1)), None);
        assert_eq!(rule(logins.attempt(phone, 1)), Some(SOURCE_RULE));
    }

    #[test]
    fn one_64_is_one_source_and_unknown_clients_are_one_too() {
        let logins = LoginLimiter::default();
        for n in 0..PER_SOURCE {
            fail(&logins, ip(&format!("2001:db8:0:7::{n:x}")), 1);
            fail(&logins, ClientAddr::Unknown, 2);
        }
        let same_64 = ip("2001:db8:0:7:ffff::9");
        assert_eq!(rule(logins.attempt(same_64, 5)), Some(SOURCE_RULE));
        assert_eq!(
            rule(logins.attempt(ClientAddr::Unknown, 5)),
            Some(SOURCE_RULE)
        );
        assert_eq!(rule(logins.attempt(ip("2001:db8:0:8::1"), 5)), None);
    }

    #[test]
    fn an_account_is_refused_after_its_failures_except_to_known_sources() {
        let logins = LoginLimiter::default();
        let owner = ip("198.51.100.7");
        assert_eq!(rule(logins.attempt(owner, 42)), None);
        logins.succeeded(owner, 42);
        // Two failures from each of ten sources: none is over its own limit.
        for n in 0..PER_ACCOUNT {
            fail(&logins, ip(&format!("203.0.113.{}", n / 2)), 42);
        }
        let stranger = ip("192.0.2.1");
        assert_eq!(rule(logins.attempt(stranger, 42)), Some(ACCOUNT_RULE));
        // That refusal did not count for the stranger's source.
        assert_eq!(logins.by_source.counted(stranger.source()), 0);
        assert_eq!(rule(logins.attempt(stranger, 43)), None);
        // The owner's source is still asked.
        assert_eq!(rule(logins.attempt(owner, 42)), None);
    }
}

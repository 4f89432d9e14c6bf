//! How often a phone is told that another device took over its SIP
//! account: once per token per [`NOTICE_INTERVAL`], so an account
//! re-registered in a loop does not push the phone it replaced in a loop;
//! and at most [`ACCOUNT_NOTICES`] per account per interval, so an account
//! registering fresh tokens in a loop (each one replacing the last) does not
//! push a notice per token.
//!
//! Both are bounded tables of windows ([`Windows`]). A full one makes room
//! by forgetting its oldest entries rather than by holding every notice
//! back: one account flooding it must not silence the others. Forgetting a
//! token early costs at most a second notice to it; the per-account limit
//! keeps one account from being the one that fills the token table.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use crate::auth::Windows;

/// How often one token may be told that another device took over.
const NOTICE_INTERVAL: Duration = Duration::from_secs(60);

/// Takeover notices one SIP account may send per [`NOTICE_INTERVAL`]: more
/// than a phone swapped twice (see tests/hardening_push.rs), far fewer than
/// a registration loop would ask for.
const ACCOUNT_NOTICES: u32 = 3;

/// The most tokens, and accounts, remembered: 10,000 takeovers a minute is
/// far beyond any real traffic, and a few hundred KiB.
const MAX_RECENT_NOTICES: usize = 10_000;

/// Why a takeover notice is held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldBack {
    /// This token was told within the interval.
    TokenToldLately,
    /// The account has sent its [`ACCOUNT_NOTICES`] within the interval.
    AccountOverLimit,
}

impl fmt::Display for HeldBack {
    /// What the log line says.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeldBack::TokenToldLately => f.write_str("this token was told within the minute"),
            HeldBack::AccountOverLimit => write!(
                f,
                "the account has sent its {ACCOUNT_NOTICES} takeover notices within the minute"
            ),
        }
    }
}

/// The tokens and accounts recently told; one per server.
pub struct TakeoverNotices {
    /// Keyed per process, so nobody can pick tokens that collide (a
    /// collision would only hold back a notice); a table of hashes, not of
    /// tokens, is small and holds no secret.
    hasher: RandomState,
    tokens: Windows<u64>,
    accounts: Windows<i64>,
}

impl Default for TakeoverNotices {
    fn default() -> Self {
        TakeoverNotices {
            hasher: RandomState::new(),
            tokens: Windows::new(1, NOTICE_INTERVAL, MAX_RECENT_NOTICES),
            accounts: Windows::new(ACCOUNT_NOTICES, NOTICE_INTERVAL, MAX_RECENT_NOTICES),
        }
    }
}

impl TakeoverNotices {
    /// Whether `token`, replaced on `sip_user_id`, may be told now; counts
    /// it against both limits if so. A notice held back by one limit costs
    /// nothing against the other.
    pub fn may_tell(&self, sip_user_id: i64, token: &str) -> Result<(), HeldBack> {
        let token = self.hasher.hash_one(token);
        if self.tokens.take(token).is_err() {
            return Err(HeldBack::TokenToldLately);
        }
        if self.accounts.take(sip_user_id).is_err() {
            self.tokens.give_back(token);
            return Err(HeldBack::AccountOverLimit);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_token_is_told_once_per_interval() {
        let notices = TakeoverNotices::default();
        assert_eq!(notices.may_tell(1, "a"), Ok(()));
        assert_eq!(notices.may_tell(1, "a"), Err(HeldBack::TokenToldLately));
        assert_eq!(notices.may_tell(2, "b"), Ok(()));
        tokio::time::advance(NOTICE_INTERVAL - Duration::from_millis(1)).await;
        assert_eq!(notices.may_tell(1, "a"), Err(HeldBack::TokenToldLately));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(notices.may_tell(1, "a"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_account_sends_a_few_notices_per_interval_and_others_still_theirs() {
        let notices = TakeoverNotices::default();
        let told = (0..1_000)
            .filter(|n| notices.may_tell(7, &format!("fresh-{n}")).is_ok())
            .count();
        assert_eq!(told, ACCOUNT_NOTICES as usize);
        assert_eq!(
            notices.may_tell(7, "another"),
            Err(HeldBack::AccountOverLimit)
        );
        assert_eq!(notices.may_tell(8, "fresh-999"), Ok(()), "not marked told");
        tokio::time::advance(NOTICE_INTERVAL).await;
        assert_eq!(notices.may_tell(7, "another"), Ok(()));
    }

    #[test]
    fn a_full_table_silences_nobody() {
        let notices = TakeoverNotices::default();
        // Every account and token a new one: more than the tables hold.
        for n in 0..(MAX_RECENT_NOTICES as i64 + 5_000) {
            assert_eq!(notices.may_tell(n, &format!("t{n}")), Ok(()), "{n}");
        }
        assert_eq!(notices.may_tell(-1, "newcomer"), Ok(()));
    }
}

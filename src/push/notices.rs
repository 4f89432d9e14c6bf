//! How often a phone is told that another device took over its SIP
//! account: once per token per [`NOTICE_INTERVAL`], so an account
//! re-registered in a loop does not push the phone it replaced in a loop.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tokens recently told they were replaced; one per server.
pub struct TakeoverNotices(Mutex<RecentNotices>);

impl Default for TakeoverNotices {
    fn default() -> Self {
        TakeoverNotices(Mutex::new(RecentNotices::new(MAX_RECENT_NOTICES)))
    }
}

impl TakeoverNotices {
    /// Whether `token` may be told now; notes it if so.
    pub fn may_tell(&self, token: &str) -> bool {
        self.0
            .lock()
            .expect("the notice lock is never poisoned")
            .first_within_interval(token, Instant::now())
    }
}

/// How often one token may be told that another device took over.
const NOTICE_INTERVAL: Duration = Duration::from_secs(60);

/// The most tokens [`RecentNotices`] remembers: 10,000 takeovers a minute is
/// far beyond any real traffic, and about 400 KiB.
const MAX_RECENT_NOTICES: usize = 10_000;

/// Recently told tokens, oldest first, as hashes (keyed per process, so
/// nobody can pick tokens that collide; a collision would only hold back a
/// notice). Bounded: when it holds `capacity` tokens all told within the
/// interval, further notices are held back rather than an entry forgotten,
/// so a flood of takeovers cannot buy a second notice for a token.
struct RecentNotices {
    hasher: RandomState,
    capacity: usize,
    order: VecDeque<(Instant, u64)>,
    told: HashSet<u64>,
}

impl RecentNotices {
    fn new(capacity: usize) -> Self {
        RecentNotices {
            hasher: RandomState::new(),
            capacity,
            order: VecDeque::new(),
            told: HashSet::new(),
        }
    }

    /// Whether `token` may be told now, noting it if so.
    fn first_within_interval(&mut self, token: &str, now: Instant) -> bool {
        while let Some(&(at, hash)) = self.order.front() {
            if now.saturating_duration_since(at) < NOTICE_INTERVAL {
                break;
            }
            self.order.pop_front();
            self.told.remove(&hash);
        }
        let hash = self.hasher.hash_one(token);
        if self.told.contains(&hash) || self.order.len() >= self.capacity {
            return false;
        }
        self.order.push_back((now, hash));
        self.told.insert(hash);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_told_once_per_interval() {
        let mut recent = RecentNotices::new(100);
        let start = Instant::now();
        assert!(recent.first_within_interval("a", start));
        assert!(!recent.first_within_interval("a", start));
        assert!(recent.first_within_interval("b", start));
        let later = start + NOTICE_INTERVAL - Duration::from_millis(1);
        assert!(!recent.first_within_interval("a", later));
        assert!(recent.first_within_interval("a", start + NOTICE_INTERVAL));
        assert!(!recent.first_within_interval("a", start + NOTICE_INTERVAL));
    }

    #[test]
    fn a_full_table_holds_notices_back_and_frees_up_as_entries_age() {
        let mut recent = RecentNotices::new(3);
        let start = Instant::now();
        for token in ["a", "b", "c"] {
            assert!(recent.first_within_interval(token, start));
        }
        // Full: nobody new is told, and nobody told is forgotten.
        assert!(!recent.first_within_interval("d", start));
        assert!(!recent.first_within_interval("a", start));
        assert_eq!(recent.order.len(), 3);
        // Once the oldest have aged out there is room again.
        let later = start + NOTICE_INTERVAL;
        assert!(recent.first_within_interval("d", later));
        assert_eq!((recent.order.len(), recent.told.len()), (1, 1));
    }
}

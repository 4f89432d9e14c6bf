//! Counting per key in fixed time windows, in a table of bounded size: the
//! one structure behind every limit here (unknown keys on call-response,
//! failed logins per source and per account, recent logins).
//!
//! A full table makes room by dropping ended windows, then the oldest ones
//! that have not reached the limit, and blocked ones only when nothing else
//! is left: a blocked source cannot free itself by sending from thousands of
//! other addresses.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

// tokio's clock, so tests can move time on with a paused clock.
use tokio::time::Instant;

/// One key's window: when it started and how much it has counted since.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

/// Counts per key; a key that has counted `limit` in its window is refused
/// until the window ends.
#[derive(Debug)]
pub(crate) struct Windows<K> {
    limit: u32,
    window: Duration,
    /// Most keys held, so a flood of distinct keys costs bounded memory.
    cap: usize,
    table: Mutex<HashMap<K, Window>>,
}

impl<K: Hash + Eq + Copy> Windows<K> {
    pub(crate) fn new(limit: u32, window: Duration, cap: usize) -> Self {
        Windows {
            limit,
            window,
            cap: cap.max(1),
            table: Mutex::new(HashMap::new()),
        }
    }

    /// How much `key` has counted in its current window.
    pub(crate) fn counted(&self, key: K) -> u32 {
        let now = Instant::now();
        let table = self.table.lock().expect("windows lock");
        table
            .get(&key)
            .filter(|w| now.duration_since(w.start) < self.window)
            .map_or(0, |w| w.count)
    }

    /// Whether `key` has used up its window, and if so how long it must
    /// still wait: a look, which counts nothing.
    pub(crate) fn check(&self, key: K) -> Result<(), Duration> {
        let now = Instant::now();
        let table = self.table.lock().expect("windows lock");
        match table.get(&key) {
            Some(w) if now.duration_since(w.start) < self.window && w.count >= self.limit => {
                Err(self.window - now.duration_since(w.start))
            }
            _ => Ok(()),
        }
    }

    /// Counts one for `key`, unless it has used up its window: then says
    /// how long it must still wait. Checking and counting under one lock
    /// lets no two requests in flight together past the limit. `Ok(true)`
    /// when this one used the window up, so the caller can log the start of
    /// a block once rather than every refusal.
    pub(crate) fn take(&self, key: K) -> Result<bool, Duration> {
        let now = Instant::now();
        let mut table = self.table.lock().expect("windows lock");
        let window = self.window_of(&mut table, key, now);
        if window.count >= self.limit {
            return Err(self.window - now.duration_since(window.start));
        }
        window.count += 1;
        Ok(window.count == self.limit)
    }

    /// Counts one for `key`, over the limit or not: a record, not a request
    /// for permission.
    pub(crate) fn count(&self, key: K) {
        let now = Instant::now();
        let mut table = self.table.lock().expect("windows lock");
        let window = self.window_of(&mut table, key, now);
        window.count = window.count.saturating_add(1);
    }

    /// Takes back one that [`Windows::take`] counted, for something that
    /// turned out not to count. Should the window have started anew since,
    /// the new one is one short: a rounding error of one, at a window's edge.
    pub(crate) fn give_back(&self, key: K) {
        let now = Instant::now();
        let mut table = self.table.lock().expect("windows lock");
        if let Some(window) = table.get_mut(&key) {
            if now.duration_since(window.start) < self.window {
                window.count = window.count.saturating_sub(1);
            }
        }
    }

    /// `key`'s current window, a new one when it had none or it ended.
    fn window_of<'t>(
        &self,
        table: &'t mut HashMap<K, Window>,
        key: K,
        now: Instant,
    ) -> &'t mut Window {
        if table.len() >= self.cap && !table.contains_key(&key) {
            self.make_room(table, now);
        }
        let window = table.entry(key).or_insert(Window {
            start: now,
            count: 0,
        });
        if now.duration_since(window.start) >= self.window {
            *window = Window {
                start: now,
                count: 0,
            };
        }
        window
    }

    /// Frees a tenth of the table at once (so a flood of new keys scans it
    /// once per tenth of the cap, not once per key): ended windows first, then
    /// the oldest unblocked, then, only if every key is blocked, the oldest.
    fn make_room(&self, table: &mut HashMap<K, Window>, now: Instant) {
        table.retain(|_, w| now.duration_since(w.start) < self.window);
        let target = self.cap - self.cap.div_ceil(10);
        if table.len() <= target {
            return;
        }
        let mut by_age: Vec<(bool, Instant, K)> = table
            .iter()
            .map(|(key, w)| (w.count >= self.limit, w.start, *key))
            .collect();
        let excess = by_age.len() - target;
        // Unblocked before blocked, oldest first within each.
        by_age.select_nth_unstable_by_key(excess - 1, |(blocked, start, _)| (*blocked, *start));
        for (_, _, key) in &by_age[..excess] {
            table.remove(key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().expect("windows lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn blocked<K: Hash + Eq + Copy>(windows: &Windows<K>, key: K) -> bool {
        windows.counted(key) >= windows.limit
    }

    #[test]
    fn a_key_is_refused_once_it_has_taken_the_limit() {
        let windows = Windows::new(3, WINDOW, 100);
        assert_eq!(windows.take(1), Ok(false));
        assert_eq!(windows.take(1), Ok(false));
        assert_eq!(
            windows.take(1),
            Ok(true),
            "the third one uses the window up"
        );
        assert!(windows.take(1).is_err_and(|wait| wait <= WINDOW));
        assert_eq!(windows.counted(1), 3, "a refusal does not count");
        assert_eq!(windows.take(2), Ok(false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_counts_nothing_and_says_how_long_a_block_lasts() {
        let windows = Windows::new(2, WINDOW, 100);
        assert_eq!(windows.check(1), Ok(()));
        windows.take(1).unwrap();
        assert_eq!(windows.check(1), Ok(()));
        assert_eq!(windows.counted(1), 1, "checks count nothing");
        windows.take(1).unwrap();
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(windows.check(1), Err(Duration::from_secs(40)));
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(windows.check(1), Ok(()), "the block ended with its window");
    }

    #[test]
    fn what_is_given_back_can_be_taken_again() {
        let windows = Windows::new(2, WINDOW, 100);
        windows.take(1).unwrap();
        windows.take(1).unwrap();
        windows.give_back(1);
        assert_eq!(windows.take(1), Ok(true));
        assert!(windows.take(1).is_err());
        windows.give_back(7); // nothing to give back: no harm
        assert_eq!(windows.counted(7), 0);
    }

    #[test]
    fn counting_goes_past_the_limit() {
        let windows = Windows::new(1, WINDOW, 100);
        windows.count(1);
        windows.count(1);
        assert_eq!(windows.counted(1), 2);
        assert!(windows.take(1).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_block_ends_with_its_window() {
        let windows = Windows::new(1, WINDOW, 100);
        windows.take("a").unwrap();
        tokio::time::advance(Duration::from_secs(45)).await;
        assert_eq!(windows.take("a"), Err(Duration::from_secs(15)));
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(windows.counted("a"), 0);
        assert_eq!(windows.take("a"), Ok(true), "a new window starts at one");
    }

    #[test]
    fn a_blocked_key_outlives_a_flood_of_other_keys() {
        let windows = Windows::new(2, WINDOW, 1_000);
        windows.take(u32::MAX).unwrap();
        windows.take(u32::MAX).unwrap();
        for key in 0..25_000 {
            windows.take(key).unwrap();
            assert!(windows.len() <= 1_000);
        }
        assert!(windows.take(u32::MAX).is_err(), "still blocked");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_drops_its_oldest_unblocked_windows_first() {
        let windows = Windows::new(2, WINDOW, 10);
        // Key 0 is the oldest and blocked; 1 to 9 come later, one each.
        windows.count(0);
        windows.count(0);
        for key in 1..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            windows.count(key);
        }
        assert_eq!(windows.len(), 10);
        tokio::time::advance(Duration::from_secs(1)).await;
        windows.count(1000);
        // One tenth made room: the oldest unblocked (key 1), not key 0.
        assert_eq!(windows.len(), 10);
        assert!(blocked(&windows, 0));
        assert_eq!(windows.counted(1), 0);
        assert_eq!(windows.counted(2), 1);
        assert_eq!(windows.counted(1000), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_key_is_blocked_the_oldest_go() {
        let windows = Windows::new(1, WINDOW, 10);
        for key in 0..10 {
            windows.count(key);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        windows.count(10);
        assert_eq!(windows.len(), 10);
        assert_eq!(windows.counted(0), 0, "the oldest block went");
        assert!(blocked(&windows, 1));
        assert!(blocked(&windows, 10));
    }

    #[tokio::test(start_paused = true)]
    async fn ended_windows_are_dropped_before_any_live_one() {
        let windows = Windows::new(5, WINDOW, 10);
        for key in 0..5 {
            windows.count(key);
        }
        tokio::time::advance(WINDOW).await;
        for key in 5..10 {
            windows.count(key);
        }
        windows.count(10);
        assert_eq!(windows.len(), 6, "the five ended windows went, no live one");
        assert!((5..=10).all(|key| windows.counted(key) == 1));
    }
}

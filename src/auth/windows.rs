//! Counting per key in fixed time windows, in a table of bounded size: the
//! one structure behind every limit here (unknown keys on call-response).
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
        assert_eq!(windows.take(2), Ok(false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_block_ends_with_its_window() {
        let windows = Windows::new(1, WINDOW, 100);
        windows.take("a").unwrap();
        tokio::time::advance(Duration::from_secs(45)).await;
        assert_eq!(windows.take("a"), Err(Duration::from_secs(15)));
        tokio::time::advance(Duration::from_secs(15)).await;
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
        windows.take(0).unwrap();
        windows.take(0).unwrap();
        for key in 1..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            windows.take(key).unwrap();
        }
        assert_eq!(windows.len(), 10);
        tokio::time::advance(Duration::from_secs(1)).await;
        windows.take(1000).unwrap();
        // One tenth made room: the oldest unblocked (key 1), not key 0.
        assert_eq!(windows.len(), 10);
        assert!(windows.take(0).is_err());
        assert_eq!(windows.take(2), Ok(true), "key 2 kept its count");
        assert_eq!(windows.take(1), Ok(false), "key 1 starts anew");
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_key_is_blocked_the_oldest_go() {
        let windows = Windows::new(1, WINDOW, 10);
        for key in 0..10 {
            windows.take(key).unwrap();
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        windows.take(10).unwrap();
        assert_eq!(windows.len(), 10);
        assert!(windows.take(1).is_err());
        assert!(windows.take(10).is_err());
        assert_eq!(windows.take(0), Ok(true), "the oldest block went");
    }

    #[tokio::test(start_paused = true)]
    async fn ended_windows_are_dropped_before_any_live_one() {
        let windows = Windows::new(5, WINDOW, 10);
        for key in 0..5 {
            windows.take(key).unwrap();
        }
        tokio::time::advance(WINDOW).await;
        for key in 5..10 {
            windows.take(key).unwrap();
        }
        windows.take(10).unwrap();
        assert_eq!(windows.len(), 6, "the five ended windows went, no live one");
    }
}

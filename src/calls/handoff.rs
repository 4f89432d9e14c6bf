//! The answered call's follow-up, handed to the answer that won it, so
//! that the PBX's `status=ACK` goes out before the app's 202 with no
//! thread woken for it, when the call is parked on the instance the answer
//! reached ([`crate::broker::CallBroker::holds`]: always in process).
//!
//! There the broker wakes the call's task from inside the answer, on the
//! answer's worker: the call's task takes the worker's next slot and
//! runs as soon as the answer's task stops. If the answer's task went on
//! to write its 202 first, the PBX would wait for that write (the plain
//! floor in `benches/calls/floor.rs` writes the ACK first). Stopping to
//! wait is not enough by itself: once the call's task has its outcome it
//! spawns its follow-up (the other phones' notices, the tombstone), and a
//! task woken besides it then takes the next slot and pushes the other to
//! the queue, where tokio wakes the runtime's other worker to steal it, a
//! thread wake-up before the ACK (`docs/performance.md`, "Wake-ups nothing
//! needs"). So the answer that waits registers here under its push key;
//! the call's task hands it the follow-up instead of spawning it, which
//! wakes that one task and no other; the ACK is written; the answer's task
//! spawns the follow-up and writes its 202.
//!
//! A follow-up is never lost: with nobody waiting, or the waiter gone, it
//! is spawned as before. A waiter is never stranded: it waits at most
//! [`BACKSTOP`] (the call's task may never come: its PBX hung up as the
//! answer won), and leaves its place when dropped.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

/// The work an answered call does after its ACK.
pub type FollowUp = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How long an answer waits for the call it won, at most: the call's task
/// runs at once on the answer's worker, so only a call that ended some
/// other way (its PBX hung up just then) lets it run out, and the app's 202
/// comes that much later.
pub const BACKSTOP: Duration = Duration::from_millis(100);

/// Each waiting answer's place, by push key: its number (so that only it
/// leaves it) and where its follow-up goes.
type Places = HashMap<String, (u64, oneshot::Sender<FollowUp>)>;

/// The answers waiting for their call's follow-up.
#[derive(Default)]
pub struct Handoffs {
    waiting: Mutex<Places>,
    next: AtomicU64,
}

impl Handoffs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Places> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An answer to `push_key` about to be given: from now on the call's
    /// follow-up comes to it. A second answer to the same key takes the
    /// place; the first then waits for nothing.
    pub fn expect(&self, push_key: &str) -> Expecting<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.lock().insert(push_key.to_owned(), (id, sender));
        Expecting {
            handoffs: self,
            push_key: push_key.to_owned(),
            id,
            receiver: Some(receiver),
        }
    }

    /// Gives `follow_up` to the answer waiting under `push_key`, or spawns
    /// it when there is none (or it is gone).
    pub fn hand_over(&self, push_key: &str, follow_up: FollowUp) {
        let waiting = self.lock().remove(push_key);
        let unclaimed = match waiting {
            Some((_, sender)) => sender.send(follow_up).err(),
            None => Some(follow_up),
        };
        if let Some(follow_up) = unclaimed {
            tokio::spawn(follow_up);
        }
    }

    /// How many answers wait (for the tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// An answer's place in [`Handoffs`]; dropping it leaves the place.
pub struct Expecting<'a> {
    handoffs: &'a Handoffs,
    push_key: String,
    id: u64,
    receiver: Option<oneshot::Receiver<FollowUp>>,
}

impl Expecting<'_> {
    /// Waits until the call's task has its outcome (and has written it, in
    /// the same poll) and spawns the follow-up it hands over; returns at
    /// once if it hands nothing (another answer took the place), and after
    /// [`BACKSTOP`] at most.
    pub async fn follow(mut self) {
        let Some(receiver) = self.receiver.take() else {
            return;
        };
        if let Ok(Ok(follow_up)) = tokio::time::timeout(BACKSTOP, receiver).await {
            // Spawned from this task, it takes the worker's next slot and
            // runs once the 202 is written.
            tokio::spawn(follow_up);
        }
    }
}

impl Drop for Expecting<'_> {
    fn drop(&mut self) {
        let mut waiting = self.handoffs.lock();
        if waiting
            .get(&self.push_key)
            .is_some_and(|(id, _)| *id == self.id)
        {
            waiting.remove(&self.push_key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use super::*;

    fn counting(ran: &Arc<AtomicUsize>) -> FollowUp {
        let ran = ran.clone();
        Box::pin(async move {
            ran.fetch_add(1, Ordering::SeqCst);
        })
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn the_waiting_answer_gets_the_follow_up_and_spawns_it() {
        let handoffs = Handoffs::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let expecting = handoffs.expect("k.1");
        handoffs.hand_over("k.1", counting(&ran));
        assert_eq!(handoffs.len(), 0, "the place is taken by the hand-over");
        expecting.follow().await;
        settle().await;
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn with_nobody_waiting_or_the_waiter_gone_the_follow_up_is_spawned() {
        let handoffs = Handoffs::default();
        let ran = Arc::new(AtomicUsize::new(0));
        handoffs.hand_over("k.1", counting(&ran));
        let gone = handoffs.expect("k.2");
        drop(gone);
        assert_eq!(handoffs.len(), 0, "a dropped waiter leaves its place");
        handoffs.hand_over("k.2", counting(&ran));
        settle().await;
        assert_eq!(ran.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_second_answer_takes_the_place_and_the_first_waits_for_nothing() {
        let handoffs = Handoffs::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let first = handoffs.expect("k");
        let second = handoffs.expect("k");
        // The first returns at once: its sender was replaced.
        first.follow().await;
        assert_eq!(
            handoffs.len(),
            1,
            "the first leaving left the second's place"
        );
        handoffs.hand_over("k", counting(&ran));
        second.follow().await;
        settle().await;
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_whose_call_never_comes_stops_waiting_at_the_backstop() {
        let handoffs = Handoffs::default();
        let started = tokio::time::Instant::now();
        handoffs.expect("k").follow().await;
        assert_eq!(started.elapsed(), BACKSTOP);
        assert_eq!(handoffs.len(), 0);
    }
}

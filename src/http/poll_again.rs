//! A connection's task that wakes itself is polled again at once, not
//! rescheduled.
//!
//! hyper wakes a connection's task from inside that task's own poll: the
//! request body it feeds to the handler (and, until it read its count
//! lazily, the idle clock of [`super::listener`] on each request). tokio
//! treats a task woken while it runs as a yield: it goes to the back of the
//! worker's queue and the runtime wakes its other, parked worker to come
//! and steal it (a futex wake, and on a virtual machine a halted vCPU to
//! start). On an idle server that is two or three thread wake-ups per
//! request that nothing needs, one of them between the app's answer and the
//! PBX's `status=ACK`, and the woken worker competes for the machine's
//! cores with the PBX reading its answer. A bare hyper server's idle
//! wake-up, 2 workers on 2 cores, took 245-284 µs at the median where the
//! same with 1 worker took 165-171 µs; polled in place, 186-188 µs
//! (`docs/performance.md`, "Wake-ups nothing needs").
//!
//! Used with the in-process broker only: on Redis the answer waits on two
//! sockets, and its share of the wake-up grew with it in both runs it was
//! measured in (the same section).
//!
//! [`PollAgain`] hands the inner future a waker of its own. A wake that
//! comes while the inner future is being polled only marks it, and the
//! inner future is polled again before this poll returns; any other wake
//! goes to the task. The loop is bounded: after [`POLLS`] rounds the task
//! yields to the runtime like any other, so a busy connection cannot hold a
//! worker.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Rounds of one poll at most (hyper's own read-write loop takes 16 before
/// it yields).
const POLLS: usize = 8;

/// The waker [`PollAgain`] gives its future.
struct Relay {
    /// The inner future is being polled: a wake now only marks it.
    polling: AtomicBool,
    /// Woken since the round began.
    woken: AtomicBool,
    /// The task's own waker, for wakes between polls.
    task: AtomicWaker,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Marked first, then checked: a poll that has just ended sees the
        // mark and polls again, or this sees it ended and wakes the task
        // (both, at worst, which costs one spare poll and loses nothing).
        self.woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

/// A future (a connection's whole life) polled again in place when it
/// wakes itself.
pub struct PollAgain<F> {
    inner: Pin<Box<F>>,
    relay: Arc<Relay>,
    waker: Waker,
}

impl<F: Future> PollAgain<F> {
    pub fn new(inner: F) -> Self {
        let relay = Arc::new(Relay {
            polling: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        PollAgain {
            inner: Box::pin(inner),
            waker: Waker::from(relay.clone()),
            relay,
        }
    }
}

impl<F: Future> Future for PollAgain<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        this.relay.task.register(cx.waker());
        let mut inner = Context::from_waker(&this.waker);
        for _ in 0..POLLS {
            this.relay.woken.store(false, Ordering::SeqCst);
            this.relay.polling.store(true, Ordering::SeqCst);
            let polled = this.inner.as_mut().poll(&mut inner);
            this.relay.polling.store(false, Ordering::SeqCst);
            if polled.is_ready() {
                return polled;
            }
            if !this.relay.woken.swap(false, Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        // Still waking itself: back to the runtime's queue, behind the rest.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// The task's waker: counts its wakes.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Count {
        fn wakes(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// Pending `self_wakes` times, waking itself each time, then ready with
    /// how many times it was polled.
    struct WakesItself {
        self_wakes: usize,
        polls: usize,
    }

    impl Future for WakesItself {
        type Output = usize;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            self.polls += 1;
            if self.polls > self.self_wakes {
                return Poll::Ready(self.polls);
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn poll_once<F: Future>(future: &mut PollAgain<F>, task: &Arc<Count>) -> Poll<F::Output> {
        let waker = Waker::from(task.clone());
        Pin::new(future).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn a_future_that_wakes_itself_is_polled_again_in_the_same_poll() {
        let task = Arc::new(Count::default());
        let mut future = PollAgain::new(WakesItself {
            self_wakes: 3,
            polls: 0,
        });
        assert_eq!(poll_once(&mut future, &task), Poll::Ready(4));
        assert_eq!(task.wakes(), 0, "the runtime was never asked to reschedule");
    }

    #[test]
    fn one_that_keeps_waking_itself_yields_to_the_runtime_after_a_bound() {
        let task = Arc::new(Count::default());
        let mut future = PollAgain::new(WakesItself {
            self_wakes: POLLS + 2,
            polls: 0,
        });
        assert_eq!(poll_once(&mut future, &task), Poll::Pending);
        assert_eq!(task.wakes(), 1, "rescheduled once, behind the others");
        assert_eq!(poll_once(&mut future, &task), Poll::Ready(POLLS + 3));
        assert_eq!(task.wakes(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wake_from_elsewhere_between_polls_reaches_the_task() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let task = Arc::new(Count::default());
        let mut future = PollAgain::new(rx);
        assert!(poll_once(&mut future, &task).is_pending());
        std::thread::spawn(move || tx.send(7))
            .join()
            .expect("the sender thread")
            .expect("the receiver is alive");
        assert_eq!(task.wakes(), 1);
        assert_eq!(poll_once(&mut future, &task), Poll::Ready(Ok(7)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_task_that_wakes_itself_runs_to_the_end() {
        // The real thing, end to end: a oneshot sent from inside the same
        // task (a self-wake) and one from another task, through tokio.
        let (inside_tx, inside_rx) = tokio::sync::oneshot::channel::<u32>();
        let (outside_tx, outside_rx) = tokio::sync::oneshot::channel::<u32>();
        let joined = tokio::spawn(PollAgain::new(async move {
            let mut inside_tx = Some(inside_tx);
            let mut inside_rx = std::pin::pin!(inside_rx);
            let first = std::future::poll_fn(|cx| {
                if let Poll::Ready(v) = inside_rx.as_mut().poll(cx) {
                    return Poll::Ready(v);
                }
                if let Some(tx) = inside_tx.take() {
                    let _ = tx.send(1);
                }
                Poll::Pending
            })
            .await
            .expect("sent");
            first + outside_rx.await.expect("sent")
        }));
        tokio::task::yield_now().await;
        outside_tx.send(2).expect("the task waits");
        assert_eq!(joined.await.expect("the task"), 3);
    }
}

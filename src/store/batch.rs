//! Rows written off the request path and in batches: the response log and
//! the call history.
//!
//! A request must answer at once, and the database takes one writer at a
//! time (SQLite) or a round trip per statement (PostgreSQL): a row per
//! request, each in its own task, falls behind at a few thousand requests
//! per second. Instead, rows queue in a bounded channel and one task writes
//! whatever piled up in one transaction. A full queue drops the row
//! (counted, never blocking a request); shutdown drains the queue, once the
//! rows promised ([`BatchWriter::promise`]) have come in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, Notify, OwnedRwLockReadGuard, RwLock};

use super::{Store, StoreError};

/// Rows waiting to be written, at most.
const QUEUE: usize = 100_000;
/// Rows per transaction, at most.
const BATCH: usize = 1_000;
/// How long shutdown waits for the rows promised before it writes what it
/// has: a promise is kept within a push's timeout.
const PROMISES_WAIT: Duration = Duration::from_secs(15);
/// How long a batch waits for more rows once its first has come. Each
/// batch costs the database a commit (and SQLite a statement), and a writer
/// that keeps up with the calls row by row pays those per call: at 32 calls
/// in flight, batches of 2.1 rows cost the embedded set-up 3.5 times the
/// WAL commits of 5ac25e6's 7.4-row batches (`docs/performance.md`). The
/// rows are off the call path; a few milliseconds cost nobody anything.
const LINGER: Duration = Duration::from_millis(10);

/// How often a writer that has just written looks for rows, and for how
/// many looks (two seconds) before it waits to be woken by the next row.
/// A row queued meanwhile wakes nobody: the response log's row is queued
/// by the app's answer on its way to the PBX's `status=ACK`, and a writer
/// woken there would push the PBX's task off the worker's next slot and
/// wake the runtime's other worker to take it (`docs/performance.md`,
/// "Wake-ups nothing needs"). A server with calls coming looks ten times a
/// second, a timer each; an idle one stops after two seconds. A row waits
/// a tenth of a second at most, and under load the batches grow.
const TICK: Duration = Duration::from_millis(100);
const TICKS: u32 = 20;

/// How a batch of rows reaches the store: one of its multi-row writes
/// (`|store, rows| store.log_responses(rows)`).
pub type WriteBatch<T> =
    for<'a> fn(&'a dyn Store, &'a [T]) -> BoxFuture<'a, Result<(), StoreError>>;

/// A bounded queue of rows and the one task that writes them.
pub struct BatchWriter<T> {
    queue: mpsc::Sender<T>,
    /// What the rows are, for the warnings (`"response log"`).
    what: &'static str,
    /// Rows dropped because the queue was full or the write failed.
    lost: Arc<AtomicU64>,
    /// Tells the writer to stop taking rows and finish the queue.
    closing: Arc<Notify>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Read-held by each [`Promise`]; [`BatchWriter::flush`] takes it to
    /// write to wait for them.
    promises: Arc<RwLock<()>>,
}

/// A row a [`BatchWriter`] is promised but cannot be given yet (what a
/// call's devices were told is known only when their pushes return): the
/// writer's shutdown waits for it. Dropping it unkept is no harm.
pub struct Promise<T> {
    queue: mpsc::Sender<T>,
    what: &'static str,
    lost: Arc<AtomicU64>,
    _open: OwnedRwLockReadGuard<()>,
}

impl<T> Promise<T> {
    /// Queues the row; never waits.
    pub fn record(self, row: T) {
        queue(&self.queue, self.what, &self.lost, row);
    }
}

/// Queues a row, or counts it lost (and warns, at powers of two) when the
/// queue is full or closed.
fn queue<T>(queue: &mpsc::Sender<T>, what: &'static str, lost: &AtomicU64, row: T) {
    if queue.try_send(row).is_err() {
        let lost = lost.fetch_add(1, Ordering::Relaxed) + 1;
        if lost.is_power_of_two() {
            tracing::warn!(lost, "{what} queue full; rows dropped");
        }
    }
}

impl<T: Send + Sync + 'static> BatchWriter<T> {
    /// Starts the writer task, which hands each batch to `write`.
    pub fn new(what: &'static str, store: Arc<dyn Store>, write: WriteBatch<T>) -> Self {
        let (queue, rows) = mpsc::channel(QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        let closing = Arc::new(Notify::new());
        let writer = tokio::spawn(run(
            Sink {
                what,
                store,
                write,
                lost: lost.clone(),
            },
            rows,
            closing.clone(),
        ));
        BatchWriter {
            queue,
            what,
            lost,
            closing,
            writer: Mutex::new(Some(writer)),
            promises: Arc::new(RwLock::new(())),
        }
    }

    /// Queues a row; never waits.
    pub fn record(&self, row: T) {
        queue(&self.queue, self.what, &self.lost, row);
    }

    /// A promise of a row to come, which shutdown waits for; `None` once
    /// shutdown has begun (a row given now would come too late).
    pub fn promise(&self) -> Option<Promise<T>> {
        Some(Promise {
            queue: self.queue.clone(),
            what: self.what,
            lost: self.lost.clone(),
            _open: self.promises.clone().try_read_owned().ok()?,
        })
    }

    /// Rows lost so far.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Waits (a while) for the rows promised, writes what is queued and
    /// stops the writer. Rows recorded afterwards are dropped.
    pub async fn flush(&self) {
        // Held to the end: no promise is made once the writer stops.
        let promises = self.promises.clone().write_owned();
        let kept = tokio::time::timeout(PROMISES_WAIT, promises).await;
        if kept.is_err() {
            tracing::warn!(
                "{}: rows promised did not come in {PROMISES_WAIT:?}",
                self.what
            );
        }
        self.closing.notify_one();
        let writer = self.writer.lock().expect("writer lock poisoned").take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
    }
}

/// Where the writer task puts its batches.
struct Sink<T> {
    what: &'static str,
    store: Arc<dyn Store>,
    write: WriteBatch<T>,
    lost: Arc<AtomicU64>,
}

async fn run<T>(sink: Sink<T>, mut rows: mpsc::Receiver<T>, closing: Arc<Notify>) {
    let mut batch = Vec::with_capacity(BATCH);
    // Looks left before the writer waits to be woken by a row again.
    let mut ticking = 0;
    // The last batch was full: more are likely queued.
    let mut backlog = false;
    loop {
        if ticking > 0 {
            // Recently busy: look every TICK, so a row is queued without
            // waking this task; straight away after a full batch.
            if !backlog {
                tokio::select! {
                    _ = tokio::time::sleep(TICK) => {}
                    _ = closing.notified() => rows.close(),
                }
            }
            take_queued(&mut rows, &mut batch);
            if rows.is_closed() {
                ticking = 0;
            } else if batch.is_empty() {
                ticking -= 1;
                continue;
            }
        } else {
            let received = tokio::select! {
                received = rows.recv_many(&mut batch, BATCH) => received,
                // Take no more rows; what is queued still comes out of recv_many.
                _ = closing.notified() => {
                    rows.close();
                    continue;
                }
            };
            if received == 0 {
                return;
            }
            if batch.len() < BATCH {
                tokio::time::sleep(LINGER).await;
                take_queued(&mut rows, &mut batch);
            }
        }
        if !batch.is_empty() {
            if let Err(e) = (sink.write)(sink.store.as_ref(), &batch).await {
                sink.lost.fetch_add(batch.len() as u64, Ordering::Relaxed);
                tracing::warn!(error = %e, rows = batch.len(), "cannot write the {}", sink.what);
            }
        }
        backlog = batch.len() == BATCH;
        batch.clear();
        if !rows.is_closed() {
            ticking = TICKS;
        }
    }
}

/// Moves what is queued into `batch`, up to [`BATCH`] rows.
fn take_queued<T>(rows: &mut mpsc::Receiver<T>, batch: &mut Vec<T>) {
    while batch.len() < BATCH {
        let Ok(row) = rows.try_recv() else { break };
        batch.push(row);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::time::{sleep, Instant};

    use super::*;
    use crate::store::{open, PoolOptions};

    /// What the test writer was handed: when, and which rows.
    static WRITES: Mutex<Vec<(Instant, Vec<u32>)>> = Mutex::new(Vec::new());

    fn write<'a>(_: &'a dyn Store, rows: &'a [u32]) -> BoxFuture<'a, Result<(), StoreError>> {
        WRITES
            .lock()
            .expect("writes lock")
            .push((Instant::now(), rows.to_vec()));
        Box::pin(async { Ok(()) })
    }

    fn writes() -> Vec<(Instant, Vec<u32>)> {
        WRITES.lock().expect("writes lock").clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_writer_looks_for_rows_and_an_idle_one_is_woken_by_the_next() {
        let store = open(
            ":memory:",
            PoolOptions {
                max_size: 1,
                acquire_timeout: Duration::from_secs(5),
            },
        )
        .await
        .expect("an in-memory store");
        let writer = BatchWriter::new("test rows", store, write);

        // Idle: the first row wakes the writer, which lingers for more.
        let first = Instant::now();
        writer.record(1);
        sleep(LINGER / 2).await;
        writer.record(2);
        sleep(LINGER).await;
        assert_eq!(writes(), vec![(first + LINGER, vec![1, 2])]);

        // Just written: a row waits for the writer's next look, a TICK after
        // the write, whenever it came (it woke nobody).
        sleep(TICK / 4).await;
        writer.record(3);
        sleep(TICK).await;
        assert_eq!(writes()[1], (first + LINGER + TICK, vec![3]));

        // Looks that find nothing write nothing; after TICKS of them the
        // writer waits to be woken again, and the next row does so.
        sleep(TICK * (TICKS + 1)).await;
        assert_eq!(writes().len(), 2, "empty looks write no batch");
        let quiet = Instant::now();
        writer.record(4);
        sleep(LINGER * 2).await;
        assert_eq!(writes()[2], (quiet + LINGER, vec![4]));

        // Shutdown takes what is queued, mid-look.
        writer.record(5);
        writer.flush().await;
        assert_eq!(writes()[3].1, vec![5]);
        assert_eq!(writes().len(), 4);
        assert_eq!(writer.lost(), 0);
    }
}

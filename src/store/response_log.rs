//! The response log, written off the request path and in batches.
//!
//! call-response must answer at once, and the database takes one writer at
//! a time (SQLite) or a round trip per statement (PostgreSQL): a row per
//! answer, each in its own task, falls behind at a few thousand answers per
//! second. Instead, answers queue in a bounded channel and one task writes
//! whatever piled up in one multi-row insert. A full queue drops the row
//! (counted, never blocking an answer); shutdown drains the queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};

use super::{ResponseLogEntry, Store};

/// Rows waiting to be written, at most.
const QUEUE: usize = 100_000;
/// Rows per insert, at most.
const BATCH: usize = 1_000;

pub struct ResponseLog {
    queue: mpsc::Sender<ResponseLogEntry>,
    /// Rows dropped because the queue was full or the insert failed.
    lost: Arc<AtomicU64>,
    /// Tells the writer to stop taking rows and finish the queue.
    closing: Arc<Notify>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ResponseLog {
    /// Starts the writer task.
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (queue, rows) = mpsc::channel(QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        let closing = Arc::new(Notify::new());
        let writer = tokio::spawn(write(store, rows, lost.clone(), closing.clone()));
        ResponseLog {
            queue,
            lost,
            closing,
            writer: Mutex::new(Some(writer)),
        }
    }

    /// Queues a row; never waits.
    pub fn record(&self, entry: ResponseLogEntry) {
        if self.queue.try_send(entry).is_err() {
            let lost = self.lost.fetch_add(1, Ordering::Relaxed) + 1;
            if lost.is_power_of_two() {
                tracing::warn!(lost, "response log queue full; rows dropped");
            }
        }
    }

    /// Rows lost so far.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Writes what is queued and stops the writer. Rows recorded afterwards
    /// are dropped.
    pub async fn flush(&self) {
        self.closing.notify_one();
        let writer = self.writer.lock().expect("writer lock poisoned").take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
    }
}

async fn write(
    store: Arc<dyn Store>,
    mut rows: mpsc::Receiver<ResponseLogEntry>,
    lost: Arc<AtomicU64>,
    closing: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
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
        if let Err(e) = store.log_responses(&batch).await {
            lost.fetch_add(batch.len() as u64, Ordering::Relaxed);
            tracing::warn!(error = %e, rows = batch.len(), "cannot write the response log");
        }
        batch.clear();
    }
}

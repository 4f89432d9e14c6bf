//! The response log: one row per app answer that counted, written off the
//! request path and in batches ([`BatchWriter`]): call-response must answer
//! at once.

use std::sync::Arc;

use super::batch::BatchWriter;
use super::{ResponseLogEntry, Store};

/// The response log's writer.
pub type ResponseLog = BatchWriter<ResponseLogEntry>;

impl ResponseLog {
    /// Starts the writer task.
    pub fn start(store: Arc<dyn Store>) -> Self {
        BatchWriter::new("response log", store, |store, rows| {
            store.log_responses(rows)
        })
    }
}

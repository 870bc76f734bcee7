//! The live buffer: durable events not yet in the Delta table.
//!
//! Each stream keeps its batches in WAL order. A flush copies a prefix out, commits it,
//! and only then drops that prefix, so a reader always finds each event in exactly one
//! of the buffer or the table.

use std::collections::VecDeque;
use std::time::Instant;

use arrow::record_batch::RecordBatch;

/// One durable batch in the buffer.
#[derive(Debug, Clone)]
pub(crate) struct Buffered {
    pub(crate) seq: u64,
    pub(crate) batch: RecordBatch,
    pub(crate) bytes: usize,
    pub(crate) at: Instant,
}

/// A stream's buffered batches.
#[derive(Debug, Default)]
pub(crate) struct LiveBuffer {
    items: VecDeque<Buffered>,
    bytes: usize,
    rows: usize,
}

impl LiveBuffer {
    pub(crate) fn push(&mut self, seq: u64, batch: RecordBatch) -> usize {
        let bytes = batch.get_array_memory_size();
        self.bytes += bytes;
        self.rows += batch.num_rows();
        self.items.push_back(Buffered {
            seq,
            batch,
            bytes,
            at: Instant::now(),
        });
        bytes
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn oldest(&self) -> Option<Instant> {
        self.items.front().map(|b| b.at)
    }

    /// Copies out the whole buffer and the highest sequence number in it.
    pub(crate) fn snapshot(&self) -> (Vec<RecordBatch>, Option<u64>) {
        let batches = self.items.iter().map(|b| b.batch.clone()).collect();
        (batches, self.items.back().map(|b| b.seq))
    }

    /// Drops every batch up to and including `seq`; returns (bytes, rows) released.
    pub(crate) fn release_through(&mut self, seq: u64) -> (usize, usize) {
        let mut freed = (0, 0);
        while self.items.front().is_some_and(|b| b.seq <= seq) {
            if let Some(b) = self.items.pop_front() {
                freed.0 += b.bytes;
                freed.1 += b.batch.num_rows();
            }
        }
        self.bytes -= freed.0;
        self.rows -= freed.1;
        freed
    }
}

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
    /// Adds a batch; `bytes` is its size as encoded in the WAL, which tracks its columnar
    /// size closely (Arrow's own per-array count double-counts buffers that arrays share).
    pub(crate) fn push(&mut self, seq: u64, batch: RecordBatch, bytes: usize) {
        self.bytes += bytes;
        self.rows += batch.num_rows();
        self.items.push_back(Buffered {
            seq,
            batch,
            bytes,
            at: Instant::now(),
        });
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// The WAL position of the newest buffered batch.
    pub(crate) fn newest_seq(&self) -> Option<u64> {
        self.items.back().map(|b| b.seq)
    }

    /// The WAL position of the oldest buffered batch.
    pub(crate) fn oldest_seq(&self) -> Option<u64> {
        self.items.front().map(|b| b.seq)
    }

    pub(crate) fn oldest(&self) -> Option<Instant> {
        self.items.front().map(|b| b.at)
    }

    /// Copies out the oldest batches, up to about `max_bytes` (at least one), and the
    /// highest sequence number among them. Capping a flush keeps its working memory
    /// bounded however far behind flushing has fallen.
    pub(crate) fn prefix(&self, max_bytes: usize) -> (Vec<RecordBatch>, Option<u64>) {
        let mut taken = 0;
        let mut last = None;
        let mut batches = Vec::new();
        for b in &self.items {
            if taken > 0 && taken + b.bytes > max_bytes {
                break;
            }
            taken += b.bytes;
            last = Some(b.seq);
            batches.push(b.batch.clone());
        }
        (batches, last)
    }

    /// Every buffered batch with its WAL position, oldest first (for queries).
    pub(crate) fn batches(&self) -> Vec<(u64, RecordBatch)> {
        self.items
            .iter()
            .map(|b| (b.seq, b.batch.clone()))
            .collect()
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2]))]).unwrap()
    }

    #[test]
    fn prefixes_are_capped_and_release_is_exact() {
        let mut buf = LiveBuffer::default();
        for seq in 1..=5 {
            buf.push(seq, batch(), 100);
        }
        assert_eq!((buf.bytes(), buf.rows()), (500, 10));
        let (batches, last) = buf.prefix(250);
        assert_eq!((batches.len(), last), (2, Some(2)));
        // A batch larger than the cap still goes, alone.
        assert_eq!(buf.prefix(10).1, Some(1));
        assert_eq!(buf.release_through(2), (200, 4));
        assert_eq!(buf.prefix(usize::MAX).1, Some(5));
        assert_eq!(buf.release_through(5), (300, 6));
        assert_eq!((buf.bytes(), buf.rows(), buf.oldest()), (0, 0, None));
        assert_eq!(buf.prefix(100), (vec![], None));
    }
}

//! Counting what a query spilled to disk.
//!
//! DataFusion's operators record their spills in their own metrics; nothing adds them
//! up across queries. [`Counted`] passes a query's stream through unchanged and, once
//! the stream is done (finished, failed or dropped), walks the physical plan and adds
//! its spills to the server's counters, so an operator can see from `/metrics` that
//! queries spill, and how much.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::Result;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream};
use datafusion::physical_plan::ExecutionPlan;
use futures::Stream;

use crate::EngineMetrics;

/// A query's stream that reports the plan's spills when it is done.
pub(super) struct Counted {
    inner: SendableRecordBatchStream,
    plan: Option<Arc<dyn ExecutionPlan>>,
    metrics: Arc<EngineMetrics>,
}

impl std::fmt::Debug for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted").finish_non_exhaustive()
    }
}

impl Counted {
    pub(super) fn new(
        inner: SendableRecordBatchStream,
        plan: Arc<dyn ExecutionPlan>,
        metrics: Arc<EngineMetrics>,
    ) -> Self {
        Self {
            inner,
            plan: Some(plan),
            metrics,
        }
    }

    /// Adds the plan's spills to the counters, once.
    fn report(&mut self) {
        let Some(plan) = self.plan.take() else {
            return;
        };
        let (spills, bytes) = spilled(plan.as_ref());
        if spills > 0 {
            self.metrics.sql_spills_total.inc_by(spills as u64);
            self.metrics.sql_spilled_bytes_total.inc_by(bytes as u64);
        }
    }
}

/// Spill count and spilled bytes of every operator in `plan`.
fn spilled(plan: &dyn ExecutionPlan) -> (usize, usize) {
    let own = plan.metrics().map_or((0, 0), |m| {
        (m.spill_count().unwrap_or(0), m.spilled_bytes().unwrap_or(0))
    });
    plan.children().into_iter().fold(own, |(n, b), child| {
        let (cn, cb) = spilled(child.as_ref());
        (n + cn, b + cb)
    })
}

impl Stream for Counted {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(None) = next {
            self.report();
        }
        next
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl RecordBatchStream for Counted {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.report();
    }
}

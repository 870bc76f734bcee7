//! The per-query memory pool: DataFusion's fair spill pool with room kept for the
//! operators that cannot spill.
//!
//! `FairSpillPool` lets spilling operators (aggregations, sorts) share everything not
//! yet taken by operators that cannot spill. An operator that cannot spill and starts
//! late, such as the TopK of `GROUP BY … ORDER BY … LIMIT` once the aggregation is
//! done, then finds the pool full and fails the query, although the aggregation
//! could have spilled to make room. Here spilling operators together get at most
//! `SPILL_SHARE` of the limit, so the rest stays for the others.

use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::{
    FairSpillPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};

/// Share of the limit spilling operators may hold together.
const SPILL_SHARE: f64 = 0.8;

#[derive(Debug)]
pub(super) struct QueryPool {
    inner: FairSpillPool,
    spill_cap: usize,
    spilling: AtomicUsize,
}

impl QueryPool {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            inner: FairSpillPool::new(limit),
            spill_cap: (limit as f64 * SPILL_SHARE) as usize,
            spilling: AtomicUsize::new(0),
        }
    }
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &str {
        "fair spill pool with room for unspillable operators"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.inner.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.inner.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        if reservation.consumer().can_spill() {
            self.spilling.fetch_add(additional, Ordering::Relaxed);
        }
        self.inner.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        if reservation.consumer().can_spill() {
            self.spilling.fetch_sub(shrink, Ordering::Relaxed);
        }
        self.inner.shrink(reservation, shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        if !reservation.consumer().can_spill() {
            return self.inner.try_grow(reservation, additional);
        }
        let before = self.spilling.fetch_add(additional, Ordering::Relaxed);
        if before + additional > self.spill_cap {
            self.spilling.fetch_sub(additional, Ordering::Relaxed);
            return Err(DataFusionError::ResourcesExhausted(format!(
                "Failed to allocate additional {additional} bytes for {}: spilling operators \
                 hold {before} of the {} bytes they may share",
                reservation.consumer().name(),
                self.spill_cap
            )));
        }
        self.inner
            .try_grow(reservation, additional)
            .inspect_err(|_| {
                self.spilling.fetch_sub(additional, Ordering::Relaxed);
            })
    }

    fn reserved(&self) -> usize {
        self.inner.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.inner.memory_limit()
    }
}

impl std::fmt::Display for QueryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (spilling operators {} of {} bytes)",
            self.name(),
            self.spilling.load(Ordering::Relaxed),
            self.spill_cap
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Two aggregation partitions take what they may, then a TopK that cannot spill
    /// asks for a little: it gets it, because the spillers stopped at their share.
    #[test]
    fn operators_that_cannot_spill_find_room_after_spillers_took_their_fill() {
        let pool: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(1000));
        let spiller = |name: &str| {
            MemoryConsumer::new(name)
                .with_can_spill(true)
                .register(&pool)
        };
        let (a, b) = (spiller("agg-0"), spiller("agg-1"));
        // Each grows until refused, as an aggregation does before it spills.
        while a.try_grow(10).is_ok() {}
        while b.try_grow(10).is_ok() {}
        assert_eq!(a.size() + b.size(), 800);
        let topk = MemoryConsumer::new("TopK").register(&pool);
        topk.try_grow(150).unwrap();
        // Freed spill memory is theirs again.
        a.free();
        assert!(b.try_grow(100).is_ok());
    }

    /// A `GROUP BY … ORDER BY … LIMIT` whose aggregation must spill, on two partitions
    /// and the runtime queries use: the partitions merge their spilled runs back while
    /// the other still aggregates, and neither merge may starve its own aggregation.
    /// With an unbounded merge fan-in about one run in ten failed here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spilled_aggregation_merges_back_under_the_limit_every_time() {
        use datafusion::prelude::{SessionConfig, SessionContext};

        let dir = tempfile::tempdir().unwrap();
        let runtime = super::super::QueryRuntime::new(super::super::QueryOptions {
            memory_limit: 20_000_000,
            threads: 2,
            spill_dir: Some(dir.path().to_owned()),
            ..Default::default()
        })
        .unwrap();
        for run in 0..16 {
            let ctx = SessionContext::new_with_config_rt(
                SessionConfig::new().with_target_partitions(2),
                runtime.env_for_query(),
            );
            let batches = ctx
                .sql(
                    "SELECT value % 3000000 AS k, COUNT(*) AS n FROM generate_series(1, 6000000) \
                     GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1",
                )
                .await
                .unwrap()
                .collect()
                .await
                .unwrap_or_else(|e| panic!("run {run}: {e}"));
            let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
                .unwrap()
                .to_string();
            assert!(text.contains("| 0 | 2 |"), "run {run}: {text}");
        }
    }
}

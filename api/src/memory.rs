//! The process allocates through jemalloc, and says how its memory splits.
//!
//! Quiver allocates from many threads (HTTP, ingest, the view maintainer, push) and
//! frees much of it on another one: a frame is encoded where a change set is fanned out
//! and freed where it is written. glibc's malloc keeps such memory in per-thread arenas
//! that shrink only from the top; with jemalloc, which gives freed pages back after its
//! decay time (ten seconds), RSS grew about 65 MiB less over the five-minute push
//! benchmark. jemalloc also tells how many bytes are in live allocations, so RSS can be
//! split into live data and the rest.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Memory gauges, read from jemalloc and `/proc` when metrics are scraped.
#[derive(Debug, Clone, Default)]
pub(crate) struct MemoryMetrics {
    allocated: Gauge<u64, AtomicU64>,
    resident: Gauge<u64, AtomicU64>,
    rss: Gauge<u64, AtomicU64>,
    limit: Gauge<u64, AtomicU64>,
}

impl MemoryMetrics {
    pub(crate) fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident set size of the process",
            m.rss.clone(),
        );
        let registry = registry.sub_registry_with_prefix("quiver");
        m.limit.set(memory_limit().unwrap_or(0));
        registry.register(
            "memory_limit_bytes",
            "Memory the process may use: its cgroup's limit (a container's), else the machine's RAM",
            m.limit.clone(),
        );
        registry.register(
            "memory_allocated_bytes",
            "Bytes in live allocations (jemalloc stats.allocated)",
            m.allocated.clone(),
        );
        registry.register(
            "memory_allocator_resident_bytes",
            "Bytes of physical memory the allocator holds, live or not yet returned (jemalloc stats.resident)",
            m.resident.clone(),
        );
        m
    }

    /// Reads the current figures. jemalloc's statistics are as of its last epoch,
    /// which this advances.
    pub(crate) fn refresh(&self) {
        if tikv_jemalloc_ctl::epoch::advance().is_ok() {
            if let Ok(b) = tikv_jemalloc_ctl::stats::allocated::read() {
                self.allocated.set(b as u64);
            }
            if let Ok(b) = tikv_jemalloc_ctl::stats::resident::read() {
                self.resident.set(b as u64);
            }
        }
        if let Some(b) = quiver_engine::metrics::resident_bytes(std::process::id()) {
            self.rss.set(b);
        }
    }
}

/// The cgroup's memory limit (v2, then v1), or the machine's RAM when there is none.
fn memory_limit() -> Option<u64> {
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .find_map(|t| t.trim().parse::<u64>().ok());
    let ram = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    // cgroup v1 reports "no limit" as a huge number.
    match (cgroup, ram) {
        (Some(c), Some(r)) => Some(c.min(r)),
        (c, r) => c.or(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_bytes_follow_an_allocation() {
        let m = MemoryMetrics::default();
        m.refresh();
        let before = m.allocated.get();
        let held = vec![1u8; 64 << 20];
        m.refresh();
        let during = m.allocated.get();
        assert!(
            during >= before + (60 << 20),
            "allocated {before} -> {during} bytes with 64 MiB held"
        );
        assert!(m.rss.get() >= 64 << 20, "rss {}", m.rss.get());
        assert!(m.resident.get() >= during, "resident below allocated");
        drop(held);
    }
}

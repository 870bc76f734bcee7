//! What every surface shares: configuration, the engine once it has recovered, tokens,
//! metrics, limits and the push hub. Built once by [`crate::server`].

use std::sync::{Arc, OnceLock};

use governor::DefaultKeyedRateLimiter;
use prometheus_client::registry::Registry;
use quiver_engine::{Engine, EngineMetrics};

use crate::auth::Tokens;
use crate::config::ServeConfig;

/// State every handler shares.
#[derive(Debug)]
pub(crate) struct AppState {
    pub(crate) config: ServeConfig,
    pub(crate) engine: OnceLock<Engine>,
    pub(crate) tokens: Arc<Tokens>,
    pub(crate) registry: Registry,
    pub(crate) metrics: Arc<EngineMetrics>,
    pub(crate) memory: crate::memory::MemoryMetrics,
    pub(crate) rate_limiter: Option<DefaultKeyedRateLimiter<String>>,
    /// `--rate-limit`: requests per second per client on every endpoint.
    pub(crate) request_limits: Option<Arc<crate::edge::RequestLimits>>,
    /// Whether HTTP is served over TLS (answers then carry HSTS).
    pub(crate) tls: bool,
    /// One permit per query allowed to run at once.
    pub(crate) query_slots: Arc<tokio::sync::Semaphore>,
    pub(crate) push: Arc<crate::push::Push>,
    /// Batch jobs: runs on request and on schedule.
    pub(crate) jobs: Arc<crate::jobs::Jobs>,
    /// Reports: definitions, runs and their schedules.
    pub(crate) reports: Arc<crate::reports::Reports>,
}

impl AppState {
    /// The engine, or 503 while the write-ahead log is still being recovered.
    pub(crate) fn ready_engine(&self) -> crate::error::ApiResult<&Engine> {
        self.engine
            .get()
            .ok_or_else(|| crate::error::ApiError::unavailable("recovering the write-ahead log", 1))
    }
}

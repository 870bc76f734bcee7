//! Scheduled backups in the server (`--backup-to`, `--backup-schedule`): at each time
//! of the schedule the live buffers are flushed, so the backup holds every event
//! acknowledged before it started, and the store is backed up (see
//! [`quiver_engine::backup`]). Outcomes are metrics; `QuiverBackupStale` in
//! `deploy/prometheus/rules.yml` fires when none has succeeded for two intervals.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use quiver_engine::{Engine, Store};
use tracing::{error, info};

use crate::schedule::Schedule;

/// The backup metrics (`quiver_backup_*`).
#[derive(Debug, Clone, Default)]
pub(crate) struct BackupMetrics {
    last_success: Gauge<i64, AtomicI64>,
    last_cut: Gauge<i64, AtomicI64>,
    interval: Gauge<i64, AtomicI64>,
    last_seconds: Gauge<f64, AtomicU64>,
    last_copied_bytes: Gauge<i64, AtomicI64>,
    failures: Counter,
    succeeded: Counter,
}

impl BackupMetrics {
    fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("quiver_backup");
        r.register(
            "last_success_timestamp_seconds",
            "When the last successful backup finished (Unix seconds); the server's start until one has",
            m.last_success.clone(),
        );
        r.register(
            "last_cut_timestamp_seconds",
            "The cut of the last successful backup: events acknowledged before it are in it (Unix seconds)",
            m.last_cut.clone(),
        );
        r.register(
            "interval_seconds",
            "Seconds between scheduled backups (from --backup-schedule)",
            m.interval.clone(),
        );
        r.register(
            "last_duration_seconds",
            "How long the last successful backup took, flush included",
            m.last_seconds.clone(),
        );
        r.register(
            "last_copied_bytes",
            "Bytes the last successful backup copied (the rest were in earlier backups)",
            m.last_copied_bytes.clone(),
        );
        r.register("failures", "Backups that failed", m.failures.clone());
        r.register("succeeded", "Backups that succeeded", m.succeeded.clone());
        m
    }
}

/// Scheduled backups of the server's store.
#[derive(Debug)]
pub(crate) struct Backups {
    dest: Store,
    schedule: Schedule,
    metrics: BackupMetrics,
}

impl Backups {
    /// `None` without `--backup-to`.
    pub(crate) fn new(
        to: Option<&str>,
        schedule: &str,
        registry: &mut Registry,
    ) -> anyhow::Result<Option<Self>> {
        let Some(to) = to else { return Ok(None) };
        let schedule =
            Schedule::parse(schedule).map_err(|e| anyhow::anyhow!("--backup-schedule: {e}"))?;
        let dest = Store::open(to).map_err(|e| anyhow::anyhow!("--backup-to {to}: {e}"))?;
        let metrics = BackupMetrics::new(registry);
        let now = chrono::Utc::now();
        // Staleness counts from the start until a backup succeeds.
        metrics.last_success.set(now.timestamp());
        if let Some(first) = schedule.next_after(now)
            && let Some(second) = schedule.next_after(first)
        {
            metrics.interval.set((second - first).num_seconds());
        }
        Ok(Some(Self {
            dest,
            schedule,
            metrics,
        }))
    }

    /// Runs the schedule until `stop` changes.
    pub(crate) fn spawn(self, engine: Engine, mut stop: tokio::sync::watch::Receiver<bool>) {
        tokio::spawn(async move {
            loop {
                let now = chrono::Utc::now();
                let Some(next) = self.schedule.next_after(now) else {
                    return;
                };
                let wait = (next - now).to_std().unwrap_or_default();
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
                self.run_once(&engine).await;
            }
        });
    }

    async fn run_once(&self, engine: &Engine) {
        let started = std::time::Instant::now();
        let cut = chrono::Utc::now();
        // Everything acknowledged so far goes into the tables first.
        let result = match engine.flush_acknowledged().await {
            Ok(()) => quiver_engine::backup::backup(engine.store(), &self.dest, Some(cut))
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("flushing before the backup: {e}")),
        };
        match result {
            Ok(m) => {
                let g = &self.metrics;
                g.succeeded.inc();
                g.last_success.set(chrono::Utc::now().timestamp());
                g.last_cut.set(cut.timestamp());
                g.last_seconds.set(started.elapsed().as_secs_f64());
                g.last_copied_bytes.set(m.copied_bytes as i64);
                info!(backup = %m.id, to = %self.dest.url(), "scheduled backup done");
            }
            Err(e) => {
                self.metrics.failures.inc();
                error!(error = %e, to = %self.dest.url(), "scheduled backup failed");
            }
        }
    }
}

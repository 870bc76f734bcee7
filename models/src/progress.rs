//! How far a job has got, and a way to stop it: shared between the job's threads and
//! whoever watches it (a progress bar, `GET /v1/jobs`, `DELETE /v1/jobs/{id}`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A job's progress and cancellation flag.
#[derive(Debug, Default)]
pub struct Progress {
    stage: Mutex<&'static str>,
    done: AtomicU64,
    total: AtomicU64,
    cancelled: AtomicBool,
}

/// The job was cancelled; nothing of this run was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the job was cancelled")]
pub struct Cancelled;

/// What a watcher sees of a job's progress.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProgressReport {
    /// What the job does now (`reading`, `forecasting`, `writing`, …).
    pub stage: &'static str,
    /// Units of the stage done (series, for forecasting).
    pub done: u64,
    /// Units of the stage in all (0 while unknown).
    pub total: u64,
}

impl Progress {
    /// Starts a stage of `total` units.
    pub fn stage(&self, name: &'static str, total: u64) {
        *self.stage.lock().unwrap_or_else(|p| p.into_inner()) = name;
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// Counts `n` more units of the stage done.
    pub fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Asks the job to stop at its next check.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Whether the job was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// An error once the job was asked to stop.
    pub fn check(&self) -> Result<(), Cancelled> {
        if self.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }

    /// The stage and its counts now.
    pub fn report(&self) -> ProgressReport {
        ProgressReport {
            stage: *self.stage.lock().unwrap_or_else(|p| p.into_inner()),
            done: self.done.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
        }
    }
}

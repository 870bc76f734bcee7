//! The time the engine goes by: alert deadlines and views' temporal filters.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Where "now" comes from: the system clock, the system clock shifted to start at
/// another instant, or a clock a test sets.
#[derive(Debug, Clone, Default)]
pub struct Clock(Source);

#[derive(Debug, Clone, Default)]
enum Source {
    #[default]
    System,
    /// Milliseconds added to the system clock.
    Shifted(i64),
    Manual(Arc<AtomicI64>),
}

fn system_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self(Source::System)
    }

    /// A clock that reads `start_ms` now and then runs at the system clock's pace: to
    /// replay recorded events as if they were happening.
    pub fn starting_at(start_ms: i64) -> Self {
        Self(Source::Shifted(start_ms - system_ms()))
    }

    /// A clock that stands at `start_ms` until moved.
    pub fn manual(start_ms: i64) -> Self {
        Self(Source::Manual(Arc::new(AtomicI64::new(start_ms))))
    }

    /// Milliseconds since the epoch.
    pub fn now(&self) -> i64 {
        match &self.0 {
            Source::System => system_ms(),
            Source::Shifted(by) => system_ms() + by,
            Source::Manual(t) => t.load(Ordering::Acquire),
        }
    }

    /// Moves a manual clock forward (no effect on the others).
    pub fn advance(&self, by: Duration) {
        if let Source::Manual(t) = &self.0 {
            t.fetch_add(by.as_millis() as i64, Ordering::AcqRel);
        }
    }
}

//! Admission to the live buffers: back-pressure that slows writers down before it
//! refuses them.
//!
//! The buffers hold events that are durable in the WAL but not yet in Delta; their
//! total is bounded so memory is. A write that fits goes straight in. One that does
//! not waits, first come first served, for flushes to free room, up to a bound; only
//! when the wait would exceed it (judged from how fast flushes have been draining the
//! buffers) or did exceed it is the write refused, with the time the backlog needs to
//! drain as `Retry-After`. A sender that ignores `Retry-After` is thus held at the
//! rate storage takes events, the way TCP holds a sender at the receiver's rate,
//! instead of seeing mostly errors.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;

/// A write that could not be admitted in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    /// Bytes the buffers held when it was refused.
    pub(crate) held: usize,
    /// Seconds the backlog should take to drain, at least one.
    pub(crate) retry_after_secs: u64,
}

/// The bound on buffered bytes and the writers waiting under it.
#[derive(Debug)]
pub(crate) struct Admission {
    limit: usize,
    max_wait: Duration,
    held: AtomicUsize,
    /// Writers waiting for room, so a newcomer queues behind them.
    waiting: AtomicUsize,
    /// Held by the writer at the head of the queue; tokio's mutex is fair (FIFO).
    head: Mutex<()>,
    /// Signalled whenever flushes release bytes.
    released: Notify,
    /// Recent drain rate of the buffers, bytes per second (0: none seen yet).
    drain_rate: AtomicU64,
}

impl Admission {
    pub(crate) fn new(limit: usize, max_wait: Duration) -> Self {
        Self {
            limit,
            max_wait,
            held: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            head: Mutex::new(()),
            released: Notify::new(),
            drain_rate: AtomicU64::new(0),
        }
    }

    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Counts bytes that entered the buffers.
    pub(crate) fn add(&self, bytes: usize) {
        self.held.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Counts bytes a flush released, `spent` after it started, and wakes the writer at
    /// the head of the queue.
    pub(crate) fn release(&self, bytes: usize, spent: Duration) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
        if bytes > 0 && !spent.is_zero() {
            let now = (bytes as f64 / spent.as_secs_f64()) as u64;
            let before = self.drain_rate.load(Ordering::Relaxed);
            // Weighted towards the recent flushes, but one slow flush does not decide.
            let rate = if before == 0 {
                now
            } else {
                (before as f64 * 0.7 + now as f64 * 0.3) as u64
            };
            self.drain_rate.store(rate.max(1), Ordering::Relaxed);
        }
        self.released.notify_waiters();
    }

    /// An empty buffer takes any single write, so one larger than the bound is not
    /// refused forever.
    fn fits(&self, need: usize) -> bool {
        let held = self.held();
        held == 0 || held + need <= self.limit
    }

    /// Seconds the buffers need to drain enough for `need` more bytes at the rate seen,
    /// if a flush has been seen.
    fn drain_secs(&self, need: usize) -> Option<f64> {
        let over = (self.held() + need).saturating_sub(self.limit) as f64;
        match self.drain_rate.load(Ordering::Relaxed) {
            0 => None,
            rate => Some(over / rate as f64),
        }
    }

    fn refused(&self, need: usize) -> Refused {
        let secs = self.drain_secs(need).unwrap_or(1.0);
        Refused {
            held: self.held(),
            retry_after_secs: (secs.ceil() as u64).clamp(1, 60),
        }
    }

    /// Waits until `need` more bytes fit, in arrival order, for at most the bound.
    /// Returns how long it waited (zero when it did not).
    pub(crate) async fn admit(&self, need: usize) -> Result<Duration, Refused> {
        if self.waiting.load(Ordering::Acquire) == 0 && self.fits(need) {
            return Ok(Duration::ZERO);
        }
        let started = Instant::now();
        let hopeless = self
            .drain_secs(need)
            .is_some_and(|s| s > self.max_wait.as_secs_f64());
        if self.max_wait.is_zero() || hopeless {
            return Err(self.refused(need));
        }
        let deadline = started + self.max_wait;
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let outcome = async {
            let _head = tokio::time::timeout_at(deadline, self.head.lock())
                .await
                .map_err(|_| self.refused(need))?;
            loop {
                let released = self.released.notified();
                tokio::pin!(released);
                released.as_mut().enable();
                if self.fits(need) {
                    return Ok(started.elapsed());
                }
                if tokio::time::timeout_at(deadline, released).await.is_err() {
                    return Err(self.refused(need));
                }
            }
        }
        .await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn writes_wait_in_order_for_room_and_are_refused_only_past_the_bound() {
        let a = Arc::new(Admission::new(100, ms(600)));
        assert_eq!(a.admit(60).await, Ok(Duration::ZERO));
        a.add(60);
        // No drain rate known yet: a writer over the bound waits, up to the bound.
        let first = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit(50).await }
        });
        tokio::time::sleep(ms(20)).await;
        // A newcomer that would fit on its own still queues behind the waiter.
        let second = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit(30).await }
        });
        tokio::time::sleep(ms(180)).await;
        assert!(!first.is_finished() && !second.is_finished());
        // A flush frees 60 bytes in 300 ms (200 bytes/s): both go, in order.
        a.release(60, ms(300));
        // Both waited (neither was done before the release), and reported it.
        let waited = first.await.unwrap().unwrap();
        assert!(waited > Duration::ZERO && waited < ms(600), "{waited:?}");
        assert!(second.await.unwrap().unwrap() > Duration::ZERO);

        // 130 held over a bound of 100 needs 0.25 s to drain for 20 more at that rate…
        a.add(130);
        let started = Instant::now();
        let r = a.admit(20).await;
        // …but nothing drained: refused at the bound, with the backlog's drain time.
        assert!(started.elapsed() >= ms(600));
        assert_eq!(
            r,
            Err(Refused {
                held: 130,
                retry_after_secs: 1
            })
        );
        // A backlog that cannot drain within the bound is refused at once.
        a.add(1000);
        let started = Instant::now();
        let r = a.admit(10).await;
        assert!(started.elapsed() < ms(300), "not refused at once");
        assert_eq!(
            r,
            Err(Refused {
                held: 1130,
                retry_after_secs: 6
            })
        );
        // An empty buffer takes a write larger than the bound.
        a.release(1130, Duration::from_secs(1));
        assert_eq!(a.admit(500).await, Ok(Duration::ZERO));
    }
}

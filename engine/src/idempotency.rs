//! Idempotency keys: a retried request with the same key gets the first answer and
//! stores nothing twice.
//!
//! A key's outcome is known once its WAL record is durable; the record carries the key,
//! so replay restores it. Before WAL segments are deleted the live entries are written
//! to `idempotency.json` beside the log, so keys outlive the segments that held them.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::{Error, Result};

/// How a lookup of a key came out.
#[derive(Debug)]
pub(crate) enum KeyState {
    /// First time this key is seen: the caller owns it and must finish or abandon it.
    New,
    /// A request with this key already succeeded with this many events.
    Done {
        /// Events the first request accepted.
        accepted: u64,
    },
    /// The key was used before for a different body.
    Conflict,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    stream: String,
    key: String,
    fingerprint: String,
    accepted: u64,
    at_ms: u64,
}

#[derive(Debug, Default)]
struct Inner {
    done: HashMap<(String, String), Entry>,
    order: VecDeque<(String, String)>,
    in_flight: HashMap<(String, String), Arc<Notify>>,
}

/// The key cache.
#[derive(Debug)]
pub(crate) struct Idempotency {
    inner: Mutex<Inner>,
    ttl: Duration,
    capacity: usize,
    file: PathBuf,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Idempotency {
    /// Loads saved keys from `dir` (if any).
    pub(crate) fn load(dir: &Path, ttl: Duration, capacity: usize) -> Result<Self> {
        let file = dir.join("idempotency.json");
        let this = Self {
            inner: Mutex::new(Inner::default()),
            ttl,
            capacity,
            file,
        };
        match std::fs::read(&this.file) {
            Ok(bytes) => {
                let entries: Vec<Entry> = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::Wal(format!("{} is unreadable: {e}", this.file.display()))
                })?;
                for e in entries {
                    this.insert(e);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(this)
    }

    /// Looks `key` up for `stream`; waits while another request with the key is in flight.
    pub(crate) async fn begin(&self, stream: &str, key: &str, fingerprint: &str) -> KeyState {
        let id = (stream.to_owned(), key.to_owned());
        loop {
            let wait = {
                let mut inner = self.inner.lock();
                if let Some(e) = inner.done.get(&id) {
                    return if e.fingerprint == fingerprint {
                        KeyState::Done {
                            accepted: e.accepted,
                        }
                    } else {
                        KeyState::Conflict
                    };
                }
                match inner.in_flight.get(&id) {
                    Some(n) => Arc::clone(n),
                    None => {
                        inner.in_flight.insert(id, Arc::new(Notify::new()));
                        return KeyState::New;
                    }
                }
            };
            let notified = wait.notified();
            // Re-check after registering interest, so a completion in between is not missed.
            if !self.inner.lock().in_flight.contains_key(&id) {
                continue;
            }
            notified.await;
        }
    }

    /// Gives up ownership of a key whose request failed, so a retry can proceed.
    pub(crate) fn abandon(&self, stream: &str, key: &str) {
        let id = (stream.to_owned(), key.to_owned());
        if let Some(n) = self.inner.lock().in_flight.remove(&id) {
            n.notify_waiters();
        }
    }

    /// Records the outcome of a durable request.
    pub(crate) fn complete(&self, stream: &str, key: &str, fingerprint: &str, accepted: u64) {
        self.insert(Entry {
            stream: stream.to_owned(),
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
            accepted,
            at_ms: now_ms(),
        });
        let id = (stream.to_owned(), key.to_owned());
        if let Some(n) = self.inner.lock().in_flight.remove(&id) {
            n.notify_waiters();
        }
    }

    fn insert(&self, e: Entry) {
        let mut inner = self.inner.lock();
        let id = (e.stream.clone(), e.key.clone());
        if inner.done.insert(id.clone(), e).is_none() {
            inner.order.push_back(id);
        }
        let horizon = now_ms().saturating_sub(self.ttl.as_millis() as u64);
        while let Some(front) = inner.order.front().cloned() {
            let expired = inner.done.get(&front).is_none_or(|e| e.at_ms < horizon);
            if expired || inner.done.len() > self.capacity {
                inner.order.pop_front();
                inner.done.remove(&front);
            } else {
                break;
            }
        }
    }

    /// Writes the live keys to disk (atomically), before the WAL forgets them.
    pub(crate) fn persist(&self) -> Result<()> {
        let entries: Vec<Entry> = {
            let inner = self.inner.lock();
            inner
                .order
                .iter()
                .filter_map(|id| inner.done.get(id).cloned())
                .collect()
        };
        crate::durable_file::write_atomic(&self.file, &serde_json::to_vec(&entries)?)?;
        Ok(())
    }
}

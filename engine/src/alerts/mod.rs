//! Alert rules over materialized views: the per-key state machine a rule runs for each
//! row key of its view ([`Tracker`]), and the service that runs the rules ([`Alerts`]).
//!
//! A rule's predicate is evaluated on each change set of its view, per row key. A key
//! whose row enters the predicate is `Pending`; once it has stayed in for the rule's
//! `FOR` it is `Firing` (at once when `FOR` is zero). A firing key whose row leaves
//! the predicate (or is deleted) keeps firing for `KEEP FIRING FOR`, then is
//! `Resolved` and forgotten; back in the predicate before that, it simply goes on
//! firing. A pending key that leaves before `FOR` is forgotten without a word, so a
//! flapping row inside `FOR` tells nobody anything. Only `Firing` and `Resolved` are
//! transitions people are told about.
//!
//! Time is passed in (milliseconds since the epoch), so tests drive the clock and a
//! timer only has to call [`Tracker::tick`] at [`Tracker::next_deadline`]. The tracker
//! serializes whole: saved after each transition and loaded at start, then reconciled
//! with the view's rows ([`Tracker::reconcile`]), a key that was firing before a
//! restart and still matches does not fire again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

mod deliver;
mod predicate;
mod rule;
mod service;
#[cfg(test)]
mod service_tests;
#[cfg(test)]
mod tests;

pub use deliver::{iso, new_secret, sign};
pub use predicate::Predicate;
pub use rule::{AlertRule, Destination, Severity, parse_create_alert};
pub use service::{
    AlertInfo, AlertOptions, Alerts, Attempt, Clock, Notification, Outcome, Pending, Silence,
    destination_label, severity_name,
};

/// What a key of a rule is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum AlertState {
    /// In the predicate, for less than `FOR`.
    Pending,
    /// In the predicate for `FOR`, or left it less than `KEEP FIRING FOR` ago.
    Firing,
    /// Out of the predicate for `KEEP FIRING FOR` after firing.
    Resolved,
}

/// A rule's `FOR` and `KEEP FIRING FOR`, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timers {
    /// How long a row must stay in the predicate before the key fires.
    pub for_ms: i64,
    /// How long a key keeps firing after its row left the predicate.
    pub keep_firing_for_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Phase {
    Pending { since: i64 },
    Firing { since: i64, left: Option<i64> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    phase: Phase,
    /// The row as last seen in the predicate.
    row: Value,
}

/// A key's move to `Firing` or `Resolved`: what a notification says.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The row key (the view's key columns, as JSON text).
    pub key: String,
    /// `Firing` or `Resolved`.
    pub state: AlertState,
    /// When it happened (ms since the epoch): for `Firing`, when `FOR` ran out.
    pub at: i64,
    /// When the row entered the predicate.
    pub since: i64,
    /// The row as last seen in the predicate.
    pub row: Value,
}

/// One key's state, for `SHOW ALERTS` and `GET /v1/alerts`.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyStatus {
    /// The row key.
    pub key: String,
    /// `Pending` or `Firing`.
    pub state: AlertState,
    /// When the row entered the predicate.
    pub since: i64,
    /// For a firing key whose row has left the predicate: when it left (it resolves
    /// `KEEP FIRING FOR` later).
    pub left: Option<i64>,
    /// The row as last seen in the predicate.
    pub row: Value,
}

/// The states of one rule's keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tracker {
    timers: Timers,
    keys: BTreeMap<String, Entry>,
    /// Grows each time a key starts or stops being tracked (not saved).
    #[serde(skip)]
    moves: u64,
}

/// Equal when the timers and every key's state are (how often keys moved is not state).
impl PartialEq for Tracker {
    fn eq(&self, other: &Self) -> bool {
        self.timers == other.timers && self.keys == other.keys
    }
}

impl Tracker {
    /// A tracker with no key in any state.
    pub fn new(timers: Timers) -> Self {
        Self {
            timers,
            keys: BTreeMap::new(),
            moves: 0,
        }
    }

    /// The row of `key` changed at `now`: `Some(row)` when it is in the predicate,
    /// `None` when it is not or was deleted. Returns what became due, this key's
    /// change included.
    pub fn observe(&mut self, key: &str, matching: Option<Value>, now: i64) -> Vec<Transition> {
        let mut out = Vec::new();
        match (self.keys.get_mut(key), matching) {
            (None, None) => {}
            (None, Some(row)) => {
                self.moves += 1;
                self.keys.insert(
                    key.to_owned(),
                    Entry {
                        phase: Phase::Pending { since: now },
                        row,
                    },
                );
            }
            (Some(entry), Some(row)) => {
                entry.row = row;
                if let Phase::Firing { left, .. } = &mut entry.phase {
                    *left = None;
                }
            }
            (Some(entry), None) => match entry.phase {
                Phase::Pending { .. } => {
                    self.moves += 1;
                    self.keys.remove(key);
                }
                Phase::Firing { since, left: None } => {
                    entry.phase = Phase::Firing {
                        since,
                        left: Some(now),
                    };
                }
                Phase::Firing { left: Some(_), .. } => {}
            },
        }
        out.extend(self.tick(now));
        out
    }

    /// Moves every key whose `FOR` or `KEEP FIRING FOR` has run out by `now`.
    pub fn tick(&mut self, now: i64) -> Vec<Transition> {
        let Timers {
            for_ms,
            keep_firing_for_ms,
        } = self.timers;
        let mut out = Vec::new();
        let mut resolved = Vec::new();
        for (key, entry) in &mut self.keys {
            match entry.phase {
                Phase::Pending { since } if now - since >= for_ms => {
                    entry.phase = Phase::Firing { since, left: None };
                    out.push(Transition {
                        key: key.clone(),
                        state: AlertState::Firing,
                        at: since + for_ms,
                        since,
                        row: entry.row.clone(),
                    });
                }
                Phase::Firing {
                    since,
                    left: Some(left),
                } if now - left >= keep_firing_for_ms => {
                    resolved.push(key.clone());
                    out.push(Transition {
                        key: key.clone(),
                        state: AlertState::Resolved,
                        at: left + keep_firing_for_ms,
                        since,
                        row: entry.row.clone(),
                    });
                }
                _ => {}
            }
        }
        for key in resolved {
            self.keys.remove(&key);
        }
        out
    }

    /// When [`Tracker::tick`] next has something to do, if ever.
    pub fn next_deadline(&self) -> Option<i64> {
        self.keys
            .values()
            .filter_map(|e| match e.phase {
                Phase::Pending { since } => Some(since + self.timers.for_ms),
                Phase::Firing {
                    left: Some(left), ..
                } => Some(left + self.timers.keep_firing_for_ms),
                Phase::Firing { left: None, .. } => None,
            })
            .min()
    }

    /// After a restart: the view's rows in the predicate now, by key. Keys tracked
    /// and still matching carry on where they were (no second `Firing`); keys
    /// tracked and no longer matching leave; new ones enter.
    pub fn reconcile(&mut self, matching: BTreeMap<String, Value>, now: i64) -> Vec<Transition> {
        let gone: Vec<String> = self
            .keys
            .keys()
            .filter(|k| !matching.contains_key(*k))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for key in gone {
            out.extend(self.observe(&key, None, now));
        }
        for (key, row) in matching {
            out.extend(self.observe(&key, Some(row), now));
        }
        out
    }

    /// A number that grows whenever a key starts or stops being tracked, so a caller
    /// can tell whether the tracker is worth saving.
    pub fn moves(&self) -> u64 {
        self.moves
    }

    /// Whether no key is pending or firing.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `key` is pending or firing.
    pub fn has(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// Every key pending or firing.
    pub fn status(&self) -> Vec<KeyStatus> {
        self.keys
            .iter()
            .map(|(key, e)| {
                let (state, since, left) = match e.phase {
                    Phase::Pending { since } => (AlertState::Pending, since, None),
                    Phase::Firing { since, left } => (AlertState::Firing, since, left),
                };
                KeyStatus {
                    key: key.clone(),
                    state,
                    since,
                    left,
                    row: e.row.clone(),
                }
            })
            .collect()
    }
}

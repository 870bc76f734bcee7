//! The running alert rules of an engine: evaluated on each change set of their view,
//! their transitions kept as notifications, and those sent from a durable outbox.
//!
//! One task reads the views' change sets. For each, only the rules on that view run:
//! the predicate over the upserted rows (vectorized, once per rule), then each row key
//! into the rule's [`Tracker`]. Deleted keys leave the predicate. A rule on a view with
//! no key is reconciled with the view's rows instead. When the change-set feed has
//! moved on past this task (it lagged), every rule is reconciled with its view's rows,
//! so no change is missed, only merged.
//!
//! A `Firing` or `Resolved` transition becomes a [`Notification`] and, unless a silence
//! covers it, one outbox entry per destination. Trackers, notifications and the outbox
//! are one catalog document (`alert_state`), written after each batch of change sets
//! that moved anything and before any of its deliveries is attempted: a restart neither
//! loses a pending delivery nor fires again for a key that was already firing. A
//! delivery confirmed by its receiver is removed from the outbox in the next write; a
//! crash between the two sends it once more, with the same `webhook-id`, so a receiver
//! can tell.
//!
//! Each delivery attempt runs in a task of its own under a timeout, at most
//! [`PER_DESTINATION`] at once per destination: a receiver that hangs holds back only
//! its own deliveries, never the evaluation, other destinations or the engine.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, BooleanArray, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, broadcast, watch};
use tracing::{debug, info, warn};

use super::deliver::{self, Sent};
use super::{AlertRule, AlertState, Destination, KeyStatus, Predicate, Severity, Tracker};
use crate::catalog::Document;
use crate::engine::Engine;
use crate::metrics::EngineMetrics;
use crate::query::QueryError;

/// Deliveries in flight at once to one destination.
pub(super) const PER_DESTINATION: usize = 8;

pub use crate::clock::Clock;

/// Alerting settings.
#[derive(Debug, Clone)]
pub struct AlertOptions {
    /// Notifications kept (newest); older ones leave the `notifications` table.
    pub keep_notifications: usize,
    /// Delivery attempts kept per rule, for `GET /v1/alerts/{name}/deliveries`.
    pub keep_attempts: usize,
    /// How long one delivery attempt may take.
    pub delivery_timeout: Duration,
    /// Attempts before a delivery is given up.
    pub max_attempts: u32,
    /// Wait after the first failure; doubles with each further one.
    pub retry_base: Duration,
    /// Longest wait between attempts.
    pub retry_max: Duration,
    /// SMTP relay for email destinations (`smtp://host:port`, `smtps://…`), if any.
    pub smtp_url: Option<String>,
    /// Sender address of alert emails.
    pub email_from: String,
    /// The clock rules are timed by.
    pub clock: Clock,
}

impl Default for AlertOptions {
    fn default() -> Self {
        Self {
            keep_notifications: 1_000,
            keep_attempts: 100,
            delivery_timeout: Duration::from_secs(10),
            max_attempts: 12,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(600),
            smtp_url: None,
            email_from: "quiver@localhost".into(),
            clock: Clock::system(),
        }
    }
}

/// A transition someone is told about, as kept and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Grows by one per notification, never reused.
    pub id: u64,
    /// The rule.
    pub alert: String,
    /// The rule's view.
    pub view: String,
    /// The rule's severity.
    pub severity: Severity,
    /// `firing` or `resolved`.
    pub state: AlertState,
    /// The row key, as a JSON object of the view's key columns.
    pub key: Value,
    /// The row as last seen in the predicate.
    pub row: Value,
    /// When the row entered the predicate (ms since the epoch).
    pub since: i64,
    /// When the transition happened (ms since the epoch).
    pub at: i64,
    /// When it was recorded (ms since the epoch).
    pub created_at: i64,
    /// When someone marked it read.
    pub read_at: Option<i64>,
    /// Who marked it read (token name).
    pub read_by: Option<String>,
    /// Whether a silence kept it from being sent.
    pub silenced: bool,
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Outcome {
    /// The receiver took it (2xx; for email, the relay accepted it).
    Delivered,
    /// It failed and will be tried again.
    Failed,
    /// It failed for the last time.
    GaveUp,
}

/// One delivery attempt, for `GET /v1/alerts/{name}/deliveries`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// The delivery (the `webhook-id` header), the same on every attempt.
    pub delivery: String,
    /// The notification delivered.
    pub notification: u64,
    /// Where to: the URL or the address.
    pub destination: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When it ended (ms since the epoch).
    pub at: i64,
    /// What happened.
    pub outcome: Outcome,
    /// The receiver's HTTP status, if it answered.
    pub status: Option<u16>,
    /// Why it failed.
    pub error: Option<String>,
    /// How long it took.
    pub elapsed_ms: u64,
}

/// A delivery not yet confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// Its id (the `webhook-id` header).
    pub id: String,
    /// The notification it carries.
    pub notification: u64,
    /// The rule.
    pub alert: String,
    /// Where to.
    pub destination: Destination,
    /// The JSON body sent.
    pub body: String,
    /// Email subject line.
    pub subject: String,
    /// Attempts so far.
    pub attempts: u32,
    /// When the next attempt is due (ms since the epoch).
    pub next_at: i64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// A silence: transitions it covers are recorded and shown but not sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    /// Its id.
    pub id: String,
    /// The rule it covers; every rule when absent.
    #[serde(default)]
    pub alert: Option<String>,
    /// Key columns and the values they must have (all of them).
    #[serde(default)]
    pub matchers: BTreeMap<String, Value>,
    /// Start (ms since the epoch).
    pub starts_at: i64,
    /// End (ms since the epoch).
    pub ends_at: i64,
    /// Why.
    #[serde(default)]
    pub comment: String,
    /// Who made it (token name).
    #[serde(default)]
    pub created_by: String,
}

impl Silence {
    /// Whether it covers a transition of rule `alert` for `key` at `now`.
    pub fn covers(&self, alert: &str, key: &Value, now: i64) -> bool {
        now >= self.starts_at
            && now < self.ends_at
            && self.alert.as_deref().is_none_or(|a| a == alert)
            && self.matchers.iter().all(|(column, want)| {
                key.get(column).is_some_and(|got| {
                    got == want || (got.as_str().is_some() && got.as_str() == want.as_str())
                })
            })
    }
}

/// A rule with its state, for `SHOW ALERTS` and `GET /v1/alerts`.
#[derive(Debug, Clone)]
pub struct AlertInfo {
    /// The rule as written.
    pub rule: AlertRule,
    /// Keys pending or firing.
    pub keys: Vec<KeyStatus>,
    /// Why the rule cannot be evaluated now (its view was dropped or changed).
    pub error: Option<String>,
    /// Deliveries waiting to be sent or retried.
    pub pending_deliveries: usize,
}

/// What is written to the `alert_state` document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Saved {
    next_id: u64,
    trackers: BTreeMap<String, Tracker>,
    notifications: VecDeque<Notification>,
    outbox: Vec<Pending>,
    attempts: BTreeMap<String, VecDeque<Attempt>>,
}

#[derive(Debug)]
struct Active {
    rule: AlertRule,
    predicate: Option<Predicate>,
    key: Vec<String>,
    tracker: Tracker,
    /// The view version the tracker has seen.
    seen: u64,
    error: Option<String>,
}

#[derive(Debug, Default)]
struct Live {
    rules: BTreeMap<String, Active>,
    next_id: u64,
    notifications: VecDeque<Notification>,
    outbox: BTreeMap<String, Pending>,
    /// Deliveries being attempted, and how many per destination.
    in_flight: HashSet<String>,
    per_destination: HashMap<String, usize>,
    attempts: BTreeMap<String, VecDeque<Attempt>>,
    silences: Vec<Silence>,
    /// Notifications recorded since the last write, to announce once it is done.
    fresh: Vec<Notification>,
    /// Grows with every change that must be written.
    generation: u64,
}

impl Live {
    fn saved(&self) -> Saved {
        Saved {
            next_id: self.next_id,
            trackers: self
                .rules
                .iter()
                .map(|(n, a)| (n.clone(), a.tracker.clone()))
                .collect(),
            notifications: self.notifications.clone(),
            outbox: self.outbox.values().cloned().collect(),
            attempts: self.attempts.clone(),
        }
    }
}

/// The engine's alert rules (reached through `Engine::alerts`).
#[derive(Debug)]
pub struct Alerts {
    options: AlertOptions,
    live: Mutex<Live>,
    rules_doc: Document<Vec<AlertRule>>,
    state_doc: Document<Saved>,
    silences_doc: Document<Vec<Silence>>,
    /// Serialises writes of `alert_state`.
    writer: tokio::sync::Mutex<()>,
    saved_generation: AtomicU64,
    /// Serialises rule changes, so the saved rules never lose one.
    ddl: tokio::sync::Mutex<()>,
    wake_eval: Notify,
    wake_deliver: Notify,
    events: broadcast::Sender<Arc<Notification>>,
    http: reqwest::Client,
    metrics: Arc<EngineMetrics>,
}

fn invalid(m: impl Into<String>) -> QueryError {
    QueryError::Invalid(m.into())
}

fn store_error(what: &str, e: &crate::Error) -> QueryError {
    QueryError::Internal(format!("{what}: {e}"))
}

impl Alerts {
    pub(crate) fn new(
        options: AlertOptions,
        store: &crate::Store,
        node: &str,
        metrics: Arc<EngineMetrics>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(options.delivery_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self {
            live: Mutex::new(Live::default()),
            rules_doc: Document::new(store, "alerts", None, node),
            state_doc: Document::new(store, "alert_state", None, node),
            silences_doc: Document::new(store, "silences", None, node),
            writer: tokio::sync::Mutex::new(()),
            saved_generation: AtomicU64::new(0),
            ddl: tokio::sync::Mutex::new(()),
            wake_eval: Notify::new(),
            wake_deliver: Notify::new(),
            events: broadcast::channel(1024).0,
            http,
            metrics,
            options,
        }
    }

    /// The clock rules are timed by.
    pub fn clock(&self) -> &Clock {
        &self.options.clock
    }

    /// Loads the saved rules, their state and the silences. Rules are compiled when
    /// the evaluator starts, once the views are ready.
    pub(crate) async fn load(&self) -> crate::Result<()> {
        let rules = self.rules_doc.read().await?;
        let mut saved = self.state_doc.read().await?;
        let silences = self.silences_doc.read().await?;
        let mut live = self.live.lock();
        live.next_id = saved.next_id;
        live.notifications = saved.notifications;
        live.outbox = saved
            .outbox
            .into_iter()
            .map(|p| (p.id.clone(), p))
            .collect();
        live.attempts = saved.attempts;
        live.silences = silences;
        for rule in rules {
            let tracker = saved
                .trackers
                .remove(&rule.name)
                .unwrap_or_else(|| Tracker::new(rule.timers));
            live.rules.insert(
                rule.name.clone(),
                Active {
                    rule,
                    predicate: None,
                    key: Vec::new(),
                    tracker,
                    seen: 0,
                    error: Some("waiting for the views to load".into()),
                },
            );
        }
        self.metrics.alert_rules.set(live.rules.len() as i64);
        self.metrics.alert_outbox.set(live.outbox.len() as i64);
        Ok(())
    }

    /// Notifications as they are recorded or marked read.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Notification>> {
        self.events.subscribe()
    }

    /// Creates a rule: its view must exist and its predicate fit the view's columns.
    /// Webhooks without a secret get one. Returns the rule as stored.
    pub async fn create(
        &self,
        engine: &Engine,
        mut rule: AlertRule,
        if_not_exists: bool,
    ) -> Result<(AlertRule, bool), QueryError> {
        let _ddl = self.ddl.lock().await;
        if let Some(a) = self.live.lock().rules.get(&rule.name) {
            if if_not_exists {
                return Ok((a.rule.clone(), false));
            }
            return Err(QueryError::Conflict(format!(
                "alert '{}' already exists; DROP ALERT it first",
                rule.name
            )));
        }
        check_name(&rule.name)?;
        let info = engine.views().view_info(&rule.view).ok_or_else(|| {
            invalid(format!(
                "alert '{}': there is no view '{}' (SHOW VIEWS lists them)",
                rule.name, rule.view
            ))
        })?;
        let predicate = Predicate::compile(&rule.predicate, &rule.view, Arc::clone(&info.schema))
            .map_err(|e| invalid(format!("alert '{}': {e}", rule.name)))?;
        for d in &mut rule.notify {
            match d {
                Destination::Webhook { url, secret } => {
                    url::Url::parse(url).map_err(|e| invalid(format!("webhook '{url}': {e}")))?;
                    match secret {
                        Some(s) => {
                            deliver::secret_key(s)
                                .map_err(|e| invalid(format!("webhook '{url}': {e}")))?;
                        }
                        None => *secret = Some(deliver::new_secret()),
                    }
                }
                Destination::Email { address } => {
                    if !address.contains('@') {
                        return Err(invalid(format!("'{address}' is not an email address")));
                    }
                }
            }
        }
        let stored = rule.clone();
        self.rules_doc
            .update(|rules| {
                rules.retain(|r| r.name != stored.name);
                rules.push(stored.clone());
                Ok(())
            })
            .await
            .map_err(|e| store_error("saving the alert", &e))?;
        {
            let mut live = self.live.lock();
            let mut active = Active {
                tracker: Tracker::new(rule.timers),
                rule: rule.clone(),
                predicate: Some(predicate),
                key: info.key.clone(),
                seen: 0,
                error: None,
            };
            // Rows already in the predicate enter it now.
            let now = self.options.clock.now();
            let moved = resync(engine, &mut active, now);
            record(&mut live, &self.options, &rule, moved, now, &self.metrics);
            live.rules.insert(rule.name.clone(), active);
            live.generation += 1;
            self.metrics.alert_rules.set(live.rules.len() as i64);
        }
        self.persist().await;
        self.wake_eval.notify_one();
        self.wake_deliver.notify_one();
        info!(alert = %rule.name, view = %rule.view, "alert created");
        Ok((rule, true))
    }

    /// Drops a rule, its state and its pending deliveries.
    pub async fn drop_alert(&self, name: &str, if_exists: bool) -> Result<bool, QueryError> {
        let _ddl = self.ddl.lock().await;
        if !self.live.lock().rules.contains_key(name) {
            if if_exists {
                return Ok(false);
            }
            return Err(QueryError::NotFound(format!("there is no alert '{name}'")));
        }
        self.rules_doc
            .update(|rules| {
                rules.retain(|r| r.name != name);
                Ok(())
            })
            .await
            .map_err(|e| store_error("saving the alerts", &e))?;
        {
            let mut live = self.live.lock();
            live.rules.remove(name);
            live.outbox.retain(|_, p| p.alert != name);
            live.attempts.remove(name);
            live.generation += 1;
            self.metrics.alert_rules.set(live.rules.len() as i64);
            self.metrics.alert_outbox.set(live.outbox.len() as i64);
        }
        self.persist().await;
        info!(alert = %name, "alert dropped");
        Ok(true)
    }

    /// Every rule with its keys, by name.
    pub fn list(&self) -> Vec<AlertInfo> {
        let live = self.live.lock();
        live.rules.values().map(|a| info_of(&live, a)).collect()
    }

    /// One rule with its keys.
    pub fn get(&self, name: &str) -> Option<AlertInfo> {
        let live = self.live.lock();
        live.rules.get(name).map(|a| info_of(&live, a))
    }

    /// A rule's delivery attempts (newest last) and its deliveries not yet confirmed.
    pub fn deliveries(&self, name: &str) -> Option<(Vec<Attempt>, Vec<Pending>)> {
        let live = self.live.lock();
        live.rules.get(name)?;
        let attempts = live
            .attempts
            .get(name)
            .map(|a| a.iter().cloned().collect())
            .unwrap_or_default();
        let pending = live
            .outbox
            .values()
            .filter(|p| p.alert == name)
            .cloned()
            .collect();
        Some((attempts, pending))
    }

    /// Notifications, newest first: all, or only unread ones, up to `limit`.
    pub fn notifications(&self, unread_only: bool, limit: usize) -> Vec<Notification> {
        let live = self.live.lock();
        live.notifications
            .iter()
            .rev()
            .filter(|n| !unread_only || n.read_at.is_none())
            .take(limit)
            .cloned()
            .collect()
    }

    /// Notifications nobody has read.
    pub fn unread(&self) -> usize {
        let live = self.live.lock();
        live.notifications
            .iter()
            .filter(|n| n.read_at.is_none())
            .count()
    }

    /// Marks a notification read by `who` (reading it again keeps the first time).
    pub async fn mark_read(&self, id: u64, who: &str) -> Result<Notification, QueryError> {
        let n = {
            let mut live = self.live.lock();
            let now = self.options.clock.now();
            let n = live
                .notifications
                .iter_mut()
                .find(|n| n.id == id)
                .ok_or_else(|| QueryError::NotFound(format!("there is no notification {id}")))?;
            if n.read_at.is_some() {
                return Ok(n.clone());
            }
            n.read_at = Some(now);
            n.read_by = Some(who.to_owned());
            let n = n.clone();
            live.generation += 1;
            n
        };
        self.persist().await;
        let _ = self.events.send(Arc::new(n.clone()));
        Ok(n)
    }

    /// Adds a silence; returns it with its id.
    pub async fn add_silence(&self, mut silence: Silence) -> Result<Silence, QueryError> {
        if silence.ends_at <= silence.starts_at {
            return Err(invalid("a silence must end after it starts"));
        }
        if silence.id.is_empty() {
            silence.id = format!("sil_{:016x}", rand::random::<u64>());
        }
        let s = silence.clone();
        let (_, all) = self
            .silences_doc
            .update(|list| {
                list.retain(|x| x.id != s.id);
                list.push(s.clone());
                Ok(())
            })
            .await
            .map_err(|e| store_error("saving the silence", &e))?;
        self.live.lock().silences = all;
        Ok(silence)
    }

    /// Silences not yet ended.
    pub fn silences(&self) -> Vec<Silence> {
        let now = self.options.clock.now();
        let live = self.live.lock();
        live.silences
            .iter()
            .filter(|s| s.ends_at > now)
            .cloned()
            .collect()
    }

    /// Removes a silence.
    pub async fn remove_silence(&self, id: &str) -> Result<bool, QueryError> {
        let (found, all) = self
            .silences_doc
            .update(|list| {
                let before = list.len();
                list.retain(|x| x.id != id);
                Ok(list.len() != before)
            })
            .await
            .map_err(|e| store_error("saving the silences", &e))?;
        self.live.lock().silences = all;
        Ok(found)
    }

    /// Re-evaluates timers now (after a manual clock moved).
    pub fn wake(&self) {
        self.wake_eval.notify_one();
        self.wake_deliver.notify_one();
    }

    /// Writes `alert_state` if anything changed since the last write. Concurrent
    /// callers share one write.
    async fn persist(&self) {
        let _w = self.writer.lock().await;
        let (generation, saved, fresh) = {
            let mut live = self.live.lock();
            if live.generation <= self.saved_generation.load(Ordering::Acquire) {
                return;
            }
            (
                live.generation,
                live.saved(),
                std::mem::take(&mut live.fresh),
            )
        };
        let mut tries = 0u32;
        loop {
            match self
                .state_doc
                .update(|v| {
                    *v = saved.clone();
                    Ok(())
                })
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    tries += 1;
                    warn!(error = %e, tries, "cannot save the alert state; retrying");
                    tokio::time::sleep(Duration::from_millis(100 << tries.min(6))).await;
                }
            }
        }
        self.saved_generation.store(generation, Ordering::Release);
        for n in fresh {
            let _ = self.events.send(Arc::new(n));
        }
    }

    /// Starts the evaluator and the delivery tasks.
    pub(crate) fn start(
        self: &Arc<Self>,
        engine: &Engine,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let evaluator = {
            let alerts = Arc::clone(self);
            let engine = engine.clone();
            let stop = stop.clone();
            tokio::spawn(async move { alerts.evaluate(engine, stop).await })
        };
        let sender = {
            let alerts = Arc::clone(self);
            tokio::spawn(async move { alerts.deliver(stop).await })
        };
        vec![evaluator, sender]
    }

    async fn evaluate(self: Arc<Self>, engine: Engine, mut stop: watch::Receiver<bool>) {
        let mut changes = engine.views().subscribe_changes();
        engine.views().views_settled().await;
        {
            let now = self.options.clock.now();
            let mut live = self.live.lock();
            let names: Vec<String> = live.rules.keys().cloned().collect();
            for name in names {
                let Some(mut active) = live.rules.remove(&name) else {
                    continue;
                };
                compile(&engine, &mut active);
                let moved = resync(&engine, &mut active, now);
                let rule = active.rule.clone();
                live.rules.insert(name, active);
                record(&mut live, &self.options, &rule, moved, now, &self.metrics);
            }
            // What was loaded is written back once, so a restart on a changed view
            // state is recorded.
            live.generation += 1;
        }
        self.persist().await;
        self.wake_deliver.notify_one();
        loop {
            let wait = self.until_next_deadline();
            tokio::select! {
                first = changes.recv() => {
                    let mut next = Some(first);
                    while let Some(got) = next.take() {
                        match got {
                            Ok(cs) => self.on_change(&engine, &cs),
                            Err(broadcast::error::RecvError::Lagged(missed)) => {
                                warn!(missed, "alert rules fell behind the view changes; reconciling with the views");
                                self.resync_all(&engine);
                            }
                            Err(broadcast::error::RecvError::Closed) => return,
                        }
                        next = match changes.try_recv() {
                            Ok(cs) => Some(Ok(cs)),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                Some(Err(broadcast::error::RecvError::Lagged(n)))
                            }
                            Err(_) => None,
                        };
                    }
                }
                _ = tokio::time::sleep(wait) => self.tick(),
                _ = self.wake_eval.notified() => self.tick(),
                _ = stop.changed() => return,
            }
            let moved = {
                let live = self.live.lock();
                live.generation > self.saved_generation.load(Ordering::Acquire)
            };
            if moved {
                self.persist().await;
                self.wake_deliver.notify_one();
            }
        }
    }

    fn until_next_deadline(&self) -> Duration {
        let live = self.live.lock();
        let now = self.options.clock.now();
        let next = live
            .rules
            .values()
            .filter_map(|a| a.tracker.next_deadline())
            .min();
        match next {
            // Wake at least each second: a manual clock does not wake anyone.
            Some(at) => Duration::from_millis((at - now).clamp(0, 1_000) as u64),
            None => Duration::from_secs(1),
        }
    }

    fn tick(&self) {
        let now = self.options.clock.now();
        let mut live = self.live.lock();
        let mut moved = Vec::new();
        for a in live.rules.values_mut() {
            let t = a.tracker.tick(now);
            if !t.is_empty() {
                moved.push((a.rule.clone(), t));
            }
        }
        for (rule, t) in moved {
            record(&mut live, &self.options, &rule, t, now, &self.metrics);
        }
    }

    fn resync_all(&self, engine: &Engine) {
        let now = self.options.clock.now();
        let mut live = self.live.lock();
        let mut moved = Vec::new();
        for a in live.rules.values_mut() {
            let t = resync(engine, a, now);
            moved.push((a.rule.clone(), t));
        }
        for (rule, t) in moved {
            record(&mut live, &self.options, &rule, t, now, &self.metrics);
        }
    }

    fn on_change(&self, engine: &Engine, cs: &crate::views::ChangeSet) {
        let started = Instant::now();
        let now = self.options.clock.now();
        let mut rows = ChangeRows::new(cs);
        let mut live = self.live.lock();
        let mut moved = Vec::new();
        let mut any = false;
        let mut tracked_changed = false;
        for a in live.rules.values_mut() {
            if a.rule.view != cs.view || cs.version <= a.seen {
                continue;
            }
            any = true;
            if a.key.is_empty() || cs.version != a.seen + 1 && a.seen != 0 {
                // No key to follow rows by, or a version skipped: read the view whole.
                let t = resync(engine, a, now);
                moved.push((a.rule.clone(), t));
                continue;
            }
            a.seen = cs.version;
            let Some(predicate) = &a.predicate else {
                continue;
            };
            let moves = a.tracker.moves();
            let mut t = Vec::new();
            if cs.upserts.num_rows() > 0 {
                let mask = match predicate.matches(&cs.upserts) {
                    Ok(mask) => mask,
                    Err(e) => {
                        a.error = Some(e);
                        continue;
                    }
                };
                for (i, &hit) in mask.iter().enumerate() {
                    // Most rules follow no key most of the time: nothing to look up.
                    if !hit && a.tracker.is_empty() {
                        continue;
                    }
                    let key = rows.upsert_key(i, &a.key).to_owned();
                    if hit {
                        let row = rows.row(i);
                        t.extend(a.tracker.observe(&key, Some(row), now));
                    } else if a.tracker.has(&key) {
                        t.extend(a.tracker.observe(&key, None, now));
                    }
                }
            }
            if !a.tracker.is_empty() {
                for i in 0..cs.deletes.num_rows() {
                    let key = rows.delete_key(i, &a.key).to_owned();
                    if a.tracker.has(&key) {
                        t.extend(a.tracker.observe(&key, None, now));
                    }
                }
            }
            // A key that went pending (or stopped) is saved too, so FOR keeps its
            // start across a restart.
            tracked_changed |= a.tracker.moves() != moves;
            if !t.is_empty() {
                moved.push((a.rule.clone(), t));
            }
        }
        for (rule, t) in moved {
            record(&mut live, &self.options, &rule, t, now, &self.metrics);
        }
        if tracked_changed {
            live.generation += 1;
        }
        if any {
            self.metrics
                .alert_eval_seconds
                .observe(started.elapsed().as_secs_f64());
        }
    }

    async fn deliver(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let now = self.options.clock.now();
            let due: Vec<Pending> = {
                let mut live = self.live.lock();
                let mut due = Vec::new();
                let candidates: Vec<Pending> = live
                    .outbox
                    .values()
                    .filter(|p| p.next_at <= now && !live.in_flight.contains(&p.id))
                    .cloned()
                    .collect();
                for p in candidates {
                    let dest = destination_label(&p.destination);
                    let busy = live.per_destination.entry(dest).or_default();
                    if *busy >= PER_DESTINATION {
                        continue;
                    }
                    *busy += 1;
                    if live.in_flight.insert(p.id.clone()) {
                        due.push(p);
                    }
                }
                due
            };
            for p in due {
                let alerts = Arc::clone(&self);
                tokio::spawn(async move { alerts.attempt(p).await });
            }
            let wait = {
                let live = self.live.lock();
                live.outbox
                    .values()
                    .filter(|p| !live.in_flight.contains(&p.id))
                    .map(|p| p.next_at)
                    .min()
                    .map(|at| Duration::from_millis((at - now).clamp(0, 1_000) as u64))
                    .unwrap_or(Duration::from_secs(1))
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake_deliver.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn attempt(self: Arc<Self>, p: Pending) {
        let started = Instant::now();
        let result = match &p.destination {
            Destination::Webhook { url, secret } => {
                deliver::post(&self.http, url, secret.as_deref(), &p.id, &p.body).await
            }
            Destination::Email { address } => {
                deliver::email(&self.options, address, &p.subject, &p.body).await
            }
        };
        let elapsed = started.elapsed();
        let kind = match p.destination {
            Destination::Webhook { .. } => "webhook",
            Destination::Email { .. } => "email",
        };
        self.metrics
            .alert_delivery_seconds
            .observe(elapsed.as_secs_f64());
        {
            let mut live = self.live.lock();
            let label = destination_label(&p.destination);
            if let Some(n) = live.per_destination.get_mut(&label) {
                *n = n.saturating_sub(1);
            }
            live.in_flight.remove(&p.id);
            let now = self.options.clock.now();
            let attempt_no = p.attempts + 1;
            let (outcome, status, error) = match &result {
                Ok(Sent { status }) => {
                    live.outbox.remove(&p.id);
                    (Outcome::Delivered, *status, None)
                }
                Err(e) if attempt_no >= self.options.max_attempts => {
                    live.outbox.remove(&p.id);
                    warn!(alert = %p.alert, delivery = %p.id, error = %e.message, "delivery given up");
                    (Outcome::GaveUp, e.status, Some(e.message.clone()))
                }
                Err(e) => {
                    let wait = backoff(&self.options, attempt_no);
                    if let Some(entry) = live.outbox.get_mut(&p.id) {
                        entry.attempts = attempt_no;
                        entry.next_at = now + wait.as_millis() as i64;
                        entry.last_error = Some(e.message.clone());
                    }
                    debug!(alert = %p.alert, delivery = %p.id, error = %e.message, retry_in_ms = wait.as_millis() as u64, "delivery failed");
                    (Outcome::Failed, e.status, Some(e.message.clone()))
                }
            };
            self.metrics
                .alert_deliveries_total
                .get_or_create(&crate::metrics::DeliveryLabel {
                    kind: kind.into(),
                    outcome: <&str>::from(outcome).into(),
                })
                .inc();
            let keep = self.options.keep_attempts;
            let log = live.attempts.entry(p.alert.clone()).or_default();
            log.push_back(Attempt {
                delivery: p.id.clone(),
                notification: p.notification,
                destination: label,
                attempt: attempt_no,
                at: now,
                outcome,
                status,
                error,
                elapsed_ms: elapsed.as_millis() as u64,
            });
            while log.len() > keep {
                log.pop_front();
            }
            live.generation += 1;
            self.metrics.alert_outbox.set(live.outbox.len() as i64);
        }
        self.persist().await;
        self.wake_deliver.notify_one();
    }

    /// The `alerts` system table: one row per rule.
    pub(crate) fn alerts_table(&self) -> RecordBatch {
        let infos = self.list();
        let text = |f: &dyn Fn(&AlertInfo) -> String| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(infos.iter().map(f)))
        };
        let count = |state: AlertState| -> ArrayRef {
            Arc::new(Int64Array::from_iter_values(infos.iter().map(|i| {
                i.keys.iter().filter(|k| k.state == state).count() as i64
            })))
        };
        let columns: Vec<ArrayRef> = vec![
            text(&|i| i.rule.name.clone()),
            text(&|i| i.rule.view.clone()),
            text(&|i| i.rule.predicate.clone()),
            Arc::new(Int64Array::from_iter_values(
                infos.iter().map(|i| i.rule.timers.for_ms),
            )),
            Arc::new(Int64Array::from_iter_values(
                infos.iter().map(|i| i.rule.timers.keep_firing_for_ms),
            )),
            text(&|i| severity_name(i.rule.severity).to_owned()),
            text(&|i| {
                i.rule
                    .notify
                    .iter()
                    .map(destination_label)
                    .collect::<Vec<_>>()
                    .join(", ")
            }),
            count(AlertState::Pending),
            count(AlertState::Firing),
            Arc::new(StringArray::from_iter(
                infos.iter().map(|i| i.error.clone()),
            )),
        ];
        RecordBatch::try_new(alerts_schema(), columns).expect("columns match the schema")
    }

    /// The `notifications` system table: the kept notifications, oldest first.
    pub(crate) fn notifications_table(&self) -> RecordBatch {
        let live = self.live.lock();
        let ns = &live.notifications;
        let text = |f: &dyn Fn(&Notification) -> String| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(ns.iter().map(f)))
        };
        let millis = |f: &dyn Fn(&Notification) -> Option<i64>| -> ArrayRef {
            Arc::new(TimestampMillisecondArray::from_iter(ns.iter().map(f)).with_timezone("UTC"))
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(ns.iter().map(|n| n.id as i64))),
            text(&|n| n.alert.clone()),
            text(&|n| n.view.clone()),
            text(&|n| severity_name(n.severity).to_owned()),
            text(&|n| <&str>::from(n.state).to_owned()),
            text(&|n| n.key.to_string()),
            text(&|n| n.row.to_string()),
            millis(&|n| Some(n.since)),
            millis(&|n| Some(n.created_at)),
            millis(&|n| n.read_at),
            Arc::new(StringArray::from_iter(ns.iter().map(|n| n.read_by.clone()))),
            Arc::new(BooleanArray::from_iter(ns.iter().map(|n| Some(n.silenced)))),
        ];
        RecordBatch::try_new(notifications_schema(), columns).expect("columns match the schema")
    }
}

/// Schema of the `alerts` system table.
pub(crate) fn alerts_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("view", DataType::Utf8, false),
        Field::new("predicate", DataType::Utf8, false),
        Field::new("for_ms", DataType::Int64, false),
        Field::new("keep_firing_for_ms", DataType::Int64, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("notify", DataType::Utf8, false),
        Field::new("pending", DataType::Int64, false),
        Field::new("firing", DataType::Int64, false),
        Field::new("error", DataType::Utf8, true),
    ]))
}

/// Schema of the `notifications` system table.
pub(crate) fn notifications_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("alert", DataType::Utf8, false),
        Field::new("view", DataType::Utf8, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("row", DataType::Utf8, false),
        Field::new("since", ts.clone(), false),
        Field::new("created_at", ts.clone(), false),
        Field::new("read_at", ts, true),
        Field::new("read_by", DataType::Utf8, true),
        Field::new("silenced", DataType::Boolean, false),
    ]))
}

/// `info`, `warning` or `critical`.
pub fn severity_name(s: Severity) -> &'static str {
    match s {
        Severity::Info => "info",
        Severity::Warning => "warning",
        Severity::Critical => "critical",
    }
}

/// The URL or address a destination sends to.
pub fn destination_label(d: &Destination) -> String {
    match d {
        Destination::Webhook { url, .. } => url.clone(),
        Destination::Email { address } => format!("mailto:{address}"),
    }
}

fn check_name(name: &str) -> Result<(), QueryError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "alert name '{name}': use letters, digits, '_' and '-' (at most 128)"
        )))
    }
}

fn backoff(options: &AlertOptions, attempt: u32) -> Duration {
    let factor = 1u32 << (attempt.saturating_sub(1)).min(20);
    options
        .retry_base
        .saturating_mul(factor)
        .min(options.retry_max)
}

fn info_of(live: &Live, a: &Active) -> AlertInfo {
    AlertInfo {
        rule: a.rule.clone(),
        keys: a.tracker.status(),
        error: a.error.clone(),
        pending_deliveries: live
            .outbox
            .values()
            .filter(|p| p.alert == a.rule.name)
            .count(),
    }
}

/// Compiles a loaded rule's predicate against its view as it is now.
fn compile(engine: &Engine, a: &mut Active) {
    match engine.views().view_info(&a.rule.view) {
        None => {
            a.predicate = None;
            a.error = Some(format!("view '{}' does not exist", a.rule.view));
        }
        Some(info) => match Predicate::compile(&a.rule.predicate, &a.rule.view, info.schema) {
            Ok(p) => {
                a.predicate = Some(p);
                a.key = info.key;
                a.error = None;
            }
            Err(e) => {
                a.predicate = None;
                a.error = Some(e);
            }
        },
    }
}

/// Reconciles a rule's tracker with every row of its view now.
fn resync(engine: &Engine, a: &mut Active, now: i64) -> Vec<super::Transition> {
    let Some(snapshot) = engine.views().view_snapshot(&a.rule.view) else {
        a.error = Some(format!("view '{}' does not exist", a.rule.view));
        return Vec::new();
    };
    let snapshot = match snapshot {
        Ok(s) => s,
        Err(e) => {
            a.error = Some(format!("reading view '{}': {e}", a.rule.view));
            return Vec::new();
        }
    };
    if a.predicate.is_none() || a.key != snapshot.key {
        compile(engine, a);
    }
    let Some(predicate) = &a.predicate else {
        return Vec::new();
    };
    let mask = match predicate.matches(&snapshot.rows) {
        Ok(m) => m,
        Err(e) => {
            a.error = Some(e);
            return Vec::new();
        }
    };
    a.seen = snapshot.version;
    // Only the rows in the predicate become JSON: a large view has few of them.
    let hits = match arrow::compute::filter_record_batch(&snapshot.rows, &BooleanArray::from(mask))
    {
        Ok(b) => b,
        Err(e) => {
            a.error = Some(e.to_string());
            return Vec::new();
        }
    };
    let mut matching = BTreeMap::new();
    for row in json_rows(&hits) {
        let key = if a.key.is_empty() {
            row.to_string()
        } else {
            key_of(&row, &a.key)
        };
        matching.insert(key, row);
    }
    a.tracker.reconcile(matching, now)
}

/// Turns transitions into notifications and outbox entries.
fn record(
    live: &mut Live,
    options: &AlertOptions,
    rule: &AlertRule,
    moved: Vec<super::Transition>,
    now: i64,
    metrics: &EngineMetrics,
) {
    if moved.is_empty() {
        return;
    }
    live.generation += 1;
    for t in moved {
        live.next_id += 1;
        let id = live.next_id;
        let key: Value = serde_json::from_str(&t.key).unwrap_or(Value::String(t.key.clone()));
        let silenced = live
            .silences
            .iter()
            .any(|s| s.covers(&rule.name, &key, now));
        metrics
            .alert_transitions_total
            .get_or_create(&crate::metrics::AlertStateLabel {
                state: <&str>::from(t.state).into(),
            })
            .inc();
        let n = Notification {
            id,
            alert: rule.name.clone(),
            view: rule.view.clone(),
            severity: rule.severity,
            state: t.state,
            key,
            row: t.row,
            since: t.since,
            at: t.at,
            created_at: now,
            read_at: None,
            read_by: None,
            silenced,
        };
        info!(alert = %rule.name, key = %n.key, state = <&str>::from(n.state), silenced, "alert transition");
        if !silenced {
            let body = deliver::payload(&n, &rule.predicate);
            let subject = deliver::subject(&n);
            for (i, destination) in rule.notify.iter().enumerate() {
                let pid = format!("msg_{id}_{i}");
                live.outbox.insert(
                    pid.clone(),
                    Pending {
                        id: pid,
                        notification: id,
                        alert: rule.name.clone(),
                        destination: destination.clone(),
                        body: body.clone(),
                        subject: subject.clone(),
                        attempts: 0,
                        next_at: now,
                        last_error: None,
                    },
                );
            }
        }
        live.fresh.push(n.clone());
        live.notifications.push_back(n);
    }
    while live.notifications.len() > options.keep_notifications {
        live.notifications.pop_front();
    }
    metrics.alert_outbox.set(live.outbox.len() as i64);
}

/// A change set's rows as JSON and their keys, converted once however many rules
/// read them (every rule of a view has the view's key).
struct ChangeRows<'a> {
    cs: &'a crate::views::ChangeSet,
    upserts: Option<Vec<Value>>,
    upsert_keys: Option<Vec<String>>,
    delete_keys: Option<Vec<String>>,
}

impl<'a> ChangeRows<'a> {
    fn new(cs: &'a crate::views::ChangeSet) -> Self {
        Self {
            cs,
            upserts: None,
            upsert_keys: None,
            delete_keys: None,
        }
    }

    fn rows(&mut self) -> &[Value] {
        self.upserts
            .get_or_insert_with(|| json_rows(&self.cs.upserts))
    }

    fn row(&mut self, i: usize) -> Value {
        self.rows().get(i).cloned().unwrap_or(Value::Null)
    }

    fn upsert_key(&mut self, i: usize, key: &[String]) -> &str {
        if self.upsert_keys.is_none() {
            let keys = self.rows().iter().map(|r| key_of(r, key)).collect();
            self.upsert_keys = Some(keys);
        }
        self.upsert_keys
            .as_ref()
            .and_then(|k| k.get(i))
            .map_or("", String::as_str)
    }

    fn delete_key(&mut self, i: usize, key: &[String]) -> &str {
        let cs = self.cs;
        self.delete_keys
            .get_or_insert_with(|| {
                json_rows(&cs.deletes)
                    .iter()
                    .map(|r| key_of(r, key))
                    .collect()
            })
            .get(i)
            .map_or("", String::as_str)
    }
}

/// A row's key columns as a JSON object, in key order.
fn key_of(row: &Value, key: &[String]) -> String {
    let mut m = Map::new();
    for column in key {
        m.insert(
            column.clone(),
            row.get(column).cloned().unwrap_or(Value::Null),
        );
    }
    Value::Object(m).to_string()
}

/// A batch's rows as JSON objects (nulls kept as `null`).
fn json_rows(batch: &RecordBatch) -> Vec<Value> {
    if batch.num_rows() == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut writer = arrow::json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, arrow::json::writer::JsonArray>(&mut out);
    if writer.write(batch).and_then(|()| writer.finish()).is_err() {
        return vec![json!(null); batch.num_rows()];
    }
    drop(writer);
    serde_json::from_slice(&out).unwrap_or_else(|_| vec![json!(null); batch.num_rows()])
}

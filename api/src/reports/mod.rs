//! Reports: SQL plus a format plus a schedule plus recipients. Quiver runs a report's
//! queries, writes the file (CSV, Parquet, Excel or PDF), stores it under
//! `reports/<name>/<run id>.<ext>` in the store, and emails it.
//!
//! Definitions live in the catalog document `reports`, runs and each report's next
//! scheduled time in `report_runs`, so both survive restarts. One worker runs the
//! queued runs one after another on the query runtime, each query holding a query
//! slot and its own memory pool like any `/v1/sql` query, so a report never takes
//! threads from ingest or push. The scheduler sleeps until the earliest due report;
//! a report whose time passed while the server was down runs once at start, however
//! many times it was missed. Emails go out on their own task, retried with backoff,
//! so a dead relay delays no other run.

mod def;
pub(crate) mod http;
mod pdf;
mod render;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use object_store::ObjectStoreExt as _;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use quiver_engine::catalog::Document;
use quiver_engine::clock::Clock;
use quiver_engine::{Engine, Prepared, QueryError, Store};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

pub(crate) use def::ReportDef;

use crate::state::AppState;

/// Runs kept per report at most, whatever the retention.
const MAX_RUNS_KEPT: usize = 1000;

/// The owner of the built-in reports (`sql/reports`).
const BUILT_IN: &str = "built-in";

/// Attempts at one email before the delivery is marked failed.
const EMAIL_ATTEMPTS: u32 = 4;

/// Settings from the command line.
#[derive(Debug, Clone)]
pub(crate) struct ReportOptions {
    pub(crate) retention: Duration,
    pub(crate) timeout: Duration,
    pub(crate) max_result_bytes: usize,
    pub(crate) smtp_url: Option<String>,
    pub(crate) email_from: String,
    pub(crate) email_timeout: Duration,
    pub(crate) email_retry: Duration,
    pub(crate) max_attachment_bytes: usize,
    /// Base of links in emails; `None` until the HTTP address is known.
    pub(crate) public_url: Option<String>,
    pub(crate) clock: Clock,
}

/// A report as stored: the definition, who made it and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Stored {
    pub(crate) def: ReportDef,
    /// The name of the token that created or last replaced it.
    pub(crate) owner: String,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub(crate) enum RunState {
    Queued,
    Running,
    Succeeded,
    Failed,
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Trigger {
    /// `POST /v1/reports/{name}/run` (and the CLI).
    Request,
    /// Its schedule.
    Schedule,
    /// A scheduled time that passed while the server was down, run once at start.
    Missed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DeliveryState {
    Pending,
    Sent,
    Failed,
}

/// How a run's email went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Delivery {
    pub(crate) state: DeliveryState,
    pub(crate) to: Vec<String>,
    pub(crate) attempts: u32,
    /// The file was attached (false: the email links to it).
    pub(crate) attached: bool,
    pub(crate) error: Option<String>,
    pub(crate) sent_at: Option<i64>,
}

/// One query's part of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct QueryRun {
    pub(crate) title: String,
    pub(crate) rows: u64,
    /// The first row, for the email's headline numbers.
    pub(crate) first_row: Option<Value>,
}

/// One run of a report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Run {
    pub(crate) id: String,
    pub(crate) report: String,
    pub(crate) state: RunState,
    pub(crate) trigger: Trigger,
    pub(crate) queued_at: i64,
    pub(crate) started_at: Option<i64>,
    pub(crate) finished_at: Option<i64>,
    /// The values bound to the queries' placeholders.
    pub(crate) params: Map<String, Value>,
    pub(crate) rows: u64,
    pub(crate) bytes: u64,
    pub(crate) queries: Vec<QueryRun>,
    /// The stored file's extension (`csv`, `zip`, …), once there is a file.
    pub(crate) extension: Option<String>,
    pub(crate) error: Option<String>,
    pub(crate) delivery: Option<Delivery>,
}

impl Run {
    /// The run as the API shows it.
    pub(crate) fn to_json(&self) -> Value {
        let iso = |t: Option<i64>| t.map(quiver_engine::alerts::iso);
        json!({
            "id": self.id,
            "report": self.report,
            "state": <&str>::from(self.state),
            "trigger": self.trigger,
            "queued_at": quiver_engine::alerts::iso(self.queued_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "params": self.params,
            "rows": self.rows,
            "bytes": self.bytes,
            "queries": self.queries.iter().map(|q| json!({"title": q.title, "rows": q.rows})).collect::<Vec<_>>(),
            "file": self.extension.as_ref().map(|_| format!("/v1/reports/{}/runs/{}/file", self.report, self.id)),
            "file_name": self.file_name(),
            "error": self.error,
            "delivery": self.delivery.as_ref().map(|d| json!({
                "state": d.state,
                "to": d.to,
                "attempts": d.attempts,
                "attached": d.attached,
                "error": d.error,
                "sent_at": iso(d.sent_at),
            })),
        })
    }

    /// The name a downloaded file gets.
    pub(crate) fn file_name(&self) -> Option<String> {
        self.extension
            .as_ref()
            .map(|ext| format!("{}-{}.{ext}", self.report, self.id))
    }
}

/// A report's runs and schedule, as saved.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ReportRuns {
    /// When the schedule fires next (ms); kept so a restart can tell it was missed.
    next_due: Option<i64>,
    /// Oldest first.
    runs: Vec<Run>,
}

#[derive(Debug, Default)]
struct Live {
    defs: BTreeMap<String, Stored>,
    runs: BTreeMap<String, ReportRuns>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Debug)]
struct Metrics {
    runs: Family<OutcomeLabel, Counter>,
    deliveries: Family<OutcomeLabel, Counter>,
    seconds: Histogram,
}

/// The server's reports.
#[derive(Debug)]
pub(crate) struct Reports {
    options: Mutex<ReportOptions>,
    store: Store,
    defs_doc: Document<Vec<Stored>>,
    runs_doc: Document<BTreeMap<String, ReportRuns>>,
    live: Mutex<Live>,
    /// Serialises writes of `report_runs`.
    writer: tokio::sync::Mutex<()>,
    /// Serialises definition changes.
    ddl: tokio::sync::Mutex<()>,
    queue: mpsc::UnboundedSender<(String, String)>,
    queue_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, String)>>>,
    wake: Notify,
    metrics: Metrics,
}

/// An error a caller sees: bad input (400), not found (404) or a failure (500).
#[derive(Debug)]
pub(crate) enum ReportError {
    Invalid(String),
    NotFound(String),
    Conflict(String),
    Internal(String),
}

impl std::fmt::Display for ReportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(m) | Self::NotFound(m) | Self::Conflict(m) | Self::Internal(m) => {
                f.write_str(m)
            }
        }
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> ReportError {
    ReportError::Internal(format!("{what}: {e}"))
}

impl Reports {
    pub(crate) fn new(
        options: ReportOptions,
        store: &Store,
        node: &str,
        registry: &mut Registry,
    ) -> Self {
        let metrics = Metrics {
            runs: Family::default(),
            deliveries: Family::default(),
            seconds: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
        };
        registry.register(
            "quiver_report_runs",
            "Report runs finished, by outcome (succeeded, failed)",
            metrics.runs.clone(),
        );
        registry.register(
            "quiver_report_deliveries",
            "Report emails, by outcome (sent, failed)",
            metrics.deliveries.clone(),
        );
        registry.register(
            "quiver_report_run_seconds",
            "Time from a report run's start to its stored file",
            metrics.seconds.clone(),
        );
        let (queue, rx) = mpsc::unbounded_channel();
        Self {
            options: Mutex::new(options),
            store: store.clone(),
            defs_doc: Document::new(store, "reports", None, node),
            runs_doc: Document::new(store, "report_runs", None, node),
            live: Mutex::new(Live::default()),
            writer: tokio::sync::Mutex::new(()),
            ddl: tokio::sync::Mutex::new(()),
            queue,
            queue_rx: Mutex::new(Some(rx)),
            wake: Notify::new(),
            metrics,
        }
    }

    fn options(&self) -> ReportOptions {
        self.options.lock().clone()
    }

    fn now(&self) -> i64 {
        self.options.lock().clock.now()
    }

    /// Sets the base of links in emails once the HTTP address is known, unless one
    /// was configured.
    pub(crate) fn default_public_url(&self, url: String) {
        self.options.lock().public_url.get_or_insert(url);
    }

    /// Loads the definitions and runs. A run that was going when the server stopped
    /// failed; one still queued is queued again.
    pub(crate) async fn load(&self) -> Result<(), ReportError> {
        let defs = self
            .defs_doc
            .read()
            .await
            .map_err(|e| internal("reading the reports", e))?;
        let mut runs = self
            .runs_doc
            .read()
            .await
            .map_err(|e| internal("reading the report runs", e))?;
        let now = self.now();
        let mut requeue = Vec::new();
        for (name, r) in &mut runs {
            for run in &mut r.runs {
                match run.state {
                    RunState::Running => {
                        run.state = RunState::Failed;
                        run.finished_at = Some(now);
                        run.error = Some("the server stopped during this run".into());
                    }
                    RunState::Queued => requeue.push((name.clone(), run.id.clone())),
                    _ => {}
                }
                if let Some(d) = &mut run.delivery
                    && d.state == DeliveryState::Pending
                {
                    d.state = DeliveryState::Failed;
                    d.error = Some("the server stopped before the email was sent".into());
                }
            }
        }
        {
            let mut live = self.live.lock();
            live.defs = defs.into_iter().map(|s| (s.def.name.clone(), s)).collect();
            live.runs = runs;
        }
        for item in requeue {
            let _ = self.queue.send(item);
        }
        self.save().await;
        Ok(())
    }

    /// Starts the worker and the scheduler; they stop when `stop` turns true.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        state: Arc<AppState>,
        engine: Engine,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let Some(mut rx) = self.queue_rx.lock().take() else {
            return;
        };
        let worker = Arc::clone(self);
        let mut worker_stop = stop.clone();
        let worker_engine = engine.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    n = rx.recv() => n,
                    _ = worker_stop.changed() => None,
                };
                let Some((name, id)) = next else { break };
                worker.run_one(&state, &worker_engine, &name, &id).await;
            }
        });
        let scheduler = Arc::clone(self);
        tokio::spawn(async move { scheduler.schedule_loop(stop).await });
    }

    /// Creates a report (or replaces it with `replace`), checking its SQL under the
    /// same read-only rules as `/v1/sql`.
    pub(crate) async fn create(
        &self,
        engine: &Engine,
        def: ReportDef,
        owner: &str,
        replace: bool,
    ) -> Result<(Stored, bool), ReportError> {
        def.check().map_err(ReportError::Invalid)?;
        let schedule = def.parsed_schedule().map_err(ReportError::Invalid)?;
        for i in 0..def.queries.len() {
            check_query(engine, &def, i).await?;
        }
        let _ddl = self.ddl.lock().await;
        let now = self.now();
        let (stored, created) = {
            let live = self.live.lock();
            match live.defs.get(&def.name) {
                Some(_) if !replace => {
                    return Err(ReportError::Conflict(format!(
                        "report '{}' already exists (PUT /v1/reports/{} replaces it)",
                        def.name, def.name
                    )));
                }
                Some(old) => (
                    Stored {
                        def: def.clone(),
                        owner: owner.to_owned(),
                        created_at: old.created_at,
                        updated_at: now,
                    },
                    false,
                ),
                None => (
                    Stored {
                        def: def.clone(),
                        owner: owner.to_owned(),
                        created_at: now,
                        updated_at: now,
                    },
                    true,
                ),
            }
        };
        let saved = stored.clone();
        self.defs_doc
            .update(move |defs| {
                defs.retain(|s| s.def.name != saved.def.name);
                defs.push(saved.clone());
                Ok(())
            })
            .await
            .map_err(|e| internal("saving the report", e))?;
        {
            let mut live = self.live.lock();
            live.defs.insert(def.name.clone(), stored.clone());
            let runs = live.runs.entry(def.name.clone()).or_default();
            runs.next_due = schedule.and_then(|s| s.next_after_ms(now));
        }
        self.save().await;
        self.wake.notify_one();
        info!(report = %def.name, created, "report saved");
        Ok((stored, created))
    }

    /// Creates the built-in reports that are missing, and brings up to date the ones
    /// still as built in (owner `built-in`); one a user replaced is left alone. Without
    /// `scheduled` they run only on request. A query marked `"optional": true` is left
    /// out while it does not plan (a table not made yet).
    pub(crate) async fn load_examples(
        &self,
        engine: &Engine,
        examples: Vec<Value>,
        scheduled: bool,
    ) {
        for mut example in examples {
            let name = example["name"].as_str().unwrap_or("?").to_owned();
            if !scheduled && let Value::Object(m) = &mut example {
                m.remove("schedule");
            }
            let mut optional = Vec::new();
            if let Some(queries) = example["queries"].as_array_mut() {
                for (i, q) in queries.iter_mut().enumerate() {
                    if let Value::Object(m) = q
                        && m.remove("optional") == Some(Value::Bool(true))
                    {
                        optional.push(i);
                    }
                }
            }
            let mut def: ReportDef = match serde_json::from_value(example) {
                Ok(d) => d,
                Err(e) => {
                    warn!(report = %name, error = %e, "a built-in report does not parse");
                    continue;
                }
            };
            let mut kept = Vec::new();
            for (i, q) in def.queries.iter().enumerate() {
                if !optional.contains(&i) || check_query(engine, &def, i).await.is_ok() {
                    kept.push(q.clone());
                }
            }
            def.queries = kept;
            let existing = self.live.lock().defs.get(&name).cloned();
            let replace = match existing {
                None => false,
                Some(s) if s.owner == BUILT_IN && s.def != def => true,
                Some(_) => continue,
            };
            if let Err(e) = self.create(engine, def, BUILT_IN, replace).await {
                warn!(report = %name, error = %e, "cannot load a built-in report");
            }
        }
    }

    /// Deletes a report, its runs and its files.
    pub(crate) async fn delete(&self, name: &str) -> Result<(), ReportError> {
        let _ddl = self.ddl.lock().await;
        if !self.live.lock().defs.contains_key(name) {
            return Err(not_found(name));
        }
        let owned = name.to_owned();
        self.defs_doc
            .update(move |defs| {
                defs.retain(|s| s.def.name != owned);
                Ok(())
            })
            .await
            .map_err(|e| internal("saving the reports", e))?;
        let runs = {
            let mut live = self.live.lock();
            live.defs.remove(name);
            live.runs.remove(name)
        };
        self.save().await;
        for run in runs.map(|r| r.runs).unwrap_or_default() {
            self.delete_file(&run).await;
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Every report, by name.
    pub(crate) fn list(&self) -> Vec<Value> {
        let live = self.live.lock();
        live.defs
            .values()
            .map(|s| report_json(s, live.runs.get(&s.def.name)))
            .collect()
    }

    /// One report, with its next scheduled time and last run.
    pub(crate) fn get(&self, name: &str) -> Result<Value, ReportError> {
        let live = self.live.lock();
        let s = live.defs.get(name).ok_or_else(|| not_found(name))?;
        Ok(report_json(s, live.runs.get(name)))
    }

    /// A report's runs, newest first.
    pub(crate) fn runs(&self, name: &str) -> Result<Vec<Run>, ReportError> {
        let live = self.live.lock();
        if !live.defs.contains_key(name) {
            return Err(not_found(name));
        }
        Ok(live
            .runs
            .get(name)
            .map(|r| r.runs.iter().rev().cloned().collect())
            .unwrap_or_default())
    }

    /// One run.
    pub(crate) fn run(&self, name: &str, id: &str) -> Result<Run, ReportError> {
        self.runs(name)?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| ReportError::NotFound(format!("report '{name}' has no run '{id}'")))
    }

    /// Where a run's file is stored.
    pub(crate) fn file_path(&self, run: &Run) -> Result<object_store::path::Path, ReportError> {
        let ext = run.extension.as_deref().ok_or_else(|| {
            ReportError::NotFound(format!("run '{}' has no file ({:?})", run.id, run.state))
        })?;
        self.store
            .path(&format!("reports/{}/{}.{ext}", run.report, run.id))
            .map_err(|e| internal("the file's path", e))
    }

    /// The store the files are in.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The content type of a run's file.
    pub(crate) fn content_type(&self, run: &Run) -> &'static str {
        def::content_type_of(run.extension.as_deref().unwrap_or(""))
    }

    /// Queues a run now, with `params` over the report's own.
    pub(crate) async fn queue_run(
        &self,
        name: &str,
        params: Map<String, Value>,
        trigger: Trigger,
    ) -> Result<Run, ReportError> {
        let now = self.now();
        let run = {
            let mut live = self.live.lock();
            let stored = live.defs.get(name).ok_or_else(|| not_found(name))?;
            let mut merged = stored.def.params.clone();
            for (k, v) in params {
                if !merged.contains_key(&k) {
                    return Err(ReportError::Invalid(format!(
                        "params.{k}: report '{name}' has no such parameter (it has: {})",
                        merged.keys().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                if matches!(v, Value::Array(_) | Value::Object(_)) {
                    return Err(ReportError::Invalid(format!(
                        "params.{k}: only null, booleans, numbers and strings can be bound"
                    )));
                }
                merged.insert(k, v);
            }
            let taken = |id: &str| {
                live.runs
                    .get(name)
                    .is_some_and(|r| r.runs.iter().any(|r| r.id == id))
            };
            let mut id = run_id(now);
            while taken(&id) {
                id = run_id(now);
            }
            let run = Run {
                id,
                report: name.to_owned(),
                state: RunState::Queued,
                trigger,
                queued_at: now,
                started_at: None,
                finished_at: None,
                params: merged,
                rows: 0,
                bytes: 0,
                queries: Vec::new(),
                extension: None,
                error: None,
                delivery: None,
            };
            live.runs
                .entry(name.to_owned())
                .or_default()
                .runs
                .push(run.clone());
            run
        };
        self.save().await;
        let _ = self.queue.send((name.to_owned(), run.id.clone()));
        Ok(run)
    }

    /// Changes a run in memory; false when it is gone (the report was deleted).
    fn update_run(&self, name: &str, id: &str, change: impl FnOnce(&mut Run)) -> bool {
        let mut live = self.live.lock();
        let Some(run) = live
            .runs
            .get_mut(name)
            .and_then(|r| r.runs.iter_mut().find(|r| r.id == id))
        else {
            return false;
        };
        change(run);
        true
    }

    /// Writes the runs document as it is in memory, retrying while the store fails.
    async fn save(&self) {
        let _writer = self.writer.lock().await;
        for attempt in 1..=5u32 {
            let snapshot = self.live.lock().runs.clone();
            match self
                .runs_doc
                .update(move |doc| {
                    doc.clone_from(&snapshot);
                    Ok(())
                })
                .await
            {
                Ok(_) => return,
                Err(e) => {
                    warn!(error = %e, attempt, "cannot save the report runs; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
            }
        }
    }

    async fn run_one(self: &Arc<Self>, state: &AppState, engine: &Engine, name: &str, id: &str) {
        let stored = self.live.lock().defs.get(name).cloned();
        let Some(stored) = stored else { return };
        let started = self.now();
        let mut params = Map::new();
        if !self.update_run(name, id, |r| {
            r.state = RunState::Running;
            r.started_at = Some(started);
            params = r.params.clone();
        }) {
            return;
        }
        self.save().await;
        let options = self.options();
        let clock = std::time::Instant::now();
        let result = tokio::time::timeout(
            options.timeout,
            self.produce(state, engine, &stored.def, &params, id, started),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the run took longer than {} (--report-timeout)",
                humantime::format_duration(options.timeout)
            ))
        });
        let finished = self.now();
        let outcome = if result.is_ok() {
            "succeeded"
        } else {
            "failed"
        };
        self.metrics
            .runs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
        let mut email = None;
        match result {
            Ok(produced) => {
                self.metrics.seconds.observe(clock.elapsed().as_secs_f64());
                info!(
                    report = name,
                    run = id,
                    rows = produced.rows,
                    bytes = produced.bytes,
                    "report run stored"
                );
                let wants_email = !stored.def.email.is_empty();
                self.update_run(name, id, |r| {
                    r.state = RunState::Succeeded;
                    r.finished_at = Some(finished);
                    r.rows = produced.rows;
                    r.bytes = produced.bytes;
                    r.queries = produced.queries.clone();
                    r.extension = Some(stored.def.file_extension().to_owned());
                    if wants_email {
                        r.delivery = Some(Delivery {
                            state: DeliveryState::Pending,
                            to: stored.def.email.clone(),
                            attempts: 0,
                            attached: false,
                            error: None,
                            sent_at: None,
                        });
                    }
                });
                if wants_email {
                    email = Some(produced);
                }
            }
            Err(error) => {
                warn!(report = name, run = id, %error, "report run failed");
                self.update_run(name, id, |r| {
                    r.state = RunState::Failed;
                    r.finished_at = Some(finished);
                    r.error = Some(error);
                });
            }
        }
        self.retain(finished).await;
        self.save().await;
        if let Some(produced) = email
            && let Ok(run) = self.run(name, id)
        {
            self.spawn_delivery(stored, run, produced.local);
        }
    }

    /// Runs the queries into a local file and stores it.
    async fn produce(
        &self,
        state: &AppState,
        engine: &Engine,
        def: &ReportDef,
        params: &Map<String, Value>,
        id: &str,
        started: i64,
    ) -> Result<Produced, String> {
        let options = self.options();
        let local = tempfile::NamedTempFile::new()
            .map_err(|e| format!("creating a temporary file: {e}"))?;
        let file = local
            .reopen()
            .map_err(|e| format!("opening the temporary file: {e}"))?;
        let meta = render::ReportMeta {
            title: def.title().to_owned(),
            run_at: started,
            params: params.clone(),
            queries: def.queries.len(),
        };
        let mut writer = render::writer(def.format, file, meta)?;
        let mut queries = Vec::new();
        let mut total_rows = 0u64;
        for (i, q) in def.queries.iter().enumerate() {
            let title = def.query_title(i);
            let at = format!("query {} ('{title}')", i + 1);
            let slot = crate::service::wait_slot(state).await;
            let session = engine.query_session();
            let plan = match session.prepare_unbound(&q.sql).await {
                Ok(Prepared::Query(plan)) => *plan,
                Ok(Prepared::Ddl(_)) => {
                    return Err(format!("{at}: only queries can run in a report"));
                }
                Err(e) => return Err(format!("{at}: {e}")),
            };
            let plan = bind_named(plan, params).map_err(|e| format!("{at}: {e}"))?;
            let part = render::Part {
                index: i,
                title: title.clone(),
                chart: q.chart.clone(),
            };
            let limit = options.max_result_bytes as u64;
            let (returned, rows, first_row) = engine
                .query_runtime()
                .spawn(async move {
                    let _slot = slot;
                    let mut writer = writer;
                    let out = write_query(&session, plan, part, &mut writer, limit).await;
                    (writer, out)
                })
                .await
                .map(|(w, out)| out.map(|(rows, first)| (w, rows, first)))
                .map_err(|e| format!("{at}: the query task failed: {e}"))?
                .map_err(|e| format!("{at}: {e}"))?;
            writer = returned;
            total_rows += rows;
            queries.push(QueryRun {
                title,
                rows,
                first_row,
            });
        }
        let bytes = tokio::task::spawn_blocking(move || writer.finish())
            .await
            .map_err(|e| format!("writing the file failed: {e}"))??;
        if bytes > options.max_result_bytes as u64 {
            return Err(format!(
                "the file is {bytes} bytes, over the {}-byte result limit (--max-result-bytes)",
                options.max_result_bytes
            ));
        }
        let path = self
            .store
            .path(&format!(
                "reports/{}/{id}.{}",
                def.name,
                def.file_extension()
            ))
            .map_err(|e| e.to_string())?;
        upload(&self.store, &path, local.path())
            .await
            .map_err(|e| format!("storing the file at {path}: {e}"))?;
        Ok(Produced {
            rows: total_rows,
            bytes,
            queries,
            local,
        })
    }

    /// Emails a run's file on a task of its own, retrying with backoff; the outcome is
    /// recorded in the run.
    fn spawn_delivery(self: &Arc<Self>, stored: Stored, run: Run, local: tempfile::NamedTempFile) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let options = this.options();
            let outcome = this.deliver(&options, &stored, &run, local).await;
            let label = if outcome.is_ok() { "sent" } else { "failed" };
            this.metrics
                .deliveries
                .get_or_create(&OutcomeLabel {
                    outcome: label.into(),
                })
                .inc();
            if let Err(e) = &outcome {
                warn!(report = %run.report, run = %run.id, error = %e, "report email failed");
            }
            this.save().await;
        });
    }

    async fn deliver(
        &self,
        options: &ReportOptions,
        stored: &Stored,
        run: &Run,
        local: tempfile::NamedTempFile,
    ) -> Result<(), String> {
        let (name, id) = (run.report.as_str(), run.id.as_str());
        let fail = |this: &Self, error: String| {
            this.update_run(name, id, |r| {
                if let Some(d) = &mut r.delivery {
                    d.state = DeliveryState::Failed;
                    d.error = Some(error.clone());
                }
            });
            Err(error)
        };
        let Some(relay) = options.smtp_url.clone() else {
            return fail(
                self,
                "no SMTP relay is configured (start the server with --smtp-url)".into(),
            );
        };
        let link = format!(
            "{}/v1/reports/{name}/runs/{id}/file",
            options
                .public_url
                .as_deref()
                .unwrap_or("")
                .trim_end_matches('/')
        );
        let attach = run.bytes <= options.max_attachment_bytes as u64;
        let attachment = if attach {
            let bytes = tokio::fs::read(local.path())
                .await
                .map_err(|e| format!("reading the file: {e}"));
            match bytes {
                Ok(bytes) => Some(quiver_engine::mail::File {
                    name: run.file_name().unwrap_or_default(),
                    content_type: stored.def.content_type().to_owned(),
                    bytes,
                }),
                Err(e) => return fail(self, e),
            }
        } else {
            None
        };
        drop(local);
        let (text, html) = email_bodies(&stored.def, run, (!attach).then_some(link.as_str()));
        let email = quiver_engine::mail::Email {
            from: options.email_from.clone(),
            to: stored.def.email.clone(),
            subject: format!("{} ({})", stored.def.title(), run_day(run)),
            text,
            html,
            attachment,
        };
        let mut wait = options.email_retry;
        for attempt in 1..=EMAIL_ATTEMPTS {
            let sent =
                quiver_engine::mail::send(&relay, options.email_timeout, email.clone()).await;
            let now = self.now();
            let last = attempt == EMAIL_ATTEMPTS;
            let done = self.update_run(name, id, |r| {
                if let Some(d) = &mut r.delivery {
                    d.attempts = attempt;
                    d.attached = attach;
                    match &sent {
                        Ok(()) => {
                            d.state = DeliveryState::Sent;
                            d.sent_at = Some(now);
                            d.error = None;
                        }
                        Err(e) => {
                            d.error = Some(e.clone());
                            if last {
                                d.state = DeliveryState::Failed;
                            }
                        }
                    }
                }
            });
            match sent {
                Ok(()) => return Ok(()),
                Err(e) if last || !done => return Err(e),
                Err(e) => {
                    warn!(report = name, run = id, attempt, error = %e, retry_in = ?wait, "report email failed; retrying");
                    self.save().await;
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                }
            }
        }
        Err("no attempt was made".into())
    }

    /// Drops runs finished longer than the retention ago, and their files.
    async fn retain(&self, now: i64) {
        let cutoff = now - self.options().retention.as_millis() as i64;
        let mut gone = Vec::new();
        {
            let mut live = self.live.lock();
            for r in live.runs.values_mut() {
                let mut kept = Vec::with_capacity(r.runs.len());
                let excess = r.runs.len().saturating_sub(MAX_RUNS_KEPT);
                for (i, run) in r.runs.drain(..).enumerate() {
                    let old = run.finished_at.is_some_and(|t| t < cutoff);
                    if old || i < excess {
                        gone.push(run);
                    } else {
                        kept.push(run);
                    }
                }
                r.runs = kept;
            }
        }
        for run in &gone {
            self.delete_file(run).await;
        }
        if !gone.is_empty() {
            info!(
                runs = gone.len(),
                "report runs past their retention deleted"
            );
        }
    }

    async fn delete_file(&self, run: &Run) {
        if let Ok(path) = self.file_path(run)
            && let Err(e) = self.store.object_store().delete(&path).await
            && !matches!(e, object_store::Error::NotFound { .. })
        {
            warn!(%path, error = %e, "cannot delete a report file");
        }
    }

    /// Queues each scheduled report when its time comes.
    async fn schedule_loop(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        // At start: a time that passed while the server was down runs once.
        let now = self.now();
        let mut missed = Vec::new();
        {
            let mut live = self.live.lock();
            let Live { defs, runs, .. } = &mut *live;
            for (name, stored) in defs.iter() {
                let Ok(Some(schedule)) = stored.def.parsed_schedule() else {
                    continue;
                };
                let r = runs.entry(name.clone()).or_default();
                if r.next_due.is_some_and(|due| due <= now) {
                    missed.push(name.clone());
                }
                r.next_due = schedule.next_after_ms(now);
            }
        }
        self.save().await;
        for name in missed {
            info!(report = %name, "a scheduled run was missed while the server was down; running it now");
            if let Err(e) = self.queue_run(&name, Map::new(), Trigger::Missed).await {
                warn!(report = %name, error = %e, "cannot queue the missed run");
            }
        }
        self.retain(now).await;
        loop {
            let now = self.now();
            let mut due = Vec::new();
            let mut earliest: Option<i64> = None;
            let mut changed = false;
            {
                let mut live = self.live.lock();
                let Live { defs, runs, .. } = &mut *live;
                for (name, stored) in defs.iter() {
                    let Ok(Some(schedule)) = stored.def.parsed_schedule() else {
                        continue;
                    };
                    let r = runs.entry(name.clone()).or_default();
                    match r.next_due {
                        Some(t) if t <= now => {
                            due.push(name.clone());
                            r.next_due = schedule.next_after_ms(now);
                        }
                        None => {
                            r.next_due = schedule.next_after_ms(now);
                            changed = true;
                        }
                        Some(_) => {}
                    }
                    if let Some(t) = r.next_due {
                        earliest = Some(earliest.map_or(t, |e| e.min(t)));
                    }
                }
            }
            for name in &due {
                if let Err(e) = self.queue_run(name, Map::new(), Trigger::Schedule).await {
                    warn!(report = %name, error = %e, "cannot queue a scheduled run");
                }
            }
            // A queued run saves the new times; otherwise save them here.
            if due.is_empty() && changed {
                self.save().await;
            }
            let wait = earliest
                .map(|t| Duration::from_millis((t - now).max(0) as u64))
                .unwrap_or(Duration::from_secs(3600))
                .min(Duration::from_secs(3600));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
                _ = stop.changed() => return,
            }
            if wait >= Duration::from_secs(3600) {
                self.retain(self.now()).await;
                self.save().await;
            }
        }
    }
}

/// What a run produced.
#[derive(Debug)]
struct Produced {
    rows: u64,
    bytes: u64,
    queries: Vec<QueryRun>,
    /// The file, until it has been emailed.
    local: tempfile::NamedTempFile,
}

fn not_found(name: &str) -> ReportError {
    ReportError::NotFound(format!("no report named '{name}'"))
}

/// A sortable run id: the UTC time it was queued, and 16 random bits.
fn run_id(now: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(now).unwrap_or_default();
    format!(
        "{}-{:04x}",
        t.format("%Y%m%dT%H%M%S%3fZ"),
        rand::random::<u16>()
    )
}

fn report_json(s: &Stored, runs: Option<&ReportRuns>) -> Value {
    let mut v = serde_json::to_value(&s.def).unwrap_or(Value::Null);
    let last = runs.and_then(|r| r.runs.last());
    if let Value::Object(m) = &mut v {
        m.insert("title".into(), json!(s.def.title()));
        m.insert("owner".into(), json!(s.owner));
        m.insert(
            "created_at".into(),
            json!(quiver_engine::alerts::iso(s.created_at)),
        );
        m.insert(
            "updated_at".into(),
            json!(quiver_engine::alerts::iso(s.updated_at)),
        );
        m.insert(
            "next_run".into(),
            json!(
                runs.and_then(|r| r.next_due)
                    .map(quiver_engine::alerts::iso)
            ),
        );
        m.insert("last_run".into(), last.map_or(Value::Null, Run::to_json));
    }
    v
}

/// Checks query `i` of `def`: read-only, its placeholders all in `params`, its chart's
/// columns in its result.
async fn check_query(engine: &Engine, def: &ReportDef, i: usize) -> Result<(), ReportError> {
    let q = &def.queries[i];
    let at = format!("queries[{i}]");
    let invalid = |m: String| ReportError::Invalid(format!("{at}: {m}"));
    let plan = match engine.query_session().prepare_unbound(&q.sql).await {
        Ok(Prepared::Query(plan)) => *plan,
        Ok(Prepared::Ddl(_)) => {
            return Err(invalid(
                "a report runs queries only (SELECT, SHOW, …); this statement changes the catalog"
                    .into(),
            ));
        }
        Err(e) => return Err(invalid(e.to_string())),
    };
    let plan = bind_named(plan, &def.params).map_err(|e| invalid(e.to_string()))?;
    let Some(chart) = &q.chart else {
        return Ok(());
    };
    let schema = plan.schema();
    let columns: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let find = |name: &str, role: &str| {
        schema
            .fields()
            .iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                invalid(format!(
                    "chart {role} column '{name}' is not in the result (columns: {})",
                    columns.join(", ")
                ))
            })
    };
    find(&chart.x, "x")?;
    if let Some(series) = &chart.series {
        find(series, "series")?;
    }
    for y in &chart.y {
        let field = find(y, "y")?;
        if !field.data_type().is_numeric() {
            return Err(invalid(format!(
                "chart y column '{y}' is {}; a chart plots numbers",
                crate::sql::encode::type_name(field.data_type())
            )));
        }
    }
    Ok(())
}

/// Binds named placeholders (`$warehouse`) from `params`, each converted to the type
/// its placeholder needs. Positional ones (`$1`) have no value in a report.
fn bind_named(
    plan: datafusion::logical_expr::LogicalPlan,
    params: &Map<String, Value>,
) -> Result<datafusion::logical_expr::LogicalPlan, QueryError> {
    let wanted = plan.get_parameter_types()?;
    if wanted.is_empty() {
        return Ok(plan);
    }
    let mut values = std::collections::HashMap::new();
    for (placeholder, ty) in wanted {
        let name = placeholder.trim_start_matches('$');
        if name.chars().all(|c| c.is_ascii_digit()) {
            return Err(QueryError::Invalid(format!(
                "{placeholder}: a report's queries use named parameters ($name), given in params"
            )));
        }
        let value = params.get(name).ok_or_else(|| {
            QueryError::Invalid(format!(
                "{placeholder} has no value: add \"{name}\" to the report's params"
            ))
        })?;
        let scalar = crate::sql::json_param(0, value)
            .map_err(|e| QueryError::Invalid(format!("params.{name}: {}", e.message)))?;
        let scalar = quiver_engine::cast_param(&format!("params.{name}"), &scalar, ty.as_ref())?;
        values.insert(name.to_owned(), scalar.into());
    }
    Ok(plan.with_param_values(datafusion::common::ParamValues::Map(values))?)
}

/// Runs one query into the writer. Returns its row count and first row.
async fn write_query(
    session: &quiver_engine::QuerySession,
    plan: datafusion::logical_expr::LogicalPlan,
    part: render::Part,
    writer: &mut Box<dyn render::ReportWriter>,
    limit: u64,
) -> Result<(u64, Option<Value>), String> {
    let mut stream = session.execute(plan).await.map_err(|e| e.to_string())?;
    writer.begin(&part, stream.schema())?;
    let mut rows = 0u64;
    let mut first_row = None;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| QueryError::from(e).to_string())?;
        if first_row.is_none() && batch.num_rows() > 0 {
            first_row = crate::sql::encode::json_result(&batch.slice(0, 1))
                .ok()
                .and_then(|v| v["rows"].get(0).cloned())
                .map(|row| {
                    let schema = batch.schema();
                    let names = schema.fields().iter().map(|f| f.name().clone());
                    let obj: Map<String, Value> = names
                        .zip(row.as_array().cloned().unwrap_or_default())
                        .collect();
                    Value::Object(obj)
                });
        }
        rows += batch.num_rows() as u64;
        writer.batch(&batch)?;
        if writer.bytes() > limit {
            return Err(format!(
                "the report is over the {limit}-byte result limit (--max-result-bytes) after {rows} rows; add a LIMIT or aggregate"
            ));
        }
    }
    writer.end()?;
    Ok((rows, first_row))
}

/// Copies a local file to the store in parts.
async fn upload(
    store: &Store,
    path: &object_store::path::Path,
    local: &std::path::Path,
) -> Result<(), String> {
    use tokio::io::AsyncReadExt as _;
    let upload = store
        .object_store()
        .put_multipart(path)
        .await
        .map_err(|e| e.to_string())?;
    let mut writer = object_store::WriteMultipart::new(upload);
    let mut file = tokio::fs::File::open(local)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = file.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        writer
            .wait_for_capacity(4)
            .await
            .map_err(|e| e.to_string())?;
        writer.write(&buf[..n]);
    }
    writer.finish().await.map_err(|e| e.to_string())?;
    Ok(())
}

/// The day a run is for, as the email's subject shows it.
fn run_day(run: &Run) -> String {
    chrono::DateTime::from_timestamp_millis(run.started_at.unwrap_or(run.queued_at))
        .unwrap_or_default()
        .format("%Y-%m-%d %H:%M UTC")
        .to_string()
}

/// The plain-text and HTML bodies of a report email: the headline numbers (each
/// query's first row), and the link when the file is not attached.
fn email_bodies(def: &ReportDef, run: &Run, link: Option<&str>) -> (String, String) {
    use quiver_engine::mail::escape_html as esc;
    let mut text = format!("{}\nRun {} at {}.\n\n", def.title(), run.id, run_day(run));
    let mut html = format!(
        "<html><body><h2>{}</h2><p>Run {} at {}.</p>",
        esc(def.title()),
        esc(&run.id),
        esc(&run_day(run))
    );
    for q in &run.queries {
        text.push_str(&format!("{} ({} rows)\n", q.title, q.rows));
        html.push_str(&format!("<h3>{} ({} rows)</h3>", esc(&q.title), q.rows));
        if let Some(Value::Object(row)) = &q.first_row {
            html.push_str("<table border=\"1\" cellpadding=\"4\" cellspacing=\"0\"><tr>");
            for k in row.keys().take(8) {
                html.push_str(&format!("<th>{}</th>", esc(k)));
            }
            html.push_str("</tr><tr>");
            for (k, v) in row.iter().take(8) {
                let shown = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                text.push_str(&format!("  {k}: {shown}\n"));
                html.push_str(&format!("<td>{}</td>", esc(&shown)));
            }
            html.push_str("</tr></table>");
        }
        text.push('\n');
    }
    match link {
        Some(link) => {
            text.push_str(&format!(
                "The file is too large to attach ({} bytes); download it from {link}\n",
                run.bytes
            ));
            html.push_str(&format!(
                "<p>The file is too large to attach ({} bytes): <a href=\"{}\">download it</a>.</p>",
                run.bytes,
                esc(link)
            ));
        }
        None => {
            text.push_str("The report is attached.\n");
            html.push_str("<p>The report is attached.</p>");
        }
    }
    html.push_str("</body></html>");
    (text, html)
}

//! Batch jobs in the server: `POST /v1/jobs/{kind}` runs one now, `GET /v1/jobs` shows
//! each job's schedule, the run in progress and the last run, `DELETE /v1/jobs/{id}`
//! cancels a run; `--forecast-schedule` and `--anomalies-schedule` run them by cron.
//!
//! One job runs at a time, with `--job-threads` computing threads, so a job never takes
//! more than those threads from ingest, queries and push; its reads run on the query
//! runtime under the query memory limit. A scheduled run due while another runs waits
//! for it; a run asked for over HTTP while another runs is refused (409).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use quiver_engine::Engine;
use quiver_models::job::{JobConfig, JobKind, Run, run_job};
use serde_json::{Value, json};
use strum::IntoEnumIterator;
use tracing::{info, warn};

use crate::auth::Scope;
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::schedule::Schedule;
use crate::state::AppState;

/// The run in progress.
#[derive(Debug)]
struct Running {
    run: Run,
    trigger: &'static str,
}

/// The server's jobs.
#[derive(Debug)]
pub(crate) struct Jobs {
    config: JobConfig,
    schedules: BTreeMap<JobKind, Schedule>,
    /// Held by the run in progress: one at a time.
    gate: Arc<tokio::sync::Mutex<()>>,
    running: parking_lot::Mutex<Option<Running>>,
    last: parking_lot::Mutex<BTreeMap<JobKind, Value>>,
    next: parking_lot::Mutex<BTreeMap<JobKind, DateTime<Utc>>>,
}

impl Jobs {
    pub(crate) fn new(config: JobConfig, schedules: BTreeMap<JobKind, Schedule>) -> Self {
        Self {
            config,
            schedules,
            gate: Arc::new(tokio::sync::Mutex::new(())),
            running: parking_lot::Mutex::new(None),
            last: parking_lot::Mutex::new(BTreeMap::new()),
            next: parking_lot::Mutex::new(BTreeMap::new()),
        }
    }

    /// Starts a run of `kind` now in the background, unless a run is in progress (then
    /// that run is the error).
    fn start(self: &Arc<Self>, engine: Engine, kind: JobKind) -> Result<Run, Value> {
        let Ok(guard) = Arc::clone(&self.gate).try_lock_owned() else {
            return Err(self.running_json().unwrap_or(Value::Null));
        };
        let run = Run::new(kind);
        // Registered before the answer, so the id it gives can be cancelled at once.
        *self.running.lock() = Some(Running {
            run: run.clone(),
            trigger: "api",
        });
        let jobs = Arc::clone(self);
        let started = run.clone();
        tokio::spawn(async move {
            jobs.execute(&engine, run, "api").await;
            drop(guard);
        });
        Ok(started)
    }

    /// Runs `run` to its end; the caller holds the gate.
    async fn execute(&self, engine: &Engine, run: Run, trigger: &'static str) {
        let kind = run.kind;
        *self.running.lock() = Some(Running {
            run: run.clone(),
            trigger,
        });
        info!(run_id = %run.id, kind = kind.name(), trigger, "job run starting");
        let summary = run_job(engine, &run, &self.config, Utc::now()).await;
        let mut value = serde_json::to_value(&summary).unwrap_or(Value::Null);
        value["trigger"] = json!(trigger);
        self.last.lock().insert(kind, value);
        *self.running.lock() = None;
    }

    /// Runs the schedules until `stop`.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        engine: Engine,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let jobs = Arc::clone(self);
        tokio::spawn(async move {
            if jobs.schedules.is_empty() {
                return;
            }
            loop {
                let now = Utc::now();
                let due: BTreeMap<JobKind, DateTime<Utc>> = jobs
                    .schedules
                    .iter()
                    .filter_map(|(k, s)| Some((*k, s.next_after(now)?)))
                    .collect();
                *jobs.next.lock() = due.clone();
                let Some((kind, at)) = due.iter().min_by_key(|(_, at)| **at) else {
                    return;
                };
                let wait = (*at - now).to_std().unwrap_or_default();
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
                let guard = tokio::select! {
                    g = Arc::clone(&jobs.gate).lock_owned() => g,
                    _ = stop.changed() => return,
                };
                jobs.execute(&engine, Run::new(*kind), "schedule").await;
                drop(guard);
            }
        });
    }

    /// Runs `kind` once now in the background, waiting for a run in progress (the
    /// demo's first forecast).
    pub(crate) fn run_soon(self: &Arc<Self>, engine: Engine, kind: JobKind) {
        let jobs = Arc::clone(self);
        tokio::spawn(async move {
            let guard = Arc::clone(&jobs.gate).lock_owned().await;
            jobs.execute(&engine, Run::new(kind), "start").await;
            drop(guard);
        });
    }

    /// Asks the run in progress to stop, and waits (up to `patience`) until it has.
    pub(crate) async fn stop(&self, patience: std::time::Duration) {
        if let Some(r) = self.running.lock().as_ref() {
            r.run.progress.cancel();
        }
        let _ = tokio::time::timeout(patience, self.gate.lock()).await;
    }

    /// Reads each job's last run from `model_runs`, so `GET /v1/jobs` shows it after
    /// a restart (called before the server reports ready).
    pub(crate) async fn load_last(&self, engine: &Engine) {
        if !engine.result_tables().iter().any(|t| t == "model_runs") {
            return;
        }
        for kind in JobKind::iter() {
            let sql = format!(
                "SELECT * FROM model_runs WHERE kind = '{}' ORDER BY finished DESC LIMIT 1",
                kind.name()
            );
            let session = engine.query_session();
            let found = engine
                .query_runtime()
                .spawn(async move { session.context().sql(&sql).await?.collect().await })
                .await;
            let batch = match found {
                Ok(Ok(batches)) => batches.into_iter().find(|b| b.num_rows() > 0),
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot read the last runs from model_runs");
                    return;
                }
                Err(_) => return,
            };
            let Some(batch) = batch else { continue };
            let Ok(encoded) = crate::sql::encode::json_result(&batch) else {
                continue;
            };
            // One row as an object, like a fresh run's summary.
            let names = encoded["columns"].as_array().cloned().unwrap_or_default();
            let values = encoded["rows"][0].as_array().cloned().unwrap_or_default();
            let mut row: Value = names
                .iter()
                .zip(values)
                .filter_map(|(c, v)| Some((c["name"].as_str()?.to_owned(), v)))
                .collect::<serde_json::Map<_, _>>()
                .into();
            // Maps kept as JSON text in the table are maps here, as for a fresh run.
            for field in ["models", "tables", "settings"] {
                if let Some(parsed) = row[field]
                    .as_str()
                    .and_then(|t| serde_json::from_str::<Value>(t).ok())
                {
                    row[field] = parsed;
                }
            }
            self.last.lock().entry(kind).or_insert(row);
        }
    }

    fn running_json(&self) -> Option<Value> {
        self.running.lock().as_ref().map(|r| {
            json!({
                "id": r.run.id,
                "kind": r.run.kind,
                "started": r.run.started,
                "trigger": r.trigger,
                "progress": r.run.progress.report(),
            })
        })
    }

    fn status(&self) -> Value {
        let running = self.running_json();
        let last = self.last.lock().clone();
        let next = self.next.lock().clone();
        let jobs: Vec<Value> = JobKind::iter()
            .map(|kind| {
                json!({
                    "kind": kind,
                    "tables": kind.tables(),
                    "schedule": self.schedules.get(&kind).map(|s| s.text().to_owned()),
                    "next_run": next.get(&kind),
                    "running": running.as_ref().filter(|r| r["kind"] == json!(kind)),
                    "last_run": last.get(&kind),
                })
            })
            .collect();
        json!({ "threads": self.config.threads, "jobs": jobs })
    }

    fn cancel(&self, id: &str) -> bool {
        match self.running.lock().as_ref() {
            Some(r) if r.run.id == id => {
                r.run.progress.cancel();
                true
            }
            _ => false,
        }
    }
}

type AppStateRef = State<Arc<AppState>>;

/// `POST /v1/jobs/{kind}`: runs a job now; 202 with the run's id.
pub(crate) async fn start(
    State(state): AppStateRef,
    headers: HeaderMap,
    Path(kind): Path<String>,
) -> ApiResult<Response> {
    state.tokens.authenticate(&headers)?.require(Scope::Admin)?;
    let kind = JobKind::from_str(&kind).map_err(|_| {
        let known: Vec<&str> = JobKind::iter().map(JobKind::name).collect();
        ApiError::not_found(
            "unknown_job",
            format!("there is no job '{kind}'; jobs are: {}", known.join(", ")),
        )
    })?;
    let engine = state.ready_engine()?.clone();
    match state.jobs.start(engine, kind) {
        Ok(run) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({
                "id": run.id,
                "kind": run.kind,
                "state": "running",
                "started": run.started,
            })),
        )
            .into_response()),
        Err(running) => Err(ApiError::new(
            ErrorKind::Conflict,
            "job_running",
            format!(
                "run {} is in progress; wait for it or cancel it with DELETE /v1/jobs/{}",
                running["id"].as_str().unwrap_or("?"),
                running["id"].as_str().unwrap_or("?"),
            ),
        )
        .with_details(vec![running])),
    }
}

/// `GET /v1/jobs`: each job's schedule, the run in progress and the last run.
pub(crate) async fn list(State(state): AppStateRef, headers: HeaderMap) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    Ok(Json(state.jobs.status()))
}

/// `DELETE /v1/jobs/{id}`: asks the run in progress to stop; 202, or 404 when no run of
/// that id is in progress.
pub(crate) async fn cancel(
    State(state): AppStateRef,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    state.tokens.authenticate(&headers)?.require(Scope::Admin)?;
    if state.jobs.cancel(&id) {
        info!(run_id = %id, "job run cancelled on request");
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "state": "cancelling"})),
        )
            .into_response())
    } else {
        Err(ApiError::not_found(
            "unknown_run",
            format!("no run '{id}' is in progress"),
        ))
    }
}

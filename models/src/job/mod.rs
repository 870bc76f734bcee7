//! The batch jobs: what they read, what they write, and the record each run leaves.
//!
//! A job reads the streams through SQL, computes off the async runtime on a bounded
//! number of threads, and writes each of its tables whole in one Delta commit, so a
//! reader sees the previous run or the new one, never part of either; older runs stay
//! readable as Delta versions. Every run, whether it succeeded, failed or was
//! cancelled, then adds one row to `model_runs`: when, what it chose, how accurate the
//! backtest was, which table versions it wrote, and why it failed.

mod anomalies;
mod forecast;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use chrono::{DateTime, NaiveDate, Utc};
use quiver_engine::Engine;
use serde::Serialize;
use serde_json::Value;
use tracing::{info, warn};

pub use anomalies::{AnomalyConfig, anomalies_schema};
pub use forecast::{forecast_models_schema, forecasts_schema, stockout_risk_schema};

use crate::demand::DemandConfig;
use crate::progress::{Cancelled, Progress};

/// The jobs there are.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    serde::Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum JobKind {
    /// Demand forecasts per (sku, warehouse_id), their fitted models, and stock-out
    /// risk: tables `forecasts`, `forecast_models`, `stockout_risk`.
    Forecast,
    /// Points outside their expected band, and warehouses unlike their peers: table
    /// `anomalies`.
    Anomalies,
}

impl JobKind {
    /// The name used in URLs, the CLI and `model_runs.kind`.
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// The tables a run replaces (besides the row it adds to `model_runs`).
    pub fn tables(self) -> &'static [&'static str] {
        match self {
            Self::Forecast => &["forecasts", "forecast_models", "stockout_risk"],
            Self::Anomalies => &["anomalies"],
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum RunState {
    /// Every table was written.
    Succeeded,
    /// Something failed; see `error`. Tables written before the failure keep this
    /// run's rows (each is whole), the others the previous run's.
    Failed,
    /// Stopped on request before anything was written.
    Cancelled,
}

/// Everything a job needs besides the engine.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// How demand is forecast (horizon, backtest folds).
    pub demand: DemandConfig,
    /// How anomalies are looked for.
    pub anomaly: AnomalyConfig,
    /// Threads that compute (the SQL that reads history runs on the query runtime,
    /// under its memory limit).
    pub threads: usize,
}

impl Default for JobConfig {
    fn default() -> Self {
        Self {
            demand: DemandConfig::default(),
            anomaly: AnomalyConfig::default(),
            threads: 1,
        }
    }
}

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Reading the history failed.
    #[error("reading the history: {0}")]
    Query(#[from] datafusion::error::DataFusionError),
    /// The history or an output had an unexpected shape.
    #[error("building a table: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// Writing a result table failed.
    #[error("writing a result table: {0}")]
    Engine(#[from] quiver_engine::Error),
    /// A computing thread failed.
    #[error("a job thread stopped: {0}")]
    Thread(String),
    /// Stopped on request.
    #[error(transparent)]
    Cancelled(#[from] Cancelled),
}

/// What one run did: the row it adds to `model_runs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// This run's id, stored in every row it wrote.
    pub run_id: String,
    /// Which job.
    pub kind: JobKind,
    /// How it ended.
    pub state: RunState,
    /// When it started.
    pub started: DateTime<Utc>,
    /// When it ended.
    pub finished: DateTime<Utc>,
    /// The last day of history it read (forecasts), or the end of its window.
    pub history_end: Option<NaiveDate>,
    /// Series it looked at.
    pub series: u64,
    /// Rows it wrote to its main table (`forecasts` or `anomalies`).
    pub rows: u64,
    /// How many series each model (or fallback) served, or anomalies of each kind.
    pub models: BTreeMap<String, u64>,
    /// Mean absolute error of the chosen models over every backtested day.
    pub backtest_mae: Option<f64>,
    /// The same for seasonal naive over the same days.
    pub baseline_mae: Option<f64>,
    /// `backtest_mae / baseline_mae`: below 1 the chosen models beat seasonal naive
    /// (MASE with seasonal naive's out-of-sample error as the scale).
    pub mase_vs_seasonal_naive: Option<f64>,
    /// Share of held-out backtest days inside their 80% interval.
    pub coverage_80: Option<f64>,
    /// The same for the 95% interval.
    pub coverage_95: Option<f64>,
    /// Delta version written, per table.
    pub tables: BTreeMap<String, u64>,
    /// The settings it ran with.
    pub settings: Value,
    /// Why it failed or stopped.
    pub error: Option<String>,
}

/// A run about to start: its id (known before it starts, so it can be watched and
/// cancelled) and its progress.
#[derive(Debug, Clone)]
pub struct Run {
    /// The run's id, `<kind>-<start time>`, stored in every row it writes.
    pub id: String,
    /// Which job.
    pub kind: JobKind,
    /// When it was asked for.
    pub started: DateTime<Utc>,
    /// How far it has got; cancel through it.
    pub progress: Arc<Progress>,
}

impl Run {
    /// A new run of `kind`, starting now.
    pub fn new(kind: JobKind) -> Self {
        let started = Utc::now();
        Self {
            id: format!("{}-{}", kind.name(), started.format("%Y%m%dT%H%M%S%.6fZ")),
            kind,
            started,
            progress: Arc::new(Progress::default()),
        }
    }
}

impl RunSummary {
    fn new(run: &Run, settings: Value) -> Self {
        Self {
            run_id: run.id.clone(),
            kind: run.kind,
            state: RunState::Succeeded,
            started: run.started,
            finished: run.started,
            history_end: None,
            series: 0,
            rows: 0,
            models: BTreeMap::new(),
            backtest_mae: None,
            baseline_mae: None,
            mase_vs_seasonal_naive: None,
            coverage_80: None,
            coverage_95: None,
            tables: BTreeMap::new(),
            settings,
            error: None,
        }
    }
}

/// Runs `run` as of `now` and records it in `model_runs`. Never fails: a failed or
/// cancelled run is a summary with its state and error (also in `model_runs`, unless
/// the store itself refused that write, which the error then says too).
pub async fn run_job(
    engine: &Engine,
    run: &Run,
    config: &JobConfig,
    now: DateTime<Utc>,
) -> RunSummary {
    let (kind, progress) = (run.kind, &run.progress);
    let settings = serde_json::json!({
        "horizon": config.demand.horizon,
        "folds": config.demand.folds,
        "threads": config.threads,
        "anomaly_threshold": config.anomaly.threshold,
        "minute_window_hours": config.anomaly.minute_window_hours,
        "hourly_window_days": config.anomaly.hourly_window_days,
        "now": now,
    });
    let mut summary = RunSummary::new(run, settings);
    info!(run_id = %summary.run_id, kind = kind.name(), "job started");
    let outcome = match kind {
        JobKind::Forecast => forecast::run(engine, config, now, progress, &mut summary).await,
        JobKind::Anomalies => anomalies::run(engine, config, now, progress, &mut summary).await,
    };
    if let Err(e) = outcome {
        summary.state = match e {
            JobError::Cancelled(_) => RunState::Cancelled,
            _ => RunState::Failed,
        };
        summary.error = Some(e.to_string());
    }
    summary.finished = Utc::now();
    progress.stage("recording", 1);
    match record(engine, &summary).await {
        Ok(version) => {
            summary.tables.insert("model_runs".into(), version);
        }
        Err(e) => {
            warn!(run_id = %summary.run_id, error = %e, "cannot record the run in model_runs");
            let note = format!("recording the run in model_runs failed: {e}");
            summary.error = Some(match summary.error.take() {
                Some(first) => format!("{first}; {note}"),
                None => note,
            });
        }
    }
    progress.advance(1);
    info!(
        run_id = %summary.run_id,
        state = <&str>::from(summary.state),
        series = summary.series,
        rows = summary.rows,
        seconds = (summary.finished - summary.started).num_milliseconds() as f64 / 1000.0,
        "job finished"
    );
    summary
}

/// The schema of `model_runs`.
pub fn model_runs_schema() -> Arc<Schema> {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("started", ts.clone(), false),
        Field::new("finished", ts, false),
        Field::new("history_end", DataType::Date32, true),
        Field::new("series", DataType::Int64, false),
        Field::new("rows", DataType::Int64, false),
        Field::new("models", DataType::Utf8, false),
        Field::new("backtest_mae", DataType::Float64, true),
        Field::new("baseline_mae", DataType::Float64, true),
        Field::new("mase_vs_seasonal_naive", DataType::Float64, true),
        Field::new("coverage_80", DataType::Float64, true),
        Field::new("coverage_95", DataType::Float64, true),
        Field::new("tables", DataType::Utf8, false),
        Field::new("settings", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, true),
    ]))
}

async fn record(engine: &Engine, s: &RunSummary) -> Result<u64, JobError> {
    #[derive(Serialize)]
    struct Row<'a> {
        #[serde(flatten)]
        summary: &'a RunSummary,
        models: String,
        tables: String,
        settings: String,
    }
    let row = Row {
        summary: s,
        models: serde_json::to_string(&s.models).unwrap_or_default(),
        tables: serde_json::to_string(&s.tables).unwrap_or_default(),
        settings: s.settings.to_string(),
    };
    let batch = to_batch(model_runs_schema(), &[row])?;
    Ok(engine
        .append_result_table("model_runs", vec![batch])
        .await?)
}

/// Rows (serialized with serde: dates and times as ISO text) as one batch of `schema`.
fn to_batch<T: Serialize>(schema: Arc<Schema>, rows: &[T]) -> Result<RecordBatch, JobError> {
    let mut decoder = arrow::json::ReaderBuilder::new(Arc::clone(&schema))
        .with_batch_size(rows.len().max(1))
        .build_decoder()?;
    decoder.serialize(rows)?;
    Ok(decoder
        .flush()?
        .unwrap_or_else(|| RecordBatch::new_empty(schema)))
}

/// Runs `sql` on the engine's query runtime and collects the result.
async fn query(engine: &Engine, sql: String) -> Result<Vec<RecordBatch>, JobError> {
    let session = engine.query_session();
    let handle = engine.query_runtime();
    handle
        .spawn(async move { session.context().sql(&sql).await?.collect().await })
        .await
        .map_err(|e| JobError::Thread(e.to_string()))?
        .map_err(JobError::from)
}

/// A column as text (keys: sku, warehouse_id).
fn text(column: &ArrayRef) -> Result<StringArray, JobError> {
    let cast = cast(column, &DataType::Utf8)?;
    Ok(cast
        .as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .unwrap_or_else(|| StringArray::new_null(column.len())))
}

/// A column as `f64` values, nulls as zero.
fn numbers(column: &ArrayRef) -> Result<Vec<f64>, JobError> {
    let cast = cast(column, &DataType::Float64)?;
    let values = cast
        .as_any()
        .downcast_ref::<arrow::array::Float64Array>()
        .ok_or_else(|| JobError::Thread("a numeric column did not cast to f64".into()))?;
    Ok((0..values.len())
        .map(|i| {
            if values.is_null(i) {
                0.0
            } else {
                values.value(i)
            }
        })
        .collect())
}

/// A timestamp or date column as microseconds since the epoch (nulls as `None`).
fn micros(column: &ArrayRef) -> Result<Vec<Option<i64>>, JobError> {
    let cast = cast(column, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
    let values = cast
        .as_any()
        .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
        .ok_or_else(|| JobError::Thread("a time column did not cast to a timestamp".into()))?;
    Ok((0..values.len())
        .map(|i| (!values.is_null(i)).then(|| values.value(i)))
        .collect())
}

/// Runs `work` on its own thread, off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, JobError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| JobError::Thread(e.to_string()))
}

#[cfg(test)]
mod tests;

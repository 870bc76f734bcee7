//! The demand-forecast job: daily demand of paid order lines per (sku, warehouse_id)
//! from the `orders` stream, a forecast of each series, and the `forecasts` result
//! table replaced in one commit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Date32Array, Float64Array, RecordBatch, StringArray, StringBuilder,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use chrono::{NaiveDate, Utc};
use quiver_engine::Engine;

use crate::demand::{DemandConfig, SeriesForecast, forecast_many};

/// Why a forecast run failed; the previous forecasts are left as they were.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Reading the history failed.
    #[error("reading the order history: {0}")]
    Query(#[from] datafusion::error::DataFusionError),
    /// The history had an unexpected shape.
    #[error("the order history: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// Writing the result table failed.
    #[error("writing the forecasts: {0}")]
    Engine(#[from] quiver_engine::Error),
    /// A forecasting thread failed.
    #[error("a forecasting thread stopped: {0}")]
    Thread(String),
}

/// What one run did.
#[derive(Debug, Clone, PartialEq)]
pub struct ForecastRun {
    /// This run's id, stored in every row it wrote.
    pub run_id: String,
    /// The last day of history (the last complete UTC day before the run).
    pub history_end: NaiveDate,
    /// Series forecast.
    pub series: usize,
    /// Rows written to `forecasts`.
    pub rows: usize,
    /// The `forecasts` table's Delta version after the run.
    pub version: u64,
    /// How many series each method (or fallback) forecast.
    pub methods: BTreeMap<String, usize>,
}

/// Days since 1970-01-01, as Arrow's `Date32` counts them.
fn epoch_days(d: NaiveDate) -> i32 {
    (d - NaiveDate::default()).num_days() as i32
}

/// Forecasts every (sku, warehouse_id) that has paid order lines before `today` (UTC)
/// and replaces the `forecasts` table, on `threads` threads.
pub async fn run_forecast(
    engine: &Engine,
    config: &DemandConfig,
    today: NaiveDate,
    threads: usize,
) -> Result<ForecastRun, JobError> {
    let history_end = today.pred_opt().unwrap_or(today);
    let sql = format!(
        "SELECT sku, warehouse_id, CAST(date_trunc('day', event_time) AS DATE) AS day, \
         SUM(quantity) AS units FROM orders \
         WHERE status = 'paid' AND event_time < TIMESTAMP '{today}T00:00:00Z' \
         GROUP BY sku, warehouse_id, day"
    );
    let batches = engine
        .query_session()
        .context()
        .sql(&sql)
        .await?
        .collect()
        .await?;
    let end = epoch_days(history_end);
    let mut sales: HashMap<(String, String), BTreeMap<i32, f64>> = HashMap::new();
    for b in &batches {
        let sku = cast(b.column(0), &DataType::Utf8)?;
        let wh = cast(b.column(1), &DataType::Utf8)?;
        let day = cast(b.column(2), &DataType::Date32)?;
        let units = cast(b.column(3), &DataType::Float64)?;
        let (sku, wh) = (strings(&sku), strings(&wh));
        let day = day.as_any().downcast_ref::<Date32Array>().expect("cast");
        let units = units.as_any().downcast_ref::<Float64Array>().expect("cast");
        for i in 0..b.num_rows() {
            if sku.is_null(i) || wh.is_null(i) || day.is_null(i) {
                continue;
            }
            *sales
                .entry((sku.value(i).to_owned(), wh.value(i).to_owned()))
                .or_default()
                .entry(day.value(i))
                .or_default() += units.value(i);
        }
    }
    // Dense daily series from each one's first sale to the end of history.
    let mut keys: Vec<(String, String)> = sales.keys().cloned().collect();
    keys.sort();
    let histories: Vec<Vec<f64>> = keys
        .iter()
        .map(|k| {
            let days = &sales[k];
            let first = days.keys().next().copied().unwrap_or(end);
            (first..=end)
                .map(|d| days.get(&d).copied().unwrap_or(0.0))
                .collect()
        })
        .collect();
    let forecasts = forecast_all(histories, config.clone(), threads).await?;

    let run_id = format!("forecast-{}", Utc::now().format("%Y%m%dT%H%M%S%.6fZ"));
    let mut methods = BTreeMap::new();
    for f in &forecasts {
        let name = match f.fallback {
            Some(fb) => format!("{} ({})", f.method, fb.name()),
            None => f.method.to_owned(),
        };
        *methods.entry(name).or_default() += 1;
    }
    let batch = forecast_batch(&keys, &forecasts, end, &run_id)?;
    let rows = batch.num_rows();
    let version = engine
        .replace_result_table("forecasts", vec![batch])
        .await?;
    Ok(ForecastRun {
        run_id,
        history_end,
        series: keys.len(),
        rows,
        version,
        methods,
    })
}

fn strings(a: &ArrayRef) -> &StringArray {
    a.as_any()
        .downcast_ref::<StringArray>()
        .expect("cast to Utf8")
}

/// Forecasts each history on `threads` threads, off the async runtime.
async fn forecast_all(
    histories: Vec<Vec<f64>>,
    config: DemandConfig,
    threads: usize,
) -> Result<Vec<SeriesForecast>, JobError> {
    tokio::task::spawn_blocking(move || forecast_many(&histories, &config, threads))
        .await
        .map_err(|e| JobError::Thread(e.to_string()))
}

/// The schema of the `forecasts` table.
pub fn forecasts_schema() -> Arc<Schema> {
    let f = |name: &str, ty: DataType, nullable: bool| Field::new(name, ty, nullable);
    Arc::new(Schema::new(vec![
        f("sku", DataType::Utf8, false),
        f("warehouse_id", DataType::Utf8, false),
        f("date", DataType::Date32, false),
        f("yhat", DataType::Float64, false),
        f("yhat_lower", DataType::Float64, false),
        f("yhat_upper", DataType::Float64, false),
        f("yhat_lower_95", DataType::Float64, false),
        f("yhat_upper_95", DataType::Float64, false),
        f("model", DataType::Utf8, false),
        f("fallback", DataType::Utf8, true),
        f("run_id", DataType::Utf8, false),
    ]))
}

fn forecast_batch(
    keys: &[(String, String)],
    forecasts: &[SeriesForecast],
    history_end: i32,
    run_id: &str,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let mut sku = StringBuilder::new();
    let mut wh = StringBuilder::new();
    let mut model = StringBuilder::new();
    let mut fallback = StringBuilder::new();
    let mut run = StringBuilder::new();
    let mut date = Vec::new();
    let (mut yhat, mut lo, mut hi, mut lo95, mut hi95) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((s, w), f) in keys.iter().zip(forecasts) {
        for d in 0..f.point.len() {
            sku.append_value(s);
            wh.append_value(w);
            date.push(history_end + 1 + d as i32);
            yhat.push(f.point[d]);
            lo.push(f.lower_80[d]);
            hi.push(f.upper_80[d]);
            lo95.push(f.lower_95[d]);
            hi95.push(f.upper_95[d]);
            model.append_value(f.method);
            fallback.append_option(f.fallback.map(|fb| fb.name()));
            run.append_value(run_id);
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(sku.finish()),
        Arc::new(wh.finish()),
        Arc::new(Date32Array::from(date)),
        Arc::new(Float64Array::from(yhat)),
        Arc::new(Float64Array::from(lo)),
        Arc::new(Float64Array::from(hi)),
        Arc::new(Float64Array::from(lo95)),
        Arc::new(Float64Array::from(hi95)),
        Arc::new(model.finish()),
        Arc::new(fallback.finish()),
        Arc::new(run.finish()),
    ];
    RecordBatch::try_new(forecasts_schema(), columns)
}

#[cfg(test)]
mod tests;

//! The forecast job: daily demand of paid order lines per (sku, warehouse_id) from
//! the `orders` stream, a forecast of each series, the stock-out risk of each from the
//! stock on hand in `inventory`, and the fitted model of each.
//!
//! Tables, each replaced whole in one commit, `forecasts` last so that a run stopped
//! part way leaves the forecasts readers use as they were:
//! - `forecast_models`: per series, the chosen model, its fitted parameters and its
//!   backtest, so a forecast can be explained and reproduced;
//! - `stockout_risk`: per series, days of cover, expected stock-out date, and the
//!   probability of running out within the horizon;
//! - `forecasts`: per series and day, the point forecast and 80% and 95% intervals.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema};
use chrono::{DateTime, NaiveDate, Utc};
use quiver_engine::Engine;
use serde::Serialize;

use super::{JobConfig, JobError, RunSummary, blocking, numbers, query, text, to_batch};
use crate::demand::{SeriesForecast, forecast_many};
use crate::progress::Progress;
use crate::stockout::stockout_risk;

/// A (sku, warehouse_id).
type Key = (String, String);

pub(super) async fn run(
    engine: &Engine,
    config: &JobConfig,
    now: DateTime<Utc>,
    progress: &Arc<Progress>,
    summary: &mut RunSummary,
) -> Result<(), JobError> {
    let today = now.date_naive();
    let history_end = today.pred_opt().unwrap_or(today);
    summary.history_end = Some(history_end);
    progress.stage("reading", 0);
    let (keys, histories) = daily_demand(engine, today).await?;
    progress.check()?;
    summary.series = keys.len() as u64;

    progress.stage("forecasting", keys.len() as u64);
    let forecasts = {
        let (demand, threads, progress) =
            (config.demand.clone(), config.threads, Arc::clone(progress));
        blocking(move || forecast_many(&histories, &demand, threads, &progress)).await??
    };
    summarize(&forecasts, summary);

    progress.stage("stock", 0);
    let on_hand = stock_on_hand(engine).await?;
    progress.check()?;

    progress.stage("writing", 3);
    let run_id = summary.run_id.clone();
    let models = models_batch(&keys, &forecasts, &run_id)?;
    let risk = risk_batch(&keys, &forecasts, &on_hand, history_end, &run_id)?;
    let rows = forecast_batch(&keys, &forecasts, history_end, &run_id)?;
    summary.rows = rows.num_rows() as u64;
    for (table, batch) in [
        ("forecast_models", models),
        ("stockout_risk", risk),
        ("forecasts", rows),
    ] {
        progress.check()?;
        let version = engine.replace_result_table(table, vec![batch]).await?;
        summary.tables.insert(table.to_owned(), version);
        progress.advance(1);
    }
    Ok(())
}

/// Dense daily demand per (sku, warehouse_id), sorted by key: each series from its
/// first paid line to the day before `today`, zeros on days without sales.
async fn daily_demand(
    engine: &Engine,
    today: NaiveDate,
) -> Result<(Vec<Key>, Vec<Vec<f64>>), JobError> {
    let end = epoch_days(today) - 1;
    let batches = query(
        engine,
        format!(
            "SELECT sku, warehouse_id, CAST(date_trunc('day', event_time) AS DATE) AS day, \
             SUM(quantity) AS units FROM orders \
             WHERE status = 'paid' AND event_time < TIMESTAMP '{today}T00:00:00Z' \
             AND sku IS NOT NULL AND warehouse_id IS NOT NULL \
             GROUP BY sku, warehouse_id, day"
        ),
    )
    .await?;
    let mut sales: HashMap<Key, BTreeMap<i32, f64>> = HashMap::new();
    for b in &batches {
        let (sku, wh) = (text(b.column(0))?, text(b.column(1))?);
        let day = super::micros(b.column(2))?;
        let units = numbers(b.column(3))?;
        for i in 0..b.num_rows() {
            let Some(day) = day[i] else { continue };
            let day = day.div_euclid(86_400_000_000) as i32;
            *sales
                .entry((sku.value(i).to_owned(), wh.value(i).to_owned()))
                .or_default()
                .entry(day)
                .or_default() += units[i];
        }
    }
    let mut keys: Vec<Key> = sales.keys().cloned().collect();
    keys.sort();
    let histories = keys
        .iter()
        .map(|k| {
            let days = &sales[k];
            let first = days.keys().next().copied().unwrap_or(end);
            (first..=end)
                .map(|d| days.get(&d).copied().unwrap_or(0.0))
                .collect()
        })
        .collect();
    Ok((keys, histories))
}

/// Units on hand now per (sku, warehouse_id): the sum of every inventory movement.
async fn stock_on_hand(engine: &Engine) -> Result<HashMap<Key, f64>, JobError> {
    let batches = query(
        engine,
        "SELECT sku, warehouse_id, SUM(quantity) FROM inventory \
         WHERE sku IS NOT NULL AND warehouse_id IS NOT NULL GROUP BY sku, warehouse_id"
            .into(),
    )
    .await?;
    let mut out = HashMap::new();
    for b in &batches {
        let (sku, wh) = (text(b.column(0))?, text(b.column(1))?);
        let units = numbers(b.column(2))?;
        for (i, on_hand) in units.into_iter().enumerate() {
            out.insert((sku.value(i).to_owned(), wh.value(i).to_owned()), on_hand);
        }
    }
    Ok(out)
}

/// Counts per model and the run's backtest figures, pooled over series.
fn summarize(forecasts: &[SeriesForecast], summary: &mut RunSummary) {
    let (mut mae, mut base, mut days) = (0.0, 0.0, 0.0);
    let (mut c80, mut c95, mut covered) = (0.0, 0.0, 0.0);
    for f in forecasts {
        let name = match f.fallback {
            Some(fb) => format!("{} ({})", f.method, fb.name()),
            None => f.method.to_owned(),
        };
        *summary.models.entry(name).or_default() += 1;
        let Some(b) = &f.backtest else { continue };
        if b.mae.is_finite() && b.baseline_mae.is_finite() {
            // Each series' MAE covers the same number of days per fold.
            let n = b.folds as f64;
            mae += b.mae * n;
            base += b.baseline_mae * n;
            days += n;
        }
        if let (Some(a), Some(b)) = (b.coverage_80, b.coverage_95) {
            c80 += a;
            c95 += b;
            covered += 1.0;
        }
    }
    if days > 0.0 {
        summary.backtest_mae = Some(mae / days);
        summary.baseline_mae = Some(base / days);
        summary.mase_vs_seasonal_naive = (base > 0.0).then(|| mae / base);
    }
    if covered > 0.0 {
        summary.coverage_80 = Some(c80 / covered);
        summary.coverage_95 = Some(c95 / covered);
    }
}

/// Days since 1970-01-01, as Arrow's `Date32` counts them.
fn epoch_days(d: NaiveDate) -> i32 {
    (d - NaiveDate::default()).num_days() as i32
}

fn day_after(history_end: NaiveDate, days: usize) -> NaiveDate {
    history_end + chrono::Duration::days(days as i64)
}

/// The schema of `forecasts`.
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
    keys: &[Key],
    forecasts: &[SeriesForecast],
    history_end: NaiveDate,
    run_id: &str,
) -> Result<RecordBatch, JobError> {
    #[derive(Serialize)]
    struct Row<'a> {
        sku: &'a str,
        warehouse_id: &'a str,
        date: NaiveDate,
        yhat: f64,
        yhat_lower: f64,
        yhat_upper: f64,
        yhat_lower_95: f64,
        yhat_upper_95: f64,
        model: &'a str,
        fallback: Option<&'static str>,
        run_id: &'a str,
    }
    let mut rows = Vec::new();
    for ((sku, wh), f) in keys.iter().zip(forecasts) {
        for d in 0..f.point.len() {
            rows.push(Row {
                sku,
                warehouse_id: wh,
                date: day_after(history_end, d + 1),
                yhat: f.point[d],
                yhat_lower: f.lower_80[d],
                yhat_upper: f.upper_80[d],
                yhat_lower_95: f.lower_95[d],
                yhat_upper_95: f.upper_95[d],
                model: f.method,
                fallback: f.fallback.map(|fb| fb.name()),
                run_id,
            });
        }
    }
    to_batch(forecasts_schema(), &rows)
}

/// The schema of `forecast_models`.
pub fn forecast_models_schema() -> Arc<Schema> {
    let f = |name: &str, ty: DataType, nullable: bool| Field::new(name, ty, nullable);
    Arc::new(Schema::new(vec![
        f("sku", DataType::Utf8, false),
        f("warehouse_id", DataType::Utf8, false),
        f("model", DataType::Utf8, false),
        f("fallback", DataType::Utf8, true),
        f("params", DataType::Utf8, false),
        f("backtest_folds", DataType::Int64, true),
        f("backtest_mae", DataType::Float64, true),
        f("baseline_mae", DataType::Float64, true),
        f("mase", DataType::Float64, true),
        f("intermittent", DataType::Boolean, true),
        f("coverage_80", DataType::Float64, true),
        f("coverage_95", DataType::Float64, true),
        f("failures", DataType::Utf8, true),
        f("run_id", DataType::Utf8, false),
    ]))
}

fn models_batch(
    keys: &[Key],
    forecasts: &[SeriesForecast],
    run_id: &str,
) -> Result<RecordBatch, JobError> {
    #[derive(Serialize)]
    struct Row<'a> {
        sku: &'a str,
        warehouse_id: &'a str,
        model: &'a str,
        fallback: Option<&'static str>,
        params: String,
        backtest_folds: Option<usize>,
        backtest_mae: Option<f64>,
        baseline_mae: Option<f64>,
        mase: Option<f64>,
        intermittent: Option<bool>,
        coverage_80: Option<f64>,
        coverage_95: Option<f64>,
        failures: Option<String>,
        run_id: &'a str,
    }
    let finite = |v: f64| v.is_finite().then_some(v);
    let rows: Vec<Row<'_>> = keys
        .iter()
        .zip(forecasts)
        .map(|((sku, wh), f)| {
            let b = f.backtest.as_ref();
            Row {
                sku,
                warehouse_id: wh,
                model: f.method,
                fallback: f.fallback.map(|fb| fb.name()),
                params: f.params.to_string(),
                backtest_folds: b.map(|b| b.folds),
                backtest_mae: b.and_then(|b| finite(b.mae)),
                baseline_mae: b.and_then(|b| finite(b.baseline_mae)),
                mase: b.and_then(|b| b.mase).and_then(finite),
                intermittent: b.map(|b| b.intermittent),
                coverage_80: b.and_then(|b| b.coverage_80),
                coverage_95: b.and_then(|b| b.coverage_95),
                failures: b
                    .filter(|b| !b.failures.is_empty())
                    .map(|b| serde_json::to_string(&b.failures).unwrap_or_default()),
                run_id,
            }
        })
        .collect();
    to_batch(forecast_models_schema(), &rows)
}

/// The schema of `stockout_risk`.
pub fn stockout_risk_schema() -> Arc<Schema> {
    let f = |name: &str, ty: DataType, nullable: bool| Field::new(name, ty, nullable);
    Arc::new(Schema::new(vec![
        f("sku", DataType::Utf8, false),
        f("warehouse_id", DataType::Utf8, false),
        f("on_hand", DataType::Float64, false),
        f("expected_demand", DataType::Float64, false),
        f("horizon_days", DataType::Int64, false),
        f("days_of_cover", DataType::Float64, true),
        f("stockout_date", DataType::Date32, true),
        f("stockout_probability", DataType::Float64, false),
        f("model", DataType::Utf8, false),
        f("run_id", DataType::Utf8, false),
    ]))
}

fn risk_batch(
    keys: &[Key],
    forecasts: &[SeriesForecast],
    on_hand: &HashMap<Key, f64>,
    history_end: NaiveDate,
    run_id: &str,
) -> Result<RecordBatch, JobError> {
    #[derive(Serialize)]
    struct Row<'a> {
        sku: &'a str,
        warehouse_id: &'a str,
        on_hand: f64,
        expected_demand: f64,
        horizon_days: usize,
        days_of_cover: Option<f64>,
        stockout_date: Option<NaiveDate>,
        stockout_probability: f64,
        model: &'a str,
        run_id: &'a str,
    }
    let rows: Vec<Row<'_>> = keys
        .iter()
        .zip(forecasts)
        .map(|(key, f)| {
            // No inventory movement recorded: nothing on hand.
            let stock = on_hand.get(key).copied().unwrap_or(0.0);
            let risk = stockout_risk(stock, f);
            Row {
                sku: &key.0,
                warehouse_id: &key.1,
                on_hand: stock,
                expected_demand: risk.expected_demand,
                horizon_days: f.point.len(),
                days_of_cover: risk.days_of_cover,
                // Day 0 (nothing on hand) is out already: the first forecast day.
                stockout_date: risk.stockout_day.map(|d| day_after(history_end, d.max(1))),
                stockout_probability: risk.probability,
                model: f.method,
                run_id,
            }
        })
        .collect();
    to_batch(stockout_risk_schema(), &rows)
}

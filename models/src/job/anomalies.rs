//! The anomaly job: points outside their expected band in revenue per minute (per
//! warehouse) and in hourly units (per SKU), and stretches where one warehouse's hourly
//! revenue moved unlike the others'. One table, `anomalies`, replaced whole.
//!
//! Each series runs from its first sale in the window to the last complete minute or
//! hour before the run (zeros where nothing sold), so a series that began part way is
//! not judged on the time before it existed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use chrono::{DateTime, Utc};
use quiver_engine::Engine;
use serde::Serialize;

use super::{JobConfig, JobError, RunSummary, blocking, micros, numbers, query, text, to_batch};
use crate::anomaly::{peer_outliers, point_anomalies};
use crate::progress::Progress;

/// How anomalies are looked for.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyConfig {
    /// Robust standard deviations from the expected value that make a point an
    /// anomaly. 4.5 rather than the usual 3.5 for modified z-scores: STL remainders of
    /// order data are heavier-tailed than normal, and on ten days of clean generated
    /// hourly units 3.5 flagged 1.7% of hours (8 of 480, all between 3.7 and 4.2)
    /// where a normal remainder would give 0.05%; injected spikes scored 40 and over.
    pub threshold: f64,
    /// Hours of revenue per minute looked at.
    pub minute_window_hours: u32,
    /// Days of hourly units and hourly revenue looked at.
    pub hourly_window_days: u32,
    /// augurs' DBSCAN sensitivity for warehouses unlike their peers (0–1).
    pub peer_sensitivity: f64,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            threshold: 4.5,
            minute_window_hours: 24,
            hourly_window_days: 28,
            peer_sensitivity: 0.8,
        }
    }
}

/// Share of empty buckets above which a series is too sparse to score. In the demo's
/// backfill (a few sales per SKU an hour) scoring every series flagged 1.7% of hours;
/// those series are now counted as `too_sparse_to_score` in `model_runs` instead.
const MAX_ZERO_SHARE: f64 = 0.1;

const MINUTE: i64 = 60_000_000;
const HOUR: i64 = 60 * MINUTE;

/// A series' points, `step` microseconds apart from `start`.
struct Series {
    key: String,
    start: i64,
    values: Vec<f64>,
}

/// One row of `anomalies`.
#[derive(Debug, Serialize)]
struct Row {
    kind: &'static str,
    warehouse_id: Option<String>,
    sku: Option<String>,
    time: DateTime<Utc>,
    end_time: DateTime<Utc>,
    value: f64,
    expected: f64,
    lower: f64,
    upper: f64,
    score: f64,
    reason: String,
    run_id: String,
}

pub(super) async fn run(
    engine: &Engine,
    config: &JobConfig,
    now: DateTime<Utc>,
    progress: &Arc<Progress>,
    summary: &mut RunSummary,
) -> Result<(), JobError> {
    let a = config.anomaly.clone();
    let now_us = now.timestamp_micros();
    let minute_end = now_us.div_euclid(MINUTE) * MINUTE;
    let hour_end = now_us.div_euclid(HOUR) * HOUR;
    summary.history_end = Some(now.date_naive());
    progress.stage("reading", 3);
    let revenue = "quantity * unit_price";
    let minutes = series(
        engine,
        "warehouse_id",
        revenue,
        MINUTE,
        minute_end - i64::from(a.minute_window_hours) * HOUR,
        minute_end,
    )
    .await?;
    progress.advance(1);
    let hourly_units = series(
        engine,
        "sku",
        "quantity",
        HOUR,
        hour_end - i64::from(a.hourly_window_days) * 24 * HOUR,
        hour_end,
    )
    .await?;
    progress.advance(1);
    let hourly_revenue = series(
        engine,
        "warehouse_id",
        revenue,
        HOUR,
        hour_end - i64::from(a.hourly_window_days) * 24 * HOUR,
        hour_end,
    )
    .await?;
    progress.advance(1);
    progress.check()?;
    summary.series = (minutes.len() + hourly_units.len() + hourly_revenue.len()) as u64;

    progress.stage("scoring", summary.series);
    let run_id = summary.run_id.clone();
    let work = Arc::clone(progress);
    let (rows, skipped, sparse) = blocking(move || {
        let mut rows = Vec::new();
        let (mut skipped, mut sparse) = (0u64, 0u64);
        // Revenue per minute: an hourly cycle; the trend follows the day's shape.
        for (s, kind, period, step) in minutes
            .iter()
            .map(|s| (s, "revenue_per_minute", 60, MINUTE))
            .chain(hourly_units.iter().map(|s| (s, "hourly_units", 24, HOUR)))
        {
            work.check()?;
            // Sparse counts (a few sales an hour) are not judged by a band built for
            // values with a spread around a level: nearly every sale would be a spike.
            let zeros = s.values.iter().filter(|v| **v == 0.0).count();
            if zeros as f64 > MAX_ZERO_SHARE * s.values.len() as f64 {
                sparse += 1;
                work.advance(1);
                continue;
            }
            match point_anomalies(&s.values, period, a.threshold) {
                Ok(found) => rows.extend(found.into_iter().map(|p| {
                    let time = s.start + p.index as i64 * step;
                    let (warehouse_id, sku) = match kind {
                        "revenue_per_minute" => (Some(s.key.clone()), None),
                        _ => (None, Some(s.key.clone())),
                    };
                    Row {
                        kind,
                        warehouse_id,
                        sku,
                        time: at(time),
                        end_time: at(time + step),
                        value: p.value,
                        expected: p.expected,
                        lower: p.lower,
                        upper: p.upper,
                        score: p.score,
                        reason: p.reason,
                        run_id: run_id.clone(),
                    }
                })),
                // Too short to have a season yet: nothing to say about it.
                Err(_) => skipped += 1,
            }
            work.advance(1);
        }
        rows.extend(peers(&hourly_revenue, a.peer_sensitivity, &run_id));
        work.advance(hourly_revenue.len() as u64);
        Ok::<_, JobError>((rows, skipped, sparse))
    })
    .await??;
    for r in &rows {
        *summary.models.entry(r.kind.to_owned()).or_default() += 1;
    }
    if skipped > 0 {
        summary.models.insert("too_short_to_score".into(), skipped);
    }
    if sparse > 0 {
        summary.models.insert("too_sparse_to_score".into(), sparse);
    }
    summary.rows = rows.len() as u64;
    progress.stage("writing", 1);
    progress.check()?;
    let batch = to_batch(anomalies_schema(), &rows)?;
    let version = engine
        .replace_result_table("anomalies", vec![batch])
        .await?;
    summary.tables.insert("anomalies".into(), version);
    progress.advance(1);
    Ok(())
}

fn at(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

/// Warehouses whose hourly revenue moved unlike the others', over the hours all of
/// them were selling.
fn peers(series: &[Series], sensitivity: f64, run_id: &str) -> Vec<Row> {
    let Some(start) = series.iter().map(|s| s.start).max() else {
        return Vec::new();
    };
    let aligned: Vec<Vec<f64>> = series
        .iter()
        .map(|s| s.values[((start - s.start) / HOUR) as usize..].to_vec())
        .collect();
    // A day at least, so one hour's shape is not taken for a warehouse's.
    if aligned.first().is_none_or(|v| v.len() < 24) {
        return Vec::new();
    }
    peer_outliers(&aligned, sensitivity)
        .into_iter()
        .map(|p| {
            let key = &series[p.series].key;
            let hours = p.end - p.start;
            let (from, to) = (
                at(start + p.start as i64 * HOUR),
                at(start + p.end as i64 * HOUR),
            );
            Row {
                kind: "peer_outlier",
                warehouse_id: Some(key.clone()),
                sku: None,
                time: from,
                end_time: to,
                value: p.value,
                expected: p.expected,
                lower: p.lower,
                upper: p.upper,
                score: if p.expected > 0.0 {
                    p.value / p.expected - 1.0
                } else {
                    0.0
                },
                reason: format!(
                    "warehouse {key} took {:.2} an hour for {hours} h from {from}, where moving \
                     like the other {} warehouses it would have taken about {:.2}",
                    p.value,
                    series.len() - 1,
                    p.expected
                ),
                run_id: run_id.to_owned(),
            }
        })
        .collect()
}

/// `SUM(measure)` of paid order lines per `key` in buckets of `step` microseconds
/// over [from, to): one dense series per key from its first bucket with a sale.
async fn series(
    engine: &Engine,
    key: &str,
    measure: &str,
    step: i64,
    from: i64,
    to: i64,
) -> Result<Vec<Series>, JobError> {
    let (from_t, to_t) = (at(from).to_rfc3339(), at(to).to_rfc3339());
    let width = if step == MINUTE { "1 minute" } else { "1 hour" };
    let batches = query(
        engine,
        format!(
            "SELECT {key}, date_bin(INTERVAL '{width}', event_time) AS bucket, \
             SUM({measure}) AS total FROM orders \
             WHERE status = 'paid' AND {key} IS NOT NULL \
             AND event_time >= TIMESTAMP '{from_t}' AND event_time < TIMESTAMP '{to_t}' \
             GROUP BY 1, 2"
        ),
    )
    .await?;
    let mut points: HashMap<String, BTreeMap<i64, f64>> = HashMap::new();
    for b in &batches {
        let keys = text(b.column(0))?;
        let buckets = micros(b.column(1))?;
        let totals = numbers(b.column(2))?;
        for i in 0..b.num_rows() {
            let Some(bucket) = buckets[i] else { continue };
            *points
                .entry(keys.value(i).to_owned())
                .or_default()
                .entry((bucket - from) / step)
                .or_default() += totals[i];
        }
    }
    let buckets = (to - from) / step;
    let mut out: Vec<Series> = points
        .into_iter()
        .filter_map(|(key, p)| {
            let first = *p.keys().next()?;
            Some(Series {
                key,
                start: from + first * step,
                values: (first..buckets)
                    .map(|i| p.get(&i).copied().unwrap_or(0.0))
                    .collect(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// The schema of `anomalies`.
pub fn anomalies_schema() -> Arc<Schema> {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let f = |name: &str, ty: DataType, nullable: bool| Field::new(name, ty, nullable);
    Arc::new(Schema::new(vec![
        f("kind", DataType::Utf8, false),
        f("warehouse_id", DataType::Utf8, true),
        f("sku", DataType::Utf8, true),
        f("time", ts.clone(), false),
        f("end_time", ts, false),
        f("value", DataType::Float64, false),
        f("expected", DataType::Float64, false),
        f("lower", DataType::Float64, false),
        f("upper", DataType::Float64, false),
        f("score", DataType::Float64, false),
        f("reason", DataType::Utf8, false),
        f("run_id", DataType::Utf8, false),
    ]))
}

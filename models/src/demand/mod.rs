//! Demand forecasts for one daily series: which method, what it forecasts, and how
//! sure it is.
//!
//! A series is first checked for the histories no model should be fitted to (none,
//! never sold, stopped selling, constant, too short for a backtest); those get a
//! fallback that says which. Every other series is backtested: from several origins
//! over its last weeks (rolling origin), each candidate method forecasts the
//! following `horizon` days from the history before the origin, and its errors there
//! are compared. The method with the lowest error is chosen and fitted to the whole
//! history: mean absolute error for series that sell on most days, mean squared
//! error for intermittent ones, where the absolute error is smallest for a forecast of
//! zero (the median of a series that sells on fewer than half its days) and would
//! pick whatever forecasts least, however much is sold. Its backtest errors also give the prediction intervals:
//! their empirical quantiles (with split conformal prediction's finite-sample
//! correction), added to the point forecast. That makes the intervals
//! as wide as this method's errors on this series were, whatever the model assumes.
//! The coverage recorded with a series is measured honestly: for each origin, the
//! intervals come from the errors of the other origins only.
//!
//! Candidates: the seasonal-naive baseline always; for series that sell on most days,
//! MSTL with an AutoETS trend; for intermittent series (a sale on fewer than one day
//! in 1.32, the usual cut between smooth and intermittent demand), Croston–SBA and
//! TSB.

mod methods;

#[cfg(test)]
mod golden;
#[cfg(test)]
mod tests;

pub use methods::{Fitted, Method, MethodError, WEEK};
use serde::Serialize;

use crate::progress::{Cancelled, Progress};
use serde_json::Value;

/// How a demand forecast is made.
#[derive(Debug, Clone, PartialEq)]
pub struct DemandConfig {
    /// Days to forecast after the last day of history.
    pub horizon: usize,
    /// Backtest origins, one week apart, at most.
    pub folds: usize,
    /// Days a backtest must have before its first origin.
    pub min_train: usize,
    /// Days without a sale after which a series that sold before counts as stopped.
    pub stopped_after: usize,
}

impl Default for DemandConfig {
    fn default() -> Self {
        Self {
            horizon: 14,
            folds: 4,
            min_train: 4 * WEEK,
            stopped_after: 4 * WEEK,
        }
    }
}

/// Days of recent history a rate forecast's intervals are calibrated on.
const CALIBRATION_DAYS: usize = 13 * WEEK;

/// Average days between sales above which a series counts as intermittent.
const INTERMITTENT_ADI: f64 = 1.32;

/// Why a series got a fallback instead of a chosen model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// No days of history at all.
    NoHistory,
    /// Days of history, but never a sale.
    NoSales,
    /// It sold before, but not in the last `stopped_after` days nor in three of its
    /// usual gaps between sales: forecast zero.
    Stopped,
    /// Every day the same: forecast that value with no spread.
    Constant,
    /// Too short for one backtest: seasonal naive (or the mean, under a week), with
    /// intervals from the spread of the history.
    ShortHistory,
}

impl Fallback {
    /// The name stored in the output tables.
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// What the backtest of the chosen method measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backtest {
    /// Origins the methods were tested from.
    pub folds: usize,
    /// Mean absolute error of the chosen method.
    pub mae: f64,
    /// Mean absolute error of seasonal naive over the same days.
    pub baseline_mae: f64,
    /// Root mean squared error of the chosen method.
    pub rmse: f64,
    /// Root mean squared error of seasonal naive over the same days.
    pub baseline_rmse: f64,
    /// Whether the series counted as intermittent (chosen by squared error).
    pub intermittent: bool,
    /// MAE scaled by the in-sample mean absolute weekly difference (Hyndman's MASE);
    /// `None` when that difference is zero.
    pub mase: Option<f64>,
    /// Share of held-out days inside the 80% interval, each origin's interval taken
    /// from the other origins' errors.
    pub coverage_80: Option<f64>,
    /// The same for the 95% interval.
    pub coverage_95: Option<f64>,
    /// Methods that failed on this series, with why.
    pub failures: Vec<(String, String)>,
}

/// The forecast of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesForecast {
    /// The method that made it (for a fallback, the one it used).
    pub method: &'static str,
    /// Set when no model was chosen by backtest, and why.
    pub fallback: Option<Fallback>,
    /// Point forecast per day.
    pub point: Vec<f64>,
    /// 80% interval per day.
    pub lower_80: Vec<f64>,
    /// 80% interval per day.
    pub upper_80: Vec<f64>,
    /// 95% interval per day.
    pub lower_95: Vec<f64>,
    /// 95% interval per day.
    pub upper_95: Vec<f64>,
    /// What the method fitted.
    pub params: Value,
    /// The backtest, when there was one.
    pub backtest: Option<Backtest>,
}

/// Forecasts the `config.horizon` days after `history` (daily demand, oldest first,
/// zeros for days without sales).
pub fn forecast(history: &[f64], config: &DemandConfig) -> SeriesForecast {
    let history: Vec<f64> = history
        .iter()
        .map(|v| if v.is_finite() { v.max(0.0) } else { 0.0 })
        .collect();
    if let Some(f) = fallback(&history, config) {
        return f;
    }
    let (candidates, intermittent) = candidates(&history);
    let origins = origins(history.len(), config);
    let mut failures = Vec::new();
    let mut tried: Vec<(Method, Vec<Vec<f64>>)> = Vec::new();
    for method in candidates {
        match errors_at(&history, &origins, method, config.horizon) {
            Ok(errors) => tried.push((method, errors)),
            Err(e) => failures.push((method.name().to_owned(), e.to_string())),
        }
    }
    let loss = |errors: &[Vec<f64>]| {
        if intermittent {
            rmse(errors.iter().flatten())
        } else {
            mean_abs(errors.iter().flatten())
        }
    };
    let baseline = tried
        .iter()
        .find(|(m, _)| *m == Method::SeasonalNaive)
        .map(|(_, e)| e.clone());
    let Some((method, errors)) = tried
        .into_iter()
        .min_by(|a, b| loss(&a.1).total_cmp(&loss(&b.1)))
    else {
        // Seasonal naive fits any history long enough for a backtest; only a bug
        // gets here, and the short-history forecast is still a sound answer.
        return short_history(&history, config.horizon);
    };
    let fitted = match method.forecast(&history, config.horizon) {
        Ok(f) => f,
        Err(e) => {
            failures.push((method.name().to_owned(), e.to_string()));
            return short_history(&history, config.horizon);
        }
    };
    let mae = mean_abs(errors.iter().flatten());
    let baseline = baseline.unwrap_or_default();
    let pooled: Vec<f64> = if intermittent && fitted.is_flat() {
        // A rate forecast says the same for every day, so any recent day is a fair
        // test of it, and a sparse series needs many days to show its spread: a few
        // weeks of backtest hold a handful of sales (95% intervals from them held 79%
        // of held-out days in the test).
        let recent = &history[history.len().saturating_sub(CALIBRATION_DAYS)..];
        recent.iter().map(|y| y - fitted.point[0]).collect()
    } else {
        errors.iter().flatten().copied().collect()
    };
    let scale = weekly_scale(&history);
    let backtest = Backtest {
        folds: origins.len(),
        mae,
        baseline_mae: mean_abs(baseline.iter().flatten()),
        rmse: rmse(errors.iter().flatten()),
        baseline_rmse: rmse(baseline.iter().flatten()),
        intermittent,
        mase: (scale > 0.0).then(|| mae / scale),
        coverage_80: held_out_coverage(&errors, 0.80),
        coverage_95: held_out_coverage(&errors, 0.95),
        failures,
    };
    let band_80 = band(&fitted.point, &pooled, 0.80);
    let band_95 = band(&fitted.point, &pooled, 0.95);
    SeriesForecast::new(method, None, fitted, band_80, band_95, Some(backtest))
}

/// Lower and upper bounds, per day.
type Band = (Vec<f64>, Vec<f64>);

impl SeriesForecast {
    fn new(
        method: Method,
        fallback: Option<Fallback>,
        fitted: Fitted,
        (lower_80, upper_80): Band,
        (lower_95, upper_95): Band,
        backtest: Option<Backtest>,
    ) -> Self {
        Self {
            method: method.name(),
            fallback,
            point: fitted.point,
            lower_80,
            upper_80,
            lower_95,
            upper_95,
            params: fitted.params,
            backtest,
        }
    }
}

/// Forecasts every history on `threads` threads (the calling thread waits), in order,
/// counting each series done in `progress` and stopping early when it is cancelled.
///
/// Threads take the next series from a shared counter rather than a fixed share:
/// series differ in cost by two orders of magnitude (a sparse one is a rate, a smooth
/// one fits several models per backtest origin), and a fixed split left one thread
/// idle for a fifth of a 10,000-series run.
pub fn forecast_many(
    histories: &[Vec<f64>],
    config: &DemandConfig,
    threads: usize,
    progress: &Progress,
) -> Result<Vec<SeriesForecast>, Cancelled> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let parts = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.clamp(1, histories.len().max(1)))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(y) = histories.get(i) else {
                            return Ok(done);
                        };
                        progress.check()?;
                        done.push((i, forecast(y, config)));
                        progress.advance(1);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            // A forecast does not panic on any history (tested); if one did, this
            // thread carries it on rather than losing series silently.
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Result<Vec<Vec<(usize, SeriesForecast)>>, Cancelled>>()
    })?;
    let mut all: Vec<(usize, SeriesForecast)> = parts.into_iter().flatten().collect();
    all.sort_unstable_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, f)| f).collect())
}

/// The fallback for a history no model should be chosen for, if it is one.
fn fallback(history: &[f64], config: &DemandConfig) -> Option<SeriesForecast> {
    let horizon = config.horizon;
    let flat = |value: f64, fallback: Fallback, method: Method| {
        let same = || (vec![value; horizon], vec![value; horizon]);
        let fitted = Fitted {
            point: vec![value; horizon],
            params: serde_json::json!({ "value": value }),
        };
        SeriesForecast::new(method, Some(fallback), fitted, same(), same(), None)
    };
    let Some(&first) = history.first() else {
        return Some(flat(0.0, Fallback::NoHistory, Method::SeasonalNaive));
    };
    let last_sale = history.iter().rposition(|&v| v > 0.0);
    match last_sale {
        None => return Some(flat(0.0, Fallback::NoSales, Method::SeasonalNaive)),
        // Quiet for `stopped_after` days and for three of its usual gaps between
        // sales: a slow seller is not stopped by a month without a sale.
        Some(i)
            if {
                let quiet = history.len() - 1 - i;
                quiet >= config.stopped_after && quiet as f64 > 3.0 * days_per_sale(&history[..=i])
            } =>
        {
            return Some(flat(0.0, Fallback::Stopped, Method::SeasonalNaive));
        }
        Some(_) => {}
    }
    if history.iter().all(|&v| v == first) {
        return Some(flat(first, Fallback::Constant, Method::SeasonalNaive));
    }
    if origins(history.len(), config).is_empty() {
        return Some(short_history(history, horizon));
    }
    None
}

/// Seasonal naive (the mean under a week) with normal intervals from the history's
/// standard deviation: the best that can be said without a backtest.
fn short_history(history: &[f64], horizon: usize) -> SeriesForecast {
    let (method, fitted) = match Method::SeasonalNaive.forecast(history, horizon) {
        Ok(f) => (Method::SeasonalNaive, f),
        Err(_) => {
            let mean = history.iter().sum::<f64>() / history.len() as f64;
            (
                Method::SeasonalNaive,
                Fitted {
                    point: vec![mean; horizon],
                    params: serde_json::json!({ "mean": mean }),
                },
            )
        }
    };
    let n = history.len() as f64;
    let mean = history.iter().sum::<f64>() / n;
    let sd = (history.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
    // Standard normal quantiles for two-sided 80% and 95% intervals.
    let spread = |z: f64| -> Band {
        fitted
            .point
            .iter()
            .map(|p| ((p - z * sd).max(0.0), p + z * sd))
            .unzip()
    };
    let band_80 = spread(1.281_551_565_545);
    let band_95 = spread(1.959_963_984_540);
    SeriesForecast::new(
        method,
        Some(Fallback::ShortHistory),
        fitted,
        band_80,
        band_95,
        None,
    )
}

/// Average days per sale.
fn days_per_sale(history: &[f64]) -> f64 {
    let sales = history.iter().filter(|&&v| v > 0.0).count();
    history.len() as f64 / sales.max(1) as f64
}

/// The methods worth trying on `history`, and whether it is intermittent.
fn candidates(history: &[f64]) -> (Vec<Method>, bool) {
    if days_per_sale(history) > INTERMITTENT_ADI {
        (
            vec![Method::SeasonalNaive, Method::CrostonSba, Method::Tsb],
            true,
        )
    } else {
        (
            vec![
                Method::SeasonalNaive,
                Method::MstlEts,
                Method::RidgeFeatures,
            ],
            false,
        )
    }
}

/// Backtest origins (the length of history each fold fits on), newest first: one a
/// week, the newest leaving `horizon` days to test on.
fn origins(len: usize, config: &DemandConfig) -> Vec<usize> {
    (0..config.folds)
        .map_while(|k| {
            let origin = len.checked_sub(config.horizon + k * WEEK)?;
            (origin >= config.min_train).then_some(origin)
        })
        .collect()
}

/// Per origin, the errors (actual − forecast) of `method` over the following days.
fn errors_at(
    history: &[f64],
    origins: &[usize],
    method: Method,
    horizon: usize,
) -> Result<Vec<Vec<f64>>, MethodError> {
    origins
        .iter()
        .map(|&origin| {
            let fitted = method.forecast(&history[..origin], horizon)?;
            Ok(history[origin..origin + horizon]
                .iter()
                .zip(&fitted.point)
                .map(|(actual, forecast)| actual - forecast)
                .collect())
        })
        .collect()
}

fn rmse<'a>(errors: impl Iterator<Item = &'a f64>) -> f64 {
    let (sum, n) = errors.fold((0.0, 0usize), |(s, n), e| (s + e * e, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        (sum / n as f64).sqrt()
    }
}

fn mean_abs<'a>(errors: impl Iterator<Item = &'a f64>) -> f64 {
    let (sum, n) = errors.fold((0.0, 0usize), |(s, n), e| (s + e.abs(), n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

/// Mean absolute difference between a day and the same weekday a week before: the
/// in-sample error of seasonal naive, MASE's denominator.
fn weekly_scale(history: &[f64]) -> f64 {
    let diffs: Vec<f64> = history.windows(WEEK + 1).map(|w| w[WEEK] - w[0]).collect();
    mean_abs(diffs.iter())
}

/// The bounds of the central `level` interval of sorted backtest errors, with the
/// finite-sample correction of split conformal prediction: the ⌈(n+1)(1−α/2)⌉-th
/// smallest error above and the ⌊(n+1)·α/2⌋-th below. A plain quantile of a few
/// dozen errors is too narrow (95% intervals from 56 errors held 86% of held-out days
/// in the test); with the correction a new error falls inside with probability at
/// least `level` when errors are exchangeable. Past the sample, the extremes are used.
fn bounds(sorted: &[f64], level: f64) -> (f64, f64) {
    let n = sorted.len();
    let tail = (1.0 - level) / 2.0;
    let above = (((n + 1) as f64) * (1.0 - tail)).ceil() as usize;
    let below = (((n + 1) as f64) * tail).floor() as usize;
    (
        sorted[below.saturating_sub(1).min(n - 1)],
        sorted[above.clamp(1, n) - 1],
    )
}

/// The interval of central probability `level` around `point`: the errors' quantiles
/// added to it, kept at or above zero and around the point.
fn band(point: &[f64], errors: &[f64], level: f64) -> Band {
    let mut sorted: Vec<f64> = errors.iter().copied().filter(|e| e.is_finite()).collect();
    if sorted.is_empty() {
        return (point.to_vec(), point.to_vec());
    }
    sorted.sort_by(f64::total_cmp);
    let (lo, hi) = bounds(&sorted, level);
    point
        .iter()
        .map(|&p| ((p + lo).min(p).max(0.0), (p + hi).max(p)))
        .unzip()
}

/// Share of each origin's errors inside the band the other origins' errors give.
fn held_out_coverage(errors: &[Vec<f64>], level: f64) -> Option<f64> {
    if errors.len() < 2 {
        return None;
    }
    let (mut inside, mut total) = (0usize, 0usize);
    for (k, held_out) in errors.iter().enumerate() {
        let others: Vec<f64> = errors
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != k)
            .flat_map(|(_, e)| e.iter().copied())
            .collect();
        let mut sorted = others;
        sorted.sort_by(f64::total_cmp);
        let (lo, hi) = bounds(&sorted, level);
        inside += held_out.iter().filter(|e| (lo..=hi).contains(*e)).count();
        total += held_out.len();
    }
    Some(inside as f64 / total as f64)
}

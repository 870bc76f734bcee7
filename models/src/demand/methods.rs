//! The forecasting methods a series can be given, each fitted to a daily history and
//! asked for `horizon` days of point forecasts.

use augurs_core::{Fit, Predict};
use augurs_ets::AutoETS;
use augurs_mstl::MSTLModel;
use serde_json::{Value, json};
use smartcore::linalg::basic::matrix::DenseMatrix;
use smartcore::linear::ridge_regression::{RidgeRegression, RidgeRegressionParameters};

/// Days in the weekly season every method here knows about.
pub const WEEK: usize = 7;

/// Smoothing constant of the intermittent-demand methods: 0.1 is the value Croston,
/// Syntetos–Boylan and Teunter–Syntetos–Babai recommend, and what statsforecast's
/// `CrostonSBA` and `TSB` use by default.
const INTERMITTENT_ALPHA: f64 = 0.1;

/// A forecasting method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum Method {
    /// The same weekday of the last week: the baseline every other method must beat.
    SeasonalNaive,
    /// MSTL decomposition with a weekly season; the trend is forecast by AutoETS.
    MstlEts,
    /// Croston's method with the Syntetos–Boylan bias correction.
    CrostonSba,
    /// Teunter–Syntetos–Babai: demand probability and size smoothed apart, so a
    /// series that stops selling sees its forecast decay.
    Tsb,
    /// Ridge regression (smartcore) on features of the days before: the same weekday
    /// one and two weeks back, the last 7- and 28-day means, the day of the week and a
    /// trend; forecast one day at a time, each day's forecast feeding the next's
    /// features.
    RidgeFeatures,
}

/// Why a method could not forecast a series.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MethodError {
    /// The history is too short for the method.
    #[error("{method} needs at least {needs} days of history, got {got}")]
    TooShort {
        method: &'static str,
        needs: usize,
        got: usize,
    },
    /// The underlying model failed to fit or predict.
    #[error("{method} failed: {reason}")]
    Failed {
        method: &'static str,
        reason: String,
    },
}

/// A method's forecast and the parameters it fitted, so a forecast can be explained
/// and reproduced.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted {
    /// Point forecasts, one per day, never negative.
    pub point: Vec<f64>,
    /// What the method fitted (JSON, as stored with the run).
    pub params: Value,
}

impl Fitted {
    /// Whether the forecast is the same every day (a rate).
    pub fn is_flat(&self) -> bool {
        self.point.windows(2).all(|w| w[0] == w[1])
    }
}

impl Method {
    /// The name stored in the output tables.
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// The shortest history the method fits.
    pub fn min_history(self) -> usize {
        match self {
            Self::SeasonalNaive => WEEK,
            // MSTL needs two full seasons.
            Self::MstlEts => 2 * WEEK,
            Self::CrostonSba | Self::Tsb => 1,
            // A row needs 28 days before it, and the fit two weeks of rows.
            Self::RidgeFeatures => RIDGE_LOOKBACK + 2 * WEEK,
        }
    }

    /// Fits the method to `history` (daily values, oldest first) and forecasts the
    /// next `horizon` days.
    pub fn forecast(self, history: &[f64], horizon: usize) -> Result<Fitted, MethodError> {
        if history.len() < self.min_history() {
            return Err(MethodError::TooShort {
                method: self.name(),
                needs: self.min_history(),
                got: history.len(),
            });
        }
        let mut fitted = match self {
            Self::SeasonalNaive => seasonal_naive(history, horizon),
            Self::MstlEts => mstl_ets(history, horizon)?,
            Self::CrostonSba => croston_sba(history, horizon),
            Self::Tsb => tsb(history, horizon),
            Self::RidgeFeatures => ridge_features(history, horizon)?,
        };
        for v in &mut fitted.point {
            // Demand is never negative; a trend model can extrapolate below zero.
            *v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        }
        Ok(fitted)
    }
}

fn seasonal_naive(history: &[f64], horizon: usize) -> Fitted {
    let last_week = &history[history.len() - WEEK..];
    Fitted {
        point: (0..horizon).map(|h| last_week[h % WEEK]).collect(),
        params: json!({ "season": WEEK }),
    }
}

/// Days MSTL + AutoETS is fitted on: the most recent 13 weeks. Fitting cost grows
/// with the history (AutoETS tries several models, each optimized over every day), and
/// older days say little about the next two weeks' level and weekly shape. On 500
/// generated 730-day series (`forecast-bench`, 2 threads) the whole history forecast
/// 21 series/s, 26 weeks 77/s and 13 weeks 139/s, with held-out error against seasonal
/// naive of 0.762, 0.769 and 0.769. What it gives up: a trend that needs more than a
/// quarter to show, and any yearly season (not modelled here either way).
const MSTL_WINDOW: usize = 13 * WEEK;

fn mstl_ets(history: &[f64], horizon: usize) -> Result<Fitted, MethodError> {
    let history = &history[history.len().saturating_sub(MSTL_WINDOW)..];
    let failed = |e: &dyn std::fmt::Display| MethodError::Failed {
        method: Method::MstlEts.name(),
        reason: e.to_string(),
    };
    let model = MSTLModel::new(vec![WEEK], AutoETS::non_seasonal().into_trend_model());
    let fit = model.fit(history).map_err(|e| failed(&e))?;
    let forecast = fit.predict(horizon, None).map_err(|e| failed(&e))?;
    if forecast.point.len() != horizon {
        return Err(failed(&format!(
            "{} points for a horizon of {horizon}",
            forecast.point.len()
        )));
    }
    Ok(Fitted {
        point: forecast.point,
        params: json!({ "periods": [WEEK], "trend": "auto_ets(ZZN)", "window_days": history.len() }),
    })
}

/// Simple exponential smoothing of `x` started at its first value: the level after
/// the last value.
fn ses(x: &[f64], alpha: f64) -> f64 {
    x.iter()
        .skip(1)
        .fold(x.first().copied().unwrap_or(0.0), |level, v| {
            alpha * v + (1.0 - alpha) * level
        })
}

/// The non-zero demands and the number of days from each to the one before (the
/// first counted from the start of the history).
fn demands_and_intervals(history: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut sizes = Vec::new();
    let mut gaps = Vec::new();
    let mut last = None;
    for (i, &v) in history.iter().enumerate() {
        if v != 0.0 {
            sizes.push(v);
            gaps.push(match last {
                Some(j) => (i - j) as f64,
                None => (i + 1) as f64,
            });
            last = Some(i);
        }
    }
    (sizes, gaps)
}

fn croston_sba(history: &[f64], horizon: usize) -> Fitted {
    let (sizes, gaps) = demands_and_intervals(history);
    let (size, gap) = (
        ses(&sizes, INTERMITTENT_ALPHA),
        ses(&gaps, INTERMITTENT_ALPHA),
    );
    let rate = if sizes.is_empty() || gap <= 0.0 {
        0.0
    } else {
        // The Syntetos–Boylan correction of Croston's z/p, which overshoots.
        (1.0 - INTERMITTENT_ALPHA / 2.0) * size / gap
    };
    Fitted {
        point: vec![rate; horizon],
        params: json!({ "alpha": INTERMITTENT_ALPHA, "size": size, "interval": gap }),
    }
}

fn tsb(history: &[f64], horizon: usize) -> Fitted {
    let occurs: Vec<f64> = history
        .iter()
        .map(|&v| if v != 0.0 { 1.0 } else { 0.0 })
        .collect();
    let (sizes, _) = demands_and_intervals(history);
    let probability = ses(&occurs, INTERMITTENT_ALPHA);
    let size = ses(&sizes, INTERMITTENT_ALPHA);
    Fitted {
        point: vec![probability * size; horizon],
        params: json!({
            "alpha_probability": INTERMITTENT_ALPHA,
            "alpha_size": INTERMITTENT_ALPHA,
            "probability": probability,
            "size": size,
        }),
    }
}

/// Days of history before a regression row that its features read.
const RIDGE_LOOKBACK: usize = 4 * WEEK;

/// Rows (days) the regression is fitted on at most: the most recent 13 weeks, as for
/// MSTL, so the fit follows the current level and weekly shape.
const RIDGE_WINDOW: usize = 13 * WEEK;

/// Ridge penalty on the standardized features: small, to keep the fit stable where
/// features move together (the two means, the two lags) without flattening it.
const RIDGE_ALPHA: f64 = 1.0;

/// The features' names, in [`ridge_row`]'s order.
const RIDGE_FEATURES: [&str; 11] = [
    "lag_7", "lag_14", "mean_7", "mean_28", "trend", "dow_1", "dow_2", "dow_3", "dow_4", "dow_5",
    "dow_6",
];

/// The features of day `t` of `y`, from the days before it only.
fn ridge_row(y: &[f64], t: usize) -> Vec<f64> {
    let mean = |days: usize| y[t - days..t].iter().sum::<f64>() / days as f64;
    let mut row = vec![
        y[t - WEEK],
        y[t - 2 * WEEK],
        mean(WEEK),
        mean(4 * WEEK),
        t as f64,
    ];
    // Days of the week relative to the series' first day: six indicators, the seventh
    // day the base.
    row.extend((1..WEEK).map(|d| if t % WEEK == d { 1.0 } else { 0.0 }));
    row
}

fn ridge_features(history: &[f64], horizon: usize) -> Result<Fitted, MethodError> {
    let failed = |e: &dyn std::fmt::Display| MethodError::Failed {
        method: Method::RidgeFeatures.name(),
        reason: e.to_string(),
    };
    let first = RIDGE_LOOKBACK.max(history.len().saturating_sub(RIDGE_WINDOW));
    let rows: Vec<Vec<f64>> = (first..history.len())
        .map(|t| ridge_row(history, t))
        .collect();
    let targets: Vec<f64> = history[first..].to_vec();
    let x = DenseMatrix::from_2d_vec(&rows).map_err(|e| failed(&e))?;
    let model = RidgeRegression::fit(
        &x,
        &targets,
        RidgeRegressionParameters::default()
            .with_alpha(RIDGE_ALPHA)
            .with_normalize(true),
    )
    .map_err(|e| failed(&e))?;
    // One day at a time: each forecast becomes history for the next day's features.
    let mut extended = history.to_vec();
    for _ in 0..horizon {
        let row = ridge_row(&extended, extended.len());
        let x = DenseMatrix::from_2d_vec(&vec![row]).map_err(|e| failed(&e))?;
        let next = model.predict(&x).map_err(|e| failed(&e))?[0];
        extended.push(if next.is_finite() { next.max(0.0) } else { 0.0 });
    }
    let coefficients: serde_json::Map<String, Value> = RIDGE_FEATURES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            use smartcore::linalg::basic::arrays::Array;
            (
                (*name).to_owned(),
                json!(model.coefficients().get((i, 0)).to_owned()),
            )
        })
        .collect();
    Ok(Fitted {
        point: extended[history.len()..].to_vec(),
        params: json!({
            "alpha": RIDGE_ALPHA,
            "standardized": true,
            "rows": rows.len(),
            "intercept": model.intercept(),
            "coefficients": coefficients,
        }),
    })
}

//! Quiver's batch jobs: demand forecasts, stock-out risk and anomaly flags, read through
//! SQL and written back as Delta tables.
//!
//! - [`demand`]: the forecast of one daily demand series (method chosen by
//!   rolling-origin backtest, fallbacks for histories no model fits, intervals from the
//!   backtest's errors);
//! - [`stockout`]: the stock-out risk of one series from its forecast and stock on hand;
//! - [`anomaly`]: points outside their expected band (robust STL, median-absolute-
//!   deviation scores) and series unlike their peers (augurs' DBSCAN detector);
//! - [`job`]: the jobs that read the streams, run the above over every series and write
//!   the result tables, each run recorded in `model_runs`;
//! - [`progress`]: how far a job has got, and its cancellation.

pub mod anomaly;
pub mod demand;
pub mod job;
pub mod progress;
pub mod stockout;
pub mod synthetic;

/// The tables the jobs write.
pub const OUTPUT_TABLES: [&str; 5] = [
    "forecasts",
    "forecast_models",
    "stockout_risk",
    "anomalies",
    "model_runs",
];

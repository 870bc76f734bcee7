//! Quiver's batch jobs: demand forecasts, stock-out risk and anomaly flags, read through
//! SQL and written back as Delta tables.
//!
//! Built so far: [`demand`], the forecast of one daily demand series (method chosen by
//! rolling-origin backtest, fallbacks for histories no model fits, intervals from the
//! backtest's errors), and [`stockout`], the stock-out risk of one series from its
//! forecast and stock on hand, and [`anomaly`], points outside their expected band
//! (robust STL, median-absolute-deviation scores). The job runner that reads order lines, forecasts every
//! (sku, warehouse_id) and writes the output tables comes next.

pub mod anomaly;
pub mod demand;
pub mod job;
pub mod stockout;
pub mod synthetic;

/// The tables the forecast jobs write, reserved in the catalog.
pub const OUTPUT_TABLES: [&str; 4] = ["forecasts", "stockout_risk", "anomalies", "model_runs"];

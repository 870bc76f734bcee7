//! Quiver's batch jobs: demand forecasts, stock-out risk and anomaly flags, read through
//! SQL and written back as Delta tables.
//!
//! Nothing is built here yet; the crate exists so the workspace has its final shape and
//! the engine's public face is checked against a second consumer.

/// The names of the job outputs this crate will write, reserved in the catalog.
pub const RESERVED_OUTPUTS: [&str; 3] = ["demand_forecast", "stockout_risk", "anomalies"];

//! Quiver's network surfaces and the `quiver` binary.
//!
//! [`RunningServer`] binds HTTP, loads tokens, and recovers the engine in the
//! background (`/ready` turns 200 when done). Handlers authenticate with bearer tokens
//! ([`auth`]), decode bodies with `quiver-ingest`, and hand batches to the engine, which
//! answers once they are durable. `POST /v1/sql` (`sql`) runs read-only SQL on the
//! engine's query runtime and streams the result as JSON, NDJSON, CSV, Arrow or Parquet. [`cli`] holds the `demo`, `generate`, `load` and
//! `token` commands.

mod alerts;
pub mod auth;
mod backups;
pub mod cli;
pub mod config;
mod dashboards;
mod edge;
mod error;
mod flight;
mod jobs;
mod memory;
mod pg;
mod push;
mod reports;
mod routes;
mod schedule;
mod server;
mod service;
mod sql;
mod state;
mod tls;
mod views;

pub use config::ServeConfig;
pub use server::RunningServer;

//! Quiver's engine: everything between an accepted event and a query answer.
//!
//! Events enter through [`Engine::ingest`] as Arrow batches. They are written to the
//! write-ahead log ([`wal`]) and fsynced in groups before the call returns, then held in
//! a per-stream live buffer. A background task flushes each buffer into the stream's
//! Delta Lake table by size or age; the commit records the highest WAL position it
//! covers as a Delta `txn` action, so replay after a crash skips what is already stored
//! and no event is stored twice. WAL segments are deleted only once every stream has
//! committed past them.
//!
//! The engine depends on no other Quiver crate.

pub mod activity;
mod admission;
pub mod alerts;
pub mod backup;
mod buffer;
pub mod catalog;
pub mod clock;
mod durable_file;
mod engine;
mod error;
mod idempotency;
pub mod mail;
pub mod metrics;
pub mod query;
mod results;
pub mod schema;
mod store;
mod table;
mod views;
pub mod wal;

pub use engine::{Engine, EngineConfig, IdempotencyKey, IngestOutcome, StreamInfo, node_id};
pub use error::{Error, Result};
pub use metrics::EngineMetrics;
pub use query::{
    Prepared, QueryError, QueryOptions, QuerySession, QuiverDdl, bind_params, cast_param,
};
pub use schema::{ColumnDef, ColumnType, Rule, StreamSchema};
pub use store::{Store, read_secret_file};
pub use table::{TableAt, TableOptions};
pub use views::{
    ChangeSet, CheckpointHolds, Maintenance, ViewInfo, ViewOptions, ViewSnapshot, Views,
};
pub use wal::WalOptions;

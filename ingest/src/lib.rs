//! Quiver's ingest side: turns request bodies into validated Arrow batches, and makes
//! realistic demo data.
//!
//! [`decode`] takes a body in one of the [`Format`]s and a stream's schema and returns
//! one batch in the stream's input schema, or an [`Error`] listing every bad row.
//! [`generator`] produces order and inventory events with daily rhythm, lifecycles and
//! late arrivals.

mod decode;
mod error;
pub mod generator;
mod value;

pub use decode::{Format, decode};
pub use error::{Error, MAX_REPORTED_ERRORS, Result, RowError};

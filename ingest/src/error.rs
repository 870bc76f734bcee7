//! Errors from decoding and validating request bodies.

use std::fmt;

/// Result alias for the ingest crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One bad value or row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RowError {
    /// 1-based row number (NDJSON: line number; JSON array: element; CSV: data row;
    /// Arrow: row across all batches). 0 means the body as a whole or the CSV header.
    pub row: usize,
    /// Column the problem is in, if it is about one column.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.column {
            Some(c) => write!(f, "row {}, column '{}': {}", self.row, c, self.reason),
            None => write!(f, "row {}: {}", self.row, self.reason),
        }
    }
}

/// Why a body was refused. Nothing of a refused body is stored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The body held no events.
    #[error("the request body holds no events")]
    Empty,
    /// Rows failed to parse or validate; `errors` lists up to the cap, `total` counts all.
    #[error("{total} problem(s) in the request body; first: {}", errors.first().map(|e| e.to_string()).unwrap_or_default())]
    Invalid {
        /// The problems found, up to [`MAX_REPORTED_ERRORS`].
        errors: Vec<RowError>,
        /// How many problems there were in all.
        total: usize,
    },
    /// The body cannot be read at all in the declared format.
    #[error("malformed {format} body: {message}")]
    Malformed {
        /// Format name.
        format: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// The most row errors listed in one answer.
pub const MAX_REPORTED_ERRORS: usize = 1000;

/// Collects row errors up to the cap.
#[derive(Debug, Default)]
pub(crate) struct Problems {
    pub(crate) errors: Vec<RowError>,
    pub(crate) total: usize,
}

impl Problems {
    pub(crate) fn push(
        &mut self,
        row: usize,
        column: Option<&str>,
        reason: impl std::fmt::Display,
    ) {
        self.total += 1;
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(RowError {
                row,
                column: column.map(str::to_owned),
                reason: reason.to_string(),
            });
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.total == 0
    }

    pub(crate) fn into_result<T>(self, ok: T) -> Result<T> {
        if self.total == 0 {
            Ok(ok)
        } else {
            let mut errors = self.errors;
            errors.sort_by_key(|e| e.row);
            Err(Error::Invalid {
                errors,
                total: self.total,
            })
        }
    }
}

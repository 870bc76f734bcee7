//! The engine's error type.

use std::io;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside the engine.
///
/// [`Error::is_user_error`] separates mistakes in what a caller sent from faults of
/// the server or its storage, so the API can answer each with the right status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The named stream does not exist.
    #[error("unknown stream '{0}'")]
    UnknownStream(String),

    /// Something of that name exists already.
    #[error("{0}")]
    AlreadyExists(String),

    /// A batch does not match the stream's schema.
    #[error("schema mismatch for stream '{stream}': {message}")]
    SchemaMismatch {
        /// The stream written to.
        stream: String,
        /// What differs.
        message: String,
    },

    /// An idempotency key was reused for a different request body.
    #[error("Idempotency-Key '{0}' was already used for a different request body")]
    IdempotencyConflict(String),

    /// The server cannot take more writes right now (buffer full, disk full, shutting
    /// down); the caller should retry after `retry_after_secs`.
    #[error("{reason}")]
    Unavailable {
        /// Why the write was refused.
        reason: String,
        /// Suggested wait before a retry.
        retry_after_secs: u64,
    },

    /// What the caller sent is larger than the server can store in one piece.
    #[error(
        "{what} take {bytes} bytes once encoded, more than the {limit}-byte limit of one write-ahead log record; send them in smaller requests"
    )]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its encoded size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },

    /// The write-ahead log could not be written or read.
    #[error("write-ahead log: {0}")]
    Wal(String),

    /// A configuration value is invalid.
    #[error("configuration: {0}")]
    Config(String),

    /// An I/O failure.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),

    /// Arrow failed to build or encode a batch.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),

    /// A Delta Lake operation failed.
    #[error("delta lake: {0}")]
    Delta(#[from] deltalake::DeltaTableError),

    /// The object store failed.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),

    /// DataFusion failed.
    #[error("datafusion: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),

    /// A fault of the engine itself (a worker thread panicked).
    #[error("internal: {0}")]
    Internal(&'static str),

    /// JSON (de)serialisation of engine metadata failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// True when the error was caused by what the caller sent rather than by the server.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Self::UnknownStream(_)
                | Self::SchemaMismatch { .. }
                | Self::IdempotencyConflict(_)
                | Self::AlreadyExists(_)
                | Self::TooLarge { .. }
        )
    }

    /// Whether an I/O error means the disk is full.
    pub(crate) fn is_disk_full(err: &io::Error) -> bool {
        err.raw_os_error() == Some(libc::ENOSPC) || err.kind() == io::ErrorKind::StorageFull
    }
}

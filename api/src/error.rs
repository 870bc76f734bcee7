//! The API's one error type, and the one place each kind of failure is mapped to what
//! every surface says: an HTTP status (and `{"error": {code, message, details}}`), a
//! Postgres SQLSTATE, a gRPC status code.
//!
//! User errors say exactly what was wrong. Internal errors are logged with their detail
//! and answered with a generic message.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use quiver_engine::QueryError;
use serde_json::{Value, json};
use tracing::error;

/// Result alias for handlers.
pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// What kind of failure an error is. Each kind is mapped once, below, for every surface;
/// the error's `code` names the particular failure within its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// The request is malformed or a value in it is wrong.
    Invalid,
    /// The SQL does not parse or plan.
    InvalidSql,
    /// A type or feature the surface does not support.
    Unsupported,
    /// No valid credentials.
    Unauthorized,
    /// Valid credentials without the scope needed.
    Forbidden,
    /// A statement no one may run (DML, `COPY`, `SET`, ...).
    NotAllowed,
    /// The named stream, view or token does not exist.
    NotFound,
    /// Something of that name exists already, or something depends on it.
    Conflict,
    /// An idempotency key reused for a different body.
    KeyReused,
    /// The request is larger than a limit.
    TooLarge,
    /// A body in a format not accepted.
    UnsupportedMediaType,
    /// Over the rate limit of the token.
    RateLimited,
    /// The query ran past its deadline.
    QueryTimeout,
    /// The query needed more memory than its limit.
    MemoryLimit,
    /// The result was larger than its limit.
    ResultTooLarge,
    /// Every query slot is taken.
    Busy,
    /// The server cannot take this now (recovering, shutting down, disk full).
    Unavailable,
    /// A fault of the server.
    Internal,
}

impl ErrorKind {
    /// The HTTP status.
    pub(crate) fn http_status(self) -> StatusCode {
        match self {
            Self::Invalid
            | Self::InvalidSql
            | Self::Unsupported
            | Self::QueryTimeout
            | Self::MemoryLimit
            | Self::ResultTooLarge => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden | Self::NotAllowed => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Conflict => StatusCode::CONFLICT,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Busy | Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The Postgres SQLSTATE a client can act on.
    pub(crate) fn sqlstate(self) -> &'static str {
        match self {
            Self::Invalid | Self::KeyReused => "22023",
            Self::InvalidSql => "42601",
            Self::Unsupported | Self::UnsupportedMediaType => "0A000",
            Self::Unauthorized => "28000",
            Self::Forbidden => "42501",
            Self::NotAllowed => "25006",
            Self::NotFound => "42P01",
            Self::Conflict => "42P07",
            Self::TooLarge | Self::ResultTooLarge => "54000",
            Self::RateLimited | Self::Busy => "53300",
            Self::QueryTimeout => "57014",
            Self::MemoryLimit => "53200",
            Self::Unavailable => "57P03",
            Self::Internal => "XX000",
        }
    }

    /// The gRPC status code (Flight SQL).
    pub(crate) fn grpc_code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Invalid | Self::InvalidSql | Self::UnsupportedMediaType => Code::InvalidArgument,
            Self::Unsupported => Code::Unimplemented,
            Self::Unauthorized => Code::Unauthenticated,
            Self::Forbidden | Self::NotAllowed => Code::PermissionDenied,
            Self::NotFound => Code::NotFound,
            Self::Conflict => Code::AlreadyExists,
            Self::KeyReused => Code::FailedPrecondition,
            Self::TooLarge
            | Self::ResultTooLarge
            | Self::MemoryLimit
            | Self::RateLimited
            | Self::Busy => Code::ResourceExhausted,
            Self::QueryTimeout => Code::DeadlineExceeded,
            Self::Unavailable => Code::Unavailable,
            Self::Internal => Code::Internal,
        }
    }
}

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) kind: ErrorKind,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) details: Vec<Value>,
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
            details: Vec::new(),
            retry_after: None,
        }
    }

    pub(crate) fn with_details(mut self, details: Vec<Value>) -> Self {
        self.details = details;
        self
    }

    pub(crate) fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthorized, "unauthorized", message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, "forbidden", message)
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, code, message)
    }

    pub(crate) fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, code, message)
    }

    pub(crate) fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        Self::new(ErrorKind::Unavailable, "unavailable", message).retry_after(retry_after)
    }

    /// An internal fault: logged in full, answered generically.
    pub(crate) fn internal(context: &str, err: &dyn std::fmt::Display) -> Self {
        error!(error = %err, context, "internal error");
        Self::new(
            ErrorKind::Internal,
            "internal",
            format!("internal error while {context}; see the server log"),
        )
    }

    /// The HTTP status of this error.
    pub(crate) fn status(&self) -> StatusCode {
        self.kind.http_status()
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        let kind = match e {
            QueryError::Invalid(_) => ErrorKind::InvalidSql,
            QueryError::NotAllowed(_) => ErrorKind::NotAllowed,
            QueryError::MemoryLimit(_) => ErrorKind::MemoryLimit,
            QueryError::ResultTooLarge(_) => ErrorKind::ResultTooLarge,
            QueryError::Timeout(_) => ErrorKind::QueryTimeout,
            QueryError::Conflict(_) => ErrorKind::Conflict,
            QueryError::NotFound(_) => ErrorKind::NotFound,
            QueryError::Internal(_) => return Self::internal("running a query", &e),
        };
        Self::new(kind, e.code(), e.to_string())
    }
}

impl From<quiver_engine::Error> for ApiError {
    fn from(e: quiver_engine::Error) -> Self {
        use quiver_engine::Error as E;
        match e {
            E::UnknownStream(s) => {
                Self::not_found("unknown_stream", format!("unknown stream '{s}'"))
            }
            E::IdempotencyConflict(_) => Self::new(
                ErrorKind::KeyReused,
                "idempotency_key_reused",
                e.to_string(),
            ),
            E::SchemaMismatch { .. } => Self::bad_request("schema_mismatch", e.to_string()),
            E::TooLarge { .. } => {
                Self::new(ErrorKind::TooLarge, "payload_too_large", e.to_string())
            }
            E::AlreadyExists(m) => Self::new(ErrorKind::Conflict, "already_exists", m),
            E::Unavailable {
                reason,
                retry_after_secs,
            } => Self::unavailable(reason, retry_after_secs),
            other => Self::internal("storing events", &other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "details": self.details,
            }
        });
        let mut resp = (self.status(), axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each surface's answer for a failure comes from its kind alone.
    #[test]
    fn a_kind_maps_to_one_answer_on_every_surface() {
        let cases = [
            (
                QueryError::Timeout(std::time::Duration::from_secs(1)),
                400,
                "57014",
                tonic::Code::DeadlineExceeded,
            ),
            (
                QueryError::NotAllowed("COPY".into()),
                403,
                "25006",
                tonic::Code::PermissionDenied,
            ),
            (
                QueryError::Invalid("syntax".into()),
                400,
                "42601",
                tonic::Code::InvalidArgument,
            ),
            (
                QueryError::MemoryLimit("pool".into()),
                400,
                "53200",
                tonic::Code::ResourceExhausted,
            ),
            (
                QueryError::NotFound("view".into()),
                404,
                "42P01",
                tonic::Code::NotFound,
            ),
            (
                QueryError::Conflict("exists".into()),
                409,
                "42P07",
                tonic::Code::AlreadyExists,
            ),
        ];
        for (error, status, sqlstate, grpc) in cases {
            let code = error.code();
            let e = ApiError::from(error);
            assert_eq!(e.code, code);
            assert_eq!(e.status().as_u16(), status, "{code}");
            assert_eq!(e.kind.sqlstate(), sqlstate, "{code}");
            assert_eq!(e.kind.grpc_code(), grpc, "{code}");
        }
        let full = ApiError::from(quiver_engine::Error::TooLarge {
            what: "the events".into(),
            bytes: 2,
            limit: 1,
        });
        assert_eq!(
            (full.status().as_u16(), full.code, full.kind.sqlstate()),
            (413, "payload_too_large", "54000")
        );
        let internal = ApiError::from(QueryError::Internal("boom".into()));
        assert_eq!(internal.status().as_u16(), 500);
        assert!(
            !internal.message.contains("boom"),
            "internal detail is not answered"
        );
    }
}

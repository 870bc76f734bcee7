//! `POST /v1/sql`: one statement per request, its result streamed in the chosen format.
//!
//! The query runs on the engine's query runtime and hands encoded chunks to the
//! response through a small channel, so a slow reader slows only its own query. The
//! first megabyte is held back before the status is sent: most failures (planning,
//! memory, a timeout of a short query) still get a proper error status. A failure after
//! that ends a JSON or NDJSON body with an error member or line, and aborts a CSV, Arrow
//! or Parquet transfer, so a cut-short result is never mistaken for a whole one.

pub(crate) mod encode;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::LogicalPlan;
use futures::StreamExt;
use quiver_engine::metrics::OutcomeLabel;
use quiver_engine::{Engine, Prepared, QueryError, QuerySession, QuiverDdl};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::auth::{Principal, Scope};
use crate::error::{ApiError, ApiResult};
use crate::service::{DdlOutcome, Slot, execute_ddl, take_slot};
use crate::state::AppState;
use encode::{ResultEncoder, ResultFormat};

/// Bytes of a result held back before the status line is sent.
const HOLD_BACK_BYTES: usize = 1 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    sql: String,
    #[serde(default)]
    params: Vec<Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct SqlQuery {
    format: Option<String>,
}

/// What the query task hands the response.
enum Chunk {
    Data(Bytes),
    End,
    Failed {
        error: QueryError,
        trailer: Option<Bytes>,
    },
}

pub(crate) async fn sql(
    State(state): State<Arc<AppState>>,
    Query(query): Query<SqlQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Read)?;
    let format_name = query.format.as_deref().unwrap_or("json");
    let format = ResultFormat::parse(format_name).ok_or_else(|| {
        ApiError::bad_request(
            "unknown_format",
            format!("unknown format '{format_name}'; use json, ndjson, csv, arrow or parquet"),
        )
    })?;
    let request = parse_request(&headers, &body)?;
    let params = request
        .params
        .iter()
        .enumerate()
        .map(|(i, v)| json_param(i, v))
        .collect::<ApiResult<Vec<_>>>()?;
    let engine = state
        .engine
        .get()
        .ok_or_else(|| ApiError::unavailable("recovering the write-ahead log", 1))?;
    let started = Instant::now();
    let slot = take_slot(&state).await?;
    let session = engine.query_session();
    // The query's deadline covers planning too (a statement can be slow to plan).
    let deadline = tokio::time::Instant::from_std(started) + engine.query_options().timeout;
    let planned = tokio::time::timeout_at(
        deadline,
        session.prepare_holding(&request.sql, &params, slot),
    )
    .await
    .unwrap_or_else(|_| Err(QueryError::Timeout(engine.query_options().timeout)));
    let result = match planned {
        Err(e) => Err(ApiError::from(e)),
        Ok((Prepared::Ddl(ddl), _slot)) => run_ddl(engine, &state.reports, &principal, ddl).await,
        Ok((Prepared::Query(plan), slot)) => {
            run_query(&state, engine, session, *plan, format, deadline, slot).await
        }
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.code,
    };
    state
        .metrics
        .sql_queries_total
        .get_or_create(&OutcomeLabel {
            outcome: outcome.to_owned(),
        })
        .inc();
    result
}

/// The body is `{"sql": "...", "params": [...]}`, or plain SQL text with a
/// `text/plain` or `application/sql` content type.
fn parse_request(headers: &HeaderMap, body: &[u8]) -> ApiResult<SqlRequest> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if content_type.starts_with("text/plain") || content_type.starts_with("application/sql") {
        let sql = std::str::from_utf8(body)
            .map_err(|_| ApiError::bad_request("bad_request", "the SQL text is not UTF-8"))?;
        return Ok(SqlRequest {
            sql: sql.to_owned(),
            params: Vec::new(),
        });
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "bad_request",
            format!("expected a JSON body {{\"sql\": \"...\", \"params\": [...]}}: {e}"),
        )
    })
}

/// A JSON parameter as a SQL value; it is converted to the placeholder's type later.
pub(crate) fn json_param(index: usize, value: &Value) -> ApiResult<ScalarValue> {
    Ok(match value {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(Some(*b)),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => ScalarValue::Int64(Some(i)),
            (None, Some(f)) => ScalarValue::Float64(Some(f)),
            _ => {
                return Err(ApiError::bad_request(
                    "bad_parameter",
                    format!("parameter ${}: {n} is out of range", index + 1),
                ));
            }
        },
        Value::String(s) => ScalarValue::Utf8(Some(s.clone())),
        Value::Array(_) | Value::Object(_) => {
            return Err(ApiError::bad_request(
                "bad_parameter",
                format!(
                    "parameter ${}: only null, booleans, numbers and strings can be bound",
                    index + 1
                ),
            ));
        }
    })
}

async fn run_ddl(
    engine: &Engine,
    reports: &crate::reports::Reports,
    principal: &Principal,
    ddl: QuiverDdl,
) -> ApiResult<Response> {
    Ok(match execute_ddl(engine, reports, principal, ddl).await? {
        DdlOutcome::Done { status, body, .. } => (status, Json(body)).into_response(),
        DdlOutcome::Plan(lines) => {
            let rows: Vec<Value> = lines.into_iter().map(|l| json!([l])).collect();
            Json(json!({
                "columns": [{"name": "plan", "type": "TEXT"}],
                "rows": rows,
            }))
            .into_response()
        }
    })
}

async fn run_query(
    state: &AppState,
    engine: &Engine,
    session: QuerySession,
    plan: LogicalPlan,
    format: ResultFormat,
    deadline: tokio::time::Instant,
    slot: Slot,
) -> ApiResult<Response> {
    let timeout = engine.query_options().timeout;
    let started = (deadline - timeout).into_std();
    let max_bytes = state.config.max_result_bytes;
    let (tx, mut rx) = mpsc::channel::<Chunk>(4);
    let schema = Arc::clone(plan.schema().inner());
    let task = engine.query_runtime().spawn(async move {
        let mut encoder: Option<ResultEncoder> = None;
        let work = produce(&session, plan, format, max_bytes, &tx, &mut encoder);
        let last = match tokio::time::timeout_at(deadline, work).await {
            Ok(Ok(true)) => Some(Chunk::End),
            // The reader has gone.
            Ok(Ok(false)) => None,
            Ok(Err(error)) => Some(failed(error, encoder.as_ref())),
            Err(_) => Some(failed(QueryError::Timeout(timeout), encoder.as_ref())),
        };
        // The slot is free before the client can see the end of its result.
        drop(slot);
        if let Some(last) = last {
            let _ = tx.send(last).await;
        }
    });
    // A query that never yields cannot see its own deadline; the response side keeps one
    // too, and cancels the task.
    let abort = task.abort_handle();
    let guard_deadline = deadline + Duration::from_secs(1);

    let mut head: Vec<Bytes> = Vec::new();
    let mut held = 0;
    loop {
        let next = tokio::time::timeout_at(guard_deadline, rx.recv()).await;
        match next {
            Err(_) => {
                abort.abort();
                return Err(ApiError::from(QueryError::Timeout(timeout)));
            }
            Ok(Some(Chunk::Data(b))) => {
                held += b.len();
                head.push(b);
                if held >= HOLD_BACK_BYTES {
                    break;
                }
            }
            Ok(Some(Chunk::End)) => {
                observe(state, started);
                let body: Vec<u8> = head.concat();
                return Ok(ok_response(format, schema.fields().len(), Body::from(body)));
            }
            Ok(Some(Chunk::Failed { error, .. })) => return Err(ApiError::from(error)),
            Ok(None) => {
                return Err(ApiError::internal(
                    "running a query",
                    &"the query task ended without a result",
                ));
            }
        }
    }

    let metrics = Arc::clone(&state.metrics);
    let rest = futures::stream::unfold(Some((rx, abort)), move |st| {
        let metrics = Arc::clone(&metrics);
        async move {
            let (mut rx, abort) = st?;
            let item = match tokio::time::timeout_at(guard_deadline, rx.recv()).await {
                Ok(Some(Chunk::Data(b))) => Ok(b),
                Ok(Some(Chunk::End)) => {
                    metrics
                        .sql_query_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return None;
                }
                Ok(Some(Chunk::Failed {
                    trailer: Some(t), ..
                })) => return Some((Ok(t), None)),
                Ok(Some(Chunk::Failed { error, .. })) => {
                    Err(std::io::Error::other(error.to_string()))
                }
                Ok(None) => Err(std::io::Error::other("the query task ended early")),
                Err(_) => {
                    abort.abort();
                    Err(std::io::Error::other("the query ran past its time limit"))
                }
            };
            match item {
                Ok(b) => Some((Ok(b), Some((rx, abort)))),
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    let body = futures::stream::iter(head.into_iter().map(Ok::<_, std::io::Error>)).chain(rest);
    Ok(ok_response(
        format,
        schema.fields().len(),
        Body::from_stream(body),
    ))
}

fn observe(state: &AppState, started: Instant) {
    state
        .metrics
        .sql_query_seconds
        .observe(started.elapsed().as_secs_f64());
}

fn ok_response(format: ResultFormat, columns: usize, body: Body) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(format.content_type()),
    );
    if let Ok(v) = header::HeaderValue::from_str(&columns.to_string()) {
        headers.insert("quiver-columns", v);
    }
    resp
}

fn failed(error: QueryError, encoder: Option<&ResultEncoder>) -> Chunk {
    let trailer = encoder.and_then(|enc| enc.fail(&error));
    Chunk::Failed { error, trailer }
}

/// Runs the query and sends its encoded result, all but the end marker. False when the
/// reader has gone.
async fn produce(
    session: &QuerySession,
    plan: LogicalPlan,
    format: ResultFormat,
    max_bytes: usize,
    tx: &mpsc::Sender<Chunk>,
    encoder: &mut Option<ResultEncoder>,
) -> Result<bool, QueryError> {
    let arrow_err =
        |e: arrow::error::ArrowError| QueryError::Internal(format!("encoding the result: {e}"));
    let mut stream = session.execute(plan).await?;
    let (enc, head) = ResultEncoder::start(format, stream.schema()).map_err(arrow_err)?;
    let enc = encoder.insert(enc);
    let mut sent = head.len();
    if !head.is_empty() && tx.send(Chunk::Data(head)).await.is_err() {
        return Ok(false);
    }
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let bytes = enc.batch(&batch).map_err(arrow_err)?;
        sent += bytes.len();
        if sent > max_bytes {
            return Err(QueryError::ResultTooLarge(format!(
                "the result is larger than the {max_bytes}-byte limit; add a LIMIT or aggregate"
            )));
        }
        if !bytes.is_empty() && tx.send(Chunk::Data(bytes)).await.is_err() {
            return Ok(false);
        }
    }
    let tail = enc.finish().map_err(arrow_err)?;
    if !tail.is_empty() && tx.send(Chunk::Data(tail)).await.is_err() {
        return Ok(false);
    }
    Ok(true)
}

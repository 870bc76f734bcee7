//! HTTP handlers.

use std::sync::Arc;

use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use quiver_engine::metrics::{RejectLabel, stream_label};
use quiver_engine::{IdempotencyKey, IngestOutcome};
use quiver_ingest::Format;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::auth::Scope;
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::state::AppState;

type AppStateRef = State<Arc<AppState>>;

/// Bodies larger than this are decoded off the async workers.
const INLINE_DECODE_BYTES: usize = 1 << 20;

pub(crate) async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub(crate) async fn ready(State(state): AppStateRef) -> Response {
    match state.engine.get() {
        Some(e) if e.is_accepting() => Json(json!({"status": "ready"})).into_response(),
        Some(_) => ApiError::unavailable("shutting down", 5).into_response(),
        None => ApiError::unavailable("recovering the write-ahead log", 1).into_response(),
    }
}

pub(crate) async fn metrics(State(state): AppStateRef, headers: HeaderMap) -> ApiResult<Response> {
    if state.config.metrics_auth {
        state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    }
    state.memory.refresh();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &state.registry)
        .map_err(|e| ApiError::internal("encoding metrics", &e))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such endpoint")
}

pub(crate) async fn list_streams(
    State(state): AppStateRef,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    let engine = state.ready_engine()?;
    let streams: Vec<Value> = engine
        .streams()
        .await
        .into_iter()
        .map(|s| {
            let columns: Vec<Value> = s
                .schema
                .columns()
                .iter()
                .map(|c| json!({"name": c.name, "type": c.ty.arrow_type().to_string(), "required": c.required}))
                .collect();
            json!({
                "name": s.schema.name(),
                "columns": columns,
                "partition_by": [quiver_engine::schema::PARTITION_COLUMN],
                "rows": s.stored_events + s.buffered_events as u64,
                "stored_events": s.stored_events,
                "buffered_events": s.buffered_events,
                "files": s.files,
                "table_version": s.table_version,
                "table": s.table_url,
            })
        })
        .collect();
    Ok(Json(Value::Array(streams)))
}

/// Counts a refused ingest request by reason.
fn reject(state: &AppState, stream: &str, err: ApiError) -> ApiError {
    state
        .metrics
        .ingest_rejects_total
        .get_or_create(&RejectLabel {
            stream: stream.to_owned(),
            reason: err.code.to_owned(),
        })
        .inc();
    err
}

pub(crate) async fn ingest(
    State(state): AppStateRef,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    ingest_inner(&state, &stream, &headers, body)
        .await
        .map_err(|e| reject(&state, &stream, e))
}

async fn ingest_inner(
    state: &AppState,
    stream: &str,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let principal = state.tokens.authenticate(headers)?;
    principal.require(Scope::Ingest)?;
    if let Some(limiter) = &state.rate_limiter
        && limiter.check_key(&principal.token_id).is_err()
    {
        return Err(ApiError::new(
            ErrorKind::RateLimited,
            "rate_limited",
            format!(
                "more than {} ingest requests per second for this token",
                state.config.ingest_rate_limit
            ),
        )
        .retry_after(1));
    }
    let engine = state.ready_engine()?;
    let schema = engine.stream_schema(stream).ok_or_else(|| {
        ApiError::not_found("unknown_stream", format!("unknown stream '{stream}'"))
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = Format::from_content_type(content_type).ok_or_else(|| {
        ApiError::new(
            ErrorKind::UnsupportedMediaType,
            "unsupported_media_type",
            format!(
                "Content-Type '{content_type}' is not accepted; use application/x-ndjson, application/json, text/csv or application/vnd.apache.arrow.stream"
            ),
        )
    })?;
    let limit = state.config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            ErrorKind::TooLarge,
            "payload_too_large",
            format!("the request body is larger than the {limit}-byte limit"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && len > limit
    {
        return Err(too_large());
    }
    let bytes = to_bytes(body, limit).await.map_err(|e| {
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return too_large();
            }
            source = s.source();
        }
        ApiError::bad_request(
            "body_read_failed",
            format!("could not read the request body: {e}"),
        )
    })?;

    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "bad_idempotency_key",
                        "Idempotency-Key must be 1 to 255 visible characters",
                    )
                })?;
            let mut h = Sha256::new();
            h.update(format.name().as_bytes());
            h.update(&bytes);
            Some(IdempotencyKey {
                key: key.to_owned(),
                fingerprint: hex::encode(h.finalize()),
            })
        }
    };

    let body_len = bytes.len();
    let decoded = if body_len > INLINE_DECODE_BYTES {
        let schema = schema.clone();
        tokio::task::spawn_blocking(move || quiver_ingest::decode(&schema, format, &bytes))
            .await
            .map_err(|e| ApiError::internal("decoding the body", &e))?
    } else {
        quiver_ingest::decode(&schema, format, &bytes)
    };
    let batch = decoded.map_err(|e| decode_error(state, stream, e))?;

    let outcome = engine.ingest(stream, batch, key).await?;
    let (accepted, replayed) = match outcome {
        IngestOutcome::Accepted(n) => {
            state
                .metrics
                .ingest_bytes_total
                .get_or_create(&stream_label(stream))
                .inc_by(body_len as u64);
            (n, false)
        }
        IngestOutcome::Replayed(n) => (n, true),
    };
    let mut resp = Json(json!({"accepted": accepted})).into_response();
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

fn decode_error(state: &AppState, stream: &str, e: quiver_ingest::Error) -> ApiError {
    match e {
        quiver_ingest::Error::Empty => ApiError::bad_request("empty_body", e.to_string()),
        quiver_ingest::Error::Malformed { .. } => {
            ApiError::bad_request("malformed_body", e.to_string())
        }
        quiver_ingest::Error::Invalid { ref errors, total } => {
            state
                .metrics
                .ingest_rejected_rows_total
                .get_or_create(&stream_label(stream))
                .inc_by(total as u64);
            let details = errors
                .iter()
                .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
                .collect();
            let shown = errors.len();
            let message = if shown < total {
                format!(
                    "{total} problems in the request body (first {shown} listed); nothing was stored"
                )
            } else {
                format!("{total} problem(s) in the request body; nothing was stored")
            };
            ApiError::bad_request("invalid_rows", message).with_details(details)
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateToken {
    name: String,
    scopes: Vec<Scope>,
    /// Lifetime, e.g. "90days" (none: until deleted).
    #[serde(default)]
    ttl: Option<String>,
}

/// A lifetime like "90days" or "1h"; the error names the field.
fn lifetime(field: &str, text: Option<&str>) -> ApiResult<Option<std::time::Duration>> {
    let Some(text) = text else { return Ok(None) };
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(Some(d)),
        Ok(_) => Err(ApiError::bad_request(
            "bad_request",
            format!("{field} must be longer than zero"),
        )),
        Err(e) => Err(ApiError::bad_request(
            "bad_request",
            format!("{field} '{text}' is not a duration like \"90days\" or \"12h\": {e}"),
        )),
    }
}

pub(crate) async fn create_token(
    State(state): AppStateRef,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Admin)?;
    let req: CreateToken = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "bad_request",
            format!(
                "expected {{\"name\": \"...\", \"scopes\": [\"read\"|\"ingest\"|\"admin\"], \"ttl\": \"90days\" (optional)}}: {e}"
            ),
        )
    })?;
    if req.scopes.is_empty() || req.name.trim().is_empty() {
        return Err(ApiError::bad_request(
            "bad_request",
            "a token needs a name and at least one scope",
        ));
    }
    let ttl = lifetime("ttl", req.ttl.as_deref())?;
    let made = state
        .tokens
        .create(req.name.trim(), req.scopes, ttl)
        .await
        .map_err(|e| ApiError::internal("saving the token", &e))?;
    if let Some(engine) = state.engine.get() {
        engine
            .activity()
            .record(&principal.name, "create", "token", req.name.trim())
            .await;
    }
    Ok((StatusCode::CREATED, Json(json!(made))).into_response())
}

pub(crate) async fn list_tokens(
    State(state): AppStateRef,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Admin)?;
    let list: Vec<Value> = state
        .tokens
        .list()
        .into_iter()
        .map(
            |t| json!({"id": t.id, "name": t.name, "scopes": t.scopes, "created_at": t.created_at, "expires_at": t.expires_at}),
        )
        .collect();
    Ok(Json(Value::Array(list)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateToken {
    /// How long the old token keeps working (default one hour).
    #[serde(default)]
    grace: Option<String>,
    /// Lifetime of the new token (default: none).
    #[serde(default)]
    ttl: Option<String>,
}

/// `POST /v1/tokens/{id}/rotate`: a new token with the old one's name and scopes; the
/// old one keeps working for the grace period, so clients can switch without downtime.
pub(crate) async fn rotate_token(
    State(state): AppStateRef,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Admin)?;
    let req: RotateToken = if body.iter().all(u8::is_ascii_whitespace) {
        RotateToken::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "bad_request",
                format!("expected {{\"grace\": \"1h\", \"ttl\": \"90days\"}} (both optional): {e}"),
            )
        })?
    };
    let grace =
        lifetime("grace", req.grace.as_deref())?.unwrap_or(std::time::Duration::from_secs(3600));
    let ttl = lifetime("ttl", req.ttl.as_deref())?;
    let rotated = state
        .tokens
        .rotate(&id, grace, ttl)
        .await
        .map_err(|e| ApiError::internal("saving the tokens", &e))?
        .ok_or_else(|| ApiError::not_found("unknown_token", format!("no token with id '{id}'")))?;
    if let Some(engine) = state.engine.get() {
        engine
            .activity()
            .record(&principal.name, "rotate", "token", &id)
            .await;
    }
    Ok((StatusCode::CREATED, Json(json!(rotated))).into_response())
}

pub(crate) async fn delete_token(
    State(state): AppStateRef,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Admin)?;
    let removed = state
        .tokens
        .delete(&id)
        .await
        .map_err(|e| ApiError::internal("deleting the token", &e))?;
    if removed {
        if let Some(engine) = state.engine.get() {
            engine
                .activity()
                .record(&principal.name, "drop", "token", &id)
                .await;
        }
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(
            "unknown_token",
            format!("no token with id '{id}'"),
        ))
    }
}

//! `GET/POST /v1/views`, `GET/DELETE /v1/views/{name}`: materialized views over HTTP.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use quiver_engine::ViewInfo;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::info;

use crate::auth::Scope;
use crate::error::{ApiError, ApiResult};
use crate::sql::encode;
use crate::state::AppState;

type AppStateRef = State<Arc<AppState>>;

/// A view as `GET /v1/views` lists it.
pub(crate) fn view_json(v: &ViewInfo) -> Value {
    let columns: Vec<Value> = v
        .schema
        .fields()
        .iter()
        .map(|f| json!({"name": f.name(), "type": encode::type_name(f.data_type())}))
        .collect();
    let mut out = json!({
        "name": v.name,
        "sql": v.sql,
        "key": v.key,
        "maintenance": v.maintenance.as_str(),
        "version": v.version,
        "lag_ms": v.lag_ms,
        "rows": v.rows,
        "state_bytes": v.state_bytes,
        "state_disk_bytes": v.state_disk_bytes,
        "reads": v.reads,
        "columns": columns,
    });
    if let Some(reason) = &v.reason {
        out["recompute_reason"] = json!(reason);
    }
    out
}

pub(crate) async fn list(State(state): AppStateRef, headers: HeaderMap) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    let views: Vec<Value> = state
        .ready_engine()?
        .views()
        .views_info()
        .iter()
        .map(view_json)
        .collect();
    Ok(Json(Value::Array(views)))
}

fn unknown(name: &str) -> ApiError {
    ApiError::not_found(
        "unknown_view",
        format!("materialized view '{name}' does not exist"),
    )
}

pub(crate) async fn get_one(
    State(state): AppStateRef,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    let engine = state.ready_engine()?;
    let info = engine
        .views()
        .view_info(&name)
        .ok_or_else(|| unknown(&name))?;
    let snapshot = engine
        .views()
        .view_snapshot(&name)
        .ok_or_else(|| unknown(&name))?
        .map_err(ApiError::from)?;
    let rows = encode::json_result(&snapshot.rows)
        .map_err(|e| ApiError::internal("encoding view rows", &e))?;
    let mut out = view_json(&info);
    out["version"] = json!(snapshot.version);
    out["rows"] = rows["rows"].clone();
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateView {
    name: String,
    sql: String,
}

pub(crate) async fn create(
    State(state): AppStateRef,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Admin)?;
    let req: CreateView = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "bad_request",
            format!("expected {{\"name\": \"...\", \"sql\": \"SELECT ...\"}}: {e}"),
        )
    })?;
    let engine = state.ready_engine()?;
    let view = engine
        .views()
        .create_view(&req.name, &req.sql, false)
        .await
        .map_err(ApiError::from)?;
    info!(view = %req.name, principal = %principal.token_id, "view created over HTTP");
    Ok((StatusCode::CREATED, Json(view_json(&view))).into_response())
}

pub(crate) async fn delete(
    State(state): AppStateRef,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Admin)?;
    state
        .ready_engine()?
        .views()
        .drop_view(&name, false)
        .await
        .map_err(ApiError::from)?;
    info!(view = %name, principal = %principal.token_id, "view dropped over HTTP");
    Ok(StatusCode::NO_CONTENT.into_response())
}

//! `/v1/reports`: definitions (admin to change, read to see), runs and their files.

use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt as _;
use object_store::ObjectStoreExt as _;
use serde_json::{Map, Value, json};

use super::{ReportDef, ReportError, Trigger};
use crate::auth::Scope;
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::state::AppState;

type AppStateRef = State<Arc<AppState>>;

impl From<ReportError> for ApiError {
    fn from(e: ReportError) -> Self {
        match e {
            ReportError::Invalid(m) => ApiError::bad_request("invalid_report", m),
            ReportError::NotFound(m) => ApiError::not_found("report_not_found", m),
            ReportError::Conflict(m) => ApiError::new(ErrorKind::Conflict, "report_exists", m),
            ReportError::Internal(m) => ApiError::internal("reports", &m),
        }
    }
}

fn parse_def(body: &[u8]) -> ApiResult<ReportDef> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_report",
            format!(
                "{e}; a report is {{\"name\", \"title\", \"queries\": [{{\"title\", \"sql\", \"chart\"}}], \
                 \"format\", \"schedule\", \"email\", \"params\"}}"
            ),
        )
    })
}

pub(crate) async fn create(
    State(state): AppStateRef,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Admin)?;
    let def = parse_def(&body)?;
    let engine = state.ready_engine()?;
    let (stored, _) = state
        .reports
        .create(engine, def, &principal.name, false)
        .await?;
    let report = state.reports.get(&stored.def.name)?;
    Ok((StatusCode::CREATED, Json(report)).into_response())
}

pub(crate) async fn replace(
    State(state): AppStateRef,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Admin)?;
    let mut value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not JSON: {e}")))?;
    match value.get("name") {
        None => {
            if let Value::Object(m) = &mut value {
                m.insert("name".into(), json!(name));
            }
        }
        Some(n) if n.as_str() == Some(name.as_str()) => {}
        Some(n) => {
            return Err(ApiError::bad_request(
                "invalid_report",
                format!("the body names report {n} but the path names '{name}'"),
            ));
        }
    }
    let def = parse_def(&serde_json::to_vec(&value).unwrap_or_default())?;
    let engine = state.ready_engine()?;
    let (_, created) = state
        .reports
        .create(engine, def, &principal.name, true)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(state.reports.get(&name)?)).into_response())
}

pub(crate) async fn list(State(state): AppStateRef, headers: HeaderMap) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    Ok(Json(json!({"reports": state.reports.list()})))
}

pub(crate) async fn get_one(
    State(state): AppStateRef,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    Ok(Json(state.reports.get(&name)?))
}

pub(crate) async fn delete(
    State(state): AppStateRef,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Admin)?;
    state.reports.delete(&name).await?;
    Ok(Json(json!({"deleted": name})))
}

/// `POST /v1/reports/{name}/run`, optionally with `{"params": {...}}` over the
/// report's own: queues a run and answers 202 with it.
pub(crate) async fn run(
    State(state): AppStateRef,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    state.ready_engine()?;
    let params = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RunBody {
            #[serde(default)]
            params: Map<String, Value>,
        }
        serde_json::from_slice::<RunBody>(&body)
            .map_err(|e| {
                ApiError::bad_request(
                    "invalid_json",
                    format!("expected {{\"params\": {{...}}}} or no body: {e}"),
                )
            })?
            .params
    };
    let run = state
        .reports
        .queue_run(&name, params, Trigger::Request)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(run.to_json())).into_response())
}

pub(crate) async fn runs(
    State(state): AppStateRef,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    let runs: Vec<Value> = state
        .reports
        .runs(&name)?
        .iter()
        .map(super::Run::to_json)
        .collect();
    Ok(Json(json!({"runs": runs})))
}

pub(crate) async fn run_one(
    State(state): AppStateRef,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    Ok(Json(state.reports.run(&name, &id)?.to_json()))
}

/// The run's file, streamed from the store, as an attachment with its file name.
pub(crate) async fn file(
    State(state): AppStateRef,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    let run = state.reports.run(&name, &id)?;
    let path = state.reports.file_path(&run)?;
    let got = state
        .reports
        .store()
        .object_store()
        .get(&path)
        .await
        .map_err(|e| match e {
            object_store::Error::NotFound { .. } => ApiError::not_found(
                "report_file_not_found",
                format!("the file of run '{id}' is gone from the store ({path})"),
            ),
            other => ApiError::internal("reading the report file", &other),
        })?;
    let size = got.meta.size;
    let body = Body::from_stream(got.into_stream().map_err(std::io::Error::other));
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(state.reports.content_type(&run)),
    );
    if let Ok(v) = HeaderValue::from_str(&size.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if let Some(file_name) = run.file_name()
        && let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\""))
    {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

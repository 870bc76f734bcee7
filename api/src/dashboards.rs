//! The dashboard: its page and assets at `/` and `/ui/…` (compiled into the binary), and
//! saved dashboards at `/v1/dashboards`:
//!
//! - `GET /v1/dashboards` (read): name, title and version of each;
//! - `GET /v1/dashboards/{name}` (read): `{"name", "title", "version", "tiles": [...]}`;
//! - `PUT /v1/dashboards/{name}` (admin): `{"title", "tiles", "version"?}`; with a
//!   `version`, the write is refused (409) unless it is the version stored, so two
//!   editors never silently overwrite each other;
//! - `DELETE /v1/dashboards/{name}` (admin).
//!
//! Dashboards are a catalog document (`dashboards`) in the store. The built-in
//! "Operations" dashboard (`dashboard/operations.json`) is there from the start as
//! version 0; saving one named `operations` replaces it, deleting that brings it back.
//! A tile is `{"type": "value" | "timeseries" | "table", "view": …}` or with `"sql"`
//! instead of `"view"` (re-run every `refresh_s` seconds).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use quiver_engine::catalog::Document;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::Scope;
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::state::AppState;

type AppStateRef = State<Arc<AppState>>;

/// The built-in dashboard.
const OPERATIONS: &str = include_str!("../dashboard/operations.json");
const BUILTIN: &str = "operations";

/// A saved dashboard.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    name: String,
    title: String,
    version: u64,
    tiles: Vec<Value>,
    updated_at: String,
    updated_by: String,
}

fn builtin() -> Saved {
    let v: Value = serde_json::from_str(OPERATIONS).expect("the built-in dashboard is JSON");
    Saved {
        name: BUILTIN.into(),
        title: v["title"].as_str().unwrap_or("Operations").to_owned(),
        version: 0,
        tiles: v["tiles"].as_array().cloned().unwrap_or_default(),
        updated_at: String::new(),
        updated_by: "quiver".into(),
    }
}

fn document(state: &AppState) -> ApiResult<Document<Vec<Saved>>> {
    let engine = state.ready_engine()?;
    Ok(Document::new(
        engine.store(),
        "dashboards",
        None,
        engine.node_id(),
    ))
}

async fn all(state: &AppState) -> ApiResult<Vec<Saved>> {
    let mut list = document(state)?
        .read()
        .await
        .map_err(|e| ApiError::internal("reading the dashboards", &e))?;
    if !list.iter().any(|d| d.name == BUILTIN) {
        list.insert(0, builtin());
    }
    Ok(list)
}

fn to_json(d: &Saved) -> Value {
    json!({
        "name": d.name,
        "title": d.title,
        "version": d.version,
        "tiles": d.tiles,
        "updated_at": d.updated_at,
        "updated_by": d.updated_by,
    })
}

fn check_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_dashboard",
            format!("dashboard name '{name}': use letters, digits, '-' and '_' (at most 64)"),
        ))
    }
}

/// Checks each tile has a known type and reads a view or a query.
fn check_tiles(tiles: &[Value]) -> ApiResult<()> {
    for (i, t) in tiles.iter().enumerate() {
        let bad =
            |why: &str| ApiError::bad_request("invalid_dashboard", format!("tiles[{i}]: {why}"));
        let kind = t["type"].as_str().ok_or_else(|| bad("needs a \"type\""))?;
        if !["value", "timeseries", "table"].contains(&kind) {
            return Err(bad(&format!(
                "type '{kind}' is not one of value, timeseries, table"
            )));
        }
        match (t.get("view"), t.get("sql")) {
            (Some(Value::String(_)), None) | (None, Some(Value::String(_))) => {}
            _ => return Err(bad("give exactly one of \"view\" and \"sql\" (a string)")),
        }
        if kind == "timeseries" && (t["x"].as_str().is_none() || t["y"].as_str().is_none()) {
            return Err(bad(
                "a timeseries tile needs \"x\" (its time column) and \"y\"",
            ));
        }
        if kind == "value" && t["value"].as_str().is_none() {
            return Err(bad("a value tile needs \"value\" (a column, or \"count\")"));
        }
    }
    Ok(())
}

/// `GET /v1/dashboards`.
pub(crate) async fn list(State(state): AppStateRef, headers: HeaderMap) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    let list = all(&state).await?;
    Ok(Json(json!({
        "dashboards": list
            .iter()
            .map(|d| json!({"name": d.name, "title": d.title, "version": d.version}))
            .collect::<Vec<_>>(),
    })))
}

/// `GET /v1/dashboards/{name}`.
pub(crate) async fn get_one(
    State(state): AppStateRef,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    let list = all(&state).await?;
    let d = list.iter().find(|d| d.name == name).ok_or_else(|| {
        ApiError::not_found(
            "unknown_dashboard",
            format!("there is no dashboard '{name}' (GET /v1/dashboards lists them)"),
        )
    })?;
    Ok(Json(to_json(d)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    #[serde(default)]
    title: Option<String>,
    tiles: Vec<Value>,
    #[serde(default)]
    version: Option<u64>,
}

/// `PUT /v1/dashboards/{name}`.
pub(crate) async fn put(
    State(state): AppStateRef,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Admin)?;
    check_name(&name)?;
    let body: PutBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_dashboard",
            format!("{e}; send {{\"title\", \"tiles\": [...], \"version\"}}"),
        )
    })?;
    check_tiles(&body.tiles)?;
    let now = chrono::Utc::now().to_rfc3339();
    let who = principal.name.clone();
    let result = document(&state)?
        .update(|list| {
            let current = list
                .iter()
                .find(|d| d.name == name)
                .map(|d| d.version)
                .or_else(|| (name == BUILTIN).then_some(0));
            if let (Some(want), Some(have)) = (body.version, current)
                && want != have
            {
                return Err(quiver_engine::Error::AlreadyExists(format!(
                    "dashboard '{name}' is at version {have}, not {want}: someone saved it \
                     meanwhile; load it again"
                )));
            }
            if let (Some(want), None) = (body.version, current)
                && want != 0
            {
                return Err(quiver_engine::Error::AlreadyExists(format!(
                    "dashboard '{name}' does not exist, so it has no version {want}"
                )));
            }
            let version = current.map_or(1, |v| v + 1);
            let saved = Saved {
                name: name.clone(),
                title: body.title.clone().unwrap_or_else(|| name.clone()),
                version,
                tiles: body.tiles.clone(),
                updated_at: now.clone(),
                updated_by: who.clone(),
            };
            let created = current.is_none();
            list.retain(|d| d.name != name);
            list.push(saved.clone());
            Ok((saved, created))
        })
        .await;
    let ((saved, created), _) = result.map_err(|e| match e {
        quiver_engine::Error::AlreadyExists(m) => {
            ApiError::new(ErrorKind::Conflict, "version_conflict", m)
        }
        other => ApiError::internal("saving the dashboard", &other),
    })?;
    let engine = state.ready_engine()?;
    engine
        .activity()
        .record(
            &principal.name,
            if created { "create" } else { "replace" },
            "dashboard",
            &name,
        )
        .await;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(to_json(&saved))).into_response())
}

/// `DELETE /v1/dashboards/{name}`.
pub(crate) async fn delete(
    State(state): AppStateRef,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Admin)?;
    let (found, _) = document(&state)?
        .update(|list| {
            let before = list.len();
            list.retain(|d| d.name != name);
            Ok(list.len() != before)
        })
        .await
        .map_err(|e| ApiError::internal("saving the dashboards", &e))?;
    if !found {
        return Err(ApiError::not_found(
            "unknown_dashboard",
            format!("there is no saved dashboard '{name}'"),
        ));
    }
    state
        .ready_engine()?
        .activity()
        .record(&principal.name, "drop", "dashboard", &name)
        .await;
    Ok(Json(json!({"name": name, "deleted": true})))
}

/// `GET /v1/presence`: who has the dashboard (or any push client) open now, by token
/// name, and which of them is the caller.
pub(crate) async fn presence(
    State(state): AppStateRef,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let me = state.tokens.authenticate(&headers)?;
    me.require(Scope::Read)?;
    let names: std::collections::HashMap<String, String> = state
        .tokens
        .list()
        .into_iter()
        .map(|t| (t.id, t.name))
        .collect();
    let watching: Vec<Value> = state
        .push
        .presence()
        .into_iter()
        .map(|(id, connections, subscriptions)| {
            let name = if id == "env-admin" {
                "admin".to_owned()
            } else {
                names.get(&id).cloned().unwrap_or_else(|| id.clone())
            };
            json!({
                "name": name,
                "connections": connections,
                "subscriptions": subscriptions,
                "you": id == me.token_id,
            })
        })
        .collect();
    Ok(Json(json!({ "watching": watching })))
}

/// The page and its assets, compiled in: no build step, nothing to install.
const ASSETS: [(&str, &str, &[u8]); 6] = [
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../dashboard/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../dashboard/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../dashboard/app.css"),
    ),
    (
        "vendor/uplot/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../dashboard/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "vendor/uplot/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../dashboard/vendor/uplot/uPlot.min.css"),
    ),
    (
        "vendor/uplot/LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../dashboard/vendor/uplot/LICENSE"),
    ),
];

fn asset(path: &str) -> Response {
    match ASSETS.iter().find(|(p, _, _)| *p == path) {
        Some((_, mime, body)) => (
            [
                (header::CONTENT_TYPE, *mime),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *body,
        )
            .into_response(),
        None => ApiError::not_found("not_found", format!("no asset '/ui/{path}'")).into_response(),
    }
}

/// `GET /`: the dashboard page (it signs in and loads the rest itself).
pub(crate) async fn page() -> Response {
    asset("index.html")
}

/// `GET /ui/{*path}`.
pub(crate) async fn ui(Path(path): Path<String>) -> Response {
    asset(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_dashboard_passes_its_own_checks() {
        let d = builtin();
        assert!(d.tiles.len() >= 6);
        check_tiles(&d.tiles).unwrap();
    }

    #[test]
    fn bad_tiles_say_which_and_why() {
        for (tiles, says) in [
            (
                json!([{"type": "pie", "view": "v"}]),
                "tiles[0]: type 'pie'",
            ),
            (json!([{"type": "table"}]), "exactly one of"),
            (
                json!([{"type": "table", "view": "v"}, {"type": "timeseries", "view": "v"}]),
                "tiles[1]: a timeseries tile",
            ),
        ] {
            let e = check_tiles(tiles.as_array().unwrap()).unwrap_err();
            assert!(e.message.contains(says), "{}", e.message);
        }
    }
}

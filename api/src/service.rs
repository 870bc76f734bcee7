//! The query service every SQL surface shares (HTTP `/v1/sql`, the Postgres wire
//! protocol, Flight SQL): a slot among `--max-concurrent-queries`, running a planned
//! query into Arrow batches under its deadline and result limit, Quiver's DDL with its
//! scope check, and one mapping of query errors. Each surface only encodes.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use datafusion::logical_expr::LogicalPlan;
use futures::StreamExt as _;
use quiver_engine::{Engine, QueryError, QuerySession, QuiverDdl};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::info;

use crate::auth::{Principal, Scope};
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::reports::{ReportError, Reports};
use crate::state::AppState;

/// A running query's slot; the active-queries gauge follows it.
#[derive(Debug)]
pub(crate) struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Waits up to `--query-queue-timeout` for one of `--max-concurrent-queries` slots.
pub(crate) async fn take_slot(state: &AppState) -> ApiResult<Slot> {
    let wait = state.config.query_queue_timeout;
    let permit = tokio::time::timeout(wait, Arc::clone(&state.query_slots).acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            ApiError::new(
                ErrorKind::Busy,
                "too_many_queries",
                format!(
                    "{} queries are running and none finished within {} s; retry later",
                    state.config.max_concurrent_queries,
                    wait.as_secs_f64()
                ),
            )
            .retry_after(1)
        })?;
    Ok(slot(state, permit))
}

/// A query slot for work that waits its turn however long it takes (report runs).
pub(crate) async fn wait_slot(state: &AppState) -> Slot {
    let permit = Arc::clone(&state.query_slots)
        .acquire_owned()
        .await
        .expect("the query slots are never closed");
    slot(state, permit)
}

fn slot(state: &AppState, permit: tokio::sync::OwnedSemaphorePermit) -> Slot {
    let gauge = state.metrics.sql_active_queries.clone();
    gauge.inc();
    Slot {
        _permit: permit,
        gauge,
    }
}

/// What one of Quiver's DDL statements did; each SQL surface answers in its own form.
#[derive(Debug)]
pub(crate) enum DdlOutcome {
    /// A statement that changed (or would have changed) the catalog.
    Done {
        status: StatusCode,
        /// The command tag (`CREATE STREAM`, …).
        tag: &'static str,
        body: Value,
    },
    /// `EXPLAIN MATERIALIZED VIEW`: the plan, one line per row.
    Plan(Vec<String>),
}

/// Runs a DDL statement: writes need the admin scope, on every surface.
pub(crate) async fn execute_ddl(
    engine: &Engine,
    reports: &Reports,
    principal: &Principal,
    ddl: QuiverDdl,
) -> ApiResult<DdlOutcome> {
    let what = match &ddl {
        QuiverDdl::CreateStream { schema, .. } => {
            Some(("create", "stream", schema.name().to_owned()))
        }
        QuiverDdl::CreateMaterializedView { name, .. } => Some(("create", "view", name.clone())),
        QuiverDdl::DropMaterializedView { name, .. } => Some(("drop", "view", name.clone())),
        QuiverDdl::CreateAlert { rule, .. } => Some(("create", "alert", rule.name.clone())),
        QuiverDdl::DropAlert { name, .. } => Some(("drop", "alert", name.clone())),
        QuiverDdl::CreateReport { name, .. } => Some(("create", "report", name.clone())),
        QuiverDdl::DropReport { name, .. } => Some(("drop", "report", name.clone())),
        QuiverDdl::ExplainMaterializedView { .. } => None,
    };
    let outcome = run_ddl(engine, reports, principal, ddl).await?;
    // Only what changed something is recorded (IF NOT EXISTS on an existing one is not).
    let changed = match &outcome {
        DdlOutcome::Done { body, .. } => {
            body["created"].as_bool().unwrap_or(false) || body["dropped"].as_bool().unwrap_or(false)
        }
        DdlOutcome::Plan(_) => false,
    };
    if let (Some((action, kind, name)), true) = (what, changed) {
        engine
            .activity()
            .record(&principal.name, action, kind, &name)
            .await;
    }
    Ok(outcome)
}

async fn run_ddl(
    engine: &Engine,
    reports: &Reports,
    principal: &Principal,
    ddl: QuiverDdl,
) -> ApiResult<DdlOutcome> {
    // The answer names the statement it ran.
    let done = |status, tag: &'static str, mut body: Value| {
        body["statement"] = json!(tag);
        Ok(DdlOutcome::Done { status, tag, body })
    };
    if ddl.is_write() && !principal.has(Scope::Admin) {
        return Err(ApiError::forbidden(format!(
            "{} needs a token with the admin scope",
            ddl.kind()
        )));
    }
    match ddl {
        QuiverDdl::CreateStream {
            schema,
            if_not_exists,
        } => {
            let name = schema.name().to_owned();
            let created =
                engine
                    .create_stream(schema, if_not_exists)
                    .await
                    .map_err(|e| match e {
                        quiver_engine::Error::AlreadyExists(_) => ApiError::from(e),
                        other => ApiError::internal("creating a stream", &other),
                    })?;
            info!(stream = %name, created, principal = %principal.token_id, "CREATE STREAM");
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            done(
                status,
                "CREATE STREAM",
                json!({"stream": name, "created": created}),
            )
        }
        QuiverDdl::CreateMaterializedView {
            name,
            sql,
            if_not_exists,
        } => {
            let existed = engine.views().view_info(&name).is_some();
            let view = engine
                .views()
                .create_view(&name, &sql, if_not_exists)
                .await
                .map_err(ApiError::from)?;
            info!(view = %name, principal = %principal.token_id, "CREATE MATERIALIZED VIEW");
            let status = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            done(
                status,
                "CREATE MATERIALIZED VIEW",
                json!({
                    "view": crate::views::view_json(&view),
                    "created": !existed,
                }),
            )
        }
        QuiverDdl::DropMaterializedView { name, if_exists } => {
            let dropped = engine
                .views()
                .drop_view(&name, if_exists)
                .await
                .map_err(ApiError::from)?;
            info!(view = %name, principal = %principal.token_id, "DROP MATERIALIZED VIEW");
            done(
                StatusCode::OK,
                "DROP MATERIALIZED VIEW",
                json!({
                    "view": name,
                    "dropped": dropped,
                }),
            )
        }
        QuiverDdl::CreateAlert {
            rule,
            if_not_exists,
        } => {
            let (rule, created) = engine
                .alerts()
                .create(engine, rule, if_not_exists)
                .await
                .map_err(ApiError::from)?;
            info!(alert = %rule.name, principal = %principal.token_id, "CREATE ALERT");
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            done(
                status,
                "CREATE ALERT",
                json!({
                    "alert": crate::alerts::rule_json(&rule, true),
                    "created": created,
                }),
            )
        }
        QuiverDdl::DropAlert { name, if_exists } => {
            let dropped = engine
                .alerts()
                .drop_alert(&name, if_exists)
                .await
                .map_err(ApiError::from)?;
            info!(alert = %name, principal = %principal.token_id, "DROP ALERT");
            done(
                StatusCode::OK,
                "DROP ALERT",
                json!({"alert": name, "dropped": dropped}),
            )
        }
        QuiverDdl::CreateReport {
            name,
            if_not_exists,
            title,
            format,
            schedule,
            email,
            sql,
        } => {
            if if_not_exists && reports.get(&name).is_ok() {
                return done(
                    StatusCode::OK,
                    "CREATE REPORT",
                    json!({"report": name, "created": false}),
                );
            }
            let def: crate::reports::ReportDef = serde_json::from_value(json!({
                "name": name, "title": title, "format": format, "schedule": schedule,
                "email": email, "queries": [{"sql": sql}],
            }))
            .map_err(|e| ApiError::bad_request("invalid_report", format!("CREATE REPORT: {e}")))?;
            reports
                .create(engine, def, &principal.name, false)
                .await
                .map_err(|e| match e {
                    ReportError::Invalid(m) => {
                        ApiError::bad_request("invalid_report", format!("CREATE REPORT: {m}"))
                    }
                    other => ApiError::from(other),
                })?;
            info!(report = %name, principal = %principal.token_id, "CREATE REPORT");
            done(
                StatusCode::CREATED,
                "CREATE REPORT",
                json!({"report": name, "created": true}),
            )
        }
        QuiverDdl::DropReport { name, if_exists } => {
            let dropped = match reports.delete(&name).await {
                Ok(()) => true,
                Err(ReportError::NotFound(_)) if if_exists => false,
                Err(e) => return Err(e.into()),
            };
            info!(report = %name, principal = %principal.token_id, "DROP REPORT");
            done(
                StatusCode::OK,
                "DROP REPORT",
                json!({"report": name, "dropped": dropped}),
            )
        }
        QuiverDdl::ExplainMaterializedView { name } => Ok(DdlOutcome::Plan(
            engine
                .views()
                .explain_view(&name)
                .await
                .map_err(ApiError::from)?,
        )),
    }
}

/// Runs a planned query on the query runtime and hands its batches over a small
/// channel, for the surfaces that send Arrow batches or rows (Postgres, Flight SQL):
/// the work stays on the query threads, a slow reader holds back only its own query,
/// and the deadline covers delivery (the reading side keeps it too, a second later, for
/// a query that never yields). The slot is held until the query ends. Past `max_bytes`
/// of Arrow data the query fails with `ResultTooLarge`.
pub(crate) fn spawn_batches(
    engine: &Engine,
    session: QuerySession,
    plan: LogicalPlan,
    deadline: tokio::time::Instant,
    slot: Slot,
    max_bytes: usize,
) -> impl futures::Stream<Item = Result<arrow::record_batch::RecordBatch, QueryError>> + Send + 'static
{
    let timeout = engine.query_options().timeout;
    let (tx, rx) = mpsc::channel(2);
    engine.query_runtime().spawn(async move {
        let work = async {
            let mut stream = session.execute(plan).await?;
            let mut sent = 0usize;
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                sent += batch.get_array_memory_size();
                if sent > max_bytes {
                    return Err(QueryError::ResultTooLarge(format!(
                        "the result is larger than the {max_bytes}-byte limit; add a LIMIT or \
                         aggregate"
                    )));
                }
                if tx.send(Ok(batch)).await.is_err() {
                    break;
                }
            }
            Ok(())
        };
        let outcome = tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or(Err(QueryError::Timeout(timeout)));
        drop(slot);
        if let Err(e) = outcome {
            let _ = tx.send(Err(e)).await;
        }
    });
    let guard = deadline + Duration::from_secs(1);
    futures::stream::unfold(Some(rx), move |rx| async move {
        let mut rx = rx?;
        match tokio::time::timeout_at(guard, rx.recv()).await {
            Ok(Some(Ok(batch))) => Some((Ok(batch), Some(rx))),
            Ok(Some(Err(e))) => Some((Err(e), None)),
            Ok(None) => None,
            Err(_) => Some((Err(QueryError::Timeout(timeout)), None)),
        }
    })
}

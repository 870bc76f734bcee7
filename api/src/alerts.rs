//! Alert rules, silences and notifications over HTTP:
//!
//! - `POST /v1/alerts` (admin): `{"sql": "CREATE ALERT …"}`, or the rule as fields
//!   (`name`, `view`, `where`, `for`, `keep_firing_for`, `severity`, `notify`);
//!   `GET /v1/alerts`, `GET /v1/alerts/{name}` (read); `DELETE /v1/alerts/{name}`
//!   (admin); `GET /v1/alerts/{name}/deliveries` (read): attempts and pending ones.
//! - `POST /v1/silences` (admin), `GET /v1/silences` (read),
//!   `DELETE /v1/silences/{id}` (admin).
//! - `GET /v1/notifications[?unread=true&limit=N]` (read), and
//!   `POST /v1/notifications/{id}/read` (read: whoever can see one can acknowledge it).
//!
//! The SQL forms (`CREATE ALERT`, `DROP ALERT`, `SHOW ALERTS`) run through the same
//! engine calls on every SQL surface.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use quiver_engine::alerts::{
    AlertInfo, AlertRule, Attempt, Destination, Notification, Pending, Silence, destination_label,
    iso, severity_name,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Scope;
use crate::error::{ApiError, ApiResult};
use crate::service::{DdlOutcome, execute_ddl};
use crate::state::AppState;

type AppStateRef = State<Arc<AppState>>;

/// A rule as JSON; webhook secrets only for `show_secrets` (admins).
pub(crate) fn rule_json(rule: &AlertRule, show_secrets: bool) -> Value {
    let notify: Vec<Value> = rule
        .notify
        .iter()
        .map(|d| match d {
            Destination::Webhook { url, secret } => {
                let mut v = json!({"type": "webhook", "url": url});
                if show_secrets {
                    v["secret"] = json!(secret);
                }
                v
            }
            Destination::Email { address } => json!({"type": "email", "address": address}),
        })
        .collect();
    json!({
        "name": rule.name,
        "view": rule.view,
        "where": rule.predicate,
        "for_ms": rule.timers.for_ms,
        "keep_firing_for_ms": rule.timers.keep_firing_for_ms,
        "severity": severity_name(rule.severity),
        "notify": notify,
    })
}

fn info_json(info: &AlertInfo, show_secrets: bool) -> Value {
    let mut v = rule_json(&info.rule, show_secrets);
    v["keys"] = info
        .keys
        .iter()
        .map(|k| {
            json!({
                "key": serde_json::from_str::<Value>(&k.key).unwrap_or(json!(k.key)),
                "state": <&str>::from(k.state),
                "since": iso(k.since),
                "left_at": k.left.map(iso),
                "row": k.row,
            })
        })
        .collect();
    v["firing"] = json!(
        info.keys
            .iter()
            .filter(|k| k.state == quiver_engine::alerts::AlertState::Firing)
            .count()
    );
    v["pending"] = json!(
        info.keys
            .iter()
            .filter(|k| k.state == quiver_engine::alerts::AlertState::Pending)
            .count()
    );
    v["pending_deliveries"] = json!(info.pending_deliveries);
    v["error"] = json!(info.error);
    v
}

/// A notification as JSON (also what the `notifications` push channel sends).
pub(crate) fn notification_json(n: &Notification) -> Value {
    json!({
        "id": n.id,
        "alert": n.alert,
        "view": n.view,
        "severity": severity_name(n.severity),
        "state": <&str>::from(n.state),
        "key": n.key,
        "row": n.row,
        "since": iso(n.since),
        "at": iso(n.at),
        "created_at": iso(n.created_at),
        "read_at": n.read_at.map(iso),
        "read_by": n.read_by,
        "silenced": n.silenced,
    })
}

fn attempt_json(a: &Attempt) -> Value {
    json!({
        "delivery": a.delivery,
        "notification": a.notification,
        "destination": a.destination,
        "attempt": a.attempt,
        "at": iso(a.at),
        "outcome": <&str>::from(a.outcome),
        "status": a.status,
        "error": a.error,
        "elapsed_ms": a.elapsed_ms,
    })
}

fn pending_json(p: &Pending) -> Value {
    json!({
        "delivery": p.id,
        "notification": p.notification,
        "destination": destination_label(&p.destination),
        "attempts": p.attempts,
        "next_at": iso(p.next_at),
        "last_error": p.last_error,
    })
}

/// A rule given as fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFields {
    name: String,
    view: String,
    #[serde(rename = "where")]
    predicate: String,
    #[serde(default, rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    keep_firing_for: Option<String>,
    #[serde(default)]
    severity: Option<String>,
    #[serde(default)]
    notify: Vec<Value>,
    #[serde(default)]
    if_not_exists: bool,
}

/// Turns fields into the `CREATE ALERT` statement they stand for, so both forms go
/// through one grammar and one set of checks.
fn statement_of(f: &RuleFields) -> Result<String, ApiError> {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let mut sql = format!(
        "CREATE ALERT {}{} ON {} WHERE {}",
        if f.if_not_exists {
            "IF NOT EXISTS "
        } else {
            ""
        },
        f.name,
        f.view,
        f.predicate
    );
    if let Some(d) = &f.for_ {
        sql += &format!(" FOR {}", quote(d));
    }
    if let Some(d) = &f.keep_firing_for {
        sql += &format!(" KEEP FIRING FOR {}", quote(d));
    }
    if let Some(s) = &f.severity {
        sql += &format!(" SEVERITY {s}");
    }
    let mut targets = Vec::new();
    for (i, d) in f.notify.iter().enumerate() {
        let bad = || {
            ApiError::bad_request(
                "invalid_alert",
                format!(
                    "notify[{i}]: expected {{\"webhook\": \"<url>\", \"secret\": \"whsec_…\"}} \
                     or {{\"email\": \"<address>\"}}"
                ),
            )
        };
        if let Some(url) = d.get("webhook").and_then(Value::as_str) {
            let mut t = format!("webhook {}", quote(url));
            if let Some(secret) = d.get("secret").and_then(Value::as_str) {
                t += &format!(" SECRET {}", quote(secret));
            }
            targets.push(t);
        } else if let Some(address) = d.get("email").and_then(Value::as_str) {
            targets.push(format!("email {}", quote(address)));
        } else {
            return Err(bad());
        }
    }
    if !targets.is_empty() {
        sql += &format!(" NOTIFY {}", targets.join(", "));
    }
    Ok(sql)
}

/// `POST /v1/alerts`.
pub(crate) async fn create(
    State(state): AppStateRef,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let principal = state.tokens.authenticate(&headers)?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not JSON: {e}")))?;
    let sql = match value.get("sql").and_then(Value::as_str) {
        Some(sql) => sql.to_owned(),
        None => {
            let fields: RuleFields = serde_json::from_value(value).map_err(|e| {
                ApiError::bad_request(
                    "invalid_alert",
                    format!(
                        "{e}; send {{\"sql\": \"CREATE ALERT …\"}} or {{\"name\", \"view\", \
                         \"where\", \"for\", \"keep_firing_for\", \"severity\", \"notify\"}}"
                    ),
                )
            })?;
            statement_of(&fields)?
        }
    };
    if !sql
        .trim_start()
        .get(..12)
        .is_some_and(|s| s.eq_ignore_ascii_case("CREATE ALERT"))
    {
        return Err(ApiError::bad_request(
            "invalid_alert",
            "POST /v1/alerts takes a CREATE ALERT statement",
        ));
    }
    let engine = state.ready_engine()?.clone();
    let session = engine.query_session();
    let ddl = match session.prepare(&sql, &[]).await.map_err(ApiError::from)? {
        quiver_engine::Prepared::Ddl(ddl) => ddl,
        quiver_engine::Prepared::Query(_) => {
            return Err(ApiError::bad_request(
                "invalid_alert",
                "POST /v1/alerts takes a CREATE ALERT statement",
            ));
        }
    };
    match execute_ddl(&engine, &state.reports, &principal, ddl).await? {
        DdlOutcome::Done { status, body, .. } => Ok((status, Json(body)).into_response()),
        DdlOutcome::Plan(_) => Err(ApiError::bad_request(
            "invalid_alert",
            "POST /v1/alerts takes a CREATE ALERT statement",
        )),
    }
}

/// `GET /v1/alerts`.
pub(crate) async fn list(State(state): AppStateRef, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Read)?;
    let admin = principal.has(Scope::Admin);
    let engine = state.ready_engine()?;
    let alerts: Vec<Value> = engine
        .alerts()
        .list()
        .iter()
        .map(|i| info_json(i, admin))
        .collect();
    Ok(Json(json!({ "alerts": alerts })))
}

/// `GET /v1/alerts/{name}`.
pub(crate) async fn get_one(
    State(state): AppStateRef,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Read)?;
    let engine = state.ready_engine()?;
    let info = engine.alerts().get(&name).ok_or_else(|| no_alert(&name))?;
    Ok(Json(info_json(&info, principal.has(Scope::Admin))))
}

fn no_alert(name: &str) -> ApiError {
    ApiError::not_found(
        "unknown_alert",
        format!("there is no alert '{name}' (GET /v1/alerts lists them)"),
    )
}

/// `DELETE /v1/alerts/{name}`.
pub(crate) async fn delete(
    State(state): AppStateRef,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let principal = state.tokens.authenticate(&headers)?;
    let engine = state.ready_engine()?.clone();
    let ddl = quiver_engine::QuiverDdl::DropAlert {
        name,
        if_exists: false,
    };
    match execute_ddl(&engine, &state.reports, &principal, ddl).await? {
        DdlOutcome::Done { body, .. } => Ok(Json(body)),
        DdlOutcome::Plan(_) => Err(ApiError::bad_request("invalid_alert", "not a drop")),
    }
}

/// `GET /v1/alerts/{name}/deliveries`.
pub(crate) async fn deliveries(
    State(state): AppStateRef,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    let engine = state.ready_engine()?;
    let (attempts, pending) = engine
        .alerts()
        .deliveries(&name)
        .ok_or_else(|| no_alert(&name))?;
    Ok(Json(json!({
        "alert": name,
        "attempts": attempts.iter().rev().map(attempt_json).collect::<Vec<_>>(),
        "pending": pending.iter().map(pending_json).collect::<Vec<_>>(),
    })))
}

/// The body of `POST /v1/silences`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SilenceBody {
    #[serde(default)]
    alert: Option<String>,
    #[serde(default)]
    matchers: std::collections::BTreeMap<String, Value>,
    #[serde(default)]
    starts_at: Option<String>,
    #[serde(default)]
    ends_at: Option<String>,
    /// Instead of `ends_at`: how long from the start, e.g. `2h`.
    #[serde(default)]
    duration: Option<String>,
    #[serde(default)]
    comment: String,
}

fn parse_time(field: &str, text: &str) -> ApiResult<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            ApiError::bad_request(
                "invalid_silence",
                format!("{field} '{text}' is not an RFC 3339 time: {e}"),
            )
        })
}

fn silence_json(s: &Silence) -> Value {
    json!({
        "id": s.id,
        "alert": s.alert,
        "matchers": s.matchers,
        "starts_at": iso(s.starts_at),
        "ends_at": iso(s.ends_at),
        "comment": s.comment,
        "created_by": s.created_by,
    })
}

/// `POST /v1/silences`.
pub(crate) async fn create_silence(
    State(state): AppStateRef,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Admin)?;
    let b: SilenceBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_silence",
            format!(
                "{e}; send {{\"alert\", \"matchers\": {{column: value}}, \"starts_at\", \
                 \"ends_at\" or \"duration\", \"comment\"}}"
            ),
        )
    })?;
    let engine = state.ready_engine()?;
    let now = engine.alerts().clock().now();
    let starts_at = match &b.starts_at {
        Some(t) => parse_time("starts_at", t)?,
        None => now,
    };
    let ends_at = match (&b.ends_at, &b.duration) {
        (Some(t), None) => parse_time("ends_at", t)?,
        (None, Some(d)) => {
            let d: Duration = humantime::parse_duration(d).map_err(|e| {
                ApiError::bad_request("invalid_silence", format!("duration '{d}': {e}"))
            })?;
            starts_at + d.as_millis() as i64
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_silence",
                "give one of ends_at and duration",
            ));
        }
    };
    if let Some(alert) = &b.alert
        && engine.alerts().get(alert).is_none()
    {
        return Err(no_alert(alert));
    }
    let silence = engine
        .alerts()
        .add_silence(Silence {
            id: String::new(),
            alert: b.alert,
            matchers: b.matchers,
            starts_at,
            ends_at,
            comment: b.comment,
            created_by: principal.name.clone(),
        })
        .await
        .map_err(|e| ApiError::bad_request("invalid_silence", e.to_string()))?;
    engine
        .activity()
        .record(&principal.name, "create", "silence", &silence.id)
        .await;
    Ok((StatusCode::CREATED, Json(silence_json(&silence))).into_response())
}

/// `GET /v1/silences`: silences not yet ended.
pub(crate) async fn list_silences(
    State(state): AppStateRef,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    let engine = state.ready_engine()?;
    let list: Vec<Value> = engine
        .alerts()
        .silences()
        .iter()
        .map(silence_json)
        .collect();
    Ok(Json(json!({ "silences": list })))
}

/// `DELETE /v1/silences/{id}`.
pub(crate) async fn delete_silence(
    State(state): AppStateRef,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Admin)?;
    let engine = state.ready_engine()?;
    if !engine
        .alerts()
        .remove_silence(&id)
        .await
        .map_err(ApiError::from)?
    {
        return Err(ApiError::not_found(
            "unknown_silence",
            format!("there is no silence '{id}'"),
        ));
    }
    Ok(Json(json!({"id": id, "deleted": true})))
}

/// Query of `GET /v1/notifications`.
#[derive(Debug, Deserialize)]
pub(crate) struct NotificationQuery {
    #[serde(default)]
    unread: bool,
    #[serde(default)]
    limit: Option<usize>,
}

/// `GET /v1/notifications`: newest first, with the unread count.
pub(crate) async fn list_notifications(
    State(state): AppStateRef,
    headers: HeaderMap,
    Query(q): Query<NotificationQuery>,
) -> ApiResult<Json<Value>> {
    state.tokens.authenticate(&headers)?.require(Scope::Read)?;
    let engine = state.ready_engine()?;
    let list: Vec<Value> = engine
        .alerts()
        .notifications(q.unread, q.limit.unwrap_or(100).min(10_000))
        .iter()
        .map(notification_json)
        .collect();
    Ok(Json(json!({
        "unread": engine.alerts().unread(),
        "notifications": list,
    })))
}

/// `POST /v1/notifications/{id}/read`.
pub(crate) async fn mark_read(
    State(state): AppStateRef,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let principal = state.tokens.authenticate(&headers)?;
    principal.require(Scope::Read)?;
    let id: u64 = id.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_id",
            format!("'{id}' is not a notification id (a number)"),
        )
    })?;
    let engine = state.ready_engine()?;
    let n = engine
        .alerts()
        .mark_read(id, &principal.name)
        .await
        .map_err(ApiError::from)?;
    engine
        .activity()
        .record(&principal.name, "read", "notification", &id.to_string())
        .await;
    Ok(Json(notification_json(&n)))
}

#[cfg(test)]
mod tests {
    use quiver_engine::alerts::{Severity, parse_create_alert};

    use super::*;

    #[test]
    fn fields_become_the_statement_they_stand_for() {
        let f: RuleFields = serde_json::from_value(json!({
            "name": "low", "view": "low_stock", "where": "on_hand < 5",
            "for": "1m", "severity": "critical",
            "notify": [{"webhook": "http://h/x", "secret": "whsec_abc"}, {"email": "o'k@x.io"}],
        }))
        .unwrap();
        let sql = statement_of(&f).unwrap();
        let rule = parse_create_alert(&sql).unwrap();
        assert_eq!(rule.timers.for_ms, 60_000);
        assert_eq!(rule.severity, Severity::Critical);
        assert_eq!(
            rule.notify[1],
            Destination::Email {
                address: "o'k@x.io".into()
            }
        );
        let bad: RuleFields = serde_json::from_value(
            json!({"name": "a", "view": "v", "where": "x", "notify": [{"pager": "1"}]}),
        )
        .unwrap();
        assert!(format!("{:?}", statement_of(&bad).unwrap_err()).contains("notify[0]"));
    }
}

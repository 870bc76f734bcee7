//! The Postgres wire protocol: BI tools (psql, Grafana, Metabase, Superset, DBeaver)
//! connect to Quiver as if it were Postgres.
//!
//! The protocol is pgwire's; the `pg_catalog` that clients read to list schemas, tables
//! and columns is datafusion-pg-catalog's, added to each connection's own session over
//! the same `quiver` catalog the HTTP endpoint reads. Everything else is Quiver's: the
//! password is a Quiver token (the user name is free), statements go through the same
//! read-only checks, DDL rights, concurrency slots, timeout and result limit as
//! `POST /v1/sql`, and queries run on the engine's query runtime.
//!
//! Session commands a Postgres driver sends on its own (`SET`, `SHOW`, `BEGIN`,
//! `COMMIT`, `DISCARD`) are answered here without touching the query engine: settings
//! are kept per connection, and transactions are accepted but mean nothing (every
//! statement reads the latest data). `SET datafusion.*`, which would change the
//! engine's limits, is refused.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::logical_expr::{ColumnarValue, LogicalPlan, Volatility, create_udf};
use datafusion::sql::sqlparser::ast::{Expr, Set, Statement};
use datafusion_postgres::arrow_pg::datatypes::df::deserialize_parameters;
use datafusion_postgres::arrow_pg::datatypes::{
    arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type,
};
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::setup_pg_catalog;
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use datafusion_postgres::pgwire;
use futures::{Sink, SinkExt, StreamExt};
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, PgWireConnectionState, PgWireServerHandlers, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::startup::{Authentication, ParameterStatus, SecretKey};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::types::format::FormatOptions;
use quiver_engine::{Prepared, QueryError, QuerySession, QuiverDdl};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::auth::{Principal, Scope};
use crate::error::{ApiError, ErrorKind};
use crate::service::{DdlOutcome, execute_ddl, spawn_batches, take_slot};
use crate::state::AppState;

/// Binds the Postgres listener and serves it until `shutdown` changes.
pub(crate) async fn start(
    state: Arc<AppState>,
    addr: SocketAddr,
    tls: Option<Arc<crate::tls::ReloadingCert>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    // No ALPN: clients negotiate TLS with an SSLRequest first.
    let acceptor = tls.map(|cert| cert.acceptor(&[])).transpose()?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the Postgres listener on {addr}"))?;
    let bound = listener.local_addr()?;
    let handlers = Arc::new(PgHandlers {
        service: Arc::new(PgService::new(state)),
    });
    info!(pg_addr = %bound, tls = acceptor.is_some(), "Postgres wire protocol listening");
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.changed() => break,
            };
            let (socket, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "Postgres accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            let handlers = Arc::clone(&handlers);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Err(e) = pgwire::tokio::process_socket(socket, acceptor, handlers).await {
                    info!(%peer, error = %e, "Postgres connection ended with an error");
                }
            });
        }
    });
    Ok((bound, task))
}

/// pgwire's entry points, all served by one [`PgService`].
struct PgHandlers {
    service: Arc<PgService>,
}

impl PgWireServerHandlers for PgHandlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.service)
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::clone(&self.service)
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::clone(&self.service)
    }
}

/// One authenticated connection: who it is and its own session (with `pg_catalog`).
struct PgConn {
    principal: Principal,
    session: QuerySession,
}

struct PgService {
    state: Arc<AppState>,
    parameters: DefaultServerParameterProvider,
    parser: Arc<PgParser>,
}

impl PgService {
    fn new(state: Arc<AppState>) -> Self {
        let mut parameters = DefaultServerParameterProvider::default();
        parameters.server_version = format!("16.6 (Quiver {})", env!("CARGO_PKG_VERSION"));
        parameters.is_superuser = false;
        parameters.default_transaction_read_only = true;
        parameters.time_zone = "UTC".to_owned();
        Self {
            state,
            parameters,
            parser: Arc::new(PgParser {
                sql: PostgresCompatibilityParser::new(),
            }),
        }
    }

    /// Checks the password (a token with `read`) and opens the connection's session.
    fn open(&self, password: &str) -> PgWireResult<PgConn> {
        let principal = self.state.tokens.check(password.trim()).map_err(|why| {
            fatal(
                "28P01",
                &format!(
                    "password authentication failed: {why} (the password must be a Quiver \
                     token; the user name can be anything)"
                ),
            )
        })?;
        if !principal.has(Scope::Read) {
            return Err(fatal(
                "28000",
                "this token lacks the 'read' scope needed to query",
            ));
        }
        let engine = self.state.engine.get().ok_or_else(|| {
            fatal(
                "57P03",
                "the server is recovering its write-ahead log; retry shortly",
            )
        })?;
        let session = engine.query_session();
        setup_pg_catalog(
            session.context(),
            quiver_engine::query::CATALOG,
            EmptyContextProvider,
        )
        .map_err(|e| {
            PgWireError::ApiError(Box::new(std::io::Error::other(format!(
                "setting up pg_catalog: {e}"
            ))))
        })?;
        // A Postgres session has a time zone (UTC here, as Quiver's instants are), so
        // `TIMESTAMP WITH TIME ZONE` means timestamptz.
        session
            .context()
            .state_ref()
            .write()
            .config_mut()
            .options_mut()
            .execution
            .time_zone = Some("UTC".to_owned());
        // What `version()` says is what clients parse for the server's version
        // (SQLAlchemy looks for "PostgreSQL <major>.<minor>").
        let version = format!(
            "PostgreSQL 16.6 (Quiver {}, Apache DataFusion {})",
            env!("CARGO_PKG_VERSION"),
            datafusion::DATAFUSION_VERSION
        );
        session.context().register_udf(create_udf(
            "version",
            Vec::new(),
            DataType::Utf8,
            Volatility::Immutable,
            Arc::new(move |_: &[ColumnarValue]| {
                Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(
                    version.clone(),
                ))))
            }),
        ));
        session.context().register_udf(create_udf(
            "pg_get_serial_sequence",
            vec![DataType::Utf8, DataType::Utf8],
            DataType::Utf8,
            Volatility::Immutable,
            // Quiver has no sequences.
            Arc::new(|_: &[ColumnarValue]| Ok(ColumnarValue::Scalar(ScalarValue::Utf8(None)))),
        ));
        session.context().register_udf(create_udf(
            "pg_collation_is_visible",
            vec![DataType::Int32],
            DataType::Boolean,
            Volatility::Immutable,
            Arc::new(|_: &[ColumnarValue]| {
                Ok(ColumnarValue::Scalar(ScalarValue::Boolean(Some(true))))
            }),
        ));
        session
            .context()
            .register_udf(datafusion::logical_expr::ScalarUDF::new_from_impl(
                JsonBuildObject::new(),
            ));
        session.context().register_udf(create_udf(
            "current_setting",
            vec![DataType::Utf8],
            DataType::Utf8,
            Volatility::Stable,
            Arc::new(current_setting),
        ));
        session.context().register_udf(create_udf(
            "to_regtype",
            vec![DataType::Utf8],
            DataType::Int32,
            Volatility::Immutable,
            Arc::new(to_regtype),
        ));
        Ok(PgConn { principal, session })
    }

    /// Plans and runs one statement's text (`params` bound) into a response.
    async fn run<C>(
        &self,
        client: &C,
        conn: &PgConn,
        sql: &str,
        params: &[ScalarValue],
        format: &Format,
    ) -> Result<Response, ApiError>
    where
        C: ClientInfo + ?Sized,
    {
        let engine = self.engine()?;
        let deadline = deadline(client, engine);
        let slot = take_slot(&self.state).await?;
        let planned =
            tokio::time::timeout_at(deadline, conn.session.prepare_holding(sql, params, slot))
                .await
                .unwrap_or_else(|_| Err(QueryError::Timeout(engine.query_options().timeout)))
                .map_err(ApiError::from)?;
        match planned {
            (Prepared::Ddl(ddl), _slot) => self.ddl(conn, ddl).await,
            (Prepared::Query(plan), slot) => {
                Ok(self.stream(client, conn, *plan, format, deadline, slot))
            }
        }
    }

    fn engine(&self) -> Result<&quiver_engine::Engine, ApiError> {
        self.state
            .engine
            .get()
            .ok_or_else(|| ApiError::unavailable("recovering the write-ahead log", 1))
    }

    async fn ddl(&self, conn: &PgConn, ddl: QuiverDdl) -> Result<Response, ApiError> {
        let engine = self.engine()?;
        Ok(
            match execute_ddl(engine, &self.state.reports, &conn.principal, ddl).await? {
                DdlOutcome::Done { tag, .. } => Response::Execution(Tag::new(tag)),
                DdlOutcome::Plan(lines) => Response::Query(text_rows("plan", lines)),
            },
        )
    }

    /// Starts a planned query and answers with its rows as they come.
    fn stream<C>(
        &self,
        client: &C,
        conn: &PgConn,
        plan: LogicalPlan,
        format: &Format,
        deadline: tokio::time::Instant,
        slot: crate::service::Slot,
    ) -> Response
    where
        C: ClientInfo + ?Sized,
    {
        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        let fields =
            match arrow_schema_to_pg_fields(plan.schema().as_arrow(), format, Some(options)) {
                Ok(f) => Arc::new(f),
                Err(e) => {
                    return Response::Error(Box::new(pg_error(&ApiError::new(
                        ErrorKind::Unsupported,
                        "unsupported_type",
                        format!("the result has a column type Postgres clients cannot read: {e}"),
                    ))));
                }
            };
        let engine = self.state.engine.get().expect("engine is up while serving");
        let max_bytes = self.state.config.max_result_bytes;
        let batches = spawn_batches(
            engine,
            conn.session.clone(),
            plan,
            deadline,
            slot,
            max_bytes,
        );
        let rows_fields = Arc::clone(&fields);
        let rows = batches.flat_map(move |batch| {
            let rows: Box<dyn Iterator<Item = PgWireResult<_>> + Send + Sync> = match batch {
                Ok(batch) => encode_recordbatch(Arc::clone(&rows_fields), batch),
                Err(e) => Box::new(std::iter::once(Err(PgWireError::UserError(Box::new(
                    pg_error(&ApiError::from(e)),
                ))))),
            };
            futures::stream::iter(rows)
        });
        Response::Query(QueryResponse::new(fields, rows))
    }
}

/// `json_build_object(k1, v1, …)`: a JSON object as text, per row.
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonBuildObject {
    signature: datafusion::logical_expr::Signature,
}

impl JsonBuildObject {
    fn new() -> Self {
        Self {
            signature: datafusion::logical_expr::Signature::variadic_any(Volatility::Immutable),
        }
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for JsonBuildObject {
    fn name(&self) -> &str {
        "json_build_object"
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        if !args.args.len().is_multiple_of(2) {
            return Err(datafusion::error::DataFusionError::Plan(
                "json_build_object takes key/value pairs".into(),
            ));
        }
        let columns = ColumnarValue::values_to_arrays(&args.args)?;
        let mut out = datafusion::arrow::array::StringBuilder::new();
        for row in 0..args.number_rows {
            let mut object = serde_json::Map::new();
            for pair in columns.chunks(2) {
                let key = ScalarValue::try_from_array(&pair[0], row)?;
                let value = ScalarValue::try_from_array(&pair[1], row)?;
                let key = match key {
                    ScalarValue::Utf8(Some(k)) | ScalarValue::LargeUtf8(Some(k)) => k,
                    other => other.to_string(),
                };
                let value = match value {
                    v if v.is_null() => serde_json::Value::Null,
                    ScalarValue::Boolean(Some(b)) => serde_json::Value::Bool(b),
                    ScalarValue::Int8(Some(n)) => n.into(),
                    ScalarValue::Int16(Some(n)) => n.into(),
                    ScalarValue::Int32(Some(n)) => n.into(),
                    ScalarValue::Int64(Some(n)) => n.into(),
                    ScalarValue::UInt32(Some(n)) => n.into(),
                    ScalarValue::UInt64(Some(n)) => n.into(),
                    ScalarValue::Float64(Some(f)) => f.into(),
                    other => serde_json::Value::String(other.to_string()),
                };
                object.insert(key, value);
            }
            out.append_value(serde_json::Value::Object(object).to_string());
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// `x LIKE p ESCAPE 'c'` with an escape character other than the backslash (which
/// DataFusion does not take, and SQLAlchemy sends): the pattern is rewritten to use the
/// backslash. `cc` stands for a literal `c`, `c%` and `c_` for literal `%` and `_`.
fn rewrite_like_escapes(statement: &mut Statement) {
    use datafusion::sql::sqlparser::ast::{Value, visit_expressions_mut};
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    let _ = visit_expressions_mut(statement, |expr| {
        if let Expr::Like {
            pattern,
            escape_char,
            ..
        }
        | Expr::ILike {
            pattern,
            escape_char,
            ..
        } = expr
            && let Some(escape) = escape_char.as_ref()
            && let Value::SingleQuotedString(c) = &escape.value
            && c.chars().count() == 1
            && c != "\\"
        {
            let c = c.replace('\'', "''");
            let text = format!(
                "replace(replace(replace(replace(replace({pattern}, '\\', '\\\\'), \
                 '{c}{c}', chr(1)), '{c}%', '\\%'), '{c}_', '\\_'), chr(1), '{c}')"
            );
            if let Ok(rewritten) = Parser::new(&PostgreSqlDialect {})
                .try_with_sql(&text)
                .and_then(|mut p| p.parse_expr())
            {
                **pattern = rewritten;
                *escape_char = None;
            }
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
}

/// A scalar subquery over `pg_catalog` that is not aggregated (clients' catalog
/// queries, e.g. SQLAlchemy's column reflection) is refused by DataFusion, which cannot
/// prove it yields one row. Postgres would fail at run time on a second row; here the
/// projection is wrapped in `max(…)`, which is the same for zero or one row.
/// Subqueries over the always-empty `pg_sequence` become NULL.
fn aggregate_catalog_subqueries(statement: &mut Statement) {
    use datafusion::sql::sqlparser::ast::{
        GroupByExpr, SelectItem, SetExpr, visit_expressions_mut,
    };
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    const AGGREGATES: [&str; 8] = [
        "max",
        "min",
        "count",
        "sum",
        "avg",
        "array_agg",
        "string_agg",
        "bool_and",
    ];
    let _ = visit_expressions_mut(statement, |expr| {
        // `CASE WHEN c THEN (SELECT … WHERE c AND …)`: `c` is already known true inside,
        // and DataFusion cannot decorrelate a subquery filtered on an outer column alone.
        if let Expr::Case {
            operand: None,
            conditions,
            ..
        } = expr
        {
            for when in conditions.iter_mut() {
                if let Expr::Subquery(query) = &mut when.result
                    && let SetExpr::Select(select) = query.body.as_mut()
                    && let Some(selection) = select.selection.take()
                {
                    let guard = when.condition.to_string();
                    let mut kept: Vec<Expr> = Vec::new();
                    split_and(selection, &mut kept);
                    kept.retain(|c| c.to_string() != guard);
                    select.selection = kept.into_iter().reduce(|a, b| Expr::BinaryOp {
                        left: Box::new(a),
                        op: datafusion::sql::sqlparser::ast::BinaryOperator::And,
                        right: Box::new(b),
                    });
                }
            }
        }
        // Quiver has no sequences: a scalar subquery over `pg_sequence` (always empty)
        // is NULL. (Its correlation through pg_get_serial_sequence cannot be planned.)
        if let Expr::Subquery(query) = expr
            && let SetExpr::Select(select) = query.body.as_ref()
            && select.from.iter().any(|t| {
                t.to_string().to_ascii_lowercase().contains("pg_sequence ")
                    || t.to_string().to_ascii_lowercase().ends_with("pg_sequence")
            })
        {
            // Its placeholders stay, unused, so the client's parameters still line up.
            let mut placeholders = Vec::new();
            let _ = datafusion::sql::sqlparser::ast::visit_expressions(query.as_ref(), |e| {
                if let Expr::Value(v) = e
                    && let datafusion::sql::sqlparser::ast::Value::Placeholder(p) = &v.value
                {
                    placeholders.push(format!("CAST({p} AS VARCHAR)"));
                }
                std::ops::ControlFlow::<()>::Continue(())
            });
            let text = if placeholders.is_empty() {
                "NULL".to_owned()
            } else {
                format!(
                    "CASE WHEN false THEN concat({}) END",
                    placeholders.join(", ")
                )
            };
            if let Ok(null) = Parser::new(&PostgreSqlDialect {})
                .try_with_sql(&text)
                .and_then(|mut p| p.parse_expr())
            {
                *expr = null;
            }
            return std::ops::ControlFlow::<()>::Continue(());
        }
        if let Expr::Subquery(query) = expr
            && let SetExpr::Select(select) = query.body.as_mut()
            && select.projection.len() == 1
            && matches!(&select.group_by, GroupByExpr::Expressions(e, _) if e.is_empty())
            && select.having.is_none()
            && select
                .from
                .iter()
                .any(|t| t.to_string().to_ascii_lowercase().contains("pg_"))
        {
            let (inner, alias) = match &select.projection[0] {
                SelectItem::UnnamedExpr(e) => (e.clone(), None),
                SelectItem::ExprWithAlias { expr, alias } => (expr.clone(), Some(alias.clone())),
                _ => return std::ops::ControlFlow::<()>::Continue(()),
            };
            let aggregated = matches!(&inner, Expr::Function(f)
                if AGGREGATES.contains(&f.name.to_string().to_ascii_lowercase().as_str()));
            if !aggregated
                && let Ok(wrapped) = Parser::new(&PostgreSqlDialect {})
                    .try_with_sql(&format!("max({inner})"))
                    .and_then(|mut p| p.parse_expr())
            {
                select.projection[0] = match alias {
                    Some(alias) => SelectItem::ExprWithAlias {
                        expr: wrapped,
                        alias,
                    },
                    None => SelectItem::UnnamedExpr(wrapped),
                };
            }
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
}

/// The conjuncts of `a AND b AND …`.
fn split_and(expr: Expr, out: &mut Vec<Expr>) {
    match expr {
        Expr::BinaryOp {
            left,
            op: datafusion::sql::sqlparser::ast::BinaryOperator::And,
            right,
        } => {
            split_and(*left, out);
            split_and(*right, out);
        }
        Expr::Nested(inner)
            if matches!(
                inner.as_ref(),
                Expr::BinaryOp {
                    op: datafusion::sql::sqlparser::ast::BinaryOperator::And,
                    ..
                }
            ) =>
        {
            split_and(*inner, out)
        }
        other => out.push(other),
    }
}

/// The first argument of a function, as text.
fn text_arg(
    args: &[ColumnarValue],
) -> datafusion::error::Result<datafusion::arrow::array::StringArray> {
    let arrays = ColumnarValue::values_to_arrays(args)?;
    let first = arrays.first().ok_or_else(|| {
        datafusion::error::DataFusionError::Plan("the function takes one text argument".into())
    })?;
    let text = datafusion::arrow::compute::cast(first, &DataType::Utf8)?;
    Ok(datafusion::arrow::array::AsArray::as_string::<i32>(&text).clone())
}

/// `current_setting(name)`: the server's settings clients ask for (the values `SHOW`
/// gives a connection that has not changed them).
fn current_setting(args: &[ColumnarValue]) -> datafusion::error::Result<ColumnarValue> {
    let names = text_arg(args)?;
    let values: datafusion::arrow::array::StringArray = names
        .iter()
        .map(|n| n.map(|n| default_setting(&n.to_ascii_lowercase())))
        .collect();
    Ok(ColumnarValue::Array(Arc::new(values)))
}

/// `to_regtype(name)`: the oid of a built-in type Quiver's columns use, else NULL (as
/// Postgres answers for a type that does not exist, e.g. drivers probing for hstore).
fn to_regtype(args: &[ColumnarValue]) -> datafusion::error::Result<ColumnarValue> {
    let oid = |name: Option<&str>| -> Option<i32> {
        let ty = match name?.trim().to_ascii_lowercase().as_str() {
            "bool" | "boolean" => Type::BOOL,
            "int2" | "smallint" => Type::INT2,
            "int4" | "integer" | "int" => Type::INT4,
            "int8" | "bigint" => Type::INT8,
            "float4" | "real" => Type::FLOAT4,
            "float8" | "double precision" => Type::FLOAT8,
            "numeric" | "decimal" => Type::NUMERIC,
            "text" => Type::TEXT,
            "varchar" | "character varying" => Type::VARCHAR,
            "date" => Type::DATE,
            "timestamp" | "timestamp without time zone" => Type::TIMESTAMP,
            "timestamptz" | "timestamp with time zone" => Type::TIMESTAMPTZ,
            "bytea" => Type::BYTEA,
            _ => return None,
        };
        i32::try_from(ty.oid()).ok()
    };
    let names = text_arg(args)?;
    let oids: datafusion::arrow::array::Int32Array = names.iter().map(oid).collect();
    Ok(ColumnarValue::Array(Arc::new(oids)))
}

/// When a statement must be done: the server's query timeout, or the connection's
/// `statement_timeout` when that is shorter.
fn deadline<C: ClientInfo + ?Sized>(
    client: &C,
    engine: &quiver_engine::Engine,
) -> tokio::time::Instant {
    let server = engine.query_options().timeout;
    let timeout = client
        .metadata()
        .get(STATEMENT_TIMEOUT)
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .map_or(server, |t| t.min(server));
    tokio::time::Instant::now() + timeout
}

/// The connection metadata key of `statement_timeout`, in milliseconds.
const STATEMENT_TIMEOUT: &str = "statement_timeout";

fn conn_of<C: ClientInfo + ?Sized>(client: &C) -> PgWireResult<Arc<PgConn>> {
    client
        .session_extensions()
        .get::<PgConn>()
        .ok_or_else(|| fatal("08P01", "the connection is not authenticated"))
}

#[async_trait]
impl StartupHandler for PgService {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(pwd) => {
                let pwd = pwd.into_password()?;
                let conn = self.open(&pwd.password)?;
                let user = client.metadata().get("user").cloned().unwrap_or_default();
                info!(user = %user, token = %conn.principal.token_id, peer = %client.socket_addr(), "Postgres connection");
                client.session_extensions().insert(conn);
                client.set_pid_and_secret_key(
                    rand::random::<i32>().abs(),
                    SecretKey::I32(rand::random()),
                );
                finish_authentication(client, &self.parameters).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

#[async_trait]
impl SimpleQueryHandler for PgService {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let conn = conn_of(client)?;
        // Statements Postgres' grammar does not know (Quiver's CREATE STREAM, time
        // travel) go to Quiver's parser whole.
        let texts: Vec<(String, Option<Statement>)> = match self.parser.sql.parse(query) {
            Ok(statements) if !statements.is_empty() => statements
                .into_iter()
                .map(|mut s| {
                    rewrite_like_escapes(&mut s);
                    aggregate_catalog_subqueries(&mut s);
                    (s.to_string(), Some(s))
                })
                .collect(),
            Ok(_) => return Ok(vec![Response::EmptyQuery]),
            Err(_) => vec![(query.to_owned(), None)],
        };
        let mut responses = Vec::with_capacity(texts.len());
        for (sql, statement) in texts {
            if let Some(statement) = &statement
                && is_session_command(statement)
                && let Some(response) = session_command(client, statement).await
            {
                let failed = matches!(response, Response::Error(_));
                responses.push(response);
                if failed {
                    break;
                }
                continue;
            }
            match self
                .run(client, &conn, &sql, &[], &Format::UnifiedText)
                .await
            {
                Ok(r) => responses.push(r),
                Err(e) => {
                    // Like Postgres: the rest of the query string is not run.
                    responses.push(Response::Error(Box::new(pg_error(&e))));
                    break;
                }
            }
        }
        Ok(responses)
    }
}

/// A statement as the extended protocol keeps it between Parse and Execute.
#[derive(Debug, Clone)]
pub(crate) enum PgStatement {
    /// A read-only query, its placeholders unbound.
    Query { sql: String, plan: Arc<LogicalPlan> },
    /// Quiver DDL, run at Execute.
    Ddl { sql: String, explain: bool },
    /// A session command (`SET`, `SHOW`, `BEGIN`, …).
    Command(Arc<Statement>),
}

/// Turns the text of Parse into a [`PgStatement`].
#[derive(Debug)]
pub(crate) struct PgParser {
    sql: PostgresCompatibilityParser,
}

#[async_trait]
impl QueryParser for PgParser {
    type Statement = PgStatement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<PgStatement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let conn = conn_of(client)?;
        let (text, statement) = match self.sql.parse(sql) {
            Ok(mut statements) => {
                if statements.len() > 1 {
                    return Err(user_error(
                        "42601",
                        "a prepared statement holds one SQL statement".to_owned(),
                    ));
                }
                match statements.pop() {
                    Some(mut s) => {
                        rewrite_like_escapes(&mut s);
                        aggregate_catalog_subqueries(&mut s);
                        (s.to_string(), Some(s))
                    }
                    None => return Ok(None),
                }
            }
            Err(_) => (sql.to_owned(), None),
        };
        if let Some(statement) = statement
            && is_session_command(&statement)
        {
            return Ok(Some(PgStatement::Command(Arc::new(statement))));
        }
        match conn.session.prepare_unbound(&text).await {
            Ok(Prepared::Query(plan)) => Ok(Some(PgStatement::Query {
                sql: text,
                plan: Arc::new(*plan),
            })),
            Ok(Prepared::Ddl(ddl)) => Ok(Some(PgStatement::Ddl {
                sql: text,
                explain: matches!(ddl, QuiverDdl::ExplainMaterializedView { .. }),
            })),
            Err(e) => Err(PgWireError::UserError(Box::new(pg_error(&ApiError::from(
                e,
            ))))),
        }
    }

    fn get_parameter_types(&self, stmt: &PgStatement) -> PgWireResult<Vec<Type>> {
        let PgStatement::Query { plan, .. } = stmt else {
            return Ok(Vec::new());
        };
        parameter_types(plan)
            .into_iter()
            .map(|t| t.map_or(Ok(Type::UNKNOWN), |t| into_pg_type(&t)))
            .collect()
    }

    fn get_result_schema(
        &self,
        stmt: &PgStatement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let format = column_format.unwrap_or(&Format::UnifiedText);
        match stmt {
            PgStatement::Query { plan, .. } => {
                arrow_schema_to_pg_fields(plan.schema().as_arrow(), format, None)
            }
            PgStatement::Ddl { explain: true, .. } => Ok(vec![text_field("plan", format)]),
            PgStatement::Command(statement) => match show_name(statement) {
                Some(name) => Ok(vec![text_field(&name, format)]),
                None => Ok(Vec::new()),
            },
            PgStatement::Ddl { .. } => Ok(Vec::new()),
        }
    }
}

/// The types of `$1 … $n`, in order (`None` where the query does not fix one).
fn parameter_types(plan: &LogicalPlan) -> Vec<Option<DataType>> {
    let Ok(types) = plan.get_parameter_types() else {
        return Vec::new();
    };
    (1..=types.len())
        .map(|i| types.get(&format!("${i}")).cloned().flatten())
        .collect()
}

#[async_trait]
impl ExtendedQueryHandler for PgService {
    type Statement = PgStatement;
    type QueryParser = PgParser;

    fn query_parser(&self) -> Arc<PgParser> {
        Arc::clone(&self.parser)
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<PgStatement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = PgStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let conn = conn_of(client)?;
        let format = &portal.result_column_format;
        match &portal.statement.statement {
            PgStatement::Command(statement) => Ok(session_command(client, statement)
                .await
                .unwrap_or(Response::EmptyQuery)),
            PgStatement::Ddl { sql, .. } => Ok(self
                .run(client, &conn, sql, &[], format)
                .await
                .unwrap_or_else(error_response)),
            PgStatement::Query { sql, plan } => {
                let types = parameter_types(plan);
                let refs: Vec<Option<&DataType>> = types.iter().map(Option::as_ref).collect();
                let params = match deserialize_parameters(portal, &refs)? {
                    ParamValues::List(values) => values.into_iter().map(|v| v.value).collect(),
                    ParamValues::Map(_) => Vec::new(),
                };
                Ok(self
                    .run(client, &conn, sql, &params, format)
                    .await
                    .unwrap_or_else(error_response))
            }
        }
    }
}

fn error_response(e: ApiError) -> Response {
    Response::Error(Box::new(pg_error(&e)))
}

/// Whether a statement is a session command answered without the engine
/// (`SHOW ALERTS` is not: it reads the `alerts` table).
fn is_session_command(statement: &Statement) -> bool {
    if let Statement::ShowVariable { variable } = statement
        && variable.len() == 1
        && variable[0].value.eq_ignore_ascii_case("alerts")
    {
        return false;
    }
    matches!(
        statement,
        Statement::Set(_)
            | Statement::ShowVariable { .. }
            | Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Discard { .. }
            | Statement::Deallocate { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. }
    )
}

/// The column a `SHOW` answers with.
fn show_name(statement: &Statement) -> Option<String> {
    match statement {
        Statement::ShowVariable { variable } => Some(
            variable
                .iter()
                .map(|i| i.value.to_lowercase())
                .collect::<Vec<_>>()
                .join("_"),
        ),
        _ => None,
    }
}

/// Answers a session command, or `None` when `statement` is not one.
async fn session_command<C>(client: &mut C, statement: &Statement) -> Option<Response>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    Some(match statement {
        Statement::StartTransaction { .. } => Response::TransactionStart(Tag::new("BEGIN")),
        Statement::Commit { .. } => Response::TransactionEnd(Tag::new("COMMIT")),
        Statement::Rollback {
            savepoint: Some(_), ..
        } => Response::Execution(Tag::new("ROLLBACK")),
        Statement::Rollback { .. } => Response::TransactionEnd(Tag::new("ROLLBACK")),
        Statement::Savepoint { .. } => Response::Execution(Tag::new("SAVEPOINT")),
        Statement::ReleaseSavepoint { .. } => Response::Execution(Tag::new("RELEASE")),
        Statement::Discard { .. } => Response::Execution(Tag::new("DISCARD ALL")),
        Statement::Deallocate { .. } => Response::Execution(Tag::new("DEALLOCATE")),
        Statement::Set(set) => match set_variable(client, set) {
            Ok(Some((name, value))) => {
                let status =
                    PgWireBackendMessage::ParameterStatus(ParameterStatus::new(name, value));
                if client.send(status).await.is_err() {
                    return None;
                }
                Response::Execution(Tag::new("SET"))
            }
            Ok(None) => Response::Execution(Tag::new("SET")),
            Err(e) => Response::Error(e),
        },
        Statement::ShowVariable { .. } => {
            let name = show_name(statement).unwrap_or_default();
            let value = show_value(client, &name);
            Response::Query(text_rows(&name, vec![value]))
        }
        _ => return None,
    })
}

/// Applies a `SET`; returns a parameter to report to the client, if it is one of those
/// Postgres reports.
fn set_variable<C: ClientInfo + ?Sized>(
    client: &mut C,
    set: &Set,
) -> Result<Option<(String, String)>, Box<ErrorInfo>> {
    let (name, value) = match set {
        Set::SingleAssignment {
            variable, values, ..
        } => (
            variable.to_string().to_lowercase(),
            values.first().map(expr_text).unwrap_or_default(),
        ),
        Set::SetTimeZone { value, .. } => ("timezone".to_owned(), expr_text(value)),
        Set::SetNames { charset_name, .. } => {
            ("client_encoding".to_owned(), charset_name.to_string())
        }
        // SET ROLE, SET SESSION AUTHORIZATION, SET TRANSACTION …: accepted, no effect.
        _ => return Ok(None),
    };
    if name.starts_with("datafusion.") {
        return Err(Box::new(ErrorInfo::new(
            "ERROR".into(),
            "42501".into(),
            format!(
                "SET {name} is not allowed: engine settings are fixed by the server's \
                 configuration"
            ),
        )));
    }
    if name == STATEMENT_TIMEOUT {
        let ms = parse_timeout_ms(&value).ok_or_else(|| {
            Box::new(ErrorInfo::new(
                "ERROR".into(),
                "22023".into(),
                format!(
                    "invalid value for statement_timeout: \"{value}\" (use e.g. 5000, '5s', '2min')"
                ),
            ))
        })?;
        client.metadata_mut().insert(name, ms.to_string());
        return Ok(None);
    }
    client.metadata_mut().insert(name.clone(), value.clone());
    let reported = match name.as_str() {
        "timezone" => "TimeZone",
        "datestyle" => "DateStyle",
        "intervalstyle" => "IntervalStyle",
        "application_name" => "application_name",
        "client_encoding" => "client_encoding",
        "extra_float_digits" => "extra_float_digits",
        "search_path" => "search_path",
        "bytea_output" => "bytea_output",
        _ => return Ok(None),
    };
    Ok(Some((reported.to_owned(), value)))
}

/// A SET value as text: quotes dropped.
fn expr_text(expr: &Expr) -> String {
    match expr {
        Expr::Value(v) => v.clone().into_string().unwrap_or_else(|| v.to_string()),
        Expr::Identifier(i) => i.value.clone(),
        other => other.to_string(),
    }
    .trim_matches(|c| c == '\'' || c == '"')
    .to_owned()
}

/// `statement_timeout` values: a number of milliseconds, or with a unit.
fn parse_timeout_ms(value: &str) -> Option<u64> {
    let v = value.trim().to_lowercase();
    if v == "default" {
        return Some(0);
    }
    let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().ok()?;
    let unit = v[digits.len()..].trim();
    let factor = match unit {
        "" | "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// What `SHOW name` answers.
fn show_value<C: ClientInfo + ?Sized>(client: &C, name: &str) -> String {
    let name = match name {
        "time_zone" => "timezone",
        "transaction_isolation_level" => "transaction_isolation",
        other => other,
    };
    if let Some(v) = client.metadata().get(name) {
        return v.clone();
    }
    default_setting(name)
}

/// A setting's value before any `SET`.
fn default_setting(name: &str) -> String {
    match name {
        "server_version" => "16.6".into(),
        "server_version_num" => "160006".into(),
        "timezone" => "UTC".into(),
        "transaction_isolation" | "default_transaction_isolation" => "read committed".into(),
        "transaction_read_only" | "default_transaction_read_only" => "on".into(),
        "standard_conforming_strings" | "integer_datetimes" => "on".into(),
        "statement_timeout" => "0".into(),
        "search_path" => "public".into(),
        "client_encoding" | "server_encoding" => "UTF8".into(),
        "datestyle" => "ISO, MDY".into(),
        "intervalstyle" => "postgres".into(),
        "max_identifier_length" => "63".into(),
        "lc_collate" | "lc_ctype" => "C".into(),
        _ => String::new(),
    }
}

fn text_field(name: &str, format: &Format) -> FieldInfo {
    FieldInfo::new(
        name.to_owned(),
        None,
        None,
        Type::TEXT,
        format.format_for(0),
    )
}

/// A one-column text result.
fn text_rows(name: &str, lines: Vec<String>) -> QueryResponse {
    let fields = Arc::new(vec![FieldInfo::new(
        name.to_owned(),
        None,
        None,
        Type::TEXT,
        FieldFormat::Text,
    )]);
    let schema = Arc::clone(&fields);
    let rows = lines.into_iter().map(move |line| {
        let mut row = DataRowEncoder::new(Arc::clone(&schema));
        row.encode_field(&Some(line))?;
        Ok(row.take_row())
    });
    QueryResponse::new(fields, futures::stream::iter(rows.collect::<Vec<_>>()))
}

/// A Quiver error as a Postgres error, with the SQLSTATE its kind maps to.
fn pg_error(e: &ApiError) -> ErrorInfo {
    let mut info = ErrorInfo::new("ERROR".into(), e.kind.sqlstate().into(), e.message.clone());
    info.detail = Some(format!("quiver error code: {}", e.code));
    info
}

fn fatal(code: &str, message: &str) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".into(),
        code.into(),
        message.into(),
    )))
}

fn user_error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message,
    )))
}

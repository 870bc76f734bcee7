//! SQL over streams, safe by construction.
//!
//! Each query gets its own DataFusion session: the `quiver` catalog (streams resolved to
//! their Delta snapshot plus live buffer when the query names them), the time-travel
//! table functions, and a memory pool of its own. Statements are checked twice before
//! anything runs: the parsed statement must be a read (`SELECT`, `EXPLAIN`, `SHOW`,
//! `DESCRIBE`), and the logical plan must hold no DDL, DML or session statement
//! (DataFusion's `SQLOptions`). Nothing a user writes can create tables over server
//! files, copy data out, or change settings; Quiver's own DDL is recognised first and
//! handed back to the caller, which decides who may run it.
//!
//! Queries run on a runtime of their own, so a heavy query shares the CPU with ingest
//! through the OS scheduler instead of stalling the server's I/O tasks.

mod ddl;
mod distinct_on;
mod latest;
mod pool;
mod rewrite;
mod spill;
mod tables;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use datafusion::common::{DataFusionError, ParamValues, ScalarValue};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::TrackConsumersPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use datafusion::sql::sqlparser::dialect::GenericDialect;

pub use ddl::{QuiverDdl, column_type, parse_view_definition};
pub use tables::{CATALOG, SCHEMA, cast_batch, retype_text};

/// Quiver's own tables, readable by SQL: `alerts` (the rules and how many keys each has
/// pending and firing), `notifications` (the alert transitions kept) and `activity` (who
/// changed what).
pub const SYSTEM_TABLES: [&str; 3] = ["alerts", "notifications", "activity"];
pub(crate) use tables::{ReadSnapshot, StreamProvider, TableSource, query_schema};

use crate::EngineMetrics;
#[cfg(test)]
pub(crate) use tables::delta_scan;
use tables::{QuiverCatalog, TimeTravel};

/// Limits and parallelism of queries.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// Memory one query may hold (DataFusion memory pool); past it the query fails.
    pub memory_limit: usize,
    /// Longest a query may run, delivery of its result included.
    pub timeout: Duration,
    /// Threads of the query runtime, and partitions a query is split into.
    pub threads: usize,
    /// Folder for spill files of sorts, joins and aggregations over the memory limit
    /// (default: the OS temporary folder); `None` with `spill_bytes` 0 disables spilling.
    pub spill_dir: Option<std::path::PathBuf>,
    /// Most bytes of spill files all queries together may hold (0: never spill).
    pub spill_bytes: u64,
}

impl Default for QueryOptions {
    fn default() -> Self {
        Self {
            memory_limit: 2 << 30,
            timeout: Duration::from_secs(30),
            threads: std::thread::available_parallelism()
                .map(NonZeroUsize::get)
                .unwrap_or(2),
            spill_dir: None,
            spill_bytes: 16 << 30,
        }
    }
}

/// Most spill files one merge pass reads at once.
const SPILL_MERGE_FAN_IN: usize = 8;

/// Stack of each query thread.
const QUERY_STACK_BYTES: usize = 256 << 20;

/// Why a statement was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The SQL does not parse or plan, or failed on the data (bad cast, division by zero).
    #[error("{0}")]
    Invalid(String),
    /// The statement is not allowed on this server, for anyone.
    #[error("{0}")]
    NotAllowed(String),
    /// The query needed more memory than its limit.
    #[error("{0}")]
    MemoryLimit(String),
    /// The result grew past the size a client may fetch in one query.
    #[error("{0}")]
    ResultTooLarge(String),
    /// The query ran past its time limit.
    #[error("the query ran longer than its {} s limit and was cancelled", .0.as_secs_f64())]
    Timeout(Duration),
    /// The object exists already, or others depend on it.
    #[error("{0}")]
    Conflict(String),
    /// No such object.
    #[error("{0}")]
    NotFound(String),
    /// Something failed on the server's side (storage, an internal error).
    #[error("{0}")]
    Internal(String),
}

impl QueryError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_sql",
            Self::NotAllowed(_) => "statement_not_allowed",
            Self::MemoryLimit(_) => "memory_limit_exceeded",
            Self::ResultTooLarge(_) => "result_too_large",
            Self::Timeout(_) => "query_timeout",
            Self::Conflict(_) => "conflict",
            Self::NotFound(_) => "not_found",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        let message = e.to_string();
        match e.find_root() {
            DataFusionError::ResourcesExhausted(_) => Self::MemoryLimit(format!(
                "the query needs more memory than its limit allows: {message}"
            )),
            DataFusionError::SQL(..)
            | DataFusionError::Plan(_)
            | DataFusionError::SchemaError(..)
            | DataFusionError::NotImplemented(_)
            | DataFusionError::Execution(_)
            | DataFusionError::ArrowError(..) => Self::Invalid(message),
            _ => Self::Internal(message),
        }
    }
}

/// A statement ready to run.
#[derive(Debug)]
pub enum Prepared {
    /// A read-only query, parameters bound.
    Query(Box<LogicalPlan>),
    /// One of Quiver's own DDL statements; the caller checks the right to run it.
    Ddl(QuiverDdl),
}

/// The runtime queries execute on, and the parts of DataFusion's runtime they share
/// (object stores, the Parquet metadata cache).
#[derive(Debug)]
pub(crate) struct QueryRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    env: Arc<RuntimeEnv>,
    options: QueryOptions,
}

impl QueryRuntime {
    pub(crate) fn new(options: QueryOptions) -> crate::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.threads.max(1))
            .thread_name("quiver-query")
            // Planning, optimizing and evaluating recurse over expression trees as deep
            // as a statement is long; stacks are reserved, not committed, until used.
            .thread_stack_size(QUERY_STACK_BYTES)
            .enable_all()
            .build()?;
        // Operators that can spill (sorts, aggregations, repartitions) write temporary
        // files in one folder, under a total size cap, when a query reaches its memory
        // limit; a query that cannot spill its way under the limit fails.
        let mode = match (&options.spill_dir, options.spill_bytes) {
            (_, 0) => DiskManagerMode::Disabled,
            (Some(dir), _) => DiskManagerMode::Directories(vec![dir.clone()]),
            (None, _) => DiskManagerMode::OsTmpDirectory,
        };
        // A spilled aggregation merges its sorted runs back with one memory reservation
        // it shares with its own hash table; unbounded, the merge opens as many runs as
        // the pool lets it and leaves the aggregation no room to grow, which fails the
        // query. A bounded fan-in merges in more passes instead.
        let env = RuntimeEnvBuilder::new()
            .with_disk_manager_builder(
                DiskManagerBuilder::default()
                    .with_mode(mode)
                    .with_max_temp_directory_size(options.spill_bytes)
                    .with_max_spill_merge_fan_in(SPILL_MERGE_FAN_IN),
            )
            .build_arc()?;
        Ok(Self {
            runtime: Some(runtime),
            env,
            options,
        })
    }

    pub(crate) fn handle(&self) -> tokio::runtime::Handle {
        match &self.runtime {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }

    pub(crate) fn options(&self) -> &QueryOptions {
        &self.options
    }

    fn env_for_query(&self) -> Arc<RuntimeEnv> {
        // Fair to spilling operators: each partition's sort or aggregation gets an equal
        // share, so one cannot starve another's merge phase; and they leave room for
        // the operators that cannot spill (`pool.rs`).
        let pool = TrackConsumersPool::new(
            pool::QueryPool::new(self.options.memory_limit),
            NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
        );
        Arc::new(RuntimeEnv {
            memory_pool: Arc::new(pool),
            ..(*self.env).clone()
        })
    }
}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime; let its
        // threads wind down on their own.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// One query's session (a connection's, for the Postgres surface); clones share it.
#[derive(Clone)]
pub struct QuerySession {
    ctx: SessionContext,
    runtime: tokio::runtime::Handle,
    metrics: Arc<EngineMetrics>,
}

impl std::fmt::Debug for QuerySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuerySession")
            .field("session_id", &self.ctx.session_id())
            .finish()
    }
}

impl QuerySession {
    pub(crate) fn new(
        source: Arc<dyn TableSource>,
        metrics: Arc<EngineMetrics>,
        runtime: &QueryRuntime,
    ) -> Self {
        Self::build(source, metrics, runtime, true)
    }

    /// A session for planning views: `DISTINCT ON` stays as it is written, since views
    /// maintain it as its own operator.
    pub(crate) fn for_views(
        source: Arc<dyn TableSource>,
        metrics: Arc<EngineMetrics>,
        runtime: &QueryRuntime,
    ) -> Self {
        Self::build(source, metrics, runtime, false)
    }

    fn build(
        source: Arc<dyn TableSource>,
        metrics: Arc<EngineMetrics>,
        runtime: &QueryRuntime,
        adhoc: bool,
    ) -> Self {
        let config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG, SCHEMA)
            .with_information_schema(true)
            .with_target_partitions(runtime.options.threads.max(1));
        let mut state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime.env_for_query())
            .with_default_features()
            .with_query_planner(Arc::new(latest::QuiverQueryPlanner))
            .build();
        if adhoc {
            state.add_analyzer_rule(Arc::new(distinct_on::DistinctOnAsLatest));
        }
        let ctx = SessionContext::new_with_state(state);
        ctx.register_catalog(CATALOG, Arc::new(QuiverCatalog::new(Arc::clone(&source))));
        ctx.register_udtf(
            TimeTravel::AT_VERSION,
            Arc::new(TimeTravel::new(Arc::clone(&source), false)),
        );
        ctx.register_udtf(TimeTravel::AT_TIME, Arc::new(TimeTravel::new(source, true)));
        Self {
            ctx,
            runtime: runtime.handle(),
            metrics,
        }
    }

    /// Parses and plans one statement, binding `params` to `$1`, `$2`, …. The work runs
    /// on the query runtime, whose threads have the deep stacks planning may need.
    pub async fn prepare(&self, sql: &str, params: &[ScalarValue]) -> Result<Prepared, QueryError> {
        self.prepare_holding(sql, params, ())
            .await
            .map(|(prepared, ())| prepared)
    }

    /// Parses and plans one statement, leaving its placeholders (`$1`, …) unbound, for
    /// protocols that describe a statement before its values arrive (Postgres extended
    /// query, Flight SQL prepared statements). Bind with [`bind_params`].
    pub async fn prepare_unbound(&self, sql: &str) -> Result<Prepared, QueryError> {
        let ctx = self.ctx.clone();
        let sql = sql.to_owned();
        self.runtime
            .spawn(async move { prepare(&ctx, &sql, None).await })
            .await
            .map_err(|e| QueryError::Internal(format!("planning failed: {e}")))?
    }

    /// The DataFusion context behind the session, for surfaces that add their own
    /// catalog views and functions to it (the Postgres `pg_catalog`).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// [`Self::prepare`], holding `guard` until planning has really finished. Planning
    /// cannot be interrupted: a caller that stops waiting (a deadline) leaves the guard
    /// (e.g. a concurrency slot) with the work still running, and gets it back otherwise.
    pub async fn prepare_holding<G: Send + 'static>(
        &self,
        sql: &str,
        params: &[ScalarValue],
        guard: G,
    ) -> Result<(Prepared, G), QueryError> {
        let ctx = self.ctx.clone();
        let (sql, params) = (sql.to_owned(), params.to_vec());
        self.runtime
            .spawn(async move { prepare(&ctx, &sql, Some(&params)).await.map(|p| (p, guard)) })
            .await
            .map_err(|e| QueryError::Internal(format!("planning failed: {e}")))?
    }

    /// Plans and starts a prepared query. Call it on the query runtime
    /// ([`Engine::query_runtime`]); the stream does its work where it is polled.
    ///
    /// When the stream ends or is dropped, what its operators spilled to disk is added
    /// to `quiver_sql_spills_total` and `quiver_sql_spilled_bytes_total`.
    pub async fn execute(
        &self,
        plan: LogicalPlan,
    ) -> Result<SendableRecordBatchStream, QueryError> {
        let frame = self.ctx.execute_logical_plan(plan).await?;
        let task = Arc::new(frame.task_ctx());
        let physical = frame.create_physical_plan().await?;
        let stream = datafusion::physical_plan::execute_stream(Arc::clone(&physical), task)?;
        Ok(Box::pin(spill::Counted::new(
            stream,
            physical,
            Arc::clone(&self.metrics),
        )))
    }
}

impl QuerySession {
    /// The session's planner state.
    pub(crate) fn state(&self) -> datafusion::execution::session_state::SessionState {
        self.ctx.state()
    }

    /// Plans a view's query: read-only checks, then the analyzer (type coercion), but
    /// not the optimizer, whose rewrites would hide the shapes views maintain.
    pub(crate) async fn plan_view(&self, sql: &str) -> Result<LogicalPlan, QueryError> {
        let plan = match prepare(&self.ctx, sql, Some(&[])).await? {
            Prepared::Query(plan) => *plan,
            Prepared::Ddl(d) => {
                return Err(QueryError::Invalid(format!(
                    "a view is defined by a query, not by {}",
                    d.kind()
                )));
            }
        };
        if matches!(
            plan,
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) | LogicalPlan::DescribeTable(_)
        ) {
            return Err(QueryError::Invalid(
                "a view is defined by a SELECT query".into(),
            ));
        }
        let state = self.ctx.state();
        Ok(state
            .analyzer()
            .execute_and_check(plan, state.config_options(), |_, _| {})?)
    }

    /// Streams every row of a table provider.
    pub(crate) async fn scan(
        &self,
        provider: Arc<dyn datafusion::catalog::TableProvider>,
    ) -> Result<SendableRecordBatchStream, QueryError> {
        Ok(self.ctx.read_table(provider)?.execute_stream().await?)
    }
}

/// Parses, checks, plans and (given `params`) binds one statement.
async fn prepare(
    ctx: &SessionContext,
    sql: &str,
    params: Option<&[ScalarValue]>,
) -> Result<Prepared, QueryError> {
    if let Some(ddl) = ddl::parse(sql)? {
        return Ok(Prepared::Ddl(ddl));
    }
    let sql = ddl::rewrite_show(sql).unwrap_or_else(|| sql.to_owned());
    let sql = rewrite::time_travel(&sql)?;
    let state = ctx.state();
    let mut statements = DFParser::parse_sql_with_dialect(&sql, &GenericDialect {})?;
    if statements.len() > 1 {
        return Err(QueryError::Invalid(format!(
            "send one statement per request; this one has {}",
            statements.len()
        )));
    }
    let statement = statements
        .pop_front()
        .ok_or_else(|| QueryError::Invalid("the request holds no SQL statement".into()))?;
    check_read_only(&statement)?;
    let plan = state.statement_to_plan(statement).await?;
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)
        .map_err(|e| QueryError::NotAllowed(e.strip_backtrace()))?;
    let plan = match params {
        Some(params) => bind_params(plan, params)?,
        None => plan,
    };
    Ok(Prepared::Query(Box::new(plan)))
}

/// Refuses, by its parsed form, every statement that is not a read.
fn check_read_only(statement: &DfStatement) -> Result<(), QueryError> {
    let refuse = |what: &str| {
        Err(QueryError::NotAllowed(format!(
            "{what} is not allowed: Quiver's SQL endpoints run read-only queries \
             (SELECT, EXPLAIN, SHOW, DESCRIBE) and Quiver's own DDL"
        )))
    };
    match statement {
        DfStatement::Statement(s) => match s.as_ref() {
            SqlStatement::Query(_)
            | SqlStatement::ExplainTable { .. }
            | SqlStatement::ShowTables { .. }
            | SqlStatement::ShowColumns { .. }
            | SqlStatement::ShowVariable { .. }
            | SqlStatement::ShowFunctions { .. } => Ok(()),
            SqlStatement::Explain { statement, .. } => {
                check_read_only(&DfStatement::Statement(statement.clone()))
            }
            other => refuse(&statement_kind(other)),
        },
        DfStatement::Explain(explain) => check_read_only(&explain.statement),
        DfStatement::CreateExternalTable(_) => refuse("CREATE EXTERNAL TABLE"),
        DfStatement::CopyTo(_) => refuse("COPY"),
        DfStatement::Reset(_) => refuse("RESET"),
    }
}

/// The leading keywords of a statement, for messages (`INSERT`, `CREATE TABLE`, …).
fn statement_kind(statement: &SqlStatement) -> String {
    let text = statement.to_string();
    let words: Vec<&str> = text.split_whitespace().take(3).collect();
    let n = match words.first().map(|w| w.to_ascii_uppercase()) {
        Some(w) if w == "CREATE" || w == "DROP" || w == "ALTER" => 2,
        _ => 1,
    };
    words
        .iter()
        .take(n)
        .map(|w| w.to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Binds positional parameters, converting each value to the type its placeholder needs.
pub fn bind_params(plan: LogicalPlan, params: &[ScalarValue]) -> Result<LogicalPlan, QueryError> {
    let types = plan.get_parameter_types()?;
    let wanted = types.len();
    if wanted == 0 && params.is_empty() {
        return Ok(plan);
    }
    if params.len() != wanted {
        return Err(QueryError::Invalid(format!(
            "the statement has {wanted} parameter(s) ($1 … ${wanted}) but {} value(s) were given",
            params.len()
        )));
    }
    let mut values = Vec::with_capacity(params.len());
    for (i, value) in params.iter().enumerate() {
        let name = format!("${}", i + 1);
        let Some(slot) = types.get(&name) else {
            return Err(QueryError::Invalid(format!(
                "parameters must be numbered $1 … ${wanted}; {name} is not used"
            )));
        };
        values.push(cast_param(
            &format!("parameter {name}"),
            value,
            slot.as_ref(),
        )?);
    }
    Ok(plan.with_param_values(ParamValues::from(values))?)
}

/// `value` as the type its placeholder needs (`ty`, when planning inferred one); a
/// null becomes that type's null. `label` names the parameter in the error.
pub fn cast_param(
    label: &str,
    value: &ScalarValue,
    ty: Option<&datafusion::arrow::datatypes::DataType>,
) -> Result<ScalarValue, QueryError> {
    Ok(match ty {
        Some(ty) if value.is_null() => ScalarValue::try_from(ty)?,
        Some(ty) if value.data_type() != *ty => value.cast_to(ty).map_err(|e| {
            QueryError::Invalid(format!(
                "{label}: {value} cannot be used as {ty}: {}",
                e.strip_backtrace()
            ))
        })?,
        _ => value.clone(),
    })
}

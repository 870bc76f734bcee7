//! The tables a query sees: each stream as its Delta snapshot united with its live buffer,
//! and older versions of a stream through the time-travel table functions.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use datafusion::catalog::{
    CatalogProvider, SchemaProvider, Session, TableFunctionArgs, TableFunctionImpl, TableProvider,
};
use datafusion::common::{DataFusionError, ScalarValue, plan_err};
use datafusion::datasource::MemTable;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::union::UnionExec;
use deltalake::DeltaTable;
use deltalake::delta_datafusion::{DeltaScanConfig, DeltaScanNext};

use crate::schema::StreamSchema;
use crate::table::TableAt;
use crate::views::ViewShared;

/// What queries read, and all the query layer knows of the engine: streams as a Delta
/// snapshot plus buffered batches, their older versions, and the views' rows. The
/// engine implements it; queries hold it as `Arc<dyn TableSource>`.
#[async_trait]
pub(crate) trait TableSource: std::fmt::Debug + Send + Sync + 'static {
    /// Every stream's name.
    fn stream_names(&self) -> Vec<String>;
    /// Every view's name.
    fn view_names(&self) -> Vec<String>;
    /// A stream's schema.
    fn stream_schema(&self, name: &str) -> Option<StreamSchema>;
    /// What a query reads of a stream now.
    fn read_snapshot(&self, stream: &str) -> Option<ReadSnapshot>;
    /// A view, to read its rows at its latest version.
    fn view(&self, name: &str) -> Option<Arc<ViewShared>>;
    /// Names of the result tables batch jobs wrote.
    fn result_names(&self) -> Vec<String>;
    /// A result table as last loaded.
    fn result_table(&self, name: &str) -> Option<DeltaTable>;
    /// Names of Quiver's own tables (`alerts`, `notifications`).
    fn system_names(&self) -> Vec<String>;
    /// A system table's rows now.
    fn system_table(&self, name: &str) -> Option<RecordBatch>;
    /// A stream's or result table's Delta table as it was at a version or instant.
    async fn historical_table(&self, name: &str, at: TableAt) -> crate::Result<DeltaTable>;
}

/// What a query reads of one stream: a published table state and the buffered batches
/// that state does not hold yet.
#[derive(Debug)]
pub(crate) struct ReadSnapshot {
    pub(crate) table: DeltaTable,
    pub(crate) buffered: Vec<RecordBatch>,
}

/// Name of the catalog every surface shows.
pub const CATALOG: &str = "quiver";
/// Name of the schema that holds streams, views and job outputs.
pub const SCHEMA: &str = "public";

/// The `quiver` catalog: the schema `public`, plus any a surface adds to its own
/// session (the Postgres surface adds `pg_catalog`).
#[derive(Debug)]
pub(crate) struct QuiverCatalog {
    schema: Arc<PublicSchema>,
    added: parking_lot::RwLock<Vec<(String, Arc<dyn SchemaProvider>)>>,
}

impl QuiverCatalog {
    pub(crate) fn new(engine: Arc<dyn TableSource>) -> Self {
        Self {
            schema: Arc::new(PublicSchema { engine }),
            added: parking_lot::RwLock::new(Vec::new()),
        }
    }
}

impl CatalogProvider for QuiverCatalog {
    fn schema_names(&self) -> Vec<String> {
        let mut names = vec![SCHEMA.to_owned()];
        names.extend(self.added.read().iter().map(|(n, _)| n.clone()));
        names
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        if name == SCHEMA {
            return Some(Arc::clone(&self.schema) as Arc<dyn SchemaProvider>);
        }
        let added = self.added.read();
        added
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| Arc::clone(s))
    }

    fn register_schema(
        &self,
        name: &str,
        schema: Arc<dyn SchemaProvider>,
    ) -> datafusion::error::Result<Option<Arc<dyn SchemaProvider>>> {
        if name == SCHEMA {
            return Err(DataFusionError::Plan(format!(
                "the schema '{SCHEMA}' cannot be replaced"
            )));
        }
        let mut added = self.added.write();
        let old = added
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| added.remove(i).1);
        added.push((name.to_owned(), schema));
        Ok(old)
    }
}

/// The `public` schema: every stream, resolved when a query names it.
#[derive(Debug)]
struct PublicSchema {
    engine: Arc<dyn TableSource>,
}

#[async_trait]
impl SchemaProvider for PublicSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names = self.engine.stream_names();
        names.extend(self.engine.view_names());
        names.extend(self.engine.result_names());
        for name in self.engine.system_names() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    async fn table(&self, name: &str) -> datafusion::error::Result<Option<Arc<dyn TableProvider>>> {
        if let Some(snapshot) = self.engine.read_snapshot(name) {
            return Ok(Some(Arc::new(StreamProvider::live(
                snapshot.table,
                snapshot.buffered,
            )?)));
        }
        if let Some(table) = self.engine.result_table(name) {
            return Ok(Some(Arc::new(StreamProvider::live(table, Vec::new())?)));
        }
        let Some(view) = self.engine.view(name) else {
            // Quiver's own tables come last: a stream or view of the same name wins.
            let Some(rows) = self.engine.system_table(name) else {
                return Ok(None);
            };
            let table = MemTable::try_new(rows.schema(), vec![vec![rows]])?;
            return Ok(Some(Arc::new(table)));
        };
        // A view is read at its latest published version.
        let (_, rows) = view.snapshot()?;
        let table = MemTable::try_new(view.schema(), vec![vec![rows]])?;
        Ok(Some(Arc::new(ViewRows(table))))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.engine.stream_schema(name).is_some()
            || self.engine.view(name).is_some()
            || self.engine.result_table(name).is_some()
            || self.engine.system_names().iter().any(|n| n == name)
    }
}

/// A materialized view's rows at one version; listed as a view in the catalog.
#[derive(Debug)]
struct ViewRows(MemTable);

#[async_trait]
impl TableProvider for ViewRows {
    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        self.0.scan(state, projection, filters, limit).await
    }
}

/// A stream as one query sees it.
///
/// `Live`: the published Delta snapshot plus the buffered events the snapshot does not
/// hold yet. Both are fixed when the query resolves the table, so every event
/// acknowledged before that moment is read exactly once.
/// `History`: the stream's Delta table at an earlier version or instant, loaded when the
/// query is planned (stored events only).
#[derive(Debug)]
pub(crate) struct StreamProvider {
    schema: SchemaRef,
    source: Source,
}

#[derive(Debug)]
enum Source {
    Live {
        table: DeltaTable,
        delta: DeltaScanNext,
        buffered: Vec<RecordBatch>,
    },
    History {
        engine: Arc<dyn TableSource>,
        stream: String,
        at: TableAt,
    },
}

impl StreamProvider {
    pub(crate) fn live(
        table: DeltaTable,
        buffered: Vec<RecordBatch>,
    ) -> Result<Self, DataFusionError> {
        let delta = delta_scan(&table)?;
        // The buffer holds the stored schema; give its batches the scan's exact schema
        // (text as views) so the two sides can be united.
        let schema = delta.schema();
        let buffered = buffered
            .iter()
            .map(|b| cast_batch(b, &schema))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            schema,
            source: Source::Live {
                table,
                delta,
                buffered,
            },
        })
    }

    /// `name` (a stream or a result table) as it was at `at`, read with `schema`.
    fn history(engine: Arc<dyn TableSource>, name: &str, schema: SchemaRef, at: TableAt) -> Self {
        Self {
            schema,
            source: Source::History {
                engine,
                stream: name.to_owned(),
                at,
            },
        }
    }
}

/// A Delta scan whose schema is [`query_schema`] of the stream's stored schema: text as
/// `Utf8View` (read from Parquet pages without copying, compared and grouped faster), the
/// partition column as a plain `Date32`.
pub(crate) fn delta_scan(table: &DeltaTable) -> Result<DeltaScanNext, DataFusionError> {
    let snapshot = table
        .snapshot()
        .map_err(|e| DataFusionError::External(Box::new(e)))?
        .snapshot()
        .clone();
    // Filters still prune files, row groups and pages by statistics; they are evaluated
    // on decoded batches rather than during decoding (DataFusion's default), which
    // measured faster for the KPI queries (BENCHMARKS.md).
    let mut config = DeltaScanConfig::new()
        .with_wrap_partition_values(false)
        .with_parquet_pushdown(false);
    config.schema_force_view_types = true;
    DeltaScanNext::new(Arc::new(snapshot), config)
}

/// The schema queries see for a stream stored as `stored`: every `Utf8` as `Utf8View`.
pub(crate) fn query_schema(stored: &Schema) -> SchemaRef {
    retype_text(stored, &DataType::Utf8, DataType::Utf8View)
}

/// `schema` with every field of type `from` given type `to`.
pub fn retype_text(schema: &Schema, from: &DataType, to: DataType) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            let field = f.as_ref().clone();
            if f.data_type() == from {
                field.with_data_type(to.clone())
            } else {
                field
            }
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// `batch` with its columns cast to the types of `schema` (same columns, in order).
pub fn cast_batch(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| arrow::compute::cast(c, f.data_type()))
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(Arc::clone(schema), columns)
}

#[async_trait]
impl TableProvider for StreamProvider {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        // The Delta side prunes files, row groups and pages with them; the buffer side is
        // filtered by DataFusion above the scan.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let loaded;
        let (table, delta, buffered) = match &self.source {
            Source::Live {
                table,
                delta,
                buffered,
            } => (table, delta, buffered.as_slice()),
            Source::History { engine, stream, at } => {
                let table = engine.historical_table(stream, *at).await.map_err(|e| {
                    DataFusionError::Execution(format!(
                        "cannot read '{stream}' at {}: {e}",
                        describe(*at)
                    ))
                })?;
                let delta = delta_scan(&table)?;
                loaded = (table, delta);
                (&loaded.0, &loaded.1, &[][..])
            }
        };
        table
            .update_datafusion_session(state)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let stored = delta.scan(state, projection, filters, limit).await?;
        if buffered.is_empty() {
            return Ok(stored);
        }
        let live = MemorySourceConfig::try_new_exec(
            &[buffered.to_vec()],
            Arc::clone(&self.schema),
            projection.cloned(),
        )?;
        UnionExec::try_new(vec![stored, live])
    }
}

fn describe(at: TableAt) -> String {
    match at {
        TableAt::Version(v) => format!("version {v}"),
        TableAt::Time(t) => format!("time {}", t.to_rfc3339()),
    }
}

/// `table_at_version('orders', n)` and `table_at_time('orders', '2026-11-25T10:00:00Z')`:
/// a stream (stored events only) or a result table as its Delta table was at a version or instant.
#[derive(Debug)]
pub(crate) struct TimeTravel {
    engine: Arc<dyn TableSource>,
    by_time: bool,
}

impl TimeTravel {
    pub(crate) const AT_VERSION: &'static str = "table_at_version";
    pub(crate) const AT_TIME: &'static str = "table_at_time";

    pub(crate) fn new(engine: Arc<dyn TableSource>, by_time: bool) -> Self {
        Self { engine, by_time }
    }

    fn name(&self) -> &'static str {
        if self.by_time {
            Self::AT_TIME
        } else {
            Self::AT_VERSION
        }
    }
}

impl TableFunctionImpl for TimeTravel {
    fn call_with_args(
        &self,
        args: TableFunctionArgs,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let name = self.name();
        let usage = if self.by_time {
            "table_at_time('stream', '2026-11-25T10:00:00Z')"
        } else {
            "table_at_version('stream', 3)"
        };
        let [stream, at] = args.exprs() else {
            return plan_err!("{name} takes two arguments: {usage}");
        };
        let Expr::Literal(ScalarValue::Utf8(Some(stream)), _) = stream else {
            return plan_err!(
                "{name}: the first argument must be a stream or table name in quotes: {usage}"
            );
        };
        // A stream is read with its stored schema; a result table (whose schema a
        // job may change between runs) with its latest one.
        let schema = match self.engine.stream_schema(stream) {
            Some(s) => query_schema(s.stored_schema()),
            None => match self.engine.result_table(stream) {
                Some(table) => delta_scan(&table)?.schema(),
                None => return plan_err!("{name}: unknown stream or table '{stream}'"),
            },
        };
        let at = match (self.by_time, at) {
            (false, Expr::Literal(ScalarValue::Int64(Some(v)), _)) if *v >= 0 => {
                TableAt::Version(*v as u64)
            }
            (true, Expr::Literal(ScalarValue::Utf8(Some(text)), _)) => {
                let t = DateTime::parse_from_rfc3339(text).map_err(|e| {
                    DataFusionError::Plan(format!(
                        "{name}: '{text}' is not an RFC 3339 time ({e}): {usage}"
                    ))
                })?;
                TableAt::Time(t.with_timezone(&Utc))
            }
            (true, Expr::Literal(ScalarValue::TimestampMicrosecond(Some(us), _), _)) => {
                TableAt::Time(DateTime::from_timestamp_micros(*us).unwrap_or_default())
            }
            (true, Expr::Literal(ScalarValue::TimestampNanosecond(Some(ns), _), _)) => {
                TableAt::Time(DateTime::from_timestamp_nanos(*ns))
            }
            _ => return plan_err!("{name}: the second argument is not valid: {usage}"),
        };
        Ok(Arc::new(StreamProvider::history(
            Arc::clone(&self.engine),
            stream,
            schema,
            at,
        )))
    }
}

//! The latest row per key: `DISTINCT ON (k) … ORDER BY k, t DESC` as one row per key
//! in a hash table, instead of a sort of every row.
//!
//! [`LatestPerKey`] is the logical node (output: the input's rows, one per key) and
//! [`LatestPerKeyExec`] runs it. For every key the operator knows where its best row so
//! far lives (an input batch it holds and a row in it), and a new row replaces it when
//! it comes first in the ORDER BY. Rows are compared in arrow's row format, bytes that
//! sort as the ORDER BY does, so one comparison is a `memcmp` whatever the columns. A
//! batch is held only while it has a best row, and when the batches held have more
//! than twice as many rows as there are keys, the best rows are copied into one batch
//! and the rest let go: memory stays near one row per key.
//!
//! Each input partition first keeps its own best rows (`Partial`); those are spread
//! across partitions by a hash of the key, and each partition keeps the best of what
//! it is sent (`Final`). Ties in the ORDER BY keep the row seen first, as the sort did
//! not promise either. The state does not spill: past the query's memory limit the
//! query fails with DataFusion's "resources exhausted" error.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::compute::{SortOptions, interleave_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::row::{Row, RowConverter, Rows, SortField};
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchemaRef, Result, internal_err};
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Expr, LogicalPlan, SortExpr, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;
use datafusion::physical_plan::execution_plan::EmissionType;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, ExecutionPlanProperties,
    PlanProperties, apply_expression_roots,
};
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};
use futures::{StreamExt, TryStreamExt};

use crate::views::evaluate;

/// One row per value of `keys`: the first in `order` (any one when `order` is empty).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Hash)]
pub(crate) struct LatestPerKey {
    input: LogicalPlan,
    keys: Vec<Expr>,
    order: Vec<SortExpr>,
}

impl LatestPerKey {
    pub(crate) fn new(input: LogicalPlan, keys: Vec<Expr>, order: Vec<SortExpr>) -> Self {
        Self { input, keys, order }
    }
}

impl UserDefinedLogicalNodeCore for LatestPerKey {
    fn name(&self) -> &str {
        "LatestPerKey"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        self.input.schema()
    }

    fn expressions(&self) -> Vec<Expr> {
        let order = self.order.iter().map(|s| s.expr.clone());
        self.keys.iter().cloned().chain(order).collect()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "LatestPerKey: on=[{}]", list(&self.keys))?;
        write!(f, ", order=[{}]", list(&self.order))
    }

    fn with_exprs_and_inputs(
        &self,
        mut exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        if exprs.len() != self.keys.len() + self.order.len() || inputs.len() != 1 {
            return internal_err!("LatestPerKey rebuilt with the wrong expressions or inputs");
        }
        let order = exprs.split_off(self.keys.len());
        let order = self
            .order
            .iter()
            .zip(order)
            .map(|(s, expr)| SortExpr::new(expr, s.asc, s.nulls_first))
            .collect();
        Ok(Self {
            input: inputs.swap_remove(0),
            keys: exprs,
            order,
        })
    }

    /// The output has the input's columns, so a column the parents do not need is not
    /// needed below either (the optimizer adds the columns the keys and order read).
    fn necessary_children_exprs(&self, output_columns: &[usize]) -> Option<Vec<Vec<usize>>> {
        Some(vec![output_columns.to_vec()])
    }
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The query planner of ad-hoc sessions: DataFusion's, plus [`LatestPerKey`].
#[derive(Debug)]
pub(crate) struct QuiverQueryPlanner;

#[async_trait]
impl QueryPlanner for QuiverQueryPlanner {
    async fn create_physical_plan(
        &self,
        plan: &LogicalPlan,
        session: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        DefaultPhysicalPlanner::with_extension_planners(vec![Arc::new(LatestPlanner)])
            .create_physical_plan(plan, session)
            .await
    }
}

struct LatestPlanner;

#[async_trait]
impl ExtensionPlanner for LatestPlanner {
    async fn plan_extension(
        &self,
        planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        session: &dyn Session,
        planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<LatestPerKey>() else {
            return Ok(None);
        };
        let (Some(logical), Some(input)) = (logical_inputs.first(), physical_inputs.first()) else {
            return internal_err!("LatestPerKey has no input");
        };
        let schema = logical.schema();
        let physical = |e: &Expr| planner.create_physical_expr(e, schema, session, planning_ctx);
        let keys = node.keys.iter().map(physical).collect::<Result<Vec<_>>>()?;
        let order = node
            .order
            .iter()
            .map(|s| {
                let options = SortOptions::new(!s.asc, s.nulls_first);
                Ok(PhysicalSortExpr::new(physical(&s.expr)?, options))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut plan = Arc::clone(input);
        if plan.output_partitioning().partition_count() > 1 {
            plan = Arc::new(LatestPerKeyExec::new(
                plan,
                keys.clone(),
                order.clone(),
                Mode::Partial,
            ));
        }
        Ok(Some(Arc::new(LatestPerKeyExec::new(
            plan,
            keys,
            order,
            Mode::Final,
        ))))
    }
}

/// `Partial` keeps the best rows of one input partition, whatever keys it holds;
/// `Final` asks for its input partitioned by the keys, so it sees every candidate of a
/// key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Partial,
    Final,
}

/// Runs [`LatestPerKey`].
#[derive(Debug)]
pub(crate) struct LatestPerKeyExec {
    input: Arc<dyn ExecutionPlan>,
    keys: Vec<Arc<dyn PhysicalExpr>>,
    order: Vec<PhysicalSortExpr>,
    mode: Mode,
    properties: Arc<PlanProperties>,
}

impl LatestPerKeyExec {
    fn new(
        input: Arc<dyn ExecutionPlan>,
        keys: Vec<Arc<dyn PhysicalExpr>>,
        order: Vec<PhysicalSortExpr>,
        mode: Mode,
    ) -> Self {
        // A subset of each input partition's rows, in no particular order.
        let properties = PlanProperties::new(
            EquivalenceProperties::new(input.schema()),
            input.output_partitioning().clone(),
            EmissionType::Final,
            input.boundedness(),
        );
        Self {
            input,
            keys,
            order,
            mode,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for LatestPerKeyExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "LatestPerKeyExec: mode={:?}, on=[{}], order=[{}]",
            self.mode,
            list(&self.keys),
            list(&self.order)
        )
    }
}

impl ExecutionPlan for LatestPerKeyExec {
    fn name(&self) -> &str {
        "LatestPerKeyExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![match self.mode {
            Mode::Partial => Distribution::UnspecifiedDistribution,
            Mode::Final => Distribution::KeyPartitioned(self.keys.clone()),
        }]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        let order = self.order.iter().map(|s| &s.expr);
        apply_expression_roots(self.keys.iter().chain(order).cloned(), f)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return internal_err!("LatestPerKeyExec has one child");
        }
        Ok(Arc::new(Self::new(
            children.swap_remove(0),
            self.keys.clone(),
            self.order.clone(),
            self.mode,
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let schema = self.schema();
        let mut input = self.input.execute(partition, Arc::clone(&context))?;
        let reservation = MemoryConsumer::new(format!("LatestPerKeyExec[{partition}]"))
            .register(context.memory_pool());
        let mut state = Latest::new(&self.keys, &self.order, &schema, reservation)?;
        let batch_size = context.session_config().batch_size();
        let rows = futures::stream::once(async move {
            while let Some(batch) = input.next().await {
                state.push(batch?)?;
            }
            state.finish(batch_size)
        })
        .map_ok(|batches| futures::stream::iter(batches.into_iter().map(Ok)))
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, rows)))
    }
}

/// Where a key's best row lives: an index into `Latest::held`, and a row in it.
#[derive(Debug, Clone, Copy)]
struct Best {
    held: u32,
    row: u32,
}

impl Best {
    /// A key seen for the first time in the batch at hand.
    const NEW: Self = Self {
        held: u32::MAX,
        row: 0,
    };
}

/// An input batch that holds at least one best row, and its order columns in row
/// format (none when there is no ORDER BY).
struct Held {
    batch: RecordBatch,
    order: Option<Rows>,
}

/// Rows held past those that are some key's best before the best are copied out.
const SLACK_ROWS: usize = 1 << 16;

/// The state of one partition.
struct Latest {
    keys: Vec<Arc<dyn PhysicalExpr>>,
    order: Vec<Arc<dyn PhysicalExpr>>,
    /// Key values to dense key ids, DataFusion's GROUP BY tables.
    groups: Box<dyn GroupValues>,
    converter: Option<RowConverter>,
    /// By key id.
    best: Vec<Best>,
    held: Vec<Held>,
    held_rows: usize,
    held_bytes: usize,
    /// Key ids of the rows of the batch at hand (reused).
    ids: Vec<usize>,
    reservation: MemoryReservation,
}

impl Latest {
    fn new(
        keys: &[Arc<dyn PhysicalExpr>],
        order: &[PhysicalSortExpr],
        schema: &Schema,
        reservation: MemoryReservation,
    ) -> Result<Self> {
        let key_fields = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                Ok(Field::new(
                    format!("k{i}"),
                    k.data_type(schema)?,
                    k.nullable(schema)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let groups = new_group_values(Arc::new(Schema::new(key_fields)), &GroupOrdering::None)?;
        let converter = if order.is_empty() {
            None
        } else {
            let fields = order
                .iter()
                .map(|s| {
                    Ok(SortField::new_with_options(
                        s.expr.data_type(schema)?,
                        s.options,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            Some(RowConverter::new(fields)?)
        };
        Ok(Self {
            keys: keys.to_vec(),
            order: order.iter().map(|s| Arc::clone(&s.expr)).collect(),
            groups,
            converter,
            best: Vec::new(),
            held: Vec::new(),
            held_rows: 0,
            held_bytes: 0,
            ids: Vec::new(),
            reservation,
        })
    }

    fn push(&mut self, batch: RecordBatch) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let keys = evaluate(&self.keys, &batch)?;
        self.ids.clear();
        self.groups.intern(&keys, &mut self.ids)?;
        let order = match &self.converter {
            Some(c) => Some(c.convert_columns(&evaluate(&self.order, &batch)?)?),
            None => None,
        };
        let here = u32::try_from(self.held.len()).expect("fewer than 2^32 batches held");
        self.best.resize(self.groups.len(), Best::NEW);
        let mut kept = false;
        for (row, &id) in self.ids.iter().enumerate() {
            let best = self.best[id];
            let better = if best.held == Best::NEW.held {
                true
            } else if let Some(order) = &order {
                let current = if best.held == here {
                    order.row(best.row as usize)
                } else {
                    self.order_row(best)
                };
                order.row(row) < current
            } else {
                false
            };
            if better {
                self.best[id] = Best {
                    held: here,
                    row: row as u32,
                };
                kept = true;
            }
        }
        if kept {
            self.held_rows += n;
            self.held_bytes += batch.get_array_memory_size() + order.as_ref().map_or(0, Rows::size);
            self.held.push(Held { batch, order });
            if self.held_rows > 2 * self.best.len() + SLACK_ROWS {
                self.compact()?;
            }
        }
        self.reserve()
    }

    /// Copies the best rows into one batch and lets go of the batches they came from.
    fn compact(&mut self) -> Result<()> {
        let batch = compact_views(self.take(&self.best)?)?;
        let order = match &self.converter {
            Some(c) => {
                let mut rows = c.empty_rows(self.best.len(), 0);
                for &b in &self.best {
                    rows.push(self.order_row(b));
                }
                Some(rows)
            }
            None => None,
        };
        for (i, b) in self.best.iter_mut().enumerate() {
            *b = Best {
                held: 0,
                row: i as u32,
            };
        }
        self.held_rows = batch.num_rows();
        self.held_bytes = batch.get_array_memory_size() + order.as_ref().map_or(0, Rows::size);
        self.held = vec![Held { batch, order }];
        Ok(())
    }

    /// The order columns of a best row in a held batch, in row format.
    fn order_row(&self, b: Best) -> Row<'_> {
        let held = self.held[b.held as usize].order.as_ref();
        held.expect("held batches have their order rows when there is an ORDER BY")
            .row(b.row as usize)
    }

    fn take(&self, best: &[Best]) -> Result<RecordBatch> {
        let batches: Vec<&RecordBatch> = self.held.iter().map(|h| &h.batch).collect();
        let indices: Vec<(usize, usize)> = best
            .iter()
            .map(|b| (b.held as usize, b.row as usize))
            .collect();
        Ok(interleave_record_batch(&batches, &indices)?)
    }

    fn reserve(&mut self) -> Result<()> {
        let bytes = self.held_bytes
            + self.groups.size()
            + self.best.capacity() * size_of::<Best>()
            + self.ids.capacity() * size_of::<usize>();
        self.reservation.try_resize(bytes)
    }

    fn finish(self, batch_size: usize) -> Result<Vec<RecordBatch>> {
        self.best
            .chunks(batch_size.max(1))
            .map(|chunk| self.take(chunk))
            .collect()
    }
}

/// Copies the strings of view columns that rows were taken into, so a compacted batch
/// does not keep every buffer its rows came from alive.
fn compact_views(batch: RecordBatch) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Utf8View => Arc::new(c.as_string_view().gc()) as ArrayRef,
            DataType::BinaryView => Arc::new(c.as_binary_view().gc()) as ArrayRef,
            _ => Arc::clone(c),
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, RecordBatch, StringViewArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::datasource::MemTable;
    use datafusion::execution::session_state::SessionStateBuilder;
    use datafusion::prelude::{SessionConfig, SessionContext};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::QuiverQueryPlanner;
    use crate::query::distinct_on::DistinctOnAsLatest;

    /// Two partitions of random rows: text and integer keys (some null), an order column
    /// with nulls, a unique tie-breaker, and a long text payload (view buffers).
    fn table() -> MemTable {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k1", DataType::Utf8View, true),
            Field::new("k2", DataType::Int64, false),
            Field::new("t", DataType::Int64, true),
            Field::new("u", DataType::Int64, false),
            Field::new("payload", DataType::Utf8View, false),
        ]));
        let mut rng = StdRng::seed_from_u64(21);
        let mut partitions = vec![Vec::new(), Vec::new()];
        let mut u = 0i64;
        for b in 0..80 {
            let n = 4_000;
            let k1: Vec<Option<String>> = (0..n)
                .map(|_| {
                    (rng.random_range(0..20) > 0)
                        .then(|| format!("sku-{}", rng.random_range(0..50)))
                })
                .collect();
            let k2: Vec<i64> = (0..n).map(|_| rng.random_range(0..40)).collect();
            let t: Vec<Option<i64>> = (0..n)
                .map(|_| (rng.random_range(0..10) > 0).then(|| rng.random_range(0..1_000)))
                .collect();
            let us: Vec<i64> = (0..n)
                .map(|_| {
                    u += 1;
                    u
                })
                .collect();
            let payload: Vec<String> = us
                .iter()
                .map(|u| format!("a payload longer than twelve bytes #{u}"))
                .collect();
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(StringViewArray::from(k1)),
                    Arc::new(Int64Array::from(k2)),
                    Arc::new(Int64Array::from(t)),
                    Arc::new(Int64Array::from(us)),
                    Arc::new(StringViewArray::from(payload)),
                ],
            )
            .unwrap();
            partitions[b % 2].push(batch);
        }
        MemTable::try_new(schema, partitions).unwrap()
    }

    async fn run(ctx: &SessionContext, sql: &str) -> String {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        pretty_format_batches(&batches).unwrap().to_string()
    }

    fn context(latest: bool) -> SessionContext {
        let config = SessionConfig::new()
            .with_target_partitions(2)
            .with_batch_size(1_000);
        let mut builder = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features();
        if latest {
            builder = builder.with_query_planner(Arc::new(QuiverQueryPlanner));
        }
        let mut state = builder.build();
        if latest {
            state.add_analyzer_rule(Arc::new(DistinctOnAsLatest));
        }
        let ctx = SessionContext::new_with_state(state);
        ctx.register_table("t", Arc::new(table())).unwrap();
        ctx
    }

    /// 320,000 rows in 2,040 keys: far more rows held than keys, so the best rows are
    /// copied out many times on the way. Every answer equals DataFusion's own plan of
    /// the same query.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_latest_row_per_key_equals_datafusions_own_distinct_on() {
        let (ours, theirs) = (context(true), context(false));
        let queries = [
            "SELECT DISTINCT ON (k1, k2) k1, k2, t, u, payload FROM t ORDER BY k1, k2, t DESC, u",
            "SELECT DISTINCT ON (k1, k2) k2, u, payload FROM t ORDER BY k1, k2, t ASC NULLS FIRST, u DESC",
            "SELECT DISTINCT ON (k2) k2, k1, u FROM t ORDER BY k2, u DESC",
            "SELECT DISTINCT ON (k1) k1, u FROM t WHERE k2 < 3 ORDER BY k1 DESC NULLS LAST, t DESC NULLS LAST, u",
            "SELECT COUNT(*), SUM(u) FROM (SELECT DISTINCT ON (k1, k2) u FROM t ORDER BY k1, k2, t DESC, u)",
        ];
        for sql in queries {
            let plan = run(&ours, &format!("EXPLAIN {sql}")).await;
            assert!(plan.contains("LatestPerKeyExec: mode=Final"), "{plan}");
            assert!(plan.contains("LatestPerKeyExec: mode=Partial"), "{plan}");
            assert_eq!(run(&ours, sql).await, run(&theirs, sql).await, "{sql}");
        }
        // Without an ORDER BY any row of a key will do: one row per key.
        let keys = run(
            &ours,
            "SELECT COUNT(*) FROM (SELECT DISTINCT ON (k1, k2) u FROM t)",
        )
        .await;
        let expected = run(
            &theirs,
            "SELECT COUNT(*) FROM (SELECT DISTINCT k1, k2 FROM t)",
        )
        .await;
        assert_eq!(keys, expected);
    }
}
